"""The bytes-moved model (tpmoe.triton.traffic) against the buffers the kernels allocate: the
pair rows of the down and dx launches ([SPLIT, T*K, H], tpmoe.triton.down.pair_dtype) are bf16
for bf16 without a split and fp32 partials with one. The model sized them fp32 always, which
doubled the down write at Qwen3-30B-A3B T = 16384 (1073.74 MB printed, 536.87 MB written)."""
import pytest
import torch

pytest.importorskip("triton", reason="tpmoe.triton.down (the allocation's dtype rule) needs triton")

from tpmoe.triton.down import pair_dtype  # noqa: E402
from tpmoe.triton.traffic import Machine, Problem, configs_for, launch_traffic, problem_for  # noqa: E402


def _bytes_per_element(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_pair_rows_sized_as_allocated(dtype, split):
    problem = Problem(64, 32, 16, 4, 2, element_size=_bytes_per_element(dtype))
    assert problem.pair_element_size(split) == _bytes_per_element(pair_dtype(dtype, split))


@pytest.mark.parametrize("num_tokens", [1, 16384])
def test_qwen3_down_and_dx_pair_rows_written_as_allocated(num_tokens):
    """At decode (T = 1, where the down may split) and T = 16384: the model's pair-row bytes are
    SPLIT x T*K x H elements of the dtype down.py allocates them in, for each launch's config."""
    problem = problem_for("qwen3-30b-a3b", num_tokens)
    configs = configs_for(problem)
    traffic = launch_traffic(problem, configs, Machine())
    pairs = num_tokens * problem.top_k
    for launch, combine in (("down", "combine"), ("dx", "dx_combine")):
        split = configs[launch].SPLIT
        allocated = split * pairs * problem.hidden_size * _bytes_per_element(pair_dtype(torch.bfloat16, split))
        assert traffic[launch].c_written == allocated, (launch, split, traffic[launch].c_written, allocated)
        assert traffic[combine].a_read == allocated, (combine, split, traffic[combine].a_read, allocated)
    if num_tokens == 16384:
        assert traffic["down"].c_written == 16384 * 8 * 2048 * 2  # 536.87 MB: the measured write

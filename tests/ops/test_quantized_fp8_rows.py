"""The fp8 AMX kernel for 5..256 activation rows an expert (csrc/experts_cpu_quantized_amx.h), past
the fused decode kernels (at most 4; past 256 the widened path). Chosen once per process
(TPMOE_CPU_FP8_ROWS = amx | off | auto), so each setting runs in a process of its own: both against
the float64 reference on the dequantized weights, with float32 activations and with bf16-valued
ones (one bf16 part instead of three), and with other bits than each other wherever an expert has
5..256 rows (else the kernel forced did not run)."""
import os
import subprocess
import sys

import pytest
import torch

from support.quantized_cases import assert_bf16_within_the_bf16_rule, fp8_problem
from support.tolerances import FP32_RTOL

# (rows per expert, H, I, layout, gated, activation, bias, block): the row counts around the
# kernel's tiles of 16 rows and its passes of 32, its limit of 256 (257: the widened path), an
# expert with none, all rows on one expert; H and I no multiples of 16 or of the block, so TP
# shards start inside a block.
ROWS_CASES = [
    ((5, 8, 0, 13), 40, 24, "concatenated", True, "silu", False, 16),
    ((16, 17), 36, 300, "interleaved", True, "clamped_swiglu", True, 128),
    ((31, 0, 32, 33), 24, 20, "concatenated", False, "gelu", True, 8),
    ((0, 9), 20, 12, "interleaved", False, "relu2", False, 8),
    ((6, 7, 11), 16, 18, "concatenated", True, "softcapped_swiglu", True, 4),
    ((24,), 40, 40, "interleaved", True, "gelu_tanh", False, 16),
    ((48, 70, 257), 20, 40, "concatenated", True, "silu", True, 16),
]


def rows_problem(case, seed):
    """fp8_problem's weights and x with top-1 routing that gives each expert exactly its count."""
    counts, hidden, inter, layout, gated, activation, bias, block = case
    weights, spec, x, _, _ = fp8_problem((sum(counts), hidden, inter, len(counts), 1, layout, gated, activation, bias,
                                          "random", block), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    ids = experts[torch.randperm(len(experts), generator=generator)].unsqueeze(1)
    return weights, spec, x, ids, torch.rand(len(experts), 1, generator=generator, dtype=torch.float64) + 0.1


_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
import tpmoe.cpu.quantized as native
from ops.test_quantized_fp8_rows import ROWS_CASES, rows_problem
from support.quantized_cases import reference_on_dequantized, with_dtype
from support.tolerances import max_rel_error
from tpmoe.fp8 import shard_fp8_experts
worst, outs = 0.0, []
for case in ROWS_CASES:
    weights, spec, x, ids, w = rows_problem(case, 0)
    for experts in (weights, shard_fp8_experts(weights, layout=spec.layout, gated=spec.gated, rank=1, world_size=3)):
        for x32 in (x.float(), x.bfloat16().float()):
            with torch.no_grad():
                out = native.experts_cpu_quantized(x32, with_dtype(experts, torch.float32), ids, w.float(), spec)
            expected = reference_on_dequantized(with_dtype(experts, torch.float64), spec, x32.double(), ids, w)
            worst = max(worst, max_rel_error(out, expected.detach()))
            outs.append(out)
torch.save(outs, {path!r})
print("worst", worst)
"""


def _run(mode, path):
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TPMOE_CPU_FP8_ROWS=mode, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=tests, path=str(path))], env=env,
                          capture_output=True, text=True, timeout=300)


def test_amx_rows_match_the_reference_and_run_where_forced(tmp_path):
    results = {}
    for mode in ("amx", "off"):
        finished = _run(mode, tmp_path / f"{mode}.pt")
        if finished.returncode != 0 and f"TPMOE_CPU_FP8_ROWS={mode}, but this" in finished.stderr:
            continue  # this CPU (or OS) lacks what the kernel needs
        assert finished.returncode == 0, finished.stderr[-3000:]
        worst = float(finished.stdout.split("worst")[-1])
        assert worst <= FP32_RTOL, f"TPMOE_CPU_FP8_ROWS={mode}: max relative error {worst:.3e} > {FP32_RTOL:.1e}"
        results[mode] = torch.load(tmp_path / f"{mode}.pt")
    assert "off" in results
    if len(results) == 1:
        pytest.skip("this CPU or OS lacks AMX tiles")
    modes = sorted(results)
    for i, first in enumerate(modes):
        for second in modes[i + 1:]:
            for index, (a, b) in enumerate(zip(results[first], results[second])):
                assert not torch.equal(a, b), f"output {index}: the same bits with {first} and {second}"


def test_a_bad_rows_setting_is_an_error(tmp_path):
    bad = _run("sometimes", tmp_path / "bad.pt")
    assert bad.returncode != 0
    assert "TPMOE_CPU_FP8_ROWS: expected amx, off or auto, got 'sometimes'" in bad.stderr


@pytest.mark.parametrize("case", ROWS_CASES[:3], ids=lambda case: f"rows{'-'.join(map(str, case[0]))}")
def test_rows_in_bf16_within_twice_a_bf16_torch_run(case, seed):
    assert_bf16_within_the_bf16_rule(*rows_problem(case, seed))

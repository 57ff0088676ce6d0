"""Determinism: the same inputs give bitwise-equal outputs and gradients, run after run.

Deterministic (tested here):
- the CPU path (a fixed thread count), every dtype, forward and backward;
- the Triton path with TPMOE_TRITON_CONFIG fixed (interpreter here; on a GPU the kernels use no
  atomics: the sum over k, dx and the weight gradients reduce in a fixed order);
- MoEBlock under tensor parallelism at world size 2 on gloo (TP and sequence-parallel modes):
  run after run, and the replicated results (output, router and shared-gate gradients) bitwise
  equal on both ranks.

Not deterministic in the bitwise sense, by design (stated in docs/robustness.md):
- results across token counts: the Triton path picks BLOCK_M from T*K/E (tile_configs.py) unless
  TPMOE_TRITON_CONFIG pins it, and the CPU path's threading="auto" splits work by rows per
  expert, so a token's output may differ in the last bits with the batch it is in;
- results across CPU thread counts: not promised (ATen's GEMMs may split a reduction by thread
  count), though 1 and 2 threads agreed bitwise in the cases tried;
- results across TP world sizes (the all-reduce adds P partial sums; the order changes the
  rounding) and against the one-process block: equal within the dtype tolerance, not bitwise;
- NCCL all-reduce on GPUs may pick another algorithm (ring/tree) with other sizes or topology.
"""
import functools

import pytest
import torch

import tpmoe
from support.dist_utils import SharedSpawns
from support.experts_cases import make_inputs, run_with_grads

REPEATS = 3


def _experts_runs(backend, seed, T, H, I, E, K, layout, activation, dtype):
    """REPEATS runs of the same call: (output, {name: gradient}) each."""
    inputs, grad_out = make_inputs(seed, T, H, I, E, K, layout=layout, gated=True, bias=True, mode="skip_last")
    options = dict(layout=layout, activation=activation)
    call = functools.partial(tpmoe.fused_experts, backend=backend)
    return [run_with_grads(call, inputs, options, grad_out, dtype) for _ in range(REPEATS)]


def _assert_bitwise_equal_runs(runs):
    first_out, first_grads = runs[0]
    for repeat, (out, grads) in enumerate(runs[1:], start=1):
        assert torch.equal(first_out, out), f"output differs between run 0 and run {repeat}"
        for name, grad in first_grads.items():
            assert torch.equal(grad, grads[name]), f"d{name} differs between run 0 and run {repeat}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["concatenated", "gpt_oss"])
def test_cpu_path_is_bitwise_reproducible(dtype, layout, seed):
    threads = torch.get_num_threads()
    runs = _experts_runs("cpu", seed, T=37, H=24, I=10, E=6, K=3, layout=layout, activation="silu", dtype=dtype)
    assert torch.get_num_threads() == threads
    _assert_bitwise_equal_runs(runs)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path_with_a_fixed_config_is_bitwise_reproducible(dtype, seed, monkeypatch):
    monkeypatch.setenv("TPMOE_TRITON_CONFIG", "BLOCK_M=16,BLOCK_N=16,BLOCK_K=16,num_warps=4,num_stages=2")
    runs = _experts_runs("triton", seed, T=11, H=16, I=8, E=4, K=2, layout="interleaved", activation="gelu_tanh",
                         dtype=dtype)
    _assert_bitwise_equal_runs(runs)


def _block_runs(rank, world_size, sequence_parallel):
    import torch.distributed as dist

    from tpmoe.block import MoEBlock
    from tpmoe.distributed import allreduce_router_grads

    config = tpmoe.MoEConfig(hidden_size=12, intermediate_size=10, num_experts=5, top_k=2, renormalize=True,
                             expert_bias=True, shared_intermediate_size=6, shared_expert_gate=True)
    weights = tpmoe.random_moe_weights(config, generator=torch.Generator().manual_seed(0))
    num_tokens = 14
    x_full = torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(1))
    dy_full = torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(2))
    rows = slice(7 * rank, 7 * rank + 7) if sequence_parallel else slice(None)
    runs = []
    for _ in range(REPEATS):
        block = MoEBlock.from_full(config, weights, group=dist.group.WORLD, sequence_parallel=sequence_parallel)
        x = x_full[rows].clone().requires_grad_()
        y = block(x)
        y.backward(dy_full[rows])
        if sequence_parallel:
            allreduce_router_grads(block)
        grads = {name: grad.clone() for name, grad in block.local_grads().items() if grad is not None}
        # Raw bytes: bitwise comparable, and no tensor shared-memory handle outliving this process.
        runs.append({name: t.detach().contiguous().numpy().tobytes() for name, t in
                     {"y": y, "dx": x.grad, **grads}.items()})
    return runs


@pytest.fixture(scope="module")
def spawns():
    """Both modes' ranks in one spawn of 2 (each mode's REPEATS runs compared among themselves)."""
    return SharedSpawns({mode: (2, _block_runs, (mode,)) for mode in (False, True)})


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
def test_tensor_parallel_block_is_bitwise_reproducible(sequence_parallel, spawns):
    per_rank = spawns.results(sequence_parallel)
    for rank, runs in enumerate(per_rank):
        for repeat, run in enumerate(runs[1:], start=1):
            assert run.keys() == runs[0].keys()
            for name in run:
                assert run[name] == runs[0][name], f"rank {rank}: {name} differs in run {repeat}"
    # What is replicated is bitwise equal across the ranks too.
    replicated = ["router_weight", "shared_gate", "b_down"] + ([] if sequence_parallel else ["y", "dx"])
    for name in replicated:
        assert per_rank[0][0][name] == per_rank[1][0][name], f"{name} differs between ranks"

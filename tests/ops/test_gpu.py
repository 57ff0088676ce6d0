"""What only a CUDA GPU can check, beside the suite's CUDA-capable tests (test_triton_*.py):

- the CUDA route kernel (csrc/route_cuda.cu) and the Triton align (tpmoe/triton/align.py, the
  one GPU align) against the CPU ops and the PyTorch twins (tpmoe.routing_torch), for every
  scoring: ids and all `align` metadata bitwise, weights within one rounding (routing_cases.py);
- tpmoe.MoEBlock on CUDA, forward and backward, against tpmoe.reference in float64 at the
  token counts that pick each row-block size of the Triton tables (BLOCK_M 16, 64, 128), so
  that every compiled tile configuration of the forward and backward runs: fp32 within 1e-5
  relative, bf16 within twice the error of a same-dtype PyTorch run (tests/support/tolerances.py);
- the block under torch.compile(fullgraph=True) and CUDA-graph capture, equal to eager;
- NCCL at world size 1 (tensor parallelism over NCCL needs two GPUs).

Every test needs a GPU and skips elsewhere, saying so; `make gpu-check` runs them. A build of
tpmoe._C without nvcc has no CUDA route kernel: CUDA tensors are then routed by the plain-PyTorch
route (tpmoe.routing_torch, through tpmoe._native.use_native_ops), and every test runs on that
path (the block against the reference, torch.compile, CUDA-graph capture, NCCL) except those of
the CUDA route kernel itself, which skip saying why.
"""
import pytest
import torch

from tpmoe import MoEBlock, MoEConfig
from tpmoe.reference import reference_moe_block, reference_route, reference_router_logits
from tpmoe.routing import align, route
from tpmoe.routing_torch import AlignResult, align_torch, route_torch
from support.routing_cases import (LOGIT_DTYPES, SCORING_IDS, SCORINGS, SHAPES, align_cases, applicable,
                                   assert_align_equal, assert_weights_match, masked_and_nan_logits, route_kwargs)
from support.tolerances import FP32_RTOL, assert_fp32_close, assert_within_twice_same_dtype, max_rel_error


def _cuda_kernels_built() -> bool:
    from tpmoe._native import native_available
    return native_available() and torch._C._dispatch_has_kernel_for_dispatch_key("tpmoe::route", "CUDA")


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
# Only for the tests of the CUDA route kernel; the others run on the plain-PyTorch route there.
needs_cuda_kernels = pytest.mark.skipif(
    torch.cuda.is_available() and not _cuda_kernels_built(),
    reason="tests the CUDA route kernel, and tpmoe._C has none (built without nvcc): rebuild with a CUDA "
           "torch and nvcc (TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .)")

# Routing shapes of real models (T, E, K): Qwen3-30B-A3B, DeepSeek-V3, GPT-OSS-20B, Mixtral,
# and many experts (the route kernel keeps a token's scores in shared memory).
MODEL_SHAPES = [(4096, 128, 8), (2048, 256, 8), (1000, 32, 4), (3000, 8, 2), (64, 1024, 8)]


def _to_cuda(kwargs):
    return {name: value.cuda() if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}


def assert_cuda_route_matches(logits, top_k, **kwargs):
    """route() of CUDA logits against the CPU op and the twin, on the same values."""
    weights, ids = route(logits.cuda(), top_k, **_to_cuda(kwargs))
    assert weights.is_cuda and ids.is_cuda
    for name, (expected_weights, expected_ids) in (("CPU op", route(logits, top_k, **kwargs)),
                                                   ("twin", route_torch(logits, top_k, **kwargs))):
        assert ids.dtype == expected_ids.dtype and torch.equal(ids.cpu(), expected_ids), f"ids differ from the {name}"
        assert_weights_match(weights, expected_weights)
    return weights, ids


# ---------------------------------------------------------------------------------------
# The CUDA route kernel and the Triton align on CUDA
# ---------------------------------------------------------------------------------------


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("case", SCORINGS, ids=SCORING_IDS)
def test_cuda_route_matches_cpu_op_and_twin(case, dtype, seed):
    for num_tokens, num_experts, top_k in SHAPES + MODEL_SHAPES:
        if not applicable(case, num_experts, top_k):
            continue
        logits = torch.randn(num_tokens, num_experts).to(dtype)
        assert_cuda_route_matches(logits, top_k, **route_kwargs(case, num_experts))


@needs_cuda_kernels
@pytest.mark.parametrize("case", SCORINGS, ids=SCORING_IDS)
def test_cuda_route_ties_go_to_the_lower_expert(case, seed):
    num_experts, top_k = 16, 4
    logits = torch.cat([torch.randint(-2, 3, (50, num_experts)).float() * 0.5,
                        torch.randn(1, num_experts).expand(6, num_experts), torch.zeros(3, num_experts)])
    kwargs = route_kwargs(case, num_experts)
    if "correction_bias" in kwargs:
        kwargs["correction_bias"] = torch.randint(-1, 2, (num_experts,)).float() * 0.25
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert_cuda_route_matches(logits.to(dtype), top_k, **kwargs)


@needs_cuda_kernels
def test_cuda_route_masked_and_nan_logits(seed):
    logits, rows = masked_and_nan_logits()
    for scoring in ("softmax", "topk_softmax"):
        weights, ids = route(logits.cuda(), 3, scoring=scoring)
        weights_twin, ids_twin = route_torch(logits, 3, scoring=scoring)
        assert torch.equal(ids.cpu(), ids_twin)
        assert_weights_match(weights[rows], weights_twin[rows])


@pytest.mark.parametrize("block_m", [1, 16, 64, 128])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_triton_align_on_cuda_matches_cpu_op_and_twin(block_m, id_dtype):
    """align of CUDA ids runs the Triton kernels: its small (one launch) path up to
    SMALL_MAX_PAIRS pairs, its large (three launches) path past it (the model cases)."""
    generator = torch.Generator().manual_seed(3)
    model_cases = [("qwen3_t16384", torch.stack([torch.randperm(128, generator=generator)[:8]
                                                 for _ in range(16384)]).to(id_dtype), 128),
                   ("mixtral_t8192", torch.randint(0, 8, (8192, 2), generator=generator).to(id_dtype), 8)]
    for name, topk_ids, num_experts in align_cases(id_dtype) + model_cases:
        result = align(topk_ids.cuda(), num_experts, block_m)
        assert all(tensor.is_cuda for tensor in result), name
        assert_align_equal(result, AlignResult(*torch.ops.tpmoe.triton_align(topk_ids.cuda(), num_experts, block_m)),
                           name)
        assert_align_equal(result, align(topk_ids, num_experts, block_m), name)
        assert_align_equal(result, align_torch(topk_ids, num_experts, block_m), name)


def test_cuda_routing_runs_the_path_the_build_has():
    """route() of CUDA logits: the CUDA kernel where tpmoe._C has one, otherwise the plain-PyTorch
    twin (after one warning); either way on the device, with the twin's ids. The tests below then
    run on that path."""
    import warnings

    from tpmoe import _native
    logits = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's one warning, if this process has not given it yet
        native = _native.use_native_ops(torch.device("cuda"))
        weights, ids = route(logits.cuda(), 4)
    assert (native is not None) == _cuda_kernels_built()
    assert weights.is_cuda and ids.is_cuda
    expected_weights, expected_ids = route_torch(logits, 4)
    assert torch.equal(ids.cpu(), expected_ids)
    assert_weights_match(weights, expected_weights)


# ---------------------------------------------------------------------------------------
# The block on CUDA against the float64 reference
# ---------------------------------------------------------------------------------------

# K/E = 1/4 in every case: T = 8, 128, 4096 give 2, 32, 1024 rows per expert, which select
# BLOCK_M = 16, 64, 128 (tpmoe.triton.tile_configs) and so each table's tile configurations.
BLOCK_CASES = {
    "qwen": dict(hidden_size=256, intermediate_size=192, num_experts=8, top_k=2, renormalize=True),
    "gpt_oss": dict(hidden_size=192, intermediate_size=160, num_experts=8, top_k=2, scoring="topk_softmax",
                    router_bias=True, activation="clamped_swiglu", layout="gpt_oss", expert_bias=True,
                    swiglu_limit=1.5),  # a low limit, so that the clamps bite
    "deepseek": dict(hidden_size=128, intermediate_size=96, num_experts=16, top_k=4, scoring="sigmoid_group",
                     renormalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5, correction_bias=True,
                     layout="interleaved", shared_intermediate_size=64),
}
BLOCK_M_FOR_TOKENS = {8: 16, 128: 64, 4096: 128}
# A token whose experts change when its float64 logits move by this much (relative to their
# largest magnitude) is too near a tie: fp32 logits (1e-7 relative) could route it elsewhere
# than the reference, which would make the comparison meaningless. Such tokens are redrawn.
TIE_MARGIN = 1e-4


def make_block(case, dtype, seed):
    # The router in fp32 whatever the expert dtype (as DeepSeek-V3's): bf16 logits would route
    # near-tied tokens differently from the reference.
    config = MoEConfig(**BLOCK_CASES[case], router_dtype=torch.float32)
    return MoEBlock(config, seed=seed % 2**31, dtype=dtype, device="cuda")


def well_routed_tokens(block, num_tokens, generator):
    """[T, H] float64 tokens on the GPU, exact in the block's dtype, whose routing survives a
    TIE_MARGIN perturbation of their logits."""
    config, weights = block.config, {name: w.double() for name, w in block.local_shards().items()}
    kept = []
    while sum(len(rows) for rows in kept) < num_tokens:
        # Rounded to the block's dtype first: the routing the block and the reference see.
        x = torch.randn(2 * num_tokens, config.hidden_size, generator=generator, dtype=torch.float64)
        x = x.to(block.w_gate_up.dtype).double().cuda()
        logits = reference_router_logits(x, weights, config)

        def ids_of(values):
            return reference_route(values, config.top_k, scoring=config.scoring, renormalize=config.renormalize,
                                   correction_bias=weights.get("correction_bias"), n_group=config.n_group,
                                   topk_group=config.topk_group)[1].sort(dim=1).values

        ids = ids_of(logits)
        stable = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(4):
            noise = torch.randn(logits.shape, generator=generator, dtype=torch.float64).cuda()
            shifted = logits + TIE_MARGIN * logits.abs().amax(dim=1, keepdim=True) * noise
            stable &= (ids_of(shifted) == ids).all(dim=1)
        kept.append(x[stable])
    return torch.cat(kept)[:num_tokens]


def run_block(block, x, dy):
    x = x.detach().clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    y = block(x)
    y.backward(dy)
    return y.detach(), {"hidden_states": x.grad, **block.local_grads()}


def run_reference(block, x, dy, dtype):
    """tpmoe.reference on the block's weights in `dtype` (float64: the oracle; the block's
    dtype: the same-dtype PyTorch run the half-precision bound is taken from)."""
    leaves = {name: w.detach().to(dtype).clone().requires_grad_(name != "correction_bias")
              for name, w in block.local_shards().items()}
    x = x.detach().to(dtype).clone().requires_grad_(True)
    y = reference_moe_block(x, leaves, block.config)
    y.backward(dy.to(dtype))
    grads = {name: leaf.grad for name, leaf in leaves.items() if name != "correction_bias"}
    return y.detach(), {"hidden_states": x.grad, **grads}


@pytest.mark.parametrize("num_tokens", sorted(BLOCK_M_FOR_TOKENS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
def test_block_matches_reference(case, dtype, num_tokens, seed):
    from tpmoe.triton import tile_configs

    block = make_block(case, dtype, seed)
    config = block.config
    bucket = tile_configs.token_bucket(num_tokens, config.top_k, config.num_experts)
    assert tile_configs.block_m_for(bucket) == BLOCK_M_FOR_TOKENS[num_tokens], "the case no longer covers its BLOCK_M"
    generator = torch.Generator().manual_seed(seed)
    x64 = well_routed_tokens(block, num_tokens, generator)
    dy64 = torch.randn(num_tokens, config.hidden_size, generator=generator, dtype=torch.float64).cuda()
    x, dy = x64.to(dtype), dy64.to(dtype)

    out, grads = run_block(block, x, dy)
    ref_out, ref_grads = run_reference(block, x, dy, torch.float64)
    assert out.dtype == dtype and set(grads) == set(ref_grads)
    if dtype == torch.float32:
        assert_fp32_close(out, ref_out, "output")
        for name, grad in ref_grads.items():
            assert_fp32_close(grads[name], grad, f"d{name}")
        return
    torch_out, torch_grads = run_reference(block, x, dy, dtype)
    floor = torch.finfo(dtype).eps / 2  # used only where the same-dtype run is exact
    assert_within_twice_same_dtype(out, torch_out, ref_out, "output", floor=floor)
    for name, grad in ref_grads.items():
        assert grads[name].dtype == dtype, name
        assert_within_twice_same_dtype(grads[name], torch_grads[name], grad, f"d{name}", floor=floor)


# ---------------------------------------------------------------------------------------
# torch.compile and CUDA graphs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_compile_fullgraph_equals_eager(dtype, seed):
    """Inductor compiles the block whole; outside the custom ops it runs the router GEMM
    (cuBLAS, as eager) and the sum over k of two fp32 rows (order-free for K = 2), so the output
    must be bitwise equal. The backward's float64 router formula may be reordered by inductor,
    which moves a gradient by at most one rounding of its dtype."""
    block = make_block("qwen", dtype, seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, block.config.hidden_size, generator=generator).to(dtype).cuda()
    dy = torch.randn(64, block.config.hidden_size, generator=generator).to(dtype).cuda()
    eager_out, eager_grads = run_block(block, x, dy)
    compiled = torch.compile(block, fullgraph=True)
    out, grads = run_block(compiled, x, dy)
    assert torch.equal(out, eager_out), f"compiled output differs: max |diff| {(out - eager_out).abs().max():.3e}"
    bound = max(torch.finfo(dtype).eps, FP32_RTOL if dtype == torch.float32 else 0.0)
    for name, grad in eager_grads.items():
        error = max_rel_error(grads[name], grad)
        assert error <= bound, f"d{name}: compiled differs from eager by {error:.3e} > {bound:.1e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_replay_equals_eager(dtype, seed):
    """The forward captured once replays on new tokens, which route to other experts: routing,
    alignment and kernel grids depend on shapes only, so the replay must be bitwise eager."""
    block = make_block("gpt_oss", dtype, seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(48, block.config.hidden_size, generator=generator).to(dtype).cuda() for _ in range(3)]
    static_x = inputs[0].clone()
    with torch.no_grad():
        side = torch.cuda.Stream()  # warm-up (kernel compiles, allocator pools) off the capture stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            block(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = block(static_x)
        routes = []
        for x in inputs[1:]:
            static_x.copy_(x)
            graph.replay()
            eager = block(x)
            torch.cuda.synchronize()
            assert torch.equal(static_y, eager), f"replay differs: max |diff| {(static_y - eager).abs().max():.3e}"
            routes.append(block.route(x)[2])
    assert not torch.equal(routes[0], routes[1]), "the replayed inputs routed alike: the test shows nothing"


def test_nccl_all_reduce_at_world_size_one(tmp_path):
    import torch.distributed as dist
    if not dist.is_nccl_available():
        pytest.fail("this CUDA build of torch has no NCCL")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        values = torch.arange(5.0, device="cuda")
        dist.all_reduce(values)
        torch.cuda.synchronize()
        assert torch.equal(values.cpu(), torch.arange(5.0))
    finally:
        dist.destroy_process_group()


def test_expert_parallel_forward_syncs_the_host_once(tmp_path, seed):
    """docs/design.md: ONE host sync per expert-parallel block forward, the copy of the per-expert
    counts to the host (all_to_all_single takes host split sizes). Counted by torch's sync debug
    mode at EP 1 over NCCL, where the counting, the copy and the local ids run as at any EP size
    (only the all-to-alls of a group of one are skipped); the output equals the one-process block's.
    tests/distributed/test_expert_parallel_forward_checks.py counts the same at EP 2 on CPU."""
    import warnings

    import torch.distributed as dist
    if not dist.is_nccl_available():
        pytest.fail("this CUDA build of torch has no NCCL")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        config = MoEConfig(**BLOCK_CASES["deepseek"])
        block = MoEBlock(config, ep_group=dist.group.WORLD, seed=seed % 2**31, device="cuda")
        one_process = MoEBlock(config, seed=seed % 2**31, device="cuda")
        x = torch.randn(48, config.hidden_size, device="cuda")
        with torch.no_grad():
            block(x)  # warm-up: kernel compiles and allocator pools are set up once, not per forward
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    y = block(x)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            expected = one_process(x)
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, f"expected ONE synchronizing CUDA call per EP forward, got {len(syncs)}: {syncs}"
        assert block.expert_parallel and block.ep_size == 1
        assert_fp32_close(y, expected)
    finally:
        dist.destroy_process_group()

"""The Triton align (tpmoe/triton/align.py, the GPU's align) against the plain-PyTorch twin and the
CPU op, bit for bit on all seven AlignResult fields, on both of its paths; its launches per path;
that it and `route_torch` never read the device from the host; the device guard of the Triton ops.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py), on small shapes; on a GPU, compiled.
"""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.triton  # skipped where the kernels cannot run (conftest.py)

import tpmoe  # noqa: E402
import tpmoe.routing  # noqa: E402
import tpmoe.triton.ops as triton_ops  # noqa: E402
from tpmoe._native import native_available  # noqa: E402
from tpmoe.routing_torch import AlignResult, align_torch, route_torch  # noqa: E402
from tpmoe.triton import align as triton_align  # noqa: E402
from support.launch_counting import HostSyncError, HostSyncGuard, LaunchCounter, run_as_on_a_gpu  # noqa: E402
from support.routing_cases import (SCORINGS, SCORING_IDS, assert_align_equal, brute_force_align,  # noqa: E402
                                   route_kwargs)
from support.triton_problems import DEVICE  # noqa: E402

from support import ROOT  # noqa: E402
# The large path forced on small inputs: every T*K > 0 takes it, in chunks of 16 pairs (several
# chunks from T*K = 17 on, chunk boundaries inside an expert's run of pairs).
LARGE = dict(small_max_pairs=0, chunk_pairs=16)
PATHS = {"small": {}, "large": LARGE}


def _path(name, pairs):
    """The keyword arguments of a path; past 64 pairs the large path's chunks are 256 pairs (still
    several chunks; the interpreter runs each program in turn)."""
    if name == "large" and pairs > 64:
        return dict(LARGE, chunk_pairs=256)
    return PATHS[name]


def _ids(num_tokens, top_k, num_experts, generator, dtype, spread="random"):
    if spread == "one_expert":
        return torch.full((num_tokens, top_k), num_experts - 1, dtype=dtype)
    if spread == "half_the_experts":  # the odd experts get no pair
        return (2 * torch.randint(0, (num_experts + 1) // 2, (num_tokens, top_k), generator=generator)).to(dtype)
    return torch.randint(0, num_experts, (num_tokens, top_k), generator=generator).to(dtype)


def _expected(topk_ids, num_experts, block_m):
    """The twin's result, after checking that the CPU op (where built) gives the same, and, on
    small inputs, the loop-by-loop construction of tests/ops/test_routing_ops.py."""
    twin = align_torch(topk_ids, num_experts, block_m)
    if topk_ids.numel() <= 64:
        assert_align_equal(twin, brute_force_align(topk_ids, num_experts, block_m), "twin vs brute force")
    if native_available():
        assert_align_equal(AlignResult(*torch.ops.tpmoe.align(topk_ids, num_experts, block_m)), twin, "CPU op vs twin")
    return twin


def _check(topk_ids, num_experts, block_m, case, **path):
    got = AlignResult(*triton_align.align_triton(topk_ids.to(DEVICE), num_experts, block_m, **path))
    assert_align_equal(got, _expected(topk_ids, num_experts, block_m), case)


# (T, K, E): every T of {0, 1, 2, 7, 61, 257}, K of {1, 2, 8}, E of {1, 3, 8, 128}; K > E repeats experts
# within a token, which align accepts (route never gives it, a caller's ids may). 61 x 8 rather than
# 257 x 8: the interpreter's tl.sort takes half a minute for 2056 keys; the large path is run past
# SMALL_MAX_PAIRS by test_qwen3_decode_and_a_small_prefill.
SHAPES = [(0, 2, 8), (1, 1, 1), (1, 8, 128), (2, 2, 3), (2, 8, 8), (7, 1, 128), (7, 2, 3), (7, 8, 1),
          (257, 1, 8), (257, 2, 128), (61, 8, 3)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_K{}_E{}".format(*s))
def test_matches_twin_and_cpu_op(shape, path, seed):
    num_tokens, top_k, num_experts = shape
    generator = torch.Generator().manual_seed(seed)
    combos = [(block_m, dtype) for block_m in (1, 16, 64) for dtype in (torch.int32, torch.int64)]
    if num_tokens * top_k > 512:
        # The interpreter sorts 2**12 keys in about 20 s: two of the combinations there.
        combos = [(1, torch.int32), (64, torch.int64)]
    for block_m, dtype in combos:
        topk_ids = _ids(num_tokens, top_k, num_experts, generator, dtype)
        _check(topk_ids, num_experts, block_m, f"{shape} block_m={block_m} {dtype}", **_path(path, topk_ids.numel()))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spread", ["one_expert", "half_the_experts"])
def test_all_on_one_expert_and_experts_without_pairs(spread, path, seed):
    generator = torch.Generator().manual_seed(seed)
    for num_tokens, top_k, num_experts in ((37, 2, 8), (5, 8, 128), (1, 1, 3)):
        for block_m in (1, 16, 64):
            topk_ids = _ids(num_tokens, top_k, num_experts, generator, torch.int64, spread)
            _check(topk_ids, num_experts, block_m, f"{spread} T={num_tokens} E={num_experts} block_m={block_m}",
                   **PATHS[path])


@pytest.mark.parametrize("path", PATHS)
def test_experts_in_several_blocks(path, monkeypatch, seed):
    """More experts than one step of the loops over experts holds (MAX_BLOCK_E shrunk to 4): the
    carries between expert blocks (offsets, padded offsets, each chunk's starts)."""
    monkeypatch.setattr(triton_align, "MAX_BLOCK_E", 4)
    generator = torch.Generator().manual_seed(seed)
    for num_experts, block_m in ((13, 1), (13, 16), (8, 3), (5, 64)):
        topk_ids = _ids(23, 3, num_experts, generator, torch.int32)
        _check(topk_ids, num_experts, block_m, f"E={num_experts} block_m={block_m}", **PATHS[path])


def test_qwen3_decode_and_a_small_prefill(seed):
    """Qwen3-30B-A3B's routing (E = 128, K = 8, distinct experts per token) at decode sizes, and past
    SMALL_MAX_PAIRS on the large path with its default chunks (interpreted: one size only)."""
    generator = torch.Generator().manual_seed(seed)
    for num_tokens in (1, 3, 64):
        topk_ids = torch.stack([torch.randperm(128, generator=generator)[:8] for _ in range(num_tokens)])
        for block_m in (16, 64):
            _check(topk_ids, 128, block_m, f"T={num_tokens} block_m={block_m}")
    num_tokens = triton_align.SMALL_MAX_PAIRS // 8 + 3
    topk_ids = torch.stack([torch.randperm(128, generator=generator)[:8] for _ in range(num_tokens)])
    assert triton_align.align_launches(topk_ids.numel()) == 3
    _check(topk_ids, 128, 64, f"T={num_tokens} (large path, default chunks)")


def test_the_public_align_runs_the_triton_op_where_routing_says(monkeypatch, seed):
    """tpmoe.align on the tensors the Triton align is chosen for (CUDA; CPU here, switched on as the
    launch-count test does) goes through torch.ops.tpmoe.triton_align, its checks first."""
    run_as_on_a_gpu(monkeypatch)
    topk_ids = _ids(9, 2, 6, torch.Generator().manual_seed(seed), torch.int64).to(DEVICE)
    with LaunchCounter() as counter:
        result = tpmoe.align(topk_ids, 6, 16)
    assert counter.launches == ["triton:align_small_kernel"], counter.breakdown()
    assert_align_equal(result, _expected(topk_ids.cpu(), 6, 16))
    with pytest.raises(ValueError, match=r"block_m: expected an int >= 1, got 0"):
        tpmoe.align(topk_ids, 6, 0)


# ---------------------------------------------------------------------------------------
# Launches per path, and no host reads
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens, path, kernels", [
    (1, {}, ["align_small_kernel"]),
    (0, {}, ["align_small_kernel"]),
    (0, LARGE, ["align_small_kernel"]),  # nothing to chunk: the one launch
    (7, LARGE, ["align_count_kernel", "align_scan_kernel", "align_scatter_kernel"]),
])
def test_launches_per_path(num_tokens, path, kernels, seed):
    """The kernels are all a call launches: no fill, copy or cast around them (the outputs come
    from torch.empty, the ids are read in place)."""
    for dtype in (torch.int32, torch.int64):
        topk_ids = _ids(num_tokens, 8, 128, torch.Generator().manual_seed(seed), dtype).to(DEVICE)
        with LaunchCounter() as counter:
            triton_ops.align(topk_ids, 128, 16) if not path else triton_align.align_triton(topk_ids, 128, 16, **path)
        assert counter.launches == [f"triton:{name}" for name in kernels], counter.breakdown()
        assert triton_align.align_launches(topk_ids.numel(), **({"small_max_pairs": 0} if path else {})) == len(kernels)


@pytest.mark.parametrize("case", SCORINGS, ids=SCORING_IDS)
def test_route_torch_and_the_triton_align_never_read_the_device(case, seed):
    """What a GPU without tpmoe._C's CUDA kernels runs (route_torch, then the Triton align), under a
    dispatch mode that fails at the first host read of tensor data."""
    generator = torch.Generator().manual_seed(seed)
    num_experts, top_k = 16, 4
    kwargs = route_kwargs(case, num_experts)
    logits = torch.randn(5, num_experts, generator=generator)
    with HostSyncGuard():
        topk_weights, topk_ids = route_torch(logits, top_k, **kwargs)
        result = triton_ops.align(topk_ids, num_experts, 16)
        large = triton_align.align_triton(topk_ids, num_experts, 16, **LARGE)
    assert_align_equal(result, align_torch(topk_ids, num_experts, 16))
    assert_align_equal(large, result)


def test_the_sync_guard_catches_host_reads():
    """The guard itself: .item(), bool(), .tolist() and a data-dependent shape each fail."""
    values = torch.arange(4)
    for read in (lambda: values.sum().item(), lambda: bool(values[1]), lambda: values.tolist(),
                 lambda: values.nonzero(), lambda: values[values > 1]):
        with pytest.raises(HostSyncError):
            with HostSyncGuard():
                read()


# ---------------------------------------------------------------------------------------
# The device guard of the Triton ops
# ---------------------------------------------------------------------------------------


def test_device_guard_is_a_no_op_on_cpu(monkeypatch, seed):
    def no_cuda(device):
        raise AssertionError(f"torch.cuda.device({device}) selected for CPU tensors")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    topk_ids = _ids(3, 2, 4, torch.Generator().manual_seed(seed), torch.int64)
    assert_align_equal(triton_ops.align(topk_ids, 4, 1), align_torch(topk_ids, 4, 1))


def test_device_guard_selects_the_tensors_device(monkeypatch):
    """With a fake tensor on cuda:1 (no GPU needed), the guard makes cuda:1 current around the launcher."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    selected = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            selected.append(("enter", self.device))

        def __exit__(self, *exc):
            selected.append(("exit", self.device))

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with FakeTensorMode():
        on_gpu1 = torch.empty(4, device="cuda:1")
    launched = triton_ops.on_tensor_device(lambda *args, **kwargs: selected.append(("launch", None)))
    launched(3, None, on_gpu1, flag=True)
    assert selected == [("enter", torch.device("cuda", 1)), ("launch", None), ("exit", torch.device("cuda", 1))]
    assert triton_ops.launch_device([None, 2, on_gpu1]) == torch.device("cuda", 1)


def test_every_triton_op_runs_under_the_guard(monkeypatch, seed):
    """A forward and backward through the Triton path, and an align: every launcher passes the guard."""
    guarded = []
    real_guard = triton_ops.device_guard
    monkeypatch.setattr(triton_ops, "device_guard", lambda device: guarded.append(device) or real_guard(device))
    run_as_on_a_gpu(monkeypatch)
    generator = torch.Generator().manual_seed(seed)
    num_tokens, hidden, inter, num_experts, top_k = 3, 16, 8, 4, 2
    x = torch.randn(num_tokens, hidden, generator=generator, requires_grad=True)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=generator, requires_grad=True)
    w_down = torch.randn(num_experts, hidden, inter, generator=generator, requires_grad=True)
    topk_ids = _ids(num_tokens, top_k, num_experts, generator, torch.int64)
    topk_weights = torch.rand(num_tokens, top_k, generator=generator, requires_grad=True)
    calls = []
    for op in ("gate_up", "grouped_scatter", "combine", "backward_dh", "backward_dw", "align"):
        original = getattr(triton_ops, f"_{op}" if op != "align" else "_align_triton")
        monkeypatch.setattr(triton_ops, f"_{op}" if op != "align" else "_align_triton",
                            lambda *a, _op=op, _f=original, **k: calls.append((_op, len(guarded))) or _f(*a, **k))
    y = tpmoe.fused_experts(x.to(DEVICE), w_gate_up.to(DEVICE), w_down.to(DEVICE), topk_ids.to(DEVICE),
                            topk_weights.to(DEVICE), backend="triton")
    y.sum().backward()
    assert {op for op, _ in calls} == {"gate_up", "grouped_scatter", "combine", "backward_dh", "backward_dw", "align"}
    # Each launcher ran after its op's guard was entered (one guard per op call, none skipped).
    assert [count for _, count in calls] == list(range(1, len(calls) + 1)), calls
    assert all(device.type == DEVICE for device in guarded)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (ids on cuda:1 while cuda:0 is current)")
def test_align_on_the_second_gpu(seed):
    topk_ids = _ids(300, 8, 128, torch.Generator().manual_seed(seed), torch.int64)
    with torch.cuda.device(0):
        for path in PATHS.values():
            result = AlignResult(*triton_align.align_triton(topk_ids.to("cuda:1"), 128, 64, **path)) if path else \
                tpmoe.align(topk_ids.to("cuda:1"), 128, 64)
            assert all(tensor.device == torch.device("cuda", 1) for tensor in result)
            torch.cuda.synchronize(1)
            assert_align_equal(result, _expected(topk_ids, 128, 64))


# ---------------------------------------------------------------------------------------
# Compiled for sm_90 without a GPU
# ---------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import json, sys, torch, triton
from tpmoe.triton import align, aot
rows = []
for name, shape, block_m, path in json.loads(sys.argv[1]):
    num_tokens, top_k, num_experts = shape
    calls = []
    saved = {}
    for kernel in ("align_small_kernel", "align_count_kernel", "align_scan_kernel", "align_scatter_kernel"):
        saved[kernel] = getattr(align, kernel)
        setattr(align, kernel, aot._Recorder(calls, kernel))
    align.require_runnable = lambda kernel, device: None
    ids = torch.randint(0, num_experts, (num_tokens, top_k))
    align.align_triton(ids, num_experts, block_m, **path)
    for kernel, value in saved.items():
        setattr(align, kernel, value)
    for kernel, args, kwargs in calls:  # the recorder keeps each launch's kernel name
        aot.KERNEL_MODULES[kernel] = (align, kernel)
        launch = aot.Launch(kernel, name, "-", "int64", intermediate=0, config=None, args=args, kwargs=kwargs)
        compiled = aot.compile_launch(launch, 90)
        rows.append(dict(kernel=kernel, case=name, shared=compiled.metadata.shared,
                         **aot.ptxas_usage(compiled.asm["ptx"])))
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    """Each kernel as a real launch specialises it (tpmoe.triton.aot's recorder and compile), at
    decode and prefill sizes: registers within the limit, no spill."""
    import json

    cases = [("decode_qwen3", (1, 8, 128), 16, {}), ("small_deepseek", (512, 8, 256), 64, {}),
             ("small_e1024", (64, 8, 1024), 128, {}), ("large_qwen3", (8192, 8, 128), 64, {"small_max_pairs": 0})]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 6, rows
    for row in rows:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row

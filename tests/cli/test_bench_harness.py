"""The benchmark harness shared by `tpmoe bench` and benchmarks/*.py: peak memory counts each
allocation once (nested op events carry their children's memory too), interleaved timing gives
every implementation the same number of samples, in alternating order, the tables come out in
either style from one formatter, and the yardsticks do the work they stand for."""
import pytest
import torch

from tpmoe import MoEConfig
from tpmoe.cli.report import format_table
from tpmoe.cli.timing import peak_memory_bytes, time_call, time_calls_interleaved
from tpmoe.cli.workload import (ceiling_dtype, dense_step, expert_gemms_step, random_routing, routed_expert_flops,
                                touched_bytes, weight_read_step)


def test_peak_memory_counts_nested_allocations_once():
    size = 1 << 20

    def allocate():
        # randn allocates through a nested aten::empty; the kept tensor and a freed temporary.
        kept = torch.randn(size)  # 4 MiB, alive at the peak
        temporary = torch.empty(size // 2)  # 2 MiB, freed before the next one
        del temporary
        other = torch.empty(size // 4)  # 1 MiB
        return kept, other

    peak = peak_memory_bytes(allocate)
    assert peak == 4 * size + 2 * size, peak


def test_interleaved_timing_samples_every_call_alike():
    order = []
    calls = {name: (lambda n: lambda: order.append(n))(name) for name in ("a", "b", "c")}
    results = time_calls_interleaved(calls, warmup=1, repeats=4)
    assert order[:3] == ["a", "b", "c"]  # warm-up
    assert order[3:] == ["a", "b", "c", "c", "b", "a"] * 2
    assert all(result.repeats == 4 and len(result.samples_s) == 4 for result in results.values())
    assert all(result.min_s <= result.median_s for result in results.values())


def test_short_calls_get_more_repeats_up_to_ten_times():
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=0, repeats=3, min_time_s=60.0)
    assert timing.repeats == 30 and len(calls) == 30
    assert timing.median_ms == timing.median_s * 1e3


def test_one_formatter_for_text_and_markdown():
    rows = [dict(impl="tpmoe", ms=1.23456, note=None), dict(impl="dense", ms=12.5, note="x")]
    text = format_table(rows, ["impl", "ms", "note"], {"ms": ".2f"}, {"ms": "time"})
    assert text.splitlines() == ["impl   time   note", "-----  -----  ----", "tpmoe   1.23  -", "dense  12.50  x"]
    markdown = format_table(rows, ["impl", "ms", "note"], {"ms": ".2f"}, {"ms": "time"}, markdown=True)
    assert markdown.splitlines() == ["| impl  | time  | note |", "|-------|------:|------|", "| tpmoe |  1.23 | -    |",
                                     "| dense | 12.50 | x    |"]


def test_routing_and_yardsticks():
    config = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=6, top_k=2)
    ids, weights = random_routing(config, 9, generator=torch.Generator().manual_seed(0))
    assert ids.shape == weights.shape == (9, 2) and ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert all(len(set(row)) == 2 for row in ids.tolist())  # K distinct experts per token
    torch.testing.assert_close(weights.sum(-1), torch.ones(9))  # renormalised
    touched = torch.unique(ids).numel()
    w_gate_up, w_down = torch.randn(6, 16, 16), torch.randn(6, 16, 8)
    assert touched_bytes(ids, w_gate_up, w_down) == touched * (16 * 16 + 16 * 8) * 4
    sums = weight_read_step(ids, [w_gate_up, w_down], "fwd")()
    assert [s.item() for s in sums] == [w_gate_up[:touched].sum().item(), w_down[:touched].sum().item()]
    flops = routed_expert_flops(config, 9)
    assert flops == 2 * 9 * 2 * 16 * 3 * 8
    product = dense_step(config, 9, flops, "fwd", torch.float32, "cpu")()
    assert 2 * product.shape[0] * 16 * product.shape[1] == flops  # the same FLOPs: [T*K, H] x [H, 3I]


def test_dense_ceiling_is_the_faster_of_the_half_dtype_and_float32():
    # Where bf16 is emulated (AVX2-only CPUs) the float32 GEMM is the ceiling an implementation
    # can reach by widening; float32 data never changes dtype.
    config = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=6, top_k=2)
    assert ceiling_dtype(torch.float32) == torch.float32
    chosen = ceiling_dtype(torch.bfloat16)
    assert chosen in (torch.bfloat16, torch.float32)
    flops = routed_expert_flops(config, 9)
    for mode in ("fwd", "train"):
        step = dense_step(config, 9, flops, mode, torch.bfloat16, "cpu")
        assert step.dtype == chosen
    product = dense_step(config, 9, flops, "fwd", torch.bfloat16, "cpu")()
    assert product.dtype == chosen and 2 * product.shape[0] * 16 * product.shape[1] == flops


@pytest.mark.parametrize("gated", [True, False])
def test_expert_gemms_yardstick_runs_the_routed_experts_flops_at_their_row_counts(gated):
    from torch.utils.flop_counter import FlopCounterMode
    config = MoEConfig(hidden_size=16, intermediate_size=12, num_experts=7, top_k=2,
                       activation="silu" if gated else "gelu", gated=gated)
    ids, _ = random_routing(config, 11, generator=torch.Generator().manual_seed(1))
    ids[:3] = torch.tensor([0, 1])  # expert 0 and 1 busier, some experts likely idle
    for mode, factor in (("fwd", 1), ("train", 3)):
        step = expert_gemms_step(config, ids, mode)
        with FlopCounterMode(display=False) as counter:
            step()
        assert counter.get_total_flops() == factor * routed_expert_flops(config, 11), mode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default:
                self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
            return func(*args, **(kwargs or {}))

    with Products() as products:
        expert_gemms_step(config, ids, "fwd")()
    counts = [n for n in torch.bincount(ids.flatten(), minlength=7).tolist() if n]
    rows = 2 * 12 if gated else 12
    assert products.shapes == [shape for n in counts for shape in (((n, 16), (16, rows)), ((n, 12), (12, 16)))]

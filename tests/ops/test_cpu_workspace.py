"""The scratch buffer the native CPU forward keeps between calls (csrc/experts_cpu_workspace.cpp):
reusing it changes no result, a kept buffer never aliases what a call returns or saves for
its backward, concurrent calls stay correct, and release_workspace frees it."""
import threading

import pytest
import torch

from tpmoe._native import native_available
from tpmoe.cpu import fused_experts_cpu, release_workspace
from tpmoe.reference import reference_experts

from support.experts_cases import cast, make_inputs, run_with_grads
from support.tolerances import assert_fp32_close

pytestmark = pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built")

OPTIONS = dict(activation="silu", layout="concatenated", gated=True, alpha=1.702, limit=7.0)


def make_call(seed, num_tokens, dtype=torch.float32):
    inputs, _ = make_inputs(seed, num_tokens, 24, 19, 5, 2, layout="concatenated", gated=True, bias=True)
    args = cast(inputs, dtype)
    return args, args.pop("topk_ids")


def run(args, topk_ids, threading_mode="experts"):
    with torch.no_grad():
        return fused_experts_cpu(args["hidden_states"], args["w_gate_up"], args["w_down"], topk_ids,
                                 args["topk_weights"], b_gate_up=args["b_gate_up"], b_down=args["b_down"],
                                 threading=threading_mode, **OPTIONS)


def reference(args, topk_ids):
    doubled = cast(args, torch.float64)
    return reference_experts(doubled["hidden_states"], doubled["w_gate_up"], doubled["w_down"], topk_ids,
                             doubled["topk_weights"], b_gate_up=doubled["b_gate_up"], b_down=doubled["b_down"],
                             **OPTIONS)


@pytest.mark.parametrize("threading_mode", ["experts", "gemm"])
def test_reused_workspace_changes_no_result(threading_mode, seed):
    small, small_ids = make_call(seed, 7)
    large, large_ids = make_call(seed + 1, 53)
    release_workspace()
    small_fresh = run(small, small_ids, threading_mode)
    release_workspace()
    large_fresh = run(large, large_ids, threading_mode)
    # The large call's buffer is kept: the small call runs in part of it, then the large again.
    assert torch.equal(run(small, small_ids, threading_mode), small_fresh)
    assert torch.equal(run(large, large_ids, threading_mode), large_fresh)
    assert_fp32_close(large_fresh, reference(large, large_ids), "output")


def test_release_reports_the_kept_bytes_then_nothing(seed):
    args, topk_ids = make_call(seed, 11)
    release_workspace()
    run(args, topk_ids)
    # 11 * 2 rows of x (24 + 32 padding), h (19 + 32) and gate_up (38), float32, 64-byte aligned.
    expected = sum((22 * cols * 4 + 63) // 64 * 64 for cols in (24 + 32, 19 + 32, 38))
    assert release_workspace() == expected
    assert release_workspace() == 0


def test_outputs_and_saved_gate_up_do_not_alias_the_kept_buffer(seed):
    first, first_ids = make_call(seed, 29)
    second, second_ids = make_call(seed + 1, 23)  # smaller: it fits in (and reuses) the kept buffer
    leaves = {name: value.clone().requires_grad_(True) for name, value in first.items()}
    out = fused_experts_cpu(leaves["hidden_states"], leaves["w_gate_up"], leaves["w_down"], first_ids,
                            leaves["topk_weights"], b_gate_up=leaves["b_gate_up"], b_down=leaves["b_down"],
                            threading="experts", **OPTIONS)
    kept_out = out.detach().clone()
    run(second, second_ids)  # reuses (and overwrites) the kept scratch between forward and backward
    assert torch.equal(out.detach(), kept_out)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(grad_out)

    ref_out, ref_grads = run_with_grads(reference_experts, dict(first, topk_ids=first_ids), OPTIONS, grad_out,
                                        torch.float64)
    assert_fp32_close(kept_out, ref_out, "output")
    for name, leaf in leaves.items():
        assert_fp32_close(leaf.grad, ref_grads[name], f"d{name}")


def test_concurrent_calls_each_get_their_own_scratch(seed):
    calls = [make_call(seed + index, 17 + 6 * index) for index in range(4)]
    expected = [run(args, topk_ids) for args, topk_ids in calls]
    results = [None] * len(calls)

    def worker(index):
        for _ in range(5):
            results[index] = run(*calls[index])

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    for result, want in zip(results, expected):
        assert torch.equal(result, want)

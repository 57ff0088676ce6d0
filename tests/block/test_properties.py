"""Property-based tests (hypothesis) against tpmoe.reference, over T, H, I, E, K, dtype, layout,
activation, gating, biases, shared expert and TP world size.

- fused_experts, CPU path: output and every gradient vs the float64 reference (fp32 and fp64:
  1e-5 relative); bf16: the output within 2x the error of the same-dtype reference run.
- fused_experts, Triton path under the interpreter: the same on small shapes, fewer examples.
- The block at world size P in ONE process: shard_moe_weights for every rank, each rank's
  partial output computed by MoEBlock's own methods (route, _partial_output, _routed_down_bias)
  on that rank's shards, summed as the all-reduce would; output and the gradient of the input and
  of every full weight (shard gradients reassembled with assemble_full) vs reference_moe_block.
  float64, so that routing near-ties cannot pick other experts than the reference.
- A few real gloo spawns at world size 3 on configs drawn from the same space.

Examples are few and derandomized (`derandomize=True`): the run is reproducible and bounded.
"""
import random
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tpmoe
from support.dist_utils import run_distributed
from support.tolerances import assert_fp32_close, assert_within_twice_same_dtype
from tpmoe.block import MoEBlock
from tpmoe.config import ACTIVATIONS, GATED_ONLY_ACTIVATIONS
from tpmoe.reference import reference_experts, reference_moe_block
from tpmoe.sharding import SHARDED_NAMES, assemble_full, shard_moe_weights, shard_sizes

# bf16 floor of the 2x-same-dtype bound: on shapes this small the same-dtype run's max error is
# one or two samples, not a statistic, and may happen to be near zero; the path rounds a value to
# bf16 at most 4 times in sequence (gate_up, h, the expert output, y; the same for the gradients),
# each within one unit roundoff (2**-8) of it.
BF16_FLOOR = 4 * 2.0 ** -8
GRAD_NAMES = ("hidden_states", "w_gate_up", "w_down", "topk_weights", "b_gate_up", "b_down")


def _settings(max_examples):
    return settings(deadline=None, max_examples=max_examples, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def experts_cases(draw, max_tokens=9, max_hidden=12, max_intermediate=6, max_experts=6):
    activation = draw(st.sampled_from(ACTIVATIONS))
    gated = True if activation in GATED_ONLY_ACTIVATIONS else draw(st.booleans())
    num_experts = draw(st.integers(1, max_experts))
    return dict(
        T=draw(st.integers(1, max_tokens)), H=draw(st.integers(1, max_hidden)),
        I=draw(st.integers(1, max_intermediate)), E=num_experts, K=draw(st.integers(1, min(num_experts, 3))),
        layout=draw(st.sampled_from(["concatenated", "interleaved", "gpt_oss"])), activation=activation,
        gated=gated, bias=draw(st.booleans()), routing=draw(st.sampled_from(["random", "one_expert"])),
        seed=draw(st.integers(0, 2**16)))


def _experts_inputs(case):
    """float64 leaves; ids with distinct experts per token (or every token's first on expert 0)."""
    generator = torch.Generator().manual_seed(case["seed"])
    T, H, I, E, K = case["T"], case["H"], case["I"], case["E"], case["K"]
    rows = (2 if case["gated"] else 1) * I
    w_gate_up = torch.randn(E, rows, H, generator=generator, dtype=torch.float64) / H ** 0.5
    w_down = torch.randn(E, H, I, generator=generator, dtype=torch.float64) / I ** 0.5
    if case["layout"] == "gpt_oss":
        w_gate_up, w_down = w_gate_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()
    scores = torch.rand(T, E, generator=generator)
    if case["routing"] == "one_expert":
        scores[:, 0] = 2.0
    inputs = dict(hidden_states=torch.randn(T, H, generator=generator, dtype=torch.float64) * 2,
                  w_gate_up=w_gate_up, w_down=w_down, topk_ids=scores.topk(K, dim=1).indices,
                  topk_weights=torch.rand(T, K, generator=generator, dtype=torch.float64) + 0.1,
                  grad_output=torch.randn(T, H, generator=generator, dtype=torch.float64))
    if case["bias"]:
        inputs["b_gate_up"] = torch.randn(E, rows, generator=generator, dtype=torch.float64) / 4
        inputs["b_down"] = torch.randn(E, H, generator=generator, dtype=torch.float64) / 4
    return inputs


def _experts_run(run, inputs, case, dtype):
    """(output, {name: grad}) of one fused-experts implementation on inputs cast to dtype."""
    leaves = {n: inputs[n].detach().to(dtype).requires_grad_() for n in GRAD_NAMES if n in inputs}
    leaves["topk_weights"] = inputs["topk_weights"].detach().to(
        torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    y = run(leaves["hidden_states"], leaves["w_gate_up"], leaves["w_down"], inputs["topk_ids"],
            leaves["topk_weights"], activation=case["activation"], layout=case["layout"], gated=case["gated"],
            b_gate_up=leaves.get("b_gate_up"), b_down=leaves.get("b_down"))
    y.backward(inputs["grad_output"].to(dtype))
    return y.detach(), {n: t.grad for n, t in leaves.items()}


def _check_experts(backend, case, dtype):
    inputs = _experts_inputs(case)

    def ours(*args, **kwargs):
        return tpmoe.fused_experts(*args, backend=backend, **kwargs)

    y, grads = _experts_run(ours, inputs, case, dtype)
    y64, grads64 = _experts_run(reference_experts, inputs, case, torch.float64)
    if dtype in (torch.float32, torch.float64):
        assert_fp32_close(y, y64, "output")
        for name in grads:
            assert_fp32_close(grads[name], grads64[name], f"d{name}")
        return
    # bf16: the output only. The gradients' 2x rule holds on the fixed, larger shapes of
    # test_fused_experts_cpu.py / test_triton_fused.py; on these tiny ones (a handful of terms
    # with cancellation) a scan of 300 random cases found 5 gradients at 2.4x-4.1x the
    # same-dtype error (reported in docs/robustness.md), so they are not asserted here.
    y_same, _ = _experts_run(reference_experts, inputs, case, dtype)
    assert_within_twice_same_dtype(y, y_same, y64, "output", floor=BF16_FLOOR)


@_settings(max_examples=300)
@given(case=experts_cases(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_cpu_path_matches_the_reference(case, dtype):
    _check_experts("cpu", case, dtype)


@pytest.mark.triton
@_settings(max_examples=25)
@given(case=experts_cases(max_tokens=6, max_hidden=8, max_intermediate=4, max_experts=4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_triton_path_matches_the_reference(case, dtype):
    _check_experts("triton", case, dtype)


# ------------------------------------------------------------------------- world size, one process

# Below this a float64 gradient of O(1) inputs is rounding noise of a mathematically zero value
# (e.g. the router gradient with top_k=1 renormalised: every weight is p / p = 1).
FLOAT64_ZERO = 1e-12


def _assert_close_or_both_zero(actual, reference, name):
    if reference.abs().max().item() <= FLOAT64_ZERO:
        assert actual.abs().max().item() <= FLOAT64_ZERO, f"{name}: {actual.abs().max().item():.3e}, expected ~0"
        return
    assert_fp32_close(actual, reference, name)


@st.composite
def block_configs(draw):
    activation = draw(st.sampled_from(["silu", "gelu", "relu", "clamped_swiglu", "relu2", "softcapped_swiglu"]))
    gated = True if activation in GATED_ONLY_ACTIVATIONS else draw(st.booleans())
    num_experts = draw(st.sampled_from([1, 2, 3, 4, 6]))
    scoring = draw(st.sampled_from(["softmax", "topk_softmax", "sigmoid_group"]))
    n_group = draw(st.sampled_from([g for g in (1, 2, 3) if num_experts % g == 0])) if scoring == "sigmoid_group" else 1
    topk_group = draw(st.integers(1, n_group))
    kept_experts = topk_group * (num_experts // n_group)
    shared = draw(st.sampled_from([0, 0, 1, 3, 5]))
    return tpmoe.MoEConfig(
        hidden_size=draw(st.integers(1, 10)), intermediate_size=draw(st.integers(1, 7)), num_experts=num_experts,
        top_k=draw(st.integers(1, min(kept_experts, 3))), scoring=scoring, renormalize=draw(st.booleans()),
        n_group=n_group, topk_group=topk_group, correction_bias=scoring == "sigmoid_group" and draw(st.booleans()),
        router_bias=draw(st.booleans()), activation=activation, gated=gated,
        layout=draw(st.sampled_from(["concatenated", "interleaved", "gpt_oss"])), expert_bias=draw(st.booleans()),
        shared_intermediate_size=shared, shared_expert_gate=shared > 0 and draw(st.booleans()))


def _rank_view(config, shards, rank, world_size, align):
    """What MoEBlock's methods read from `self`, for rank's shards (no process group needed)."""
    view = types.SimpleNamespace(
        config=config, backend="cpu", **shards, _expert_spec=config.expert_spec,
        _shared_spec=config.expert_spec.with_layout("concatenated"),
        I_local=shard_sizes(config.intermediate_size, world_size, align)[rank],
        Is_local=shard_sizes(config.shared_intermediate_size, world_size, align)[rank])
    view._weight = lambda name: shards[name]
    view._shared_expert_rows = lambda x, shared_gate: MoEBlock._shared_expert_rows(view, x, shared_gate)
    view._routed_experts = lambda x, ids, weights: MoEBlock._routed_experts(view, x, ids, weights)
    return view


def _sharded_block_in_one_process(config, weights, x, world_size, align):
    """The block as P ranks compute it, the all-reduce replaced by a sum; returns (y, leaves per rank)."""
    replicated = {n: w.detach().clone().requires_grad_(n != "correction_bias")
                  for n, w in weights.items() if n not in SHARDED_NAMES}
    ranks = []
    for rank in range(world_size):
        shards = shard_moe_weights(config, weights, rank, world_size, align)
        shards = {n: (w.detach().clone().requires_grad_() if n in SHARDED_NAMES else replicated[n])
                  for n, w in shards.items()}
        ranks.append(shards)
    views = [_rank_view(config, shards, rank, world_size, align) for rank, shards in enumerate(ranks)]
    _logits, topk_weights, topk_ids = MoEBlock.route(views[0], x)
    shared_gate = torch.sigmoid(x @ replicated["shared_gate"].t()) if "shared_gate" in replicated else None
    y = sum(MoEBlock._partial_output(view, x, topk_weights, topk_ids, shared_gate) for view in views)
    if "b_down" in replicated:
        y = y + MoEBlock._routed_down_bias(views[0], topk_weights, topk_ids)
    return y, ranks


@_settings(max_examples=300)
@given(config=block_configs(), world_size=st.integers(1, 4), align=st.sampled_from([1, 1, 2]),
       num_tokens=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_block_sharded_over_world_size_matches_the_reference(config, world_size, align, num_tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    weights = tpmoe.random_moe_weights(config, dtype=torch.float64, generator=generator)
    x = torch.randn(num_tokens, config.hidden_size, dtype=torch.float64, generator=generator).requires_grad_()
    dy = torch.randn(num_tokens, config.hidden_size, dtype=torch.float64, generator=generator)

    y, ranks = _sharded_block_in_one_process(config, weights, x, world_size, align)
    y.backward(dy)
    dx = x.grad
    reference_weights = {n: w.detach().clone().requires_grad_(n != "correction_bias") for n, w in weights.items()}
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference_moe_block(x_ref, reference_weights, config)
    y_ref.backward(dy)

    assert_fp32_close(y, y_ref, "output")
    _assert_close_or_both_zero(dx, x_ref.grad, "dx")
    zeros_if_none = [{n: (w.grad if w.grad is not None else torch.zeros_like(w)) for n, w in shards.items()}
                     for shards in ranks]
    grads = assemble_full(config, zeros_if_none, align)
    for name, weight in reference_weights.items():
        if name == "correction_bias":
            continue
        _assert_close_or_both_zero(grads[name], weight.grad, f"d{name}")


# ------------------------------------------------------------------------- real spawns

def _spawned_cases(rank, world_size, seed, num_cases):
    import torch.distributed as dist

    draw = random.Random(seed)
    errors = []
    for _ in range(num_cases):
        num_experts = draw.choice([2, 4, 6])
        activation = draw.choice(["silu", "gelu_tanh", "clamped_swiglu", "silu_clamped"])
        shared = draw.choice([0, 2, 5])
        config = tpmoe.MoEConfig(
            hidden_size=draw.randint(2, 9), intermediate_size=draw.randint(1, 8), num_experts=num_experts,
            top_k=draw.randint(1, min(3, num_experts)), renormalize=draw.random() < 0.5, activation=activation,
            gated=activation in GATED_ONLY_ACTIVATIONS or draw.random() < 0.7,
            layout=draw.choice(["concatenated", "interleaved", "gpt_oss"]), expert_bias=draw.random() < 0.5,
            shared_intermediate_size=shared, shared_expert_gate=shared > 0 and draw.random() < 0.5)
        sequence_parallel = draw.random() < 0.5
        num_tokens = 3 * draw.randint(1, 3)
        generator = torch.Generator().manual_seed(draw.randint(0, 2**16))
        weights = tpmoe.random_moe_weights(config, dtype=torch.float64, generator=generator)
        x64 = torch.randn(num_tokens, config.hidden_size, dtype=torch.float64, generator=generator)
        dy64 = torch.randn(num_tokens, config.hidden_size, dtype=torch.float64, generator=generator)
        per_rank = num_tokens // world_size
        rows = slice(rank * per_rank, (rank + 1) * per_rank) if sequence_parallel else slice(None)
        block = MoEBlock.from_full(config, weights, group=dist.group.WORLD, sequence_parallel=sequence_parallel,
                                   backend="cpu")
        x = x64[rows].clone().requires_grad_()
        y = block(x)
        y.backward(dy64[rows])
        x_ref = x64.clone().requires_grad_()
        y_ref = reference_moe_block(x_ref, weights, config)
        y_ref.backward(dy64)
        scale_y, scale_dx = y_ref.abs().max().clamp_min(1e-30), x_ref.grad.abs().max().clamp_min(1e-30)
        errors.append((str(config), float((y - y_ref[rows]).abs().max() / scale_y),
                       float((x.grad - x_ref.grad[rows]).abs().max() / scale_dx)))
    return errors


@pytest.mark.distributed
@pytest.mark.slow
def test_random_configs_on_three_real_ranks(seed):
    per_rank = run_distributed(_spawned_cases, 3, seed, 8)
    for rank, errors in enumerate(per_rank):
        for config, error_y, error_dx in errors:
            assert error_y <= 1e-5 and error_dx <= 1e-5, (rank, config, error_y, error_dx)

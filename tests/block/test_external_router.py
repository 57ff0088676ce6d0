"""MoEBlock with a router that runs outside it (MoEConfig.external_router, forward(routing=...)).

What tpmoe.hf builds for a family whose router tpmoe does not implement natively: the block holds
only the experts (and shared expert), and the caller's replicated router hands it the routing.
One process: the same weights with the routing of a native block give that block's output and
gradients bit for bit (the same ops run). World size 2 (gloo): against one process, the router
weight outside the block gets its full gradient, identical on both ranks, and the block still
costs ONE all-reduce forward and ONE backward.
"""
import pytest
import torch

from support.dist_utils import counting_collectives, run_distributed
from support.tolerances import FP32_RTOL, max_rel_error

import tpmoe
from tpmoe.sharding import shard_moe_weights

SIZES = dict(hidden_size=12, intermediate_size=10, num_experts=5, top_k=2, renormalize=True,
             shared_intermediate_size=6, shared_expert_gate=True)


def _blocks(seed):
    config = tpmoe.MoEConfig(**SIZES)
    weights = tpmoe.random_moe_weights(config, generator=torch.Generator().manual_seed(seed))
    external = tpmoe.MoEConfig(**SIZES, external_router=True)
    experts_weights = {name: value for name, value in weights.items() if name != "router_weight"}
    return config, weights, external, experts_weights


def _run(block, x, dy, router_weight, config):
    """The block's output and gradients, its routing computed outside from router_weight."""
    x = x.clone().requires_grad_(True)
    logits = torch.nn.functional.linear(x, router_weight)
    weights, ids = tpmoe.route(logits, config.top_k, renormalize=config.renormalize)
    y = block(x, routing=(logits, weights, ids))
    y.backward(dy)
    return y.detach(), x.grad, block.local_grads()


def test_external_routing_is_the_native_block_bit_for_bit(seed):
    config, weights, external, experts_weights = _blocks(seed)
    native = tpmoe.MoEBlock.from_full(config, weights)
    outside = tpmoe.MoEBlock.from_full(external, experts_weights)
    assert not hasattr(outside, "router_weight")
    generator = torch.Generator().manual_seed(seed + 1)
    x, dy = torch.randn(9, 12, generator=generator), torch.randn(9, 12, generator=generator)
    x_native = x.clone().requires_grad_(True)
    y_native = native(x_native)
    y_native.backward(dy)
    router_weight = weights["router_weight"].clone().requires_grad_(True)
    y, dx, grads = _run(outside, x, dy, router_weight, config)
    assert torch.equal(y, y_native) and torch.equal(dx, x_native.grad)
    for name, grad in grads.items():
        assert torch.equal(grad, native.local_grads()[name]), name
    assert torch.equal(router_weight.grad, native.router_weight.grad)


def test_external_router_errors():
    _, _, external, experts_weights = _blocks(0)
    block = tpmoe.MoEBlock.from_full(external, experts_weights)
    x = torch.randn(3, 12)
    ids, weights = torch.zeros(3, 2, dtype=torch.int64), torch.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="routing: this block has no router of its own"):
        block(x)
    with pytest.raises(TypeError, match=r"routing: expected \(router_logits or None, topk_weights, topk_ids\)"):
        block(x, routing=(weights, ids))
    with pytest.raises(ValueError, match=r"routing: expected topk_weights of shape \[3, K\]"):
        block(x, routing=(None, weights[:2], ids))
    with pytest.raises(ValueError, match="routing: expected topk_ids of the shape of topk_weights"):
        block(x, routing=(None, weights, ids[:, :1]))
    with pytest.raises(TypeError, match="routing: expected int32 or int64 topk_ids, got float32"):
        block(x, routing=(None, weights, weights))
    with pytest.raises(ValueError, match="MoEConfig.external_router: the block holds no router weights"):
        tpmoe.MoEConfig(**SIZES, external_router=True, router_bias=True)


def _ranks(rank, world_size, seed):
    import torch.distributed as dist

    config, weights, external, experts_weights = _blocks(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x, dy = torch.randn(9, 12, generator=generator), torch.randn(9, 12, generator=generator)
    reference = tpmoe.MoEBlock.from_full(external, experts_weights)
    router_ref = weights["router_weight"].clone().requires_grad_(True)
    y_ref, dx_ref, grads_ref = _run(reference, x, dy, router_ref, config)
    block = tpmoe.MoEBlock.from_full(external, experts_weights, group=dist.group.WORLD)
    router_weight = weights["router_weight"].clone().requires_grad_(True)
    with counting_collectives() as counter:
        y, dx, grads = _run(block, x, dy, router_weight, config)
    expected = shard_moe_weights(external, {name: grad for name, grad in grads_ref.items()}, rank, world_size)
    errors = {"output": max_rel_error(y, y_ref), "input grad": max_rel_error(dx, dx_ref),
              "router weight grad": max_rel_error(router_weight.grad, router_ref.grad)}
    errors.update({name: max_rel_error(grad, expected[name]) for name, grad in grads.items()})
    return errors, dict(counter.take()), router_weight.grad


@pytest.mark.distributed
def test_external_router_tensor_parallel(seed):
    per_rank = run_distributed(_ranks, 2, seed)
    for rank, (errors, counts, _) in enumerate(per_rank):
        for name, error in errors.items():
            assert error <= FP32_RTOL, f"rank {rank}: {name} error {error:.3e}"
        assert counts == {"all_reduce": 2}, counts  # one forward (g), one backward (f)
    assert torch.equal(per_rank[0][2], per_rank[1][2]), "the router's gradient differs between the ranks"


def test_expert_outputs_are_each_picked_experts_output(seed):
    """MoEBlock.expert_outputs (for per-expert output norms): [T, K, H], expert ids[t, k] on token t,
    unweighted, the routed down bias included; the float64 reference expert by expert."""
    config = tpmoe.MoEConfig(hidden_size=12, intermediate_size=10, num_experts=5, top_k=3, expert_bias=True,
                             external_router=True, activation="gelu")
    weights = tpmoe.random_moe_weights(config, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    block = tpmoe.MoEBlock.from_full(config, weights)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(7, 12, dtype=torch.float64, generator=generator)
    ids = torch.stack([torch.randperm(5, generator=generator)[:3] for _ in range(7)])
    outputs = block.expert_outputs(x, ids)
    assert outputs.shape == (7, 3, 12)
    for k in range(3):
        expected = tpmoe.reference_experts(x, weights["w_gate_up"], weights["w_down"], ids[:, k:k + 1],
                                           torch.ones(7, 1, dtype=torch.float64), activation="gelu",
                                           b_gate_up=weights["b_gate_up"], b_down=weights["b_down"])
        assert max_rel_error(outputs[:, k], expected) <= 1e-12, k

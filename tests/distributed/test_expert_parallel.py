"""MoEBlock under expert parallelism (EP) and EP x TP (real gloo processes) against the
one-process float64 reference over the GLOBAL batch (every EP rank's tokens, concatenated in EP
rank order).

One spawn per mesh runs every case: world 2 (EP 2), world 3 (EP 3 with E = 8: ranges of 3, 3
and 2 experts), world 4 (EP 2 x TP 2: each expert's columns split over the TP pair). Each EP
rank holds its own tokens (a different count per rank; the ranks of a TP group the same ones),
and each case is run in float64 and in fp32, each compared at its dtype's tolerance
(tests/support/tolerances.py): the output, the input gradient and every parameter gradient (each rank's
shard, expert weights on their owner, against the matching slice of the reference gradient,
tpmoe.sharding), after allreduce_router_grads for the replicated parameters and the shared
expert, whose gradients must then agree bitwise on every rank.

Counts per block (tpmoe.cli.collectives): forward 3 all_to_all_single (counts, dispatch,
combine), backward 2 (dispatch, combine), each + 1 all_reduce when TP > 1; per step 1 all_reduce
over the EP group. "plain" stacks two blocks, so the counts are checked per block on a chain.

Cases: plain; a gated shared expert (interleaved layout); GPT-OSS (transposed layout, biases,
clamped swiglu, router bias); DeepSeek-V3 (sigmoid_group routing, correction bias, scaling,
shared expert); weights on the experts' input (Llama-4); an expert no token of any rank picks;
every token of every rank routed to EP rank 0's experts; a rank with no token; one token per
rank. Plus: expert_outputs (each pair's output) in float64, from_shards / local_shards, the
seeded constructor, gather_full (bitwise), plain ProcessGroups (bitwise the mesh's output),
extra_repr.
"""
import pytest
import torch

from support.dist_utils import ALL_GATHER, run_distributed
from support.tolerances import FP32_RTOL, FP64_RTOL
from tpmoe.cli.collectives import expected_ep_block_collectives, expected_ep_step_collectives

NUM_EXPERTS = 8
CASES = {
    "plain": dict(hidden_size=12, intermediate_size=10, num_experts=NUM_EXPERTS, top_k=2),
    "shared_expert_with_gate": dict(hidden_size=12, intermediate_size=7, num_experts=NUM_EXPERTS, top_k=2,
                                    renormalize=True, activation="gelu", layout="interleaved",
                                    shared_intermediate_size=6, shared_expert_gate=True),
    "gpt_oss": dict(hidden_size=12, intermediate_size=9, num_experts=NUM_EXPERTS, top_k=2, scoring="topk_softmax",
                    activation="clamped_swiglu", layout="gpt_oss", expert_bias=True, router_bias=True,
                    swiglu_limit=0.9),  # a low limit, so that the clamps bite on these small values
    "deepseek_v3": dict(hidden_size=12, intermediate_size=6, num_experts=NUM_EXPERTS, top_k=3,
                        scoring="sigmoid_group", renormalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        correction_bias=True, shared_intermediate_size=5),
    "weights_on_input": dict(hidden_size=12, intermediate_size=7, num_experts=NUM_EXPERTS, top_k=2,
                             scoring="topk_softmax", weights_on_input=True, shared_intermediate_size=4),
    # A router bias of -30 on expert 5: no token of any rank picks it (its owner receives nothing for it).
    "expert_without_tokens": dict(hidden_size=12, intermediate_size=5, num_experts=NUM_EXPERTS, top_k=2,
                                  router_bias=True, expert_bias=True),
    # +30 on experts 0 and 1 (EP rank 0's at every EP size here), top_k = 2: every token of every
    # rank goes to EP rank 0; the other ranks receive no row and send all theirs there.
    "all_tokens_to_rank0": dict(hidden_size=12, intermediate_size=6, num_experts=NUM_EXPERTS, top_k=2,
                                router_bias=True, shared_intermediate_size=3),
    "rank0_without_tokens": dict(hidden_size=12, intermediate_size=5, num_experts=NUM_EXPERTS, top_k=2,
                                 shared_intermediate_size=3, shared_expert_gate=True),
    "one_token_each": dict(hidden_size=12, intermediate_size=5, num_experts=NUM_EXPERTS, top_k=3, renormalize=True),
}
ROUTER_BIAS = {"expert_without_tokens": {5: -30.0}, "all_tokens_to_rank0": {0: 30.0, 1: 30.0}}
# Tokens of each EP rank (first entries used): different counts per rank unless the case says.
TOKENS = {"rank0_without_tokens": [0, 5, 2], "one_token_each": [1, 1, 1]}
DEFAULT_TOKENS = [5, 3, 4]
NUM_BLOCKS = {"plain": 2}
DTYPES = {torch.float64: FP64_RTOL, torch.float32: FP32_RTOL}
MESHES = {2: (2, 1), 3: (3, 1), 4: (2, 2)}  # world size -> (EP, TP)


def _error(actual, reference, scale):
    """max |actual - reference| / scale (the full reference tensor's largest magnitude, so that a
    slice of zeros, an expert no token reached, is compared to the scale of the whole gradient)."""
    if tuple(actual.shape) != tuple(reference.shape):
        return float("inf")
    if reference.numel() == 0:
        return 0.0
    return ((actual.detach().double() - reference.double()).abs().max() / scale).item()


def _reference(config, weights_per_block, x64, dy64):
    """One process, float64, autograd: output, input grad and each block's weight grads."""
    from tpmoe.reference import reference_moe_block
    x = x64.clone().requires_grad_(True)
    leaves = [{name: w.clone().requires_grad_(name != "correction_bias") for name, w in weights.items()}
              for weights in weights_per_block]
    y = x
    for weights in leaves:
        y = reference_moe_block(y, weights, config)
    y.backward(dy64)
    grads = [{name: w.grad if w.grad is not None else torch.zeros_like(w) for name, w in weights.items()}
             for weights in leaves]
    return y.detach(), x.grad, grads


def _digest(tensor):
    import hashlib
    return hashlib.sha256(tensor.detach().double().contiguous().numpy().tobytes()).hexdigest()[:16]


def _all_cases(rank, world_size, base_seed):
    """Runs in each rank: every case in both dtypes; returns errors, counts, digests and facts."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from support.dist_utils import CollectiveCounter, new_group
    from tpmoe import MoEConfig, random_moe_weights
    from tpmoe.block import MoEBlock
    from tpmoe.distributed import allreduce_router_grads
    from tpmoe.sharding import expert_range, shard_moe_weights, shard_weight

    ep_size, tp_size = MESHES[world_size]
    if tp_size > 1:
        mesh = init_device_mesh("cpu", (ep_size, tp_size), mesh_dim_names=("ep", "tp"))
        mesh_args = dict(ep_mesh_dim="ep", tp_mesh_dim="tp")
    else:
        mesh = init_device_mesh("cpu", (ep_size,), mesh_dim_names=("ep",))
        mesh_args = dict(ep_mesh_dim="ep")
    ep_rank, tp_rank = divmod(rank, tp_size)  # the mesh's row-major layout
    results = {}
    with CollectiveCounter() as counter:
        for case_index, (case, sizes) in enumerate(CASES.items()):
            config = MoEConfig(**sizes)
            generator = torch.Generator().manual_seed(base_seed + case_index)  # the same draws on every rank
            weights64 = [random_moe_weights(config, dtype=torch.float64, generator=generator)
                         for _ in range(NUM_BLOCKS.get(case, 1))]
            for expert, bias in ROUTER_BIAS.get(case, {}).items():
                for weights in weights64:
                    weights["router_bias"][expert] += bias
            counts = TOKENS.get(case, DEFAULT_TOKENS)[:ep_size]
            start = sum(counts[:ep_rank])
            rows = slice(start, start + counts[ep_rank])
            x64 = torch.randn(sum(counts), config.hidden_size, dtype=torch.float64, generator=generator)
            dy64 = torch.randn(sum(counts), config.hidden_size, dtype=torch.float64, generator=generator)
            y_ref, dx_ref, grads_ref = _reference(config, weights64, x64, dy64)
            case_result = {"reference_scale": {"y": y_ref.abs().max().item(), "dx": dx_ref.abs().max().item()}}
            for dtype in DTYPES:
                weights = [{name: w.to(dtype) for name, w in block_weights.items()} for block_weights in weights64]
                blocks = [MoEBlock.from_full(config, w, mesh, **mesh_args) for w in weights]
                x = x64[rows].to(dtype).requires_grad_(True)
                counter.take()
                y = x
                for block in blocks:
                    y = block(y)
                forward = dict(counter.take())
                y.backward(dy64[rows].to(dtype))
                backward = dict(counter.take())
                allreduce_router_grads(blocks)
                step = dict(counter.take())
                result = {"forward": forward, "backward": backward, "step": step,
                          "errors": {"y": _error(y, y_ref[rows], y_ref.abs().max().item()),
                                     "dx": _error(x.grad, dx_ref[rows], dx_ref.abs().max().item())},
                          "vacuous": [], "replicated_digests": []}
                for index, (block, full_grads) in enumerate(zip(blocks, grads_ref)):
                    expected = shard_moe_weights(config, full_grads, tp_rank, tp_size, ep_rank=ep_rank,
                                                 ep_size=ep_size)
                    for name, grad in block.local_grads().items():
                        scale = full_grads[name].abs().max().item()
                        if scale == 0:
                            result["vacuous"].append(f"block{index}.{name}")
                        if grad is None:
                            grad = torch.zeros_like(block.local_shards()[name])
                        result["errors"][f"block{index}.{name}.grad"] = _error(grad, expected[name], scale or 1.0)
                        if name in ("router_weight", "router_bias", "shared_gate", "b_down", "shared_gate_up",
                                    "shared_down"):
                            result["replicated_digests"].append((index, name, _digest(grad)))
                case_result[str(dtype)] = result
            # What the routing did over the global batch (the same router on every rank).
            global_ids = blocks[0].route(x64[:, :].float())[2]
            case_result["routed_experts"] = sorted(set(global_ids.flatten().tolist()))
            results[case] = case_result

        # Construction and gather_full, on the GPT-OSS case (biases, transposed layout).
        config = MoEConfig(**CASES["gpt_oss"])
        weights = random_moe_weights(config, generator=torch.Generator().manual_seed(base_seed))
        x = torch.randn(4, config.hidden_size, generator=torch.Generator().manual_seed(base_seed + rank // tp_size))
        block = MoEBlock.from_full(config, weights, mesh, **mesh_args)
        counter.take()
        gathered = block.gather_full()
        gather_counts = dict(counter.take())
        from_shards = MoEBlock.from_shards(config, block.local_shards(), mesh, **mesh_args)
        first, count = expert_range(config.num_experts, ep_rank, ep_size)
        seeded = MoEBlock(config, mesh, seed=base_seed, **mesh_args).gather_full()
        # Plain ProcessGroups: every rank creates every group, in the same order.
        tp_groups = [new_group(list(range(e * tp_size, (e + 1) * tp_size))) for e in range(ep_size)]
        ep_groups = [new_group(list(range(t, world_size, tp_size))) for t in range(tp_size)]
        plain = MoEBlock.from_full(config, weights, group=tp_groups[ep_rank] if tp_size > 1 else None,
                                   ep_group=ep_groups[tp_rank])
        # expert_outputs (each pair's output, for blocks that transform it before weighting), float64,
        # against tpmoe.reference's experts run on every (token, k) pair of the global batch.
        from tpmoe.reference import reference_experts
        weights64 = {name: w.double() for name, w in weights.items()}
        block64 = MoEBlock.from_full(config, weights64, mesh, **mesh_args)
        x_all = torch.randn(sum(DEFAULT_TOKENS[:ep_size]), config.hidden_size, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(base_seed + 1))
        ids_all = block64.route(x_all)[2]
        grad_all = torch.randn(*ids_all.shape, config.hidden_size, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(base_seed + 2))
        leaves = {name: w.clone().requires_grad_(True) for name, w in weights64.items()}
        x_ref = x_all.clone().requires_grad_(True)
        pairs = x_ref[:, None, :].expand(*ids_all.shape, config.hidden_size).reshape(-1, config.hidden_size)
        ref = reference_experts(pairs, leaves["w_gate_up"], leaves["w_down"], ids_all.reshape(-1, 1),
                                pairs.new_ones(pairs.shape[0], 1), activation=config.activation, layout=config.layout,
                                b_gate_up=leaves["b_gate_up"], b_down=leaves["b_down"], limit=config.swiglu_limit)
        ref = ref.view(*ids_all.shape, config.hidden_size)
        (ref * grad_all).sum().backward()
        own = slice(sum(DEFAULT_TOKENS[:ep_rank]), sum(DEFAULT_TOKENS[:ep_rank + 1]))
        x_own = x_all[own].clone().requires_grad_(True)
        outputs = block64.expert_outputs(x_own, ids_all[own])
        (outputs * grad_all[own]).sum().backward()
        expected_w_down = shard_weight(config, "w_down", leaves["w_down"].grad, tp_rank, tp_size, ep_rank=ep_rank,
                                       ep_size=ep_size)
        results["expert_outputs_errors"] = {
            "outputs": _error(outputs, ref[own], ref.abs().max().item()),
            "dx": _error(x_own.grad, x_ref.grad[own], x_ref.grad.abs().max().item()),
            "w_down.grad": _error(block64.local_grads()["w_down"], expected_w_down, leaves["w_down"].grad.abs().max().item())}
        results["construction"] = {
            "gather_full_bitwise": sorted(gathered) == sorted(weights) and all(
                torch.equal(gathered[name], weights[name]) for name in weights),
            "gather_full_counts": gather_counts,
            "local_w_down_owner": torch.equal(block.local_shards()["w_down"],
                                              shard_moe_weights(config, weights, tp_rank, tp_size, ep_rank=ep_rank,
                                                                ep_size=ep_size)["w_down"]),
            "expert_range": (first, count, block.expert_first, block.num_local_experts),
            "from_shards_equal": torch.equal(block(x), from_shards(x)),
            "seeded_equal": all(torch.equal(seeded[name], weights[name]) for name in weights),
            "plain_groups_equal": torch.equal(block(x), plain(x)),
            "repr": repr(block),
        }
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", sorted(MESHES))
def test_expert_parallel_block_matches_reference(world_size, seed):
    ep_size, tp_size = MESHES[world_size]
    per_rank = run_distributed(_all_cases, world_size, seed)
    forward_block = expected_ep_block_collectives(ep_size, tp_size, "forward")
    backward_block = expected_ep_block_collectives(ep_size, tp_size, "backward")
    step = expected_ep_step_collectives(ep_size)
    for case in CASES:
        blocks = NUM_BLOCKS.get(case, 1)
        for rank, results in enumerate(per_rank):
            case_result = results[case]
            for name, scale in case_result["reference_scale"].items():
                assert scale > 0, f"{case}: reference {name} is all zeros, the comparison would be vacuous"
            for dtype, tolerance in DTYPES.items():
                result = case_result[str(dtype)]
                where = f"{case}, {dtype}, rank {rank} of {world_size} (EP {ep_size} x TP {tp_size})"
                for name, error in result["errors"].items():
                    assert error <= tolerance, f"{where}: {name} max relative error {error:.3e} > {tolerance:.0e}"
                # Only correction_bias (a buffer's zeros slot) may have an all-zero reference grad.
                assert not result["vacuous"], f"{where}: all-zero reference gradients {result['vacuous']}"
                assert result["forward"] == {n: blocks * c for n, c in forward_block.items()}, \
                    f"{where}: forward collectives {result['forward']}"
                assert result["backward"] == {n: blocks * c for n, c in backward_block.items()}, \
                    f"{where}: backward collectives {result['backward']}"
                assert result["step"] == step, f"{where}: per-step collectives {result['step']}"
        for dtype in DTYPES:
            # After the EP sum, the replicated parameters' (and shared expert's) gradients agree bitwise
            # on the ranks holding the same slice (every rank of a TP index).
            for rank in range(world_size):
                same_slice = rank % tp_size
                digests = per_rank[rank][case][str(dtype)]["replicated_digests"]
                assert digests == per_rank[same_slice][case][str(dtype)]["replicated_digests"], \
                    f"{case}, {dtype}: replicated gradients differ bitwise, rank {rank} vs {same_slice}"
    routed = {case: per_rank[0][case]["routed_experts"] for case in ROUTER_BIAS}
    assert 5 not in routed["expert_without_tokens"], routed
    assert routed["all_tokens_to_rank0"] == [0, 1], routed
    expected_gather = {ALL_GATHER: (tp_size > 1) + (ep_size > 1)}
    for rank, results in enumerate(per_rank):
        construction = results["construction"]
        first, count, block_first, block_count = construction["expert_range"]
        assert (first, count) == (block_first, block_count), construction
        for check in ("gather_full_bitwise", "local_w_down_owner", "from_shards_equal", "seeded_equal",
                      "plain_groups_equal"):
            assert construction[check], f"rank {rank}: {check} failed: {construction}"
        assert construction["gather_full_counts"] == expected_gather, construction["gather_full_counts"]
        for name, error in results["expert_outputs_errors"].items():
            assert error <= FP64_RTOL, f"expert_outputs, rank {rank}: {name} max relative error {error:.3e}"
        assert f"ep={rank // tp_size}/{ep_size}, experts [{first}, {first + count}) of {NUM_EXPERTS}" \
            in construction["repr"], construction["repr"]
        spread = "uneven ranges of 3 or 2 experts" if world_size == 3 else f"even ranges of {NUM_EXPERTS // ep_size}"
        assert spread in construction["repr"], construction["repr"]


@pytest.mark.parametrize("layout,gated", [("concatenated", True), ("gpt_oss", True), ("interleaved", False)])
def test_expert_ranges_and_shards_round_trip(layout, gated):
    """The index maths alone (tpmoe.sharding): contiguous expert ranges of torch.chunk's sizes
    (DTensor's rule: ceil(E / P_ep) each, the last ranks fewer or none), shard shapes as cut, and assemble_full the bitwise inverse
    of shard_moe_weights for every (EP, TP) with E = 7 (uneven at EP 2, 3, 4), I = 5 (uneven TP)."""
    from tpmoe import MoEConfig, random_moe_weights
    from tpmoe.sharding import assemble_full, check_shards, expert_ranges, shard_moe_weights, shard_shapes

    config = MoEConfig(hidden_size=6, intermediate_size=5, num_experts=7, top_k=2, layout=layout, gated=gated,
                       activation="silu" if gated else "gelu", expert_bias=True, shared_intermediate_size=3)
    weights = random_moe_weights(config, generator=torch.Generator().manual_seed(7))
    for ep_size in range(1, 8):
        ranges = expert_ranges(7, ep_size)
        assert [first for first, _ in ranges] == [sum(c for _, c in ranges[:e]) for e in range(ep_size)]
        chunks = [chunk.numel() for chunk in torch.arange(7).chunk(ep_size)]
        assert [count for _, count in ranges] == chunks + [0] * (ep_size - len(chunks))
        for tp_size in (1, 2, 3):
            shards = [shard_moe_weights(config, weights, p, tp_size, ep_rank=e, ep_size=ep_size)
                      for e in range(ep_size) for p in range(tp_size)]
            for index, shard in enumerate(shards):
                e, p = divmod(index, tp_size)
                assert {n: tuple(t.shape) for n, t in shard.items()} == shard_shapes(config, p, tp_size, ep_rank=e,
                                                                                    ep_size=ep_size)
                first, count = ranges[e]
                assert torch.equal(shard["b_down"], weights["b_down"])  # replicated
                assert shard["w_gate_up"].shape[0] == count
            full = assemble_full(config, shards, ep_size=ep_size)
            assert all(torch.equal(full[name], weights[name]) for name in weights), (ep_size, tp_size)
    wrong = shard_moe_weights(config, weights, 0, 1, ep_rank=0, ep_size=2)
    with pytest.raises(ValueError, match=r"for rank 0 of a TP group of world size 1 and EP rank 1 of an EP group of "
                                         r"size 2 \(experts \[4, 7\)\)"):
        check_shards(config, wrong, 0, 1, ep_rank=1, ep_size=2)
    with pytest.raises(ValueError, match=r"ep_size: expected at most num_experts = 7 EP ranks"):
        expert_ranges(7, 8)


# ("dp", "ep", "tp") at world 8: two data-parallel replicas of an EP 2 x TP 2 block. Tokens per
# (dp, ep) index: uneven, so that a wrong sum over dp or ep would show.
DP_EP_TP_TOKENS = [[3, 2], [1, 4]]
DP_EP_TP_CONFIG = dict(hidden_size=6, intermediate_size=4, num_experts=4, top_k=2, renormalize=True,
                       shared_intermediate_size=2, shared_expert_gate=True, router_bias=True, expert_bias=True)


def _dp_ep_tp_rank(rank, world_size, base_seed):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tpmoe import MoEConfig, random_moe_weights
    from tpmoe.block import MoEBlock
    from tpmoe.distributed import allreduce_router_grads
    from tpmoe.sharding import shard_moe_weights

    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp", "ep", "tp"))
    dp_rank, ep_rank, tp_rank = rank // 4, rank // 2 % 2, rank % 2  # the mesh's row-major layout
    config = MoEConfig(**DP_EP_TP_CONFIG)
    generator = torch.Generator().manual_seed(base_seed)  # the same draws on every rank
    weights64 = random_moe_weights(config, dtype=torch.float64, generator=generator)
    counts = [count for replica in DP_EP_TP_TOKENS for count in replica]  # (dp, ep) order: the global batch
    x64 = torch.randn(sum(counts), config.hidden_size, dtype=torch.float64, generator=generator)
    dy64 = torch.randn(sum(counts), config.hidden_size, dtype=torch.float64, generator=generator)
    y_ref, dx_ref, (grads_ref,) = _reference(config, [weights64], x64, dy64)
    index = 2 * dp_rank + ep_rank
    rows = slice(sum(counts[:index]), sum(counts[:index + 1]))

    # No mesh keywords: the dimension names say the roles (mesh_dims_by_name); "dp" is left alone.
    block = MoEBlock.from_full(config, weights64, mesh)
    explicit = MoEBlock.from_full(config, weights64, mesh, ep_mesh_dim="ep", tp_mesh_dim="tp")
    x = x64[rows].clone().requires_grad_(True)
    y = block(x)
    y.backward(dy64[rows])
    allreduce_router_grads([block])  # tpmoe's sum: the replicated parameters over "ep"
    # The user's (DDP's, FSDP's) sum: every parameter's gradient over "dp", as for any replica.
    for name, grad in block.local_grads().items():
        if grad is not None:
            dist.all_reduce(grad, group=mesh.get_group("dp"))
    expected = shard_moe_weights(config, grads_ref, tp_rank, 2, ep_rank=ep_rank, ep_size=2)
    errors = {"y": _error(y, y_ref[rows], y_ref.abs().max().item()),
              "dx": _error(x.grad, dx_ref[rows], dx_ref.abs().max().item())}
    vacuous = []
    for name, grad in block.local_grads().items():
        scale = grads_ref[name].abs().max().item()
        if scale == 0:
            vacuous.append(name)
        errors[f"{name}.grad"] = _error(grad if grad is not None else torch.zeros_like(block.local_shards()[name]),
                                        expected[name], scale or 1.0)
    roles = (block.ep_size, block.ep_rank, block.tp_size, block.tp_rank)
    return dict(errors=errors, vacuous=vacuous, roles=roles, where=(dp_rank, ep_rank, tp_rank),
                explicit_equal=torch.equal(explicit(x64[rows]), block(x64[rows])))


@pytest.mark.slow
@pytest.mark.distributed
def test_dp_ep_tp_mesh_matches_reference(seed):
    """A ("dp", "ep", "tp") mesh at world 8, float64: each of the two dp replicas runs EP 2 x TP 2
    on its own tokens; after allreduce_router_grads (over "ep") and the user's all-reduce over
    "dp", the output, the input gradient and every parameter gradient match the one-process
    reference over the global batch (both replicas' tokens). The names alone set the roles."""
    per_rank = run_distributed(_dp_ep_tp_rank, 8, seed)
    for rank, result in enumerate(per_rank):
        dp_rank, ep_rank, tp_rank = result["where"]
        where = f"rank {rank} (dp {dp_rank}, ep {ep_rank}, tp {tp_rank}) of ('dp', 'ep', 'tp') (2, 2, 2)"
        assert result["roles"] == (2, ep_rank, 2, tp_rank), (where, result["roles"])
        assert result["explicit_equal"], f"{where}: the named mesh differs from ep_mesh_dim/tp_mesh_dim"
        assert not result["vacuous"] or result["vacuous"] == ["correction_bias"], (where, result["vacuous"])
        assert len(result["errors"]) > 10, (where, result["errors"])
        for name, error in result["errors"].items():
            assert error <= FP64_RTOL, f"{where}: {name} max relative error {error:.3e} > {FP64_RTOL:.0e}"

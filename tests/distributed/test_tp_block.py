"""MoEBlock under tensor parallelism (real gloo processes) against the one-process reference.

One spawn per world size runs every case (spawning costs seconds per process). Each case
stacks TWO blocks (different weights), so that the per-block collective counts are checked
on a chain, and runs them:
  - in TP mode (input replicated),
  - in sequence-parallel mode (T = 7 tokens split unevenly over the ranks, tokens_per_rank;
    T = 1 in "one_token", so that ranks hold no token at all),
and compares, in fp32 against tpmoe.reference in float64, the output, the input gradient and
every parameter gradient (each rank's shards against the matching slice of the one-process
gradient, tpmoe.sharding). The gradients of the replicated parameters (router weight and bias,
shared gate, routed down bias) must be bitwise identical on every rank, and gather_full must
rebuild the weights bitwise.

Counts (tests/support/dist_utils.CollectiveCounter wraps the torch.distributed functions):
  TP: forward 1 all_reduce per block, backward 1 all_reduce per block.
  SP: forward 1 all-gather + 1 reduce-scatter per block, backward the same,
      then 1 all_reduce per step (allreduce_router_grads) for all blocks.
  At world size 1 nothing is communicated (a sum over one rank is the identity).
The cases: plain; shared expert with its gate (interleaved layout); weights on the experts' input
(Llama-4); GPT-OSS (transposed
layout, biases, clamped swiglu, router bias); DeepSeek-V3 (sigmoid_group routing, correction
bias, scaling, shared expert); I not divisible by the world size (most cases at 3 and 4);
empty shards (I = 2, Is = 1 at world sizes 3 and 4); one token; all tokens on one expert.
The last test launches examples/train_tp.py under torchrun and checks that the loss falls.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from support.dist_utils import ALL_GATHER, run_distributed
from support.tolerances import FP32_RTOL
from tpmoe.cli.collectives import expected_block_collectives, expected_step_collectives
from tpmoe.cli.verify import _digest as digest_of
from tpmoe.cli.verify import _error as verify_error
from tpmoe.cli.verify import _reference as verify_reference
from tpmoe.cli.verify import token_split

# The CPU expert path ("auto" on CPU tensors) is the one the package runs on these machines.
BACKEND = "auto"
NUM_TOKENS = 7  # prime: an uneven token split in SP mode at every world size > 1 (unless TOKENS says)
NUM_BLOCKS = 2

CASES = {
    "plain": dict(hidden_size=12, intermediate_size=10, num_experts=4, top_k=2),
    "shared_expert_with_gate": dict(hidden_size=12, intermediate_size=7, num_experts=5, top_k=2, renormalize=True,
                                    activation="gelu", layout="interleaved", shared_intermediate_size=6,
                                    shared_expert_gate=True),
    "gpt_oss": dict(hidden_size=12, intermediate_size=9, num_experts=4, top_k=2, scoring="topk_softmax",
                    activation="clamped_swiglu", layout="gpt_oss", expert_bias=True, router_bias=True,
                    swiglu_limit=0.9),  # a low limit, so that the clamps bite on these small values
    "deepseek_v3": dict(hidden_size=12, intermediate_size=6, num_experts=8, top_k=3, scoring="sigmoid_group",
                        renormalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5, correction_bias=True,
                        shared_intermediate_size=5),
    # I = 2, Is = 1: at world size 3 and 4 some ranks hold empty shards (I_local = 0 / Is_local = 0).
    "empty_shards": dict(hidden_size=12, intermediate_size=2, num_experts=3, top_k=2, activation="gelu_tanh",
                         gated=False, expert_bias=True, shared_intermediate_size=1, shared_expert_gate=True),
    # One token: in SP mode all ranks but rank 0 hold no token at all.
    "one_token": dict(hidden_size=12, intermediate_size=5, num_experts=4, top_k=2, renormalize=True,
                      shared_intermediate_size=3),
    # A router bias of +8 on expert 2 sends every token there (top_k=1): the other experts get none.
    "all_tokens_one_expert": dict(hidden_size=12, intermediate_size=6, num_experts=4, top_k=1, router_bias=True,
                                  expert_bias=True),
    # Llama-4: the routing weight scales each expert's input, not its output (+ a shared expert).
    # Last: each case's weights are drawn from base_seed + its index.
    "weights_on_input": dict(hidden_size=12, intermediate_size=7, num_experts=5, top_k=2, scoring="topk_softmax",
                             weights_on_input=True, shared_intermediate_size=4),
}
TOKENS = {"one_token": 1}


def _error(actual, reference):
    """max relative error to the largest magnitude of the reference slice itself (stricter than
    verify's scale, the whole tensor's); 0 for empty slices, inf for a shape mismatch."""
    return verify_error(actual, reference, reference.abs().max().item() if reference.numel() else 1.0)


def _reference(config, weights_per_block, x64, dy64):
    """One process, float64: output, input grad and every block's weight grads of the stacked
    blocks, each block by verify's reference; the chain rule links them (the output grad of
    block b is the input grad of block b + 1)."""
    from tpmoe.reference import reference_moe_block
    inputs = [x64]
    for weights in weights_per_block[:-1]:
        inputs.append(reference_moe_block(inputs[-1], weights, config))
    last = len(weights_per_block) - 1
    grads, dy = [None] * len(weights_per_block), dy64
    for index in range(last, -1, -1):
        y_block, dy, grads[index] = verify_reference(config, weights_per_block[index], inputs[index], dy)
        if index == last:
            y = y_block
    return y, dy, grads


def _run_blocks(blocks, x, dy, counter, tokens_per_rank=None):
    x = x.clone().requires_grad_(True)
    counter.take()
    y = x
    for block in blocks:
        y = block(y, tokens_per_rank=tokens_per_rank) if tokens_per_rank is not None else block(y)
    forward_counts = dict(counter.take())
    y.backward(dy)
    backward_counts = dict(counter.take())
    return y.detach(), x.grad, forward_counts, backward_counts


def _compare_grads(blocks, reference_grads, rank, world_size, result):
    from tpmoe.sharding import shard_moe_weights
    for index, (block, full_grads) in enumerate(zip(blocks, reference_grads)):
        expected = shard_moe_weights(block.config, full_grads, rank, world_size)
        shards = block.local_shards()
        grads = block.local_grads()
        for name, grad in grads.items():
            if grad is None:  # only an empty shard (a parameter of size 0) may be left without one
                assert shards[name].numel() == 0, f"block {index}: {name} got no gradient"
                grad = torch.zeros_like(shards[name])
            result["errors"][f"block{index}.{name}.grad"] = _error(grad, expected[name])
            scale = expected[name].abs().max().item() if expected[name].numel() else None
            result["scales"][f"block{index}.{name}.grad"] = scale
        for name in ("router_weight", "router_bias", "shared_gate", "b_down"):
            if hasattr(block, name):
                result["replicated_digest"].append((index, name, digest_of(grads[name])))


def _all_cases(rank, world_size, base_seed):
    """Runs in each rank: every case, TP and SP; returns errors, counts and digests."""
    import torch.distributed as dist

    from support.dist_utils import CollectiveCounter
    from tpmoe import MoEConfig, random_moe_weights
    from tpmoe.block import MoEBlock
    from tpmoe.distributed import allreduce_router_grads
    from tpmoe.sharding import shard_moe_weights

    group = dist.group.WORLD
    results = {}
    with CollectiveCounter() as counter:
        for case_index, (case, sizes) in enumerate(CASES.items()):
            config = MoEConfig(**sizes)
            generator = torch.Generator().manual_seed(base_seed + case_index)  # the same on every rank
            weights64 = [random_moe_weights(config, dtype=torch.float64, generator=generator)
                         for _ in range(NUM_BLOCKS)]
            if case == "all_tokens_one_expert":
                for weights in weights64:
                    weights["router_bias"][2] += 8.0
            num_tokens = TOKENS.get(case, NUM_TOKENS)
            counts = token_split(num_tokens, world_size)
            start = sum(counts[:rank])
            local_rows = slice(start, start + counts[rank])
            x64 = torch.randn(num_tokens, config.hidden_size, dtype=torch.float64, generator=generator)
            dy64 = torch.randn(num_tokens, config.hidden_size, dtype=torch.float64, generator=generator)
            y_ref, dx_ref, grads_ref = _reference(config, weights64, x64, dy64)
            weights32 = [{name: w.float() for name, w in weights.items()} for weights in weights64]
            case_result = {"reference_scale": {"y": y_ref.abs().max().item(), "dx": dx_ref.abs().max().item()}}

            # Tensor-parallel mode: replicated tokens.
            blocks = [MoEBlock.from_full(config, weights, group=group, backend=BACKEND) for weights in weights32]
            y, dx, forward_counts, backward_counts = _run_blocks(blocks, x64.float(), dy64.float(), counter)
            routed_experts = sorted(set(blocks[0].route(x64.float())[2].flatten().tolist()))
            tp = {"errors": {"y": _error(y, y_ref), "dx": _error(dx, dx_ref)}, "scales": {},
                  "routed_experts": routed_experts,
                  "replicated_digest": [(-1, "y", digest_of(y)), (-1, "dx", digest_of(dx))],
                  "forward": forward_counts, "backward": backward_counts,
                  "shard_sizes": [block.I_local for block in blocks[:1]] + [blocks[0].Is_local]}
            _compare_grads(blocks, grads_ref, rank, world_size, tp)
            counter.take()
            gathered = blocks[0].gather_full()
            tp["gather_full_counts"] = dict(counter.take())
            tp["gather_full_bitwise"] = sorted(gathered) == sorted(weights32[0]) and all(
                torch.equal(gathered[name], weights32[0][name]) for name in weights32[0])
            case_result["tp"] = tp

            # Sequence-parallel mode: this rank's rows of the same tokens.
            blocks = [MoEBlock.from_full(config, weights, group=group, backend=BACKEND, sequence_parallel=True)
                      for weights in weights32]
            y, dx, forward_counts, backward_counts = _run_blocks(
                blocks, x64[local_rows].float(), dy64[local_rows].float(), counter, tokens_per_rank=counts)
            summed = allreduce_router_grads(blocks)
            sp = {"errors": {"y": _error(y, y_ref[local_rows]), "dx": _error(dx, dx_ref[local_rows])}, "scales": {},
                  "replicated_digest": [], "forward": forward_counts, "backward": backward_counts,
                  "router_grad_sum": dict(counter.take()), "router_grads_summed": summed}
            _compare_grads(blocks, grads_ref, rank, world_size, sp)
            case_result["sp"] = sp
            results[case] = case_result

        # Construction: from this rank's shards as from the full weights; the seeded constructor
        # builds the same full model at every world size.
        config = MoEConfig(**CASES["gpt_oss"])
        weights = random_moe_weights(config, generator=torch.Generator().manual_seed(base_seed))
        x = torch.randn(NUM_TOKENS, config.hidden_size, generator=torch.Generator().manual_seed(base_seed))
        from_full = MoEBlock.from_full(config, weights, group=group)
        from_shards = MoEBlock.from_shards(config, shard_moe_weights(config, weights, rank, world_size), group=group)
        seeded = MoEBlock(config, group, seed=base_seed).gather_full()
        results["construction"] = {
            "from_shards_equal": torch.equal(from_full(x), from_shards(x)),
            "seeded_equal": all(torch.equal(seeded[name], weights[name]) for name in weights),
        }
    return results


def _expected_counts(world_size):
    """(TP forward or backward, SP forward or backward, the SP step) for the NUM_BLOCKS stacked blocks."""
    def stacked(sequence_parallel):
        return {name: NUM_BLOCKS * count for name, count in expected_block_collectives(world_size,
                                                                                        sequence_parallel).items()}
    return stacked(False), stacked(True), expected_step_collectives(world_size, True)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_tp_block_matches_reference(world_size, seed):
    per_rank = run_distributed(_all_cases, world_size, seed)
    tp_counts, sp_counts, router_sum_counts = _expected_counts(world_size)
    for case in CASES:
        for rank, results in enumerate(per_rank):
            case_result = results[case]
            for scale_name, scale in case_result["reference_scale"].items():
                assert scale > 0, f"{case}: reference {scale_name} is all zeros, the comparison would be vacuous"
            for mode in ("tp", "sp"):
                result = case_result[mode]
                where = f"{case}, {mode}, rank {rank} of {world_size}"
                for name, error in result["errors"].items():
                    assert error <= FP32_RTOL, f"{where}: {name} max relative error {error:.3e} > {FP32_RTOL:.0e}"
                for name, scale in result["scales"].items():
                    # An all-zero reference gradient would make its comparison vacuous.
                    assert scale is None or scale > 0, f"{where}: reference {name} is all zeros"
                assert result["forward"] == tp_counts if mode == "tp" else result["forward"] == sp_counts, \
                    f"{where}: forward collectives {result['forward']}"
                assert result["backward"] == tp_counts if mode == "tp" else result["backward"] == sp_counts, \
                    f"{where}: backward collectives {result['backward']}"
            expected_gather = {ALL_GATHER: 1} if world_size > 1 else {}
            assert case_result["tp"]["gather_full_counts"] == expected_gather, case_result["tp"]["gather_full_counts"]
            assert case_result["tp"]["gather_full_bitwise"], f"{case}: gather_full is not bitwise equal, rank {rank}"
            assert case_result["sp"]["router_grad_sum"] == router_sum_counts, case_result["sp"]["router_grad_sum"]
        for mode in ("tp", "sp"):
            # Replicated values (TP: output, dx; both modes: the replicated parameters' gradients,
            # in SP after allreduce_router_grads) must agree bitwise, or the replicas drift apart.
            digests = [results[case][mode]["replicated_digest"] for results in per_rank]
            for rank, rank_digests in enumerate(digests[1:], start=1):
                assert len(rank_digests) == len(digests[0]) > 0
                for (block, name, digest), (_, _, digest0) in zip(rank_digests, digests[0]):
                    assert digest == digest0, f"{case}, {mode}: block {block} {name} differs bitwise, rank {rank} vs 0"
    assert per_rank[0]["all_tokens_one_expert"]["tp"]["routed_experts"] == [2]
    for rank, results in enumerate(per_rank):
        assert results["construction"] == {"from_shards_equal": True, "seeded_equal": True}, (rank, results)
    if world_size >= 3:
        # The empty-shard case really had ranks with nothing to compute.
        sizes = [results["empty_shards"]["tp"]["shard_sizes"] for results in per_rank]
        assert [0, 0] in sizes, sizes


from support import ROOT  # noqa: E402


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_example_trains():
    """examples/train_tp.py under torchrun (2 ranks, gloo): the loss goes down."""
    steps = 5
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(ROOT, "examples", "train_tp.py"), "--steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-4000:]
    losses = [float(value) for value in re.findall(r"^step +\d+ +loss ([-+0-9.eE]+)$", finished.stdout, re.M)]
    assert len(losses) == steps, finished.stdout
    assert losses[-1] < 0.9 * losses[0], f"the loss did not go down: {losses}"
    assert "replicated parameters identical on every rank" in finished.stdout, finished.stdout

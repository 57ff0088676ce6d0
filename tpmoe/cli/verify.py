"""`tpmoe verify`: one MoE block of a preset, sharded over P ranks, against the one-process
float64 reference (tpmoe.reference), forward and backward, with its collectives counted.

Every rank draws the same full weights, input and output gradient from one seed, computes the
float64 reference itself (the unsharded block, autograd), builds its shard with
MoEBlock.from_full and runs forward and backward, inside a CollectiveCounter. It compares:
  output and input gradient   its rows (all of them in TP mode, its own in sequence-parallel mode)
  replicated parameter grads  router weight/bias, shared gate, routed down bias: whole
                              (sequence-parallel: after the per-step allreduce_router_grads)
  sharded parameter grads     its shard of w_gate_up, w_down, b_gate_up, shared expert against the
                              matching slice of the full gradient (tpmoe.sharding.shard_moe_weights)
Errors are max |ours - reference| / max |reference| (the whole reference tensor, so that every
rank's slice is measured on the same scale). Tolerance: 1e-5 in float32; in bfloat16/float16
twice the error of the same reference run in that dtype (the flash-attention rule).
Collectives per block: TP forward 1 all-reduce, backward 1; SP forward 1 all-gather +
1 reduce-scatter, backward the same, then 1 all-reduce per step; none at world size 1.
Expert parallelism (`--ep E`, P = E x TP ranks on an ("ep", "tp") DeviceMesh): each EP rank
holds its own tokens (an uneven split of the batch) and its experts; forward 3 all_to_all_single,
backward 2, each + 1 all-reduce with TP > 1, then 1 all-reduce per step over the EP group.
"""
import hashlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .._checks import dtype_name
from ..config import MoEConfig
from ..distributed.counting import CollectiveCounter
from ..sharding import expert_ranges
from .collectives import (expected_block_collectives, expected_ep_block_collectives, expected_ep_step_collectives,
                          expected_step_collectives, format_counts)

FP32_RTOL = 1e-5
# Where a same-dtype reference run happens to be exact, the bound falls back to the dtype's
# unit roundoff (relative to the reference's largest magnitude).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# `--scale auto` keeps the float64 weights of the reference under this many bytes per rank
# (each rank also holds their gradients and its shard).
AUTO_SCALE_BUDGET_BYTES = 64 * 2 ** 20
FAULTS = ("perturb-shard",)


@dataclass(frozen=True)
class VerifyPlan:
    preset: str
    config: MoEConfig
    scale: float
    world_size: int
    sequence_parallel: bool
    num_tokens: int
    dtype: torch.dtype
    seed: int = 0
    backend: str = "auto"
    # Testing the tester: "perturb-shard" scales the last rank's w_down shard by (1 + 1e-3)
    # after the block is built, so the real comparison must catch it.
    fault: Optional[str] = None
    device_type: str = "cpu"  # "cuda": one GPU per rank (NCCL; fused_experts "auto" runs Triton there)
    ep_size: int = 1  # > 1: expert parallelism, world_size = ep_size x TP size

    @property
    def tp_size(self) -> int:
        return self.world_size // self.ep_size

    def expected_collectives(self, phase: str) -> Dict[str, int]:
        """What one block issues in `phase`: "forward", "backward" or "step" (all blocks, once)."""
        if self.ep_size > 1:
            if phase == "step":
                return expected_ep_step_collectives(self.ep_size)
            return expected_ep_block_collectives(self.ep_size, self.tp_size, phase)
        if phase == "step":
            return expected_step_collectives(self.world_size, self.sequence_parallel)
        return expected_block_collectives(self.world_size, self.sequence_parallel)

    @property
    def mode(self) -> str:
        if self.ep_size > 1:
            return f"ep {self.ep_size} x tp {self.tp_size}"
        return "sp" if self.sequence_parallel else "tp"


def weight_bytes(config: MoEConfig, itemsize: int) -> int:
    from ..weights import expected_shapes
    return sum(math.prod(shape) for shape in expected_shapes(config).values()) * itemsize


def auto_scale(config: MoEConfig, budget_bytes: int = AUTO_SCALE_BUDGET_BYTES) -> float:
    """The largest of 1, 1/2, 1/4, ... whose float64 block fits the budget."""
    from ..presets import scaled_config
    scale = 1.0
    while scale > 2 ** -12 and weight_bytes(scaled_config(config, scale), 8) > budget_bytes:
        scale /= 2
    return scale


def token_split(num_tokens: int, world_size: int) -> List[int]:
    base, extra = divmod(num_tokens, world_size)
    return [base + (1 if rank < extra else 0) for rank in range(world_size)]


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _reference(config, weights, x, dy):
    """The unsharded block under autograd: output, input grad, every trained weight's grad."""
    from ..reference import reference_moe_block
    x = x.clone().requires_grad_(True)
    leaves = {name: w.clone().requires_grad_(name != "correction_bias") for name, w in weights.items()}
    y = reference_moe_block(x, leaves, config)
    y.backward(dy)
    # Untrained entries (correction_bias) get zeros, so the dict slices like the weights.
    grads = {name: w.grad if w.grad is not None else torch.zeros_like(w) for name, w in leaves.items()}
    return y.detach(), x.grad, grads


def _error(actual: torch.Tensor, reference: torch.Tensor, scale: float) -> float:
    if tuple(actual.shape) != tuple(reference.shape):
        return math.inf
    if reference.numel() == 0:
        return 0.0
    return ((actual.detach().cpu().double() - reference.double()).abs().max() / scale).item()


def verify_rank(context, plan: VerifyPlan) -> Dict:
    """Runs on every rank; returns its errors, bounds, counts and digests (small, picklable)."""
    from ..block import MoEBlock
    from ..distributed import allreduce_router_grads
    from ..sharding import SHARDED_NAMES, shard_moe_weights
    from ..weights import random_moe_weights

    config, rank, world_size = plan.config, context.rank, context.world_size
    generator = torch.Generator().manual_seed(plan.seed)  # the same draws on every rank
    weights64 = random_moe_weights(config, dtype=torch.float64, generator=generator)
    x64 = torch.randn(plan.num_tokens, config.hidden_size, dtype=torch.float64, generator=generator)
    dy64 = torch.randn(plan.num_tokens, config.hidden_size, dtype=torch.float64, generator=generator)
    y_ref, dx_ref, grads_ref = _reference(config, weights64, x64, dy64)
    same_dtype = None
    if plan.dtype != torch.float32:
        same_dtype = _reference(config, {n: w.to(plan.dtype) for n, w in weights64.items()},
                                x64.to(plan.dtype), dy64.to(plan.dtype))

    expert_parallel = plan.ep_size > 1
    # Expert parallelism: an ("ep", "tp") mesh in row-major order; rank (e, p) holds EP rank e's tokens.
    ep_rank, tp_rank = divmod(rank, plan.tp_size) if expert_parallel else (0, rank)
    counts = token_split(plan.num_tokens, plan.ep_size if expert_parallel else world_size)
    token_rank = ep_rank if expert_parallel else rank
    start = sum(counts[:token_rank])
    own_tokens = plan.sequence_parallel or expert_parallel
    rows = slice(start, start + counts[token_rank]) if own_tokens else slice(0, plan.num_tokens)
    device = context.device
    full_weights = {name: w.to(plan.dtype) for name, w in weights64.items()}
    if expert_parallel:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (plan.ep_size, plan.tp_size), mesh_dim_names=("ep", "tp"))
        block = MoEBlock.from_full(config, full_weights, mesh, ep_mesh_dim="ep", tp_mesh_dim="tp",
                                   backend=plan.backend, device=device)
    else:
        block = MoEBlock.from_full(config, full_weights, group=context.group, sequence_parallel=plan.sequence_parallel,
                                   backend=plan.backend, device=device)
    if plan.fault == "perturb-shard" and rank == world_size - 1:
        with torch.no_grad():
            block.w_down.mul_(1 + 1e-3)

    x = x64[rows].to(device=device, dtype=plan.dtype).requires_grad_(True)
    dy = dy64[rows].to(device=device, dtype=plan.dtype)
    with CollectiveCounter() as counter:
        counter.take()
        y = block(x, tokens_per_rank=counts) if plan.sequence_parallel else block(x)
        forward_counts = counter.take()
        y.backward(dy)
        backward_counts = counter.take()
        if own_tokens:
            allreduce_router_grads([block])
        step_counts = counter.take()

    # (name, ours, reference slice, full reference, same-dtype slice)
    checks = [("output", y, y_ref[rows], y_ref, same_dtype and same_dtype[0][rows]),
              ("input grad", x.grad, dx_ref[rows], dx_ref, same_dtype and same_dtype[1][rows])]
    shard_of = dict(rank=tp_rank, world_size=plan.tp_size, ep_rank=ep_rank, ep_size=plan.ep_size)
    expected_shards = shard_moe_weights(config, grads_ref, **shard_of)
    same_dtype_shards = same_dtype and shard_moe_weights(config, same_dtype[2], **shard_of)
    replicated_digests = []
    shards = block.local_shards()
    for name, grad in block.local_grads().items():
        if grad is None:  # only an empty shard (I_local = 0) is left without one
            grad = torch.zeros_like(shards[name]) if shards[name].numel() == 0 else None
        checks.append((f"{name} grad", grad, expected_shards[name], grads_ref[name],
                       same_dtype_shards and same_dtype_shards[name]))
        if name in ("router_weight", "router_bias", "shared_gate", "b_down") and grad is not None:
            replicated_digests.append((name, _digest(grad)))
    if not own_tokens:
        replicated_digests += [("output", _digest(y)), ("input grad", _digest(x.grad))]

    results = []
    for name, ours, reference, full_reference, same in checks:
        scale = full_reference.abs().max().item()
        error = math.inf if ours is None else _error(ours, reference, scale) if scale > 0 else math.inf
        if plan.dtype == torch.float32:
            bound = FP32_RTOL
        else:
            bound = max(2 * _error(same, reference, scale), UNIT_ROUNDOFF[plan.dtype]) if scale > 0 else 0.0
        results.append(dict(name=name, error=error, bound=bound, reference_scale=scale,
                            sharded=name.split()[0] in SHARDED_NAMES))
    return dict(rank=rank, checks=results, forward=forward_counts, backward=backward_counts, step=step_counts,
                replicated_digests=replicated_digests, device=str(device), backend=context.backend,
                launcher=context.launcher, I_local=block.I_local)


def summarize(plan: VerifyPlan, per_rank: List[Dict]) -> (str, bool):
    """The pass/fail table and whether everything passed."""
    from .report import format_table

    world_size = len(per_rank)
    rows, ok = [], True
    names = [check["name"] for check in per_rank[0]["checks"]]
    for index, name in enumerate(names):
        per_rank_checks = [result["checks"][index] for result in per_rank]
        worst = max(per_rank_checks, key=lambda check: check["error"] / max(check["bound"], 1e-300))
        passed = all(check["error"] <= check["bound"] and check["reference_scale"] > 0 for check in per_rank_checks)
        what = name + (" (each rank's shard)" if worst["sharded"] and world_size > 1 else "")
        if worst["reference_scale"] == 0:
            what += " [reference all zeros: vacuous]"
        rows.append(dict(check=what, error=worst["error"], bound=worst["bound"], result="pass" if passed else "FAIL"))
        ok &= passed

    count_rows = []
    own_tokens = plan.sequence_parallel or plan.ep_size > 1
    for phase, expected in (("forward", plan.expected_collectives("forward")),
                            ("backward", plan.expected_collectives("backward")),
                            ("step (router grads)", plan.expected_collectives("step"))):
        if phase.startswith("step") and not own_tokens:
            continue
        key = "step" if phase.startswith("step") else phase
        seen = [result[key] for result in per_rank]
        differing = [s for s in seen if s != expected]
        passed = not differing
        ok &= passed
        count_rows.append(dict(collectives=phase + (" per block" if key != "step" else ""),
                               expected=format_counts(expected),
                               seen=format_counts(differing[0] if differing else seen[0])
                               + ("" if world_size == 1 else " (every rank)" if passed else " (some rank)"),
                               result="pass" if passed else "FAIL"))

    digests = [dict(result["replicated_digests"]) for result in per_rank]
    agree = all(d == digests[0] for d in digests[1:])
    ok &= agree
    what = "output, input grad, replicated grads" if not own_tokens else "replicated parameter grads"
    count_rows.append(dict(collectives=f"{what} bitwise equal on every rank", expected="yes",
                           seen="yes" if agree else "no", result="pass" if agree else "FAIL"))

    tolerance = "1e-5 relative" if plan.dtype == torch.float32 else "2 x the same-dtype reference's error"
    text = "\n".join([
        format_table(rows, ["check", "error", "bound", "result"], {"error": ".2e", "bound": ".1e"},
                     headers={"error": "max rel error", "bound": "tolerance"}),
        "",
        format_table(count_rows, ["collectives", "expected", "seen", "result"]),
        "",
        f"errors: max |ours - float64 reference| / max |reference|, worst rank; tolerance {tolerance}",
        f"verify {'PASSED' if ok else 'FAILED'}",
    ])
    return text, ok


def header(plan: VerifyPlan, per_rank: List[Dict]) -> str:
    c = plan.config
    first = per_rank[0]
    shards = ", ".join(str(result["I_local"]) for result in per_rank)
    return (f"tpmoe verify: preset {plan.preset} (scale {plan.scale:g}: H={c.hidden_size} I={c.intermediate_size} "
            f"E={c.num_experts} K={c.top_k} shared={c.shared_intermediate_size})\n"
            f"  world size {plan.world_size} ({first['launcher']}, {first['backend'] or 'no process group'}), "
            f"mode {plan.mode}, {plan.num_tokens} tokens, "
            f"{dtype_name(plan.dtype)}, device {first['device']}, experts backend {plan.backend}"
            + (f" ({'triton' if first['device'].startswith('cuda') else 'cpu'})" if plan.backend == "auto" else "")
            + ", "
            f"I per rank [{shards}]"
            + (f", experts per EP rank {[count for _, count in expert_ranges(c.num_experts, plan.ep_size)]}"
               if plan.ep_size > 1 else "")
            + f", seed {plan.seed}"
            + (f"\n  INJECTED FAULT: {plan.fault}" if plan.fault else ""))


def run_verify(plan: VerifyPlan, *, timeout_s: int, out) -> int:
    """Runs the ranks, prints the table (rank 0 under torchrun); returns the exit code."""
    from .launch import is_main_process, run_ranks

    per_rank = run_ranks(verify_rank, plan, plan.world_size, timeout_s=timeout_s, device_type=plan.device_type)
    text, ok = summarize(plan, per_rank)
    if is_main_process():
        print(header(plan, per_rank), file=out)
        print(text, file=out, flush=True)
    return 0 if ok else 1

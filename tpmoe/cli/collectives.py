"""What `tpmoe verify` expects of the collectives per block and per step (docs/design.md section 2);
the counting itself is tpmoe.distributed.counting."""
from typing import Dict

from ..distributed.counting import ALL_GATHER, REDUCE_SCATTER


def expected_block_collectives(world_size: int, sequence_parallel: bool) -> Dict[str, int]:
    """What ONE MoEBlock issues in its forward, and again in its backward (docs/design.md section 2)."""
    if world_size == 1:
        return {}  # a sum over one rank is the identity: nothing is communicated
    if sequence_parallel:
        return {ALL_GATHER: 1, REDUCE_SCATTER: 1}
    return {"all_reduce": 1}


def expected_step_collectives(world_size: int, sequence_parallel: bool) -> Dict[str, int]:
    """Once per training step for all blocks: the router-gradient sum of sequence-parallel mode."""
    return {"all_reduce": 1} if sequence_parallel and world_size > 1 else {}


def format_counts(counts: Dict[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in sorted(counts.items()) if count) or "none"


def expected_ep_block_collectives(ep_size: int, tp_size: int, phase: str) -> Dict[str, int]:
    """What ONE expert-parallel MoEBlock issues in `phase` ("forward" or "backward"): forward the
    counts all-to-all, the dispatch and the combine, backward the dispatch and the combine; each
    phase + ONE all-reduce in the TP group when TP > 1 (docs/design.md section 2)."""
    if phase not in ("forward", "backward"):
        raise ValueError(f"phase: expected 'forward' or 'backward', got {phase!r}")
    counts = {}
    if ep_size > 1:
        counts["all_to_all_single"] = 3 if phase == "forward" else 2
    if tp_size > 1:
        counts["all_reduce"] = 1
    return counts


def expected_ep_step_collectives(ep_size: int) -> Dict[str, int]:
    """Once per training step for all expert-parallel blocks: the EP sum of the replicated grads."""
    return {"all_reduce": 1} if ep_size > 1 else {}

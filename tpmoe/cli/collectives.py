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

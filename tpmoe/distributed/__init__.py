"""All of tpmoe's communication (and nothing else), through torch.distributed on the TP group.

Tensor-parallel mode, per block: forward ONE all-reduce (`reduce_from_tensor_parallel_region`),
backward ONE all-reduce (`copy_to_tensor_parallel_region`'s backward).
Sequence-parallel mode, per block: forward ONE all-gather + ONE reduce-scatter, backward the
same; plus ONE all-reduce per step for all blocks (`allreduce_router_grads`).
Every collective is issued as `torch.distributed.<name>(...)`, looked up at call time (the
all-gather is `all_gather_single`, `all_gather_into_tensor` before torch 2.13; the reduce-scatter
`reduce_scatter_single`, `reduce_scatter_tensor` before).
"""
from .groups import (CollectiveError, communicates, destroy_process_group_collected, group_rank, group_size,
                     naming_collective_failures, resolve_tp_group)
from .replicated import (all_gather_tensor_lists, allreduce_gradients, allreduce_router_grads, check_replicated,
                         check_shards_agree, gather_full)
from .sequence_parallel import (GatherFromSequenceParallelRegion, ReduceScatterToSequenceParallelRegion,
                                check_tokens_per_rank, gather_from_sequence_parallel_region,
                                reduce_scatter_to_sequence_parallel_region)
from .tensor_parallel import (CopyToTensorParallelRegion, ReduceFromTensorParallelRegion,
                              copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region)

__all__ = [
    "CollectiveError", "CopyToTensorParallelRegion", "GatherFromSequenceParallelRegion",
    "ReduceFromTensorParallelRegion",
    "ReduceScatterToSequenceParallelRegion", "all_gather_tensor_lists", "allreduce_gradients",
    "allreduce_router_grads", "check_replicated", "check_shards_agree", "check_tokens_per_rank", "communicates",
    "copy_to_tensor_parallel_region", "destroy_process_group_collected", "gather_from_sequence_parallel_region",
    "gather_full", "group_rank", "group_size",
    "naming_collective_failures",
    "reduce_from_tensor_parallel_region", "reduce_scatter_to_sequence_parallel_region", "resolve_tp_group",
]

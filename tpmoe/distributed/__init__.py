"""All of tpmoe's communication (and nothing else), through torch.distributed on the TP group.

Tensor-parallel mode, per block: forward ONE all-reduce (`reduce_from_tensor_parallel_region`),
backward ONE all-reduce (`copy_to_tensor_parallel_region`'s backward).
Sequence-parallel mode, per block: forward ONE all-gather + ONE reduce-scatter, backward the
same; plus ONE all-reduce per step for all blocks (`allreduce_router_grads`).
Expert-parallel mode (EP, optionally x TP), per block: forward ONE all_to_all_single of the
per-expert counts, ONE of the rows (dispatch) and ONE back (combine), + ONE all-reduce in the
TP group when TP > 1; backward the dispatch and the combine (+ ONE all-reduce); plus ONE
all-reduce over the EP group per step for all blocks (`allreduce_router_grads`).
Every collective is issued as `torch.distributed.<name>(...)`, looked up at call time (the
all-gather is `all_gather_single`, `all_gather_into_tensor` before torch 2.13; the reduce-scatter
`reduce_scatter_single`, `reduce_scatter_tensor` before).
"""
from .clipping import clip_grad_norm_
from .expert_parallel import AllToAllRows, Dispatched, ExchangePlan, combine_rows, dispatch_rows, exchange_counts
from .groups import (CollectiveError, check_groups_disjoint, communicates, destroy_process_group_collected,
                     group_rank, group_size, naming_collective_failures, resolve_groups, resolve_tp_group)
from .replicated import (all_gather_tensor_lists, allreduce_gradients, allreduce_router_grads,
                         check_expert_parallel_agree, check_replicated, check_shards_agree, gather_full)
from .sequence_parallel import (GatherFromSequenceParallelRegion, ReduceScatterToSequenceParallelRegion,
                                check_tokens_per_rank, gather_from_sequence_parallel_region,
                                reduce_scatter_to_sequence_parallel_region)
from .tensor_parallel import (CopyToTensorParallelRegion, ReduceFromTensorParallelRegion,
                              copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region)

__all__ = [
    "AllToAllRows", "Dispatched", "clip_grad_norm_", "ExchangePlan", "check_expert_parallel_agree", "check_groups_disjoint",
    "combine_rows", "dispatch_rows", "exchange_counts", "resolve_groups",
    "CollectiveError", "CopyToTensorParallelRegion", "GatherFromSequenceParallelRegion",
    "ReduceFromTensorParallelRegion",
    "ReduceScatterToSequenceParallelRegion", "all_gather_tensor_lists", "allreduce_gradients",
    "allreduce_router_grads", "check_replicated", "check_shards_agree", "check_tokens_per_rank", "communicates",
    "copy_to_tensor_parallel_region", "destroy_process_group_collected", "gather_from_sequence_parallel_region",
    "gather_full", "group_rank", "group_size",
    "naming_collective_failures",
    "reduce_from_tensor_parallel_region", "reduce_scatter_to_sequence_parallel_region", "resolve_tp_group",
]

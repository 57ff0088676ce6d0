"""tpmoe: the expert block of Mixture-of-Experts transformers under tensor parallelism.

Importing tpmoe needs neither a GPU nor the built extension `tpmoe._C`; the calls that need
one of them say so.
"""
from .block import MoEBlock
from .config import ExpertSpec, MoEConfig
from .distributed import CollectiveError, allreduce_router_grads
from .fused import fused_experts, routed_experts
from .reference import reference_experts, reference_moe_block, reference_route
from .routing import AlignResult, align, route
from .sharding import shard_moe_weights, shard_sizes
from .weights import ExpertWeights, check_moe_weights, expected_shapes, random_moe_weights

__version__ = "0.1.0"


def __getattr__(name):
    # tpmoe.parallelize imports torch.distributed.tensor.parallel: loaded on first use, not with tpmoe.
    if name == "parallelize":
        from .parallel_styles import parallelize
        return parallelize
    raise AttributeError(f"module 'tpmoe' has no attribute {name!r}")

__all__ = [
    "AlignResult", "CollectiveError", "ExpertSpec", "ExpertWeights", "MoEBlock", "MoEConfig", "align",
    "allreduce_router_grads", "check_moe_weights", "expected_shapes", "fused_experts", "parallelize",
    "random_moe_weights", "reference_experts", "reference_moe_block", "reference_route", "route", "routed_experts",
    "shard_moe_weights", "shard_sizes",
]

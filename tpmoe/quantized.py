"""Quantized expert weights, whatever their format: the one table of what each format
(tpmoe.fp8's "fp8_block", tpmoe.mxfp4's "mxfp4") does for checking, dequantizing and sharding."""
from typing import Optional, Tuple

import torch

from .config import ExpertSpec, MoEConfig
from .fp8 import check_fp8_experts, dequantize_fp8_experts, place_fp8_shard, shard_fp8_experts
from .mxfp4 import check_mxfp4_experts, dequantize_mxfp4_experts, place_mxfp4_shard, shard_mxfp4_experts
from .weights import FP8_FORMAT, MXFP4_FORMAT, ExpertWeights

_CHECK = {FP8_FORMAT: check_fp8_experts, MXFP4_FORMAT: check_mxfp4_experts}
_DEQUANTIZE = {FP8_FORMAT: dequantize_fp8_experts, MXFP4_FORMAT: dequantize_mxfp4_experts}
_SHARD = {FP8_FORMAT: shard_fp8_experts, MXFP4_FORMAT: shard_mxfp4_experts}
_PLACE = {FP8_FORMAT: place_fp8_shard, MXFP4_FORMAT: place_mxfp4_shard}
QUANTIZED_FORMATS = tuple(_CHECK)


def quantized_call_needs_grad(hidden_states: torch.Tensor, weights: ExpertWeights,
                              topk_weights: torch.Tensor) -> bool:
    """Whether a call on quantized (frozen) weights wants gradients, for the input, the routing
    weights or the biases: the backends' native forwards then hand it to the plain-PyTorch path."""
    return torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad
        for tensor in (hidden_states, topk_weights, weights.b_gate_up, weights.b_down))


def check_quantized_experts(weights: ExpertWeights, spec: ExpertSpec, *, hidden_size: int, device: torch.device,
                            argument: str = "weights") -> Tuple[int, int]:
    """(E, I_p) of quantized `weights` after their format's checks (naming `argument`)."""
    return _CHECK[weights.format](weights, hidden_size=hidden_size, layout=spec.layout, gated=spec.gated,
                                  device=device, argument=argument)


def dequantize_experts(weights: ExpertWeights, spec: ExpertSpec, dtype: torch.dtype,
                       experts: Optional[Tuple[int, int]] = None) -> ExpertWeights:
    """The "dense" ExpertWeights (dtype) that quantized `weights` stand for; `experts` = (first,
    count) only those (the plain CPU path's one expert at a time)."""
    return _DEQUANTIZE[weights.format](weights, layout=spec.layout, gated=spec.gated, dtype=dtype, experts=experts)


def shard_quantized_experts(full: ExpertWeights, spec: ExpertSpec, *, tp_rank: int, tp_size: int, ep_rank: int = 0,
                            ep_size: int = 1) -> ExpertWeights:
    """TP rank tp_rank's (and EP rank ep_rank's) slice of the whole quantized experts `full`."""
    return _SHARD[full.format](full, layout=spec.layout, gated=spec.gated, rank=tp_rank, world_size=tp_size,
                               ep_rank=ep_rank, ep_size=ep_size)


def place_quantized_shard(whole: ExpertWeights, local: ExpertWeights, spec: ExpertSpec, *, tp_rank: int, tp_size: int,
                          ep_rank: int = 0, ep_size: int = 1) -> None:
    """The inverse of shard_quantized_experts: TP rank tp_rank's (and EP rank ep_rank's) slice
    `local` written into the whole quantized experts `whole`, in place."""
    _PLACE[whole.format](whole, local, layout=spec.layout, gated=spec.gated, rank=tp_rank, world_size=tp_size,
                         ep_rank=ep_rank, ep_size=ep_size)


def check_whole_quantized_experts(experts: ExpertWeights, config: MoEConfig, *, argument: str = "experts"
                                  ) -> ExpertSpec:
    """The spec that runs `experts`, after checking they are the config's WHOLE quantized experts
    without biases (a block keeps its own as trained parameters). A "gpt_oss" block's are packed
    row-major and interleaved, as GPT-OSS's MXFP4 checkpoints are."""
    if not isinstance(experts, ExpertWeights) or experts.format not in QUANTIZED_FORMATS:
        got = experts.format if isinstance(experts, ExpertWeights) else type(experts).__name__
        raise TypeError(f"{argument}: expected a tpmoe.ExpertWeights of format {' or '.join(QUANTIZED_FORMATS)}, "
                        f"got {got}")
    if experts.b_gate_up is not None or experts.b_down is not None:
        raise ValueError(f"{argument}: expected no biases (the block's b_gate_up and b_down stay its trained "
                         f"parameters), got quantized experts with biases")
    spec = config.expert_spec
    spec = spec.with_layout("interleaved") if config.layout == "gpt_oss" else spec
    full_sizes = check_quantized_experts(experts, spec, hidden_size=config.hidden_size,
                                         device=experts.w_gate_up.device, argument=argument)
    if full_sizes != (config.num_experts, config.intermediate_size):
        raise ValueError(f"{argument}: expected the whole experts of the config, E = {config.num_experts} and "
                         f"I = {config.intermediate_size}, got E = {full_sizes[0]}, I = {full_sizes[1]}")
    return spec

"""Quantized expert weights, whatever their format: the dense weights they stand for."""
from typing import Optional, Tuple

import torch

from .config import ExpertSpec
from .fp8 import dequantize_fp8_experts
from .mxfp4 import dequantize_mxfp4_experts
from .weights import FP8_FORMAT, MXFP4_FORMAT, ExpertWeights

_DEQUANTIZE = {FP8_FORMAT: dequantize_fp8_experts, MXFP4_FORMAT: dequantize_mxfp4_experts}


def dequantize_experts(weights: ExpertWeights, spec: ExpertSpec, dtype: torch.dtype,
                       experts: Optional[Tuple[int, int]] = None) -> ExpertWeights:
    """The "dense" ExpertWeights (dtype) that quantized `weights` stand for; `experts` = (first,
    count) only those (the plain CPU path's one expert at a time)."""
    return _DEQUANTIZE[weights.format](weights, layout=spec.layout, gated=spec.gated, dtype=dtype, experts=experts)

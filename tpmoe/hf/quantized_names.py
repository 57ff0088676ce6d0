"""transformers' names for a block's quantized expert tensors, both ways: what tpmoe.hf reads
from a checkpoint (tpmoe.hf.quantized) and what gather_state_dict writes back (tpmoe.hf.module).
GPT-OSS's MXFP4 keeps `<gate_up>_blocks` / `_scales` and `<down>_*`; transformers' fine-grained
FP8 (FP8Experts) `<gate_up>` / `<gate_up>_scale_inv` and `<down>*`."""
from typing import Dict, List

import torch

from ..weights import MXFP4_FORMAT, ExpertWeights


def quantized_tensor_names(weight_format: str, gate_up: str, down: str) -> List[str]:
    """[gate_up values, gate_up scales, down values, down scales] under transformers' names."""
    if weight_format == MXFP4_FORMAT:
        return [f"{gate_up}_blocks", f"{gate_up}_scales", f"{down}_blocks", f"{down}_scales"]
    return [gate_up, f"{gate_up}_scale_inv", down, f"{down}_scale_inv"]


def quantized_experts_to_hf(experts: ExpertWeights, gate_up: str, down: str) -> Dict[str, torch.Tensor]:
    """The whole quantized experts as transformers holds them (the inverse of reading them):
    MXFP4's bytes and e8m0 scales as they are; fp8's gate_up scales [E, 2, I / B, H / B] back to
    FP8Experts' [E, 2I / B, H / B] (float32)."""
    gate_up_scales = experts.scales.gate_up
    if experts.format != MXFP4_FORMAT:
        gate_up_scales = gate_up_scales.flatten(1, 2)
    names = quantized_tensor_names(experts.format, gate_up, down)
    return dict(zip(names, (experts.w_gate_up, gate_up_scales, experts.w_down, experts.scales.down)))

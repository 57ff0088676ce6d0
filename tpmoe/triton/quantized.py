"""The Triton path of quantized experts (tpmoe.fp8's "fp8_block", tpmoe.mxfp4's "mxfp4"):
the forward kernels with the weights dequantized in their B-load (tpmoe.triton.dequant), so the
stored bytes are read at their own size and no dequantized copy of an expert is made.

Forward only: quantized weights are frozen. A call that needs a gradient (for the input, the
routing weights or the biases: a model training around frozen quantized experts) runs the
plain-PyTorch path instead, as the CPU backend does (tpmoe.cpu.quantized): tpmoe.cpu.experts_torch,
one expert dequantized at a time under autograd, on the tensors' own device.

fp8 x fp8 ("w8a8") for prefill on fp8_block weights (`use_fp8_activations`): x and h are
quantized per token and per scale block in the kernels (tpmoe.fp8.quantize_fp8_activations'
scheme) and every k-step is an fp8 tensor-core dot (tpmoe.triton.dequant.fp8_activation_dot).
TPMOE_FP8_ACTIVATIONS, read per call: "auto" (default) takes it on compute capability >= 9.0
(sm_80 has no fp8 MMA) for bf16 / fp16 calls of at least PREFILL_ROWS routed rows (T * K) whose
block size is a power of two >= 16 and whose shard starts on a block (block_offset 0: in a
shard cut inside a block the down kernel's loads lose their 16-byte async copies on sm_90,
benchmarks/RESULTS.md, and no GPU has timed it yet); "on" forces it for every fp8_block call
(the interpreter tests; ValueError where the block size cannot be a k-step, RuntimeError below
sm_90); "off" keeps the weight-only path (dequantized weights, activations in their dtype), as
everywhere else.
"""
import os

import torch

from ..config import ExpertSpec
from ..cpu.experts_torch import experts_torch
from ..quantized import quantized_call_needs_grad
from ..weights import FP8_FORMAT, ExpertWeights
from .autograd import _bias_only, device_capability, forward_launches

FP8_ACTIVATIONS_ENV = "TPMOE_FP8_ACTIVATIONS"
FP8_ACTIVATIONS_MODES = ("auto", "on", "off")
PREFILL_ROWS = 256  # routed rows (T * K) from which "auto" quantizes the activations


def use_fp8_activations(hidden_states: torch.Tensor, weights: ExpertWeights, top_k: int) -> bool:
    """Whether this call runs the fp8 x fp8 variant (module docstring; TPMOE_FP8_ACTIVATIONS)."""
    mode = os.environ.get(FP8_ACTIVATIONS_ENV, "auto").strip().lower() or "auto"
    if mode not in FP8_ACTIVATIONS_MODES:
        raise ValueError(f"{FP8_ACTIVATIONS_ENV}: expected one of {FP8_ACTIVATIONS_MODES}, got {mode!r}")
    if mode == "off" or weights.format != FP8_FORMAT:
        return False
    block = weights.scales.block_size
    block_fits = block >= 16 and block & (block - 1) == 0
    capability = device_capability(hidden_states.device)
    if mode == "auto":
        return (block_fits and weights.scales.block_offset == 0 and capability is not None and capability >= 90
                and hidden_states.shape[0] * top_k >= PREFILL_ROWS
                and hidden_states.dtype in (torch.bfloat16, torch.float16))
    if not block_fits:
        raise ValueError(f"weights.scales.block_size: {FP8_ACTIVATIONS_ENV}=on quantizes the activations per "
                         f"scale block, one k-step each, which needs a power of two >= 16, got {block}")
    if capability is not None and capability < 90:
        raise RuntimeError(f"{FP8_ACTIVATIONS_ENV}=on: fp8 x fp8 dots need compute capability >= 9.0, got "
                           f"{capability // 10}.{capability % 10} (set it to auto or off)")
    return True


def experts_triton_quantized(hidden_states: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor,
                             topk_weights: torch.Tensor, spec: ExpertSpec) -> torch.Tensor:
    """tpmoe.routed_experts on quantized weights with backend "triton" (inputs validated by it)."""
    if quantized_call_needs_grad(hidden_states, weights, topk_weights):
        return experts_torch(hidden_states, weights, topk_ids, topk_weights, spec)
    rows = weights.w_gate_up.shape[1]
    intermediate_size = rows // 2 if spec.gated else rows
    if hidden_states.shape[0] == 0 or intermediate_size == 0:
        return _bias_only(hidden_states, topk_ids, topk_weights, weights.b_down)
    scales = weights.scales
    output, *_ = forward_launches(
        hidden_states, weights.w_gate_up, weights.w_down, topk_weights, weights.b_gate_up, weights.b_down, topk_ids,
        *spec.op_args(), intermediate_size,
        scales=(scales.gate_up, scales.down, weights.format, scales.block_size, scales.block_offset),
        fp8_activations=use_fp8_activations(hidden_states, weights, topk_ids.shape[1]))
    return output

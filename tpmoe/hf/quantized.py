"""Quantized experts of transformers models, read at their own size (tpmoe.fp8, tpmoe.mxfp4).

Two ways in:
  - `tpmoe.hf.apply` meets transformers' fine-grained FP8 experts (FP8Experts, what its FP8
    quantizer puts in place of a family's experts): their e4m3 values and block scales become the
    block's "fp8_block" experts as they are (`fp8_experts_of`), each rank keeping its slice.
  - a checkpoint's tensors under transformers' names: GPT-OSS's MXFP4 `*_blocks` / `*_scales`
    (the checkpoint's own, which transformers dequantizes where its kernels are missing, on CPU
    among others), or FP8Experts' fused `gate_up_proj` + `gate_up_proj_scale_inv` and
    `down_proj` + `down_proj_scale_inv`: given to `tpmoe.hf.apply(model, quantized_experts=
    tensors)`, the model's own expert weights are never read (they may be on the meta device);
    given to `tpmoe.hf.load_quantized_experts(model, tensors)` after apply, they replace a
    swapped model's dense experts.
Either way the quantized experts are frozen; the router, biases and the rest of the model train.
"""
from typing import List, Mapping, Optional

import torch
from torch import nn

from ..fp8 import FP8_DTYPE, BlockScales
from ..mxfp4 import MXFP4_BLOCK
from ..weights import FP8_FORMAT, MXFP4_FORMAT, ExpertWeights
from .quantized_names import quantized_tensor_names
from .registry import Unsupported

_E8M0 = getattr(torch, "float8_e8m0fnu", None)


def _float_scales(scales: torch.Tensor, what: str) -> torch.Tensor:
    """float32 block scales: transformers keeps them float32, or as e8m0 powers of two ("ue8m0"),
    which float32 holds exactly."""
    if scales.dtype == torch.float32 or (_E8M0 is not None and scales.dtype == _E8M0):
        return scales.detach().float()
    raise Unsupported(f"{what}: expected float32 or float8_e8m0fnu scales, got {scales.dtype}")


def fp8_from_hf(gate_up: torch.Tensor, gate_up_scale_inv: torch.Tensor, down: torch.Tensor,
                down_scale_inv: torch.Tensor, block_size, what: str) -> ExpertWeights:
    """The whole "fp8_block" experts from FP8Experts' tensors: gate_up [E, 2I, H] (gate rows, then
    up rows) with scales [E, 2I / B, H / B], down [E, H, I] with [E, H / B, I / B]."""
    if block_size is None or len(tuple(block_size)) != 2 or block_size[0] != block_size[1]:
        raise Unsupported(f"{what}: block_size {block_size!r}; tpmoe's fp8_block has square B x B blocks")
    block = int(block_size[0])
    if gate_up.dtype != FP8_DTYPE or down.dtype != FP8_DTYPE:
        raise Unsupported(f"{what}: expected float8_e4m3fn expert values, got {gate_up.dtype} and {down.dtype}")
    experts, rows, hidden = gate_up.shape
    inter = rows // 2
    blocks_i, blocks_h = -(-inter // block), -(-hidden // block)
    if tuple(gate_up_scale_inv.shape) != (experts, 2 * blocks_i, blocks_h):
        raise Unsupported(
            f"{what}: gate_up_proj_scale_inv of shape {tuple(gate_up_scale_inv.shape)}, expected "
            f"{(experts, 2 * blocks_i, blocks_h)}: one scale per {block} x {block} block of the gate and of the up "
            f"half (where {block} does not divide I = {inter}, a block of transformers' straddles both halves)")
    gate_up_scales = _float_scales(gate_up_scale_inv, what).reshape(experts, 2, blocks_i, blocks_h)
    return ExpertWeights(gate_up.detach(), down.detach(), None, None, FP8_FORMAT,
                         BlockScales(gate_up_scales, _float_scales(down_scale_inv, what), block, 0))


def fp8_experts_of(experts: nn.Module, what: str) -> ExpertWeights:
    """FP8Experts' whole experts as tpmoe's "fp8_block", read in place (no copy, no dequantization)."""
    from .shards import _full_part

    if getattr(experts, "activation_scheme", "dynamic") != "dynamic":
        raise Unsupported(f"{what}: activation_scheme {experts.activation_scheme!r}; tpmoe runs fp8 weights on "
                          f"unquantized activations (transformers' 'dynamic')")
    if not getattr(experts, "has_gate", True):
        raise Unsupported(f"{what}: FP8Experts without a gate (up_proj only)")
    return fp8_from_hf(*(_full_part(getattr(experts, name)) for name in (
        "gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")),
        experts.block_size, what)


def compute_dtype(module: nn.Module, experts: nn.Module) -> torch.dtype:
    """The dtype a quantized block computes in: that of the block's floating weights outside its
    quantized experts (its router, a norm), else the default."""
    quantized = {id(tensor) for tensor in experts.parameters()}
    for tensor in module.parameters():
        if id(tensor) not in quantized and tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def checkpoint_experts(tensors: Mapping[str, torch.Tensor], owner_name: str, weights, fp8_block_size, *,
                       argument: str = "tensors") -> Optional[ExpertWeights]:
    """The whole quantized experts that `tensors` hold for the tpmoe replacement `owner_name` (the
    HF block, or its experts module) of weight map `weights`, or None where they hold none."""
    gate_up = weights.names["w_gate_up"][0]
    prefix = f"{owner_name}.{gate_up}" if owner_name else gate_up
    try:
        return _checkpoint_experts(tensors, prefix, fp8_block_size, argument)
    except Unsupported as error:
        raise ValueError(f"{argument}: the experts of {owner_name or '<root>'}: {error}") from None


def _checkpoint_experts(tensors, prefix: str, fp8_block_size, argument: str) -> Optional[ExpertWeights]:
    down = prefix.rsplit(".", 1)[0] + ".down_proj" if "." in prefix else "down_proj"
    names = quantized_tensor_names(MXFP4_FORMAT, prefix, down)
    if names[0] in tensors:  # GPT-OSS's MXFP4: [E, R, H / 32, 16] bytes, [E, R, H / 32] e8m0
        _require(tensors, names, argument)
        return ExpertWeights(tensors[names[0]], tensors[names[2]], None, None, MXFP4_FORMAT,
                             BlockScales(tensors[names[1]], tensors[names[3]], MXFP4_BLOCK, 0))
    names = quantized_tensor_names(FP8_FORMAT, prefix, down)
    if names[1] in tensors:
        _require(tensors, names, argument)
        if fp8_block_size is None:
            raise Unsupported(f"{names[1]}: fp8 scales, but no block size: pass the block size (the checkpoint "
                              f"config's quantization_config.weight_block_size)")
        return fp8_from_hf(*(tensors[name] for name in names), fp8_block_size, prefix)
    return None


def fp8_block_size(model: nn.Module, block_size):
    """The fp8 block size: the argument, else the model config's quantization_config's."""
    if block_size is not None:
        return (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    found = quantization.get("weight_block_size") if isinstance(quantization, dict) else getattr(
        quantization, "weight_block_size", None)
    return None if found is None else tuple(found)


def check_tensors(tensors, argument: str) -> None:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{argument}: expected a mapping of names to tensors (a state dict), got "
                        f"{type(tensors).__name__}")


def _require(tensors, names, argument: str) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise KeyError(f"{argument}: expected {', '.join(names)} together, missing {', '.join(missing)}")


def load_quantized_experts(model: nn.Module, tensors: Mapping[str, torch.Tensor], *, block_size=None) -> List[str]:
    """In place, after tpmoe.hf.apply: each swapped block whose quantized experts `tensors` holds
    (a checkpoint's state dict in transformers' names, the same on every rank: GPT-OSS's MXFP4
    `...experts.gate_up_proj_blocks` / `_scales` and `down_proj_*`, or fine-grained FP8's
    `...experts.gate_up_proj` / `_scale_inv` and `down_proj*`) runs them quantized, each rank keeping
    its slice (MoEBlock.load_quantized_experts_); their dense expert weights are dropped. Returns the
    names of the blocks loaded. block_size: fp8's B (an int or (B, B)); by default the model
    config's quantization_config.weight_block_size. Every rank must call it alike (a block of a group checks its
    ranks agree only through its shapes). Raises ValueError if no block's experts are in `tensors`."""
    from .module import TpmoeHFBlock, TpmoeHFExperts

    check_tensors(tensors, "tensors")
    loaded, fp8_block = [], fp8_block_size(model, block_size)
    for name, module in model.named_modules():
        if not isinstance(module, (TpmoeHFBlock, TpmoeHFExperts)):
            continue
        quantized = checkpoint_experts(tensors, name, module.hf_weights, fp8_block)
        if quantized is not None:
            module.block.load_quantized_experts_(quantized)
            loaded.append(name)
    if not loaded:
        raise ValueError(f"tensors: hold no quantized experts of {type(model).__name__}'s tpmoe blocks (expected "
                         f"'<block>.experts.gate_up_proj_blocks' (MXFP4) or '..._scale_inv' (FP8) under "
                         f"transformers' names; call tpmoe.hf.apply(model) first)")
    return loaded

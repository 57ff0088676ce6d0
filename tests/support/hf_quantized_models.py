"""Tiny transformers models with quantized experts, and their dense twins.

The twin is the same model with each expert weight set to transformers' OWN dequantization of the
quantized one (`_dequantize_fp8_weight` for fine-grained FP8, `convert_moe_packed_tensors` for
GPT-OSS's MXFP4, what it loads where its kernels are missing): an independent reference for
tpmoe's reading of the formats. Quantized values are random bytes, scales random in a range that
keeps the weights near 1 / sqrt(fan-in).
"""
import copy

import torch

from .hf_models import make_hf_causal_lm

# Qwen3-MoE and Mixtral with H = 24 and I = 40: B = 8 divides both (transformers' scales keep
# gate and up apart only then), and over 3 ranks I splits 14 / 13 / 13, no shard a multiple of B.
FP8_SIZES = {"qwen3_moe": dict(moe_intermediate_size=40), "mixtral": dict(intermediate_size=40)}
FP8_BLOCK = 8
# GPT-OSS with H = 64 and I = 160 (the checkpoint's 32-value blocks need multiples of 32): over 2
# ranks 80 / 80, over 3 ranks 54 / 53 / 53, no shard a multiple of 32.
MXFP4_GPT_OSS = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16)
EXPERT_NAMES = ("gate_up_proj", "down_proj")


def _fp8_values(shape, generator):
    """Random finite e4m3 values (no NaN bytes), spread over its range's useful part."""
    return (torch.randn(shape, generator=generator) * 2).to(torch.float8_e4m3fn)


def fp8_model(family: str, seed: int, dtype: torch.dtype = torch.float32, block: int = FP8_BLOCK, **overrides):
    """(the family's tiny model whose experts are transformers' FP8Experts, its dense twin), both
    eval mode."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight, replace_with_fp8_linear

    dense = make_hf_causal_lm(family, seed, dtype, **{**FP8_SIZES[family], **overrides})
    quantized = copy.deepcopy(dense)
    linears = [name for name, module in quantized.named_modules() if isinstance(module, torch.nn.Linear)]
    config = FineGrainedFP8Config(weight_block_size=(block, block), modules_to_not_convert=linears)
    replace_with_fp8_linear(quantized, modules_to_not_convert=linears, quantization_config=config)
    generator = torch.Generator().manual_seed(seed + 1)
    for layer, twin in zip(quantized.model.layers, dense.model.layers):
        experts = layer.mlp.experts
        experts.to_empty(device="cpu")
        with torch.no_grad():
            for name in EXPERT_NAMES:
                values, scales = getattr(experts, name), getattr(experts, f"{name}_scale_inv")
                values.copy_(_fp8_values(values.shape, generator))
                fan_in = values.shape[-1]
                scales.copy_((0.5 + torch.rand(scales.shape, generator=generator)) / (2 * fan_in ** 0.5))
                getattr(twin.mlp.experts, name).copy_(_dequantize_fp8_weight(values, scales, [block, block], dtype))
        experts.eval()
    return quantized.eval(), dense


def mxfp4_gpt_oss(seed: int, dtype: torch.dtype = torch.float32, **overrides):
    """(GPT-OSS with dense experts, the checkpoint tensors of its MXFP4 experts by transformers'
    names): the model's experts are transformers' dequantization of those tensors."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    dense = make_hf_causal_lm("gpt_oss", seed, dtype, **{**MXFP4_GPT_OSS, **overrides})
    generator = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for index, layer in enumerate(dense.model.layers):
        experts = layer.mlp.experts
        for name in EXPERT_NAMES:
            weight = getattr(experts, name)  # GPT-OSS stores [E, in, out]; the checkpoint [E, out, in / 32, 16]
            num_experts, fan_in, fan_out = weight.shape
            blocks = torch.randint(0, 256, (num_experts, fan_out, fan_in // 32, 16), generator=generator,
                                   dtype=torch.uint8)
            # e8m0 127 is 2^0; e2m1 magnitudes reach 6, so 2^-k keeps the weights near 1 / sqrt(fan-in).
            top = 127 - max(1, round(0.5 * torch.log2(torch.tensor(float(fan_in))).item()) + 2)
            scales = torch.randint(top - 2, top + 1, (num_experts, fan_out, fan_in // 32), generator=generator,
                                   dtype=torch.uint8)
            prefix = f"model.layers.{index}.mlp.experts.{name}"
            tensors[f"{prefix}_blocks"], tensors[f"{prefix}_scales"] = blocks, scales
            with torch.no_grad():
                weight.copy_(convert_moe_packed_tensors(blocks, scales, dtype=dtype))
    return dense, tensors

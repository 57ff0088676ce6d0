"""What the benchmark scripts share beyond tpmoe's harness (tpmoe.cli.timing, .report,
.workload): the expert tensors they time, and transformers' experts module holding the same
tensors."""
import math

import torch


def make_expert_weights(config, dtype, device=None, generator=None, requires_grad=False):
    """The expert tensors of `config` in tpmoe.weights' layout ("w_gate_up", "w_down", and with
    config.expert_bias "b_gate_up", "b_down"), std 1/sqrt(fan_in), drawn in `dtype` (no float32
    copy of a whole model)."""
    from tpmoe.weights import expected_shapes
    shapes = expected_shapes(config)
    fan_in = {"w_gate_up": config.hidden_size, "w_down": config.intermediate_size, "b_gate_up": 16, "b_down": 16}
    names = ["w_gate_up", "w_down"] + (["b_gate_up", "b_down"] if config.expert_bias else [])
    return {name: torch.randn(shapes[name], generator=generator, device=device, dtype=dtype)
            .div_(math.sqrt(fan_in[name])).requires_grad_(requires_grad) for name in names}


def make_hf_experts(family, config, weights, implementation):
    """transformers' experts module of `family` (the `experts` of its MoE block, built by
    tpmoe.cli.hf_blocks.meta_hf_block) for `config`, holding the tensors of `weights`
    (make_expert_weights) as its parameters, placed by the adapter's weight map: call it as
    module(x, topk_ids, topk_weights). Raises tpmoe.cli.hf_blocks.HFUnavailable where
    transformers does not import or cannot express the block."""
    from tpmoe.cli.hf_blocks import HFUnavailable, meta_hf_block

    block, hf_weights = meta_hf_block(family, config, implementation)
    module = block.experts
    for name, tensor in weights.items():
        for hf_name, part in hf_weights.to_hf(name, tensor).items():
            owner, _, attribute = hf_name.rpartition(".")
            if owner != "experts":
                raise HFUnavailable(f"{name} maps to {hf_name}, outside transformers' experts module")
            setattr(module, attribute, torch.nn.Parameter(part, requires_grad=tensor.requires_grad))
    left_on_meta = [name for name, parameter in module.named_parameters() if parameter.is_meta]
    if left_on_meta:
        raise HFUnavailable(f"{type(module).__name__} also has {left_on_meta}, which tpmoe's experts do not")
    return module

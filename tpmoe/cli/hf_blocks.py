"""transformers' own MoE block of a preset's family, holding the SAME weight tensors as tpmoe's
block (no copies), for `tpmoe bench` to time its experts implementations ("eager",
"grouped_mm") on exactly the work tpmoe does.

The module is built on the meta device (no memory) and each parameter is then replaced by a
tensor of tpmoe's weight dict (or a view of one: the shared expert's gate and up projections
are the two halves of tpmoe's concatenated shared_gate_up). Names as in tests/hf_models.py.
transformers is imported inside the functions: this module imports without it.
"""
import importlib
from typing import Callable, Dict, Optional, Tuple

import torch

from ..config import MoEConfig

# tpmoe weight name -> the HF parameter/buffer names holding it (concatenated along dim 0).
HF_PARAMETER_NAMES = {
    "qwen3_moe": {"router_weight": ["gate.weight"], "w_gate_up": ["experts.gate_up_proj"],
                  "w_down": ["experts.down_proj"]},
    "qwen2_moe": {"router_weight": ["gate.weight"], "w_gate_up": ["experts.gate_up_proj"],
                  "w_down": ["experts.down_proj"],
                  "shared_gate_up": ["shared_expert.gate_proj.weight", "shared_expert.up_proj.weight"],
                  "shared_down": ["shared_expert.down_proj.weight"], "shared_gate": ["shared_expert_gate.weight"]},
    "mixtral": {"router_weight": ["gate.weight"], "w_gate_up": ["experts.gate_up_proj"],
                "w_down": ["experts.down_proj"]},
    "olmoe": {"router_weight": ["gate.weight"], "w_gate_up": ["experts.gate_up_proj"],
              "w_down": ["experts.down_proj"]},
    "gpt_oss": {"router_weight": ["router.weight"], "router_bias": ["router.bias"],
                "w_gate_up": ["experts.gate_up_proj"], "b_gate_up": ["experts.gate_up_proj_bias"],
                "w_down": ["experts.down_proj"], "b_down": ["experts.down_proj_bias"]},
    "deepseek_v3": {"router_weight": ["gate.weight"], "correction_bias": ["gate.e_score_correction_bias"],
                    "w_gate_up": ["experts.gate_up_proj"], "w_down": ["experts.down_proj"],
                    "shared_gate_up": ["shared_experts.gate_proj.weight", "shared_experts.up_proj.weight"],
                    "shared_down": ["shared_experts.down_proj.weight"]},
}

_MODULES = {
    "qwen3_moe": ("Qwen3MoeConfig", "qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "qwen2_moe": ("Qwen2MoeConfig", "qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "mixtral": ("MixtralConfig", "mixtral", "MixtralSparseMoeBlock"),
    "olmoe": ("OlmoeConfig", "olmoe", "OlmoeSparseMoeBlock"),
    "gpt_oss": ("GptOssConfig", "gpt_oss", "GptOssMLP"),
    "deepseek_v3": ("DeepseekV3Config", "deepseek_v3", "DeepseekV3MoE"),
}
_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


class HFUnavailable(RuntimeError):
    """transformers is missing, or cannot express this block: the reason, for the bench's notes."""


def hf_config_kwargs(family: str, config: MoEConfig) -> Dict[str, object]:
    """The family's transformers config arguments describing `config` (the inverse of the preset check)."""
    c = config
    if family == "gpt_oss":
        return dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    num_local_experts=c.num_experts, num_experts_per_tok=c.top_k, swiglu_limit=c.swiglu_limit)
    if c.activation not in _HF_ACTIVATION:
        raise HFUnavailable(f"activation {c.activation!r} has no transformers name")
    common = dict(hidden_size=c.hidden_size, num_experts_per_tok=c.top_k, hidden_act=_HF_ACTIVATION[c.activation])
    if family == "mixtral":
        return dict(common, intermediate_size=c.intermediate_size, num_local_experts=c.num_experts)
    if family == "olmoe":
        return dict(common, intermediate_size=c.intermediate_size, num_experts=c.num_experts,
                    norm_topk_prob=c.renormalize)
    if family == "qwen3_moe":
        return dict(common, moe_intermediate_size=c.intermediate_size, num_experts=c.num_experts,
                    norm_topk_prob=c.renormalize)
    if family == "qwen2_moe":
        return dict(common, moe_intermediate_size=c.intermediate_size, num_experts=c.num_experts,
                    norm_topk_prob=c.renormalize, shared_expert_intermediate_size=c.shared_intermediate_size)
    if family == "deepseek_v3":
        if c.shared_intermediate_size % c.intermediate_size:
            raise HFUnavailable("DeepSeek-V3's shared experts are whole experts: shared size "
                                f"{c.shared_intermediate_size} is not a multiple of {c.intermediate_size}")
        return dict(common, moe_intermediate_size=c.intermediate_size, n_routed_experts=c.num_experts,
                    n_group=c.n_group, topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor,
                    norm_topk_prob=c.renormalize, n_shared_experts=c.shared_intermediate_size // c.intermediate_size)
    raise HFUnavailable(f"no transformers block for family {family!r}")


def _module_and_config_classes(family: str):
    if family not in _MODULES:
        raise HFUnavailable(f"no transformers block for family {family!r}")
    config_name, package, module_name = _MODULES[family]
    try:
        transformers = importlib.import_module("transformers")
        modeling = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
    except ImportError as error:
        raise HFUnavailable(f"transformers is not installed ({error}); pip install 'tpmoe[hf]'") from None
    return getattr(transformers, config_name), getattr(modeling, module_name)


def _hf_tensor(module: torch.nn.Module, dotted_name: str) -> torch.Tensor:
    try:
        return module.get_parameter(dotted_name)
    except AttributeError:
        return module.get_buffer(dotted_name)


def _set_tensor(module: torch.nn.Module, dotted_name: str, value: torch.Tensor, trainable: bool) -> None:
    *path, name = dotted_name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=trainable)
    else:  # a buffer (DeepSeek-V3's correction bias): the same values tpmoe's block routes with
        owner._buffers[name] = value.detach()


def make_hf_block(family: str, config: MoEConfig, weights: Dict[str, torch.Tensor], implementation: str,
                  trainable: bool) -> Tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(the HF block sharing `weights`, a call [T, H] -> [T, H]). Raises HFUnavailable."""
    config_class, module_class = _module_and_config_classes(family)
    hf_config = config_class(**hf_config_kwargs(family, config))
    hf_config._experts_implementation = implementation
    with torch.device("meta"):
        module = module_class(hf_config)
    for name, hf_names in HF_PARAMETER_NAMES[family].items():
        offset = 0
        for hf_name in hf_names:
            rows = _hf_tensor(module, hf_name).shape[0]
            part = weights[name] if len(hf_names) == 1 else weights[name][offset:offset + rows]
            _set_tensor(module, hf_name, part, trainable and name != "correction_bias")
            offset += rows
    left_on_meta = [name for name, tensor in list(module.named_parameters()) + list(module.named_buffers())
                    if tensor.is_meta]
    if left_on_meta:
        raise HFUnavailable(f"transformers' {module_class.__name__} has tensors tpmoe does not map: {left_on_meta}")
    if implementation not in ("eager",):
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        if implementation not in ALL_EXPERTS_FUNCTIONS:
            raise HFUnavailable(f"this transformers has no experts implementation {implementation!r}")

    def call(hidden_states: torch.Tensor) -> torch.Tensor:
        out = module(hidden_states[None])
        out = out[0] if isinstance(out, tuple) else out  # GptOssMLP returns (output, router scores)
        return out.reshape(hidden_states.shape)

    return module, call


def hf_available(family: str) -> Optional[str]:
    """None when transformers can build this family's block, else the reason."""
    try:
        _module_and_config_classes(family)
    except HFUnavailable as error:
        return str(error)
    return None

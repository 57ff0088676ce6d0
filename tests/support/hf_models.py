"""Tiny Hugging Face MoE blocks with random weights, and their weights under tpmoe's names.

    hf_block, config, weights = make_hf_block("qwen3_moe", {"num_experts": 7})

builds the family's own transformers block from its config class (no download; the families,
classes and config fields of tpmoe/hf/registry.py CONFIGS), casts it, fills every parameter and
buffer with random values (HF starts routers at zeros, which would make every expert tie), and
returns the tpmoe.MoEConfig tpmoe.hf reads off it and a weights dict in tpmoe's names
(tpmoe/weights.py) holding copies of the same values. `hf_to_tpmoe_weights` maps an HF block's
parameters (or their .grad) to tpmoe names through the adapter's weight map, so gradients can
be compared too.

transformers is imported inside the functions, so this module imports without it.
"""
import contextlib
from typing import Dict, Optional, Tuple
from unittest import mock

import torch

from tpmoe.config import MoEConfig
from tpmoe.hf.configs import config_class, config_impl
from tpmoe.weights import random_moe_weights

# Sizes every family starts from: odd on purpose (H=24, I=40, E=8, K=2).
TINY_SIZES = dict(hidden_size=24, intermediate_size=40, num_experts=8, top_k=2)
# Per family: its config fields beyond TINY_SIZES (HF names).
TINY_CONFIGS = {
    "qwen3_moe": dict(norm_topk_prob=True),
    "qwen2_moe": dict(norm_topk_prob=False, shared_expert_intermediate_size=2 * TINY_SIZES["intermediate_size"] - 3),
    "mixtral": dict(),
    "olmoe": dict(norm_topk_prob=False),
    "gpt_oss": dict(),
    "deepseek_v3": dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1, norm_topk_prob=True),
}

# Weights that HF does not train (buffers): they have no gradient on either side.
UNTRAINED = ("correction_bias",)


def _hf_config(family: str, config_kwargs: dict):
    """The family's HF config with tiny defaults, overridden by config_kwargs (HF names)."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"family: expected one of {tuple(TINY_CONFIGS)}, got {family!r}")
    sizes = {field: TINY_SIZES[ours] for field, ours in config_impl(family).fields.items() if ours in TINY_SIZES}
    hf_config = config_class(family)(**{**sizes, **TINY_CONFIGS[family], **config_kwargs})
    # HF dispatches experts through an interface; "eager" is its own plain loop.
    hf_config._experts_implementation = "eager"
    return hf_config


def hf_to_tpmoe_weights(hf_module: torch.nn.Module, *, grad: bool = False) -> Dict[str, torch.Tensor]:
    """An HF block's weights (grad=False) or their gradients (grad=True) under tpmoe names.

    With grad=True the untrained buffers (UNTRAINED) are left out.
    """
    from tpmoe.hf.configs import describe

    hf_weights = describe(hf_module)[1]
    ours = {}
    for name, tensors in hf_weights.hf_tensors(hf_module).items():
        if grad and name in UNTRAINED:
            continue
        if grad:
            missing = [n for n, t in zip(hf_weights.names[name], tensors) if t.grad is None]
            if missing:
                raise AssertionError(f"HF parameters {missing} got no gradient")
            tensors = [tensor.grad for tensor in tensors]
        ours[name] = hf_weights.to_tpmoe(name, [tensor.detach() for tensor in tensors]).clone()
    return ours


def make_hf_block(family: str, config_kwargs: Optional[dict] = None, *, dtype: torch.dtype = torch.float64,
                  generator: Optional[torch.Generator] = None
                  ) -> Tuple[torch.nn.Module, MoEConfig, Dict[str, torch.Tensor]]:
    """(HF module in `dtype` with random weights, its tpmoe.MoEConfig, the same weights in tpmoe names).

    config_kwargs: the family's HF config arguments (HF names) over the tiny defaults.
    The weights dict holds copies (not the HF parameters), so each side gets its own .grad.
    """
    from tpmoe.hf.configs import block_class, describe

    hf_module = block_class(family)(_hf_config(family, dict(config_kwargs or {}))).to(dtype)
    _, hf_weights, config = describe(hf_module)
    weights = random_moe_weights(config, dtype=dtype, generator=generator)
    hf_tensors = {**dict(hf_module.named_parameters()), **dict(hf_module.named_buffers())}
    with torch.no_grad():
        for name in hf_weights.names:
            for hf_name, part in hf_weights.to_hf(name, weights[name]).items():
                hf_tensors[hf_name].copy_(part)
    unset = sorted(set(hf_tensors) - {n for names in hf_weights.names.values() for n in names})
    if unset:
        raise AssertionError(f"{family}: HF tensors {unset} have no tpmoe name; they would keep HF's init")
    return hf_module, config, weights


def hf_block_forward(hf_module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Runs the HF block on [B, S, H]; GPT-OSS's MLP returns (output, router_scores)."""
    out = hf_module(hidden_states)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def hf_router_float32_casts_disabled():
    """Makes HF routers' float32 casts no-ops on float64 tensors, for as long as it is active.

    Several HF routers round to float32 even in a float64 model: softmax(..., dtype=torch.float)
    (Qwen2/3-MoE, OLMoE), logits.float() (Mixtral), x.type(torch.float32) (DeepSeek-V3). That
    rounding (~1e-7) hides any error smaller than it, so the exact comparison turns it off;
    the as-shipped comparison keeps it.
    """
    softmax = torch.nn.functional.softmax
    to_float = torch.Tensor.float
    to_type = torch.Tensor.type

    def softmax_keeping_float64(input, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and input.dtype == torch.float64:
            dtype = None
        return softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    def float_keeping_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else to_float(self, *args, **kwargs)

    def type_keeping_float64(self, dtype=None, *args, **kwargs):
        if dtype in (torch.float32, "torch.FloatTensor") and self.dtype == torch.float64:
            return self
        return to_type(self, dtype, *args, **kwargs)

    with mock.patch.object(torch.nn.functional, "softmax", softmax_keeping_float64), \
            mock.patch.object(torch.Tensor, "float", float_keeping_float64), \
            mock.patch.object(torch.Tensor, "type", type_keeping_float64):
        yield


def available_families():
    """The families whose modeling modules this transformers install has (found, not imported)."""
    import importlib.util

    present = []
    for family in TINY_CONFIGS:
        try:
            found = importlib.util.find_spec(f"transformers.models.{family}.modeling_{family}") is not None
        except ImportError:  # transformers itself is missing
            found = False
        if found:
            present.append(family)
    return present


# ---------------------------------------------------------------- tiny full CausalLMs (helper HF)

# Per family: the HF config arguments of a 2-layer CausalLM over tests/support/hf_families.py's tiny sizes
# (vocab 61, H=24, I=10: I is odd per rank at world size 2 and uneven at 3).
CAUSAL_LM_CONFIGS = {
    "mixtral": dict(intermediate_size=10, num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.1),
    "qwen3_moe": dict(intermediate_size=36, moe_intermediate_size=10, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True),
    "olmoe": dict(intermediate_size=10, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen2_moe": dict(intermediate_size=36, moe_intermediate_size=10, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=False, shared_expert_intermediate_size=14),
    # Layer 0 dense (first_k_dense_replace=1): apply must leave it alone.
    "deepseek_v3": dict(intermediate_size=36, moe_intermediate_size=10, n_routed_experts=8, num_experts_per_tok=3,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1, norm_topk_prob=True,
                        first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=6, head_dim=4, num_key_value_heads=4),
    "gpt_oss": dict(intermediate_size=10, num_local_experts=8, num_experts_per_tok=2, sliding_window=4),
}
# Layers whose mlp is an MoE block in the configs above.
CAUSAL_LM_MOE_LAYERS = {family: ([1] if family == "deepseek_v3" else [0, 1]) for family in CAUSAL_LM_CONFIGS}


def _causal_lm_fields(family: str, overrides: dict) -> dict:
    # With the KV cache (hf_families' models go without): tests/hf/test_hf_apply.py generates with it.
    return {"use_cache": True, **CAUSAL_LM_CONFIGS[family], **overrides}


def causal_lm_config(family: str, **overrides):
    """The family's tiny CausalLM config (HF experts_implementation "eager": HF's own loop)."""
    # Imported here: tests/support/hf_families.py imports this module's helpers.
    from support.hf_families import causal_lm_config as tiny_causal_lm_config
    return tiny_causal_lm_config(family, **_causal_lm_fields(family, overrides))


def make_hf_causal_lm(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """(model in eval mode, with random weights from `seed`) of the family's tiny CausalLM."""
    from support.hf_families import make_family_causal_lm
    return make_family_causal_lm(family, seed, dtype, **_causal_lm_fields(family, overrides))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and buffer that HF initialises to constants gets random values, the same
    for a given seed in every process: norms near 1, routers wide enough for decisive routing."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if "inv_freq" in name or not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("sinks"):
            value = 1 + 0.1 * noise
        elif tensor.dim() == 1:
            value = 0.1 * noise
        elif name.endswith(("gate.weight", "router.weight")) and tensor.dim() == 2:
            value = noise / tensor.shape[-1] ** 0.5 * 3
        elif "embed" in name:
            value = noise
        else:
            value = noise / max(tensor.shape[-1], tensor.shape[-2] if tensor.dim() == 3 else 1) ** 0.5 * 1.5
        tensor.copy_(value.to(tensor.dtype))
    return model


class PerBlockCollectives:
    """Counts the torch.distributed collectives issued inside each given module, forward and backward.

    counter: a tests/support/dist_utils.CollectiveCounter (it wraps the torch.distributed functions).
    Forward: the count between the module's forward pre-hook and forward hook. Backward: the
    count between the gradient of its output being ready and the gradient of its input being
    complete (tensor hooks): autograd runs nothing else in between, since every earlier node
    waits for the input's gradient. Results: forward[name], backward[name] (lists, one per call).
    """

    def __init__(self, counter, modules: dict):
        self.counter = counter
        self.forward = {name: [] for name in modules}
        self.backward = {name: [] for name in modules}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            module._count_start = self.counter.total()
            hidden = args[0]
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: self._backward_end(name, module))
        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.forward[name].append(self.counter.total() - module._count_start)
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: self._backward_start(module))
        return hook

    def _backward_start(self, module):
        module._count_backward = self.counter.total()

    def _backward_end(self, name, module):
        self.backward[name].append(self.counter.total() - module._count_backward)

    def remove(self):
        for handle in self._handles:
            handle.remove()


def lm_loss_backward(model, input_ids):
    """One training step's backward of a causal LM (language-model loss + router aux loss)."""
    model.zero_grad(set_to_none=True)
    output = model(input_ids, labels=input_ids, output_router_logits=True)
    loss = output.loss + (output.aux_loss if output.aux_loss is not None else 0)
    loss.backward()
    return output

"""The module that takes an HF MoE block's place: a tpmoe.MoEBlock behind the HF block's interface.

forward(hidden_states [B, S, H]) returns what the HF block returned: the hidden states, or
(hidden states, router_scores [T, K]) for GPT-OSS's MLP. Router logits reach transformers'
`output_router_logits` / aux-loss path as they did before: the HF model records them with a
forward hook on its router class (OutputRecorder(<Router>, index=0)); the router is now inside
the tpmoe block, so this module hands the logits to the same collector itself.

Router jitter (Mixtral's router_jitter_noise, training only): HF multiplies the block input by
U(1 - j, 1 + j) noise drawn from the global RNG. Under TP every rank must draw the SAME noise
or ranks would route differently and the all-reduce would sum unrelated partial outputs. So
the noise comes from a generator seeded, on every rank alike, from (jitter_seed, step, layer):
  - jitter_seed: `apply(..., jitter_seed=)`, the same int on every rank (default 0);
  - step: a counter on this module, advanced once per forward of the root model by a pre-hook
    that `apply` registers (`JitterStep`), so a gradient-checkpointing recompute inside the same
    step redraws exactly the noise of the first pass;
  - layer: the block's index in the model.
Nothing is communicated, and the noise does not depend on the global RNG state of a rank.
"""
import hashlib
from typing import Dict, Optional

import torch
from torch import nn

from ..block import MoEBlock
from .families import Pattern


def jitter_generator_seed(jitter_seed: int, step: int, layer: int) -> int:
    """A 63-bit seed that is a pure function of (jitter_seed, step, layer): the same on every rank."""
    digest = hashlib.blake2b(f"{jitter_seed}:{step}:{layer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def _router_logits_collector():
    """transformers' active output collector (a dict of lists) or None when nothing is recorded."""
    from transformers.utils import output_capturing

    collected = output_capturing._active_collector.get()
    if collected is None or "router_logits" not in collected:
        return None
    return collected["router_logits"]


class TpmoeHFBlock(nn.Module):
    """A tpmoe block in place of the HF MoE block `family`'s `hf_class_name`.

    block: the tpmoe MoEBlock (weights named as in tpmoe.weights, this rank's shards under TP).
    records_router_logits: whether the model recorded this block's router logits (its
    _can_record_outputs names the replaced router class).
    """

    def __init__(self, block: MoEBlock, pattern: Pattern, family: str, hf_class_name: str, *,
                 layer_index: int, jitter_noise: float = 0.0, jitter_seed: int = 0,
                 records_router_logits: bool = False, hf_weight_names: Optional[Dict[str, list]] = None,
                 hf_weight_rows: Optional[Dict[str, list]] = None):
        super().__init__()
        self.block = block
        self.pattern = pattern
        self.family = family
        self.hf_class_name = hf_class_name
        self.layer_index = layer_index
        self.jitter_noise = float(jitter_noise)
        self.jitter_seed = int(jitter_seed)
        self.jitter_step = 0
        self.records_router_logits = records_router_logits
        # How to write the weights back under HF names (gather_state_dict).
        self.hf_weight_names = hf_weight_names or {}
        self.hf_weight_rows = hf_weight_rows or {}

    def extra_repr(self) -> str:
        return f"family={self.family!r}, replaces={self.hf_class_name}, layer={self.layer_index}"

    def _jitter(self, hidden_states: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=hidden_states.device)
        generator.manual_seed(jitter_generator_seed(self.jitter_seed, self.jitter_step, self.layer_index))
        noise = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        noise.uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise, generator=generator)
        return hidden_states * noise

    def forward(self, hidden_states: torch.Tensor):
        if self.training and self.jitter_noise > 0:
            hidden_states = self._jitter(hidden_states)
        output, (logits, topk_weights, _) = self.block(hidden_states, return_routing=True)
        if self.records_router_logits:
            collector = _router_logits_collector()
            if collector is not None:
                collector.append(logits)
        if self.pattern.returns_router_scores:
            return output, topk_weights.to(logits.dtype)
        return output


class JitterStep:
    """Forward pre-hook of the root model: one step per root forward for every jittered block."""

    def __init__(self, blocks):
        self.blocks = list(blocks)

    def __call__(self, module, args, kwargs=None):
        if module.training:
            for block in self.blocks:
                block.jitter_step += 1

"""The modules that take an HF MoE block's place (or its experts module's), around a tpmoe.MoEBlock.

TpmoeHFBlock (judge Plan mode "block") replaces the whole block. forward(hidden_states [B, S, H])
returns what the HF block returned: the hidden states, or (hidden states, routing weights [T, K])
for GPT-OSS's MLP. The router is either tpmoe's native one (its weights inside the MoEBlock) or
the family's own router module, kept under its own attribute name, so that its state-dict keys,
its `output_router_logits` recorder hook and its code stay transformers'. With a native router
the logits reach transformers' output collector through this module instead (the model records
them with a forward hook on its router class, which no longer runs).

TpmoeHFExperts (mode "experts") replaces only `block.experts`: forward(hidden_states [T, H],
top_k_index [T, K], top_k_weights [T, K]) -> [T, H], the transformers experts contract; the
block's own forward computes everything else, replicated on every rank.

Randomness under TP. Every rank must draw the SAME random numbers inside a block (router jitter,
sparse-mixer sampling) or ranks route differently and the all-reduce sums unrelated partials.
Mixtral's jitter (block mode) draws from a generator seeded, on every rank alike, from
(jitter_seed, step, layer); the random draws of a block kept in experts mode come from the
global RNG, re-seeded the same way for the duration of its forward (SynchronizedRandomness):
  - jitter_seed: `apply(..., jitter_seed=)`, the same int on every rank (default 0);
  - step: a counter advanced once per forward of the root model by a pre-hook that `apply`
    registers (`StepCounter`), so a gradient-checkpointing recompute inside the same step redraws
    exactly the numbers of the first pass;
  - layer: the block's index in the model;
  - under expert parallelism, the EP rank: its ranks hold different tokens (the model runs
    data-parallel over EP), so each draws its own numbers; the TP ranks of one EP rank alike.
Nothing is communicated, and the draws do not depend on the global RNG state of a rank.
"""
import hashlib
from typing import Dict, List, Optional

import torch
from torch import nn

from ..block import MoEBlock
from .quantized_names import quantized_experts_to_hf
from .weight_map import WeightMap


def jitter_generator_seed(jitter_seed: int, step: int, layer: int, stream: int = 0) -> int:
    """A 63-bit seed that is a pure function of (jitter_seed, step, layer): the same on every rank.
    stream: the EP rank under expert parallelism (its ranks hold different tokens, so each draws
    its own numbers, as data-parallel replicas do); 0 leaves the seed as without EP."""
    key = f"{jitter_seed}:{step}:{layer}" + (f":{stream}" if stream else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def _router_logits_collector():
    """transformers' active output collector (a dict of lists) or None when nothing is recorded."""
    from transformers.utils import output_capturing

    collected = output_capturing._active_collector.get()
    if collected is None or "router_logits" not in collected:
        return None
    return collected["router_logits"]


class _HFWeights:
    """What gather_state_dict needs to write a tpmoe block's weights back under HF names."""

    def _init_hf_weights(self, block: MoEBlock, weights: WeightMap, family: str, hf_class_name: str,
                         layer_index: int):
        self.block = block
        self.hf_weights = weights
        self.family = family
        self.hf_class_name = hf_class_name
        self.layer_index = layer_index

    def hf_state(self) -> Dict[str, torch.Tensor]:
        """The full weights under the HF names relative to this module (ONE all-gather under TP);
        quantized experts as transformers stores them (tpmoe.hf.quantized_names)."""
        full = self.block.gather_full()
        entries = {}
        for name in self.hf_weights.names:
            if name in full:
                entries.update(self.hf_weights.to_hf(name, full[name]))
        if hasattr(self.block, "quantized_experts"):
            entries.update(quantized_experts_to_hf(self.block.gather_quantized_experts(),
                                                   self.hf_weights.names["w_gate_up"][0],
                                                   self.hf_weights.names["w_down"][0]))
        return entries

    def extra_repr(self) -> str:
        return f"family={self.family!r}, replaces={self.hf_class_name}, layer={self.layer_index}"


class TpmoeHFBlock(_HFWeights, nn.Module):
    """A tpmoe block in place of the HF MoE block `family`'s `hf_class_name` (Plan mode "block").

    plan: the judge's Plan (block structure, native router or not). kept: HF modules and tensors
    this module keeps under their HF attribute names (the family's router, router arguments such
    as a correction-bias buffer, a post-norm). routed_scale: the block's factor on the routed
    output. records_router_logits: the model records router logits from the replaced router class.
    """

    def __init__(self, block: MoEBlock, plan, weights: WeightMap, *, family: str, hf_class_name: str,
                 layer_index: int, kept: Dict[str, object], routed_scale: float = 1.0, jitter_noise: float = 0.0,
                 jitter_seed: int = 0, jitter_stream: int = 0, records_router_logits: bool = False):
        nn.Module.__init__(self)
        self._init_hf_weights(block, weights, family, hf_class_name, layer_index)
        self.structure = plan.block
        self.native_router = plan.router is not None
        for name, value in kept.items():
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            elif isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value)
        self.routed_scale = float(routed_scale)
        self.jitter_noise = float(jitter_noise)
        self.jitter_seed = int(jitter_seed)
        self.jitter_stream = int(jitter_stream)
        self.jitter_step = 0
        self.records_router_logits = records_router_logits

    def _jitter(self, hidden_states: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=hidden_states.device)
        generator.manual_seed(jitter_generator_seed(self.jitter_seed, self.jitter_step, self.layer_index,
                                                    self.jitter_stream))
        noise = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        noise.uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise, generator=generator)
        return hidden_states * noise

    def _route(self, hidden_states: torch.Tensor, x: torch.Tensor):
        if self.native_router:
            logits, weights, ids = self.block.route(x)
            if self.records_router_logits:
                collector = _router_logits_collector()
                if collector is not None:
                    collector.append(logits)
            return logits, weights, ids
        structure = self.structure
        router = getattr(self, structure.router)
        router_input = x if structure.router_input_flat else hidden_states
        outputs = router(router_input, *[getattr(self, name) for name in structure.router_args])
        if structure.router_output == "dispatch":
            # JetMoE: pairs sorted by expert, their gates in that order, the per-expert counts.
            sorted_pairs, _, gates, counts, logits = outputs
            experts = torch.repeat_interleave(torch.arange(len(counts), device=x.device),
                                              torch.tensor(counts, device=x.device))
            pairs = torch.empty_like(sorted_pairs).scatter_(0, sorted_pairs, experts)
            weights = torch.zeros(gates.shape, dtype=gates.dtype, device=gates.device).scatter(0, sorted_pairs, gates)
            return logits, weights.view(x.shape[0], -1), pairs.view(x.shape[0], -1)
        if structure.router_output == "scores_logits":
            # [T, E] scores (zero off the top-k) and the logits: the router's own top-k picks the ids.
            scores, logits = outputs
            ids = torch.topk(logits, router.top_k, dim=1).indices
            return logits, scores.gather(1, ids), ids
        logits, weights, ids = outputs[:3]
        return logits, weights, ids

    def forward(self, hidden_states: torch.Tensor):
        if self.training and self.jitter_noise > 0:
            hidden_states = self._jitter(hidden_states)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits, weights, ids = self._route(hidden_states, x)
        routed_weights = weights * self.routed_scale if self.routed_scale != 1.0 else weights
        output = self.block(x, routing=(logits, routed_weights, ids))
        if self.structure.post_norm is not None:
            output = getattr(self, self.structure.post_norm)(output)
        if self.structure.output_bias is not None:
            output = output + getattr(self, self.structure.output_bias)
        output = output.reshape(hidden_states.shape)
        if self.structure.returns == "output_and_weights":
            return output, weights.to(logits.dtype)
        if self.structure.returns == "output_and_logits":
            return output.reshape(x.shape), logits
        return output


class TpmoeHFExperts(_HFWeights, nn.Module):
    """A tpmoe block without a router in place of an HF experts module (Plan mode "experts").

    post_norm: (attribute, module) of the family's norm of each expert's output (kept, replicated),
    applied to the complete per-expert outputs before the weighting (MoEBlock.expert_outputs).
    identity_experts: ids >= the block's num_experts are identity experts (w * x): they get weight
    0 in the MoEBlock and their term, replicated, is added after its reduction."""

    def __init__(self, block: MoEBlock, weights: WeightMap, *, family: str, hf_class_name: str,
                 layer_index: int, post_norm=None, identity_experts: bool = False):
        nn.Module.__init__(self)
        self._init_hf_weights(block, weights, family, hf_class_name, layer_index)
        self.post_norm_name = None
        if post_norm is not None:
            self.post_norm_name = post_norm[0]
            self.add_module(post_norm[0], post_norm[1])
        self.identity_experts = identity_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.identity_experts:
            identity = top_k_index >= self.block.config.num_experts
            identity_weight = top_k_weights.masked_fill(~identity, 0).sum(dim=-1, keepdim=True)
            routed = self.block(hidden_states, routing=(None, top_k_weights.masked_fill(identity, 0),
                                                        top_k_index.masked_fill(identity, 0)))
            return routed + (hidden_states * identity_weight).to(hidden_states.dtype)
        if self.post_norm_name is None:
            return self.block(hidden_states, routing=(None, top_k_weights, top_k_index))
        outputs = getattr(self, self.post_norm_name)(self.block.expert_outputs(hidden_states, top_k_index))
        return (outputs * top_k_weights[..., None].to(outputs.dtype)).sum(dim=1).to(hidden_states.dtype)


class SynchronizedRandomness:
    """Forward pre-hook and hook of an HF block kept in experts mode under TP, in training: its
    forward draws from the global RNG seeded from (jitter_seed, step, layer), the same on every
    rank; the rank's own RNG state is put back afterwards."""

    def __init__(self, jitter_seed: int, layer_index: int, stream: int = 0):
        self.jitter_seed = jitter_seed
        self.layer_index = layer_index
        self.stream = stream
        self.jitter_step = 0
        self._saved: List[Optional[tuple]] = []

    def before(self, module, args, kwargs=None):
        if not module.training:
            self._saved.append(None)
            return
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._saved.append((torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None))
        seed = jitter_generator_seed(self.jitter_seed, self.jitter_step, self.layer_index, self.stream)
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)  # the current device's generator only

    def after(self, module, args, output):
        saved = self._saved.pop()
        if saved is not None:
            cpu_state, cuda_state = saved
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state)


class StepCounter:
    """Forward pre-hook of the root model: one step per root forward, for every block that draws."""

    def __init__(self, holders):
        self.holders = list(holders)

    def __call__(self, module, args, kwargs=None):
        if module.training:
            for holder in self.holders:
                holder.jitter_step += 1

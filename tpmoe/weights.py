"""Names and shapes of an MoE block's weights, a checker, and a random initialiser.

One dict of tensors describes a block (I = intermediate_size, R = 2I gated or I not gated,
Is = shared_intermediate_size):

  router_weight   [E, H]                     unless config.external_router
  router_bias     [E]                        if config.router_bias (GPT-OSS)
  correction_bias [E]                        if config.correction_bias (DeepSeek-V3, not trained)
  w_gate_up       [E, R, H]  concatenated: gate rows [0, I), up rows [I, 2I)
                  [E, R, H]  interleaved:  gate rows 0, 2, 4..., up rows 1, 3, 5...
                  [E, H, R]  gpt_oss:      interleaved along the last axis (GPT-OSS's own storage)
  w_down          [E, H, I]  ([E, I, H] for gpt_oss)
  b_gate_up       [E, R]     if config.expert_bias, packed like the columns of w_gate_up
  b_down          [E, H]     if config.expert_bias
  shared_gate_up  [2Is, H]   concatenated ([Is, H] not gated)   if Is > 0
  shared_down     [H, Is]                                         if Is > 0
  shared_gate     [1, H]     if config.shared_expert_gate

One rank's routed experts travel to tpmoe.routed_experts (and from there to a backend) as an
ExpertWeights: the four expert tensors above (a rank's shards of them) and their `format`.
"""
import math
from typing import Dict, NamedTuple, Optional

import torch

from ._checks import check_choice
from .config import MoEConfig

# How expert weights are stored. "dense": plain float tensors (float32, bfloat16, float16), the
# shapes above; "fp8_block": float8 e4m3 values with float32 scales per block (tpmoe.fp8);
# "mxfp4": e2m1 pairs a byte with an e8m0 scale per 32 values, GPT-OSS's (tpmoe.mxfp4).
FP8_FORMAT = "fp8_block"
MXFP4_FORMAT = "mxfp4"
WEIGHT_FORMATS = ("dense", FP8_FORMAT, MXFP4_FORMAT)


class ExpertWeights(NamedTuple):
    """One rank's routed-expert weights, in `format` (WEIGHT_FORMATS), shapes as above for the
    spec's layout with the rank's I_p in place of I; `scales`: a quantized format's scales
    (tpmoe.fp8.BlockScales for "fp8_block" and "mxfp4"), None for "dense". A NamedTuple: torch.compile
    traces through it without a graph break."""

    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    b_gate_up: Optional[torch.Tensor] = None
    b_down: Optional[torch.Tensor] = None
    format: str = "dense"
    scales: Optional[tuple] = None

    def check_format(self, argument: str = "weights") -> None:
        check_choice(self.format, f"{argument}.format", WEIGHT_FORMATS)


def expected_shapes(config: MoEConfig) -> Dict[str, tuple]:
    H, I, E, R = config.hidden_size, config.intermediate_size, config.num_experts, config.gate_up_rows
    shapes = {} if config.external_router else {"router_weight": (E, H)}
    if config.router_bias:
        shapes["router_bias"] = (E,)
    if config.correction_bias:
        shapes["correction_bias"] = (E,)
    if config.layout == "gpt_oss":
        shapes["w_gate_up"] = (E, H, R)
        shapes["w_down"] = (E, I, H)
    else:
        shapes["w_gate_up"] = (E, R, H)
        shapes["w_down"] = (E, H, I)
    if config.expert_bias:
        shapes["b_gate_up"] = (E, R)
        shapes["b_down"] = (E, H)
    Is = config.shared_intermediate_size
    if Is > 0:
        shapes["shared_gate_up"] = ((2 if config.gated else 1) * Is, H)
        shapes["shared_down"] = (H, Is)
        if config.shared_expert_gate:
            shapes["shared_gate"] = (1, H)
    return shapes


def check_moe_weights(config: MoEConfig, weights: Dict[str, torch.Tensor], argument: str = "weights") -> None:
    """Raises ValueError naming the first weight that is missing, unexpected or misshapen."""
    shapes = expected_shapes(config)
    for name, shape in shapes.items():
        if name not in weights:
            raise ValueError(f"{argument}: missing {name!r} (expected shape {shape} for this config)")
        tensor = weights[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{argument}[{name!r}]: expected a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{argument}[{name!r}]: expected shape {shape}, got {tuple(tensor.shape)}")
    extra = sorted(set(weights) - set(shapes))
    if extra:
        raise ValueError(f"{argument}: unexpected entries {extra} for this config (expected {sorted(shapes)})")


def random_moe_weights(config: MoEConfig, *, dtype: torch.dtype = torch.float32, device="cpu",
                       generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Random weights scaled like a trained layer (std 1/sqrt(fan_in)), never zeros.

    Biases are drawn too, so that a path that forgets one is caught. Made in float64 on the
    CPU and then cast, so the same generator gives the same block at every dtype and device.
    """
    weights = {}
    for name, shape in expected_shapes(config).items():
        if name in ("router_weight", "shared_gate"):
            fan_in = config.hidden_size
        elif name == "w_gate_up" or name == "shared_gate_up":
            fan_in = config.hidden_size
        elif name == "w_down":
            fan_in = config.intermediate_size
        elif name == "shared_down":
            fan_in = config.shared_intermediate_size
        else:  # biases
            fan_in = 16
        value = torch.randn(shape, dtype=torch.float64, generator=generator) / math.sqrt(fan_in)
        weights[name] = value.to(dtype=dtype, device=device)
    return weights

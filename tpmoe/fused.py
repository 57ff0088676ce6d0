"""`tpmoe.fused_experts` / `tpmoe.routed_experts`: the routed experts of one rank's shard, the same call
on every device."""
from typing import Optional

import torch

from ._checks import (FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_ids_in_range, check_shape,
                      check_tensor)
from ._native import use_native_ops
from .config import ExpertSpec, check_expert_fields
from .quantized import check_quantized_experts, dequantize_experts
from .weights import ExpertWeights

BACKENDS = ("auto", "cpu", "triton", "reference")


def fused_experts(hidden_states: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, activation: str = "silu",
                  layout: str = "concatenated", gated: bool = True, b_gate_up: Optional[torch.Tensor] = None,
                  b_down: Optional[torch.Tensor] = None, alpha: float = 1.702, limit: float = 7.0,
                  backend: str = "auto") -> torch.Tensor:
    """y[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden_states[t]).

    Shapes (I_p is this rank's share of the intermediate size; I_p = 0 gives zeros plus the
    weighted down bias):
      hidden_states [T, H]; topk_ids [T, K] int32/int64; topk_weights [T, K] (any float dtype);
      w_gate_up [E, R, H] ("concatenated", "interleaved") or [E, H, R] ("gpt_oss"), R = 2 I_p
      gated, I_p not gated; w_down [E, H, I_p] ([E, I_p, H] for "gpt_oss");
      b_gate_up [E, R], b_down [E, H].
    backend: "auto" (Triton on CUDA tensors, the CPU path on CPU tensors), "cpu" (the native ops
    of tpmoe._C; where it is not built, their plain-PyTorch twin, after one warning), "triton"
    (on CPU tensors only under TRITON_INTERPRET=1), "reference" (tpmoe.reference, loop-style).
    Differentiable in hidden_states, the weights, the biases and topk_weights.
    The keywords' form of tpmoe.routed_experts (which takes an ExpertWeights and an ExpertSpec).
    """
    check_expert_fields(activation, layout, gated)
    return routed_experts(hidden_states, ExpertWeights(w_gate_up, w_down, b_gate_up, b_down), topk_ids, topk_weights,
                          ExpertSpec(activation, layout, gated, alpha, limit), backend=backend)


def routed_experts(hidden_states: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor, spec: ExpertSpec = ExpertSpec(), *,
                   backend: str = "auto") -> torch.Tensor:
    """tpmoe.fused_experts with the experts' weights in one tpmoe.weights.ExpertWeights and what
    they compute in one tpmoe.ExpertSpec (MoEConfig.expert_spec), as a MoEBlock calls it."""
    check_choice(backend, "backend", BACKENDS)
    if not isinstance(spec, ExpertSpec):
        raise TypeError(f"spec: expected a tpmoe.ExpertSpec, got {type(spec).__name__}")
    if not isinstance(weights, ExpertWeights):
        raise TypeError(f"weights: expected a tpmoe.weights.ExpertWeights, got {type(weights).__name__}")
    weights.check_format()
    num_experts, intermediate_local = _check_experts_args(hidden_states, weights, topk_ids, topk_weights, spec)
    check_ids_in_range(topk_ids, num_experts)

    implementation = _implementation(backend, hidden_states.device, weights.format)
    # The Triton kernels read rows of a contiguous x and int64 ids; the other paths give the
    # same results either way.
    return implementation(hidden_states.contiguous(), weights, topk_ids.long(), topk_weights, spec)


def _implementation(backend: str, device: torch.device, weight_format: str = "dense"):
    """The one backend decision: the function that runs a call of `backend` on `device` with
    weights of `weight_format`, each called as f(hidden_states, weights, topk_ids, topk_weights, spec)."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpu"
    if backend == "reference":
        return _reference
    if backend == "triton":
        if weight_format != "dense":
            # Quantized: dequantized in the kernels' B-load (forward); calls that need gradients
            # go to the plain-PyTorch path (tpmoe.triton.quantized).
            from .triton.quantized import experts_triton_quantized
            return experts_triton_quantized
        from .triton import experts_triton
        return experts_triton
    if device.type != "cpu":
        raise ValueError(f"backend: 'cpu' needs CPU tensors, got hidden_states on {device}")
    if weight_format != "dense":
        # Quantized: the native op that dequantizes a weight row at a time (forward; it hands
        # calls that need gradients to the plain-PyTorch path itself), or that path where
        # tpmoe._C is not built.
        if use_native_ops() is not None:
            from .cpu.quantized import experts_cpu_quantized
            return experts_cpu_quantized
        from .cpu import experts_torch
        return experts_torch
    if use_native_ops() is not None:
        from .cpu import experts_cpu
        return experts_cpu
    from .cpu import experts_torch
    return experts_torch


def _reference(hidden_states, weights, topk_ids, topk_weights, spec):
    from .reference import reference_experts  # loop-style and independent: it keeps its keywords
    if weights.format != "dense":
        weights = dequantize_experts(weights, spec, hidden_states.dtype)
    return reference_experts(hidden_states, weights.w_gate_up, weights.w_down, topk_ids, topk_weights,
                             b_gate_up=weights.b_gate_up, b_down=weights.b_down, **spec.keywords())


def _check_experts_args(hidden_states, weights, topk_ids, topk_weights, spec):
    """Returns (E, I_p) after checking every tensor against hidden_states and each other."""
    check_tensor(hidden_states, "hidden_states", ndim=2, dtypes=FLOAT_DTYPES)
    device, dtype = hidden_states.device, hidden_states.dtype
    num_tokens, hidden_size = hidden_states.shape
    if weights.format != "dense":
        num_experts, intermediate_local = check_quantized_experts(weights, spec, hidden_size=hidden_size,
                                                                  device=device)
    else:
        num_experts, intermediate_local = _check_dense_weights(weights, hidden_size, dtype, device, spec)
    gate_up_rows = (2 if spec.gated else 1) * intermediate_local

    check_tensor(topk_ids, "topk_ids", ndim=2, dtypes=INDEX_DTYPES, device=device)
    top_k = topk_ids.shape[1]
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids: expected {num_tokens} rows (tokens of hidden_states), got shape "
                         f"{tuple(topk_ids.shape)}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"topk_ids: expected 1 <= K <= E ({num_experts}) columns, got K = {top_k}")
    check_tensor(topk_weights, "topk_weights", ndim=2, dtypes=FLOAT_DTYPES, device=device)
    check_shape(topk_weights, "topk_weights", tuple(topk_ids.shape), "that of topk_ids")
    if weights.b_gate_up is not None:
        check_tensor(weights.b_gate_up, "b_gate_up", dtypes=(dtype,), device=device)
        check_shape(weights.b_gate_up, "b_gate_up", (num_experts, gate_up_rows), "E, gate+up size of w_gate_up")
    if weights.b_down is not None:
        check_tensor(weights.b_down, "b_down", dtypes=(dtype,), device=device)
        check_shape(weights.b_down, "b_down", (num_experts, hidden_size), "E, H")
    return num_experts, intermediate_local


def _check_dense_weights(weights, hidden_size, dtype, device, spec):
    """(E, I_p) of "dense" weights: float tensors of hidden_states' dtype, shaped for the layout."""
    w_gate_up, w_down, layout, gated = weights.w_gate_up, weights.w_down, spec.layout, spec.gated
    check_tensor(w_gate_up, "w_gate_up", ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_tensor(w_down, "w_down", ndim=3, dtypes=FLOAT_DTYPES, device=device)
    for name, weight in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if weight.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (that of hidden_states), got {weight.dtype}")
    if weights.scales is not None:
        raise ValueError(f"weights.scales: expected None for format 'dense', got {type(weights.scales).__name__}")
    num_experts = w_gate_up.shape[0]
    transposed = layout == "gpt_oss"
    hidden_axis, rows_axis = (1, 2) if transposed else (2, 1)
    if w_gate_up.shape[hidden_axis] != hidden_size:
        raise ValueError(f"w_gate_up: expected hidden size {hidden_size} (from hidden_states) on axis {hidden_axis} "
                         f"for layout {layout!r}, got shape {tuple(w_gate_up.shape)}")
    gate_up_rows = w_gate_up.shape[rows_axis]
    if gated and gate_up_rows % 2 != 0:
        raise ValueError(f"w_gate_up: gated experts need an even gate+up size on axis {rows_axis}, "
                         f"got shape {tuple(w_gate_up.shape)}")
    intermediate_local = gate_up_rows // 2 if gated else gate_up_rows
    down_shape = ((num_experts, intermediate_local, hidden_size) if transposed
                  else (num_experts, hidden_size, intermediate_local))
    check_shape(w_down, "w_down", down_shape, f"E, I_p from w_gate_up, layout {layout!r}")
    return num_experts, intermediate_local

"""Each Triton launch as a `torch.library.custom_op` with a fake (meta) implementation, so
torch.compile can trace through them and CUDA graphs can capture them. They are
`torch.ops.tpmoe.triton_*`, in the namespace of the C++ ops (tpmoe._native).

`config` is a KernelConfig as a list [BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M, SPLIT].

Every op runs its launches under `on_tensor_device`: Triton launches on the current CUDA
device, not on that of the tensors, so with tensors on cuda:1 and cuda:0 current a launch
would run on the wrong GPU. The guard is here, once, around every op.
"""
import contextlib
import functools
from typing import List, Optional, Tuple

import torch

from ..routing_torch import empty_align_outputs
from .align import align_triton as _align_triton
from .backward_dh import backward_dh as _backward_dh
from .backward_dw import backward_dw as _backward_dw
from .combine import combine as _combine
from .down import grouped_scatter as _grouped_scatter
from .down import pair_dtype
from .gate_up import gate_up as _gate_up
from .gate_up import h_buffer
from .layouts import empty_aligned_rows, gate_up_axes
from .tile_configs import KernelConfig


def config_list(config: KernelConfig) -> List[int]:
    return [config.BLOCK_M, config.BLOCK_N, config.BLOCK_K, config.num_warps, config.num_stages, config.GROUP_M,
            config.SPLIT]


def _config(values: List[int]) -> KernelConfig:
    return KernelConfig(*values)


def launch_device(args) -> Optional[torch.device]:
    """The device of the first tensor among args: where the op's launches must run."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    return None


def device_guard(device: Optional[torch.device]):
    """torch.cuda.device(device) for a CUDA device, nothing for any other (CPU under the interpreter)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_tensor_device(launcher):
    """Runs `launcher` with its tensors' CUDA device current (see the module docstring)."""
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        with device_guard(launch_device(list(args) + list(kwargs.values()))):
            return launcher(*args, **kwargs)
    return guarded


@torch.library.custom_op("tpmoe::triton_gate_up", mutates_args=())
@on_tensor_device
def gate_up(hidden_states: torch.Tensor, w_gate_up: torch.Tensor, b_gate_up: Optional[torch.Tensor],
            sorted_ids_padded: torch.Tensor, block_expert: torch.Tensor, top_k: int, activation: str, layout: str,
            gated: bool, alpha: float, limit: float, config: List[int], scale: Optional[torch.Tensor] = None,
            weight_format: str = "dense", block_size: int = 1, block_offset: int = 0,
            fp8_activations: bool = False) -> torch.Tensor:
    """h [M, I] = act(gate) * up for the padded sorted rows (rows 16-byte aligned); a quantized
    w_gate_up comes with its scale tensor, format, block size and offset (tpmoe.triton.dequant),
    fp8_activations for the fp8 x fp8 variant."""
    return _gate_up(hidden_states, w_gate_up, b_gate_up, sorted_ids_padded, block_expert, top_k=top_k,
                    activation=activation, layout=layout, gated=gated, alpha=alpha, limit=limit,
                    config=_config(config), scale=scale, weight_format=weight_format, block_size=block_size,
                    block_offset=block_offset, fp8_activations=fp8_activations)


@gate_up.register_fake
def _(hidden_states, w_gate_up, b_gate_up, sorted_ids_padded, block_expert, top_k, activation, layout, gated,
      alpha, limit, config, scale=None, weight_format="dense", block_size=1, block_offset=0, fp8_activations=False):
    intermediate_size = w_gate_up.shape[gate_up_axes(layout)[0]] // (2 if gated else 1)
    # The strides the real op gives (16-byte aligned rows), so compiled graphs agree.
    return h_buffer(sorted_ids_padded.shape[0], intermediate_size, hidden_states.dtype, hidden_states.device,
                    block_offset if fp8_activations else 0)


@torch.library.custom_op("tpmoe::triton_grouped_scatter", mutates_args=())
@on_tensor_device
def grouped_scatter(rows: torch.Tensor, weight: torch.Tensor, n_axis: int, k_axis: int, bias: Optional[torch.Tensor],
                    routing_weights: Optional[torch.Tensor], sorted_ids_padded: torch.Tensor,
                    block_expert: torch.Tensor, num_pairs: int, config: List[int], scale: Optional[torch.Tensor] = None,
                    weight_format: str = "dense", block_size: int = 1, block_offset: int = 0,
                    fp8_activations: bool = False) -> torch.Tensor:
    """[SPLIT, num_pairs, N] per-pair partials (dtype: down.pair_dtype): rows @ weight[e]^T (+ bias[e]) (* routing
    weight); a quantized weight comes with its scale tensor, format, block size and offset (tpmoe.triton.dequant),
    fp8_activations for the fp8 x fp8 variant."""
    return _grouped_scatter(rows, weight, n_axis, k_axis, bias, routing_weights, sorted_ids_padded, block_expert,
                            num_pairs=num_pairs, config=_config(config), scale=scale, weight_format=weight_format,
                            block_size=block_size, block_offset=block_offset, fp8_activations=fp8_activations)


@grouped_scatter.register_fake
def _(rows, weight, n_axis, k_axis, bias, routing_weights, sorted_ids_padded, block_expert, num_pairs, config,
      scale=None, weight_format="dense", block_size=1, block_offset=0, fp8_activations=False):
    return rows.new_empty(config[6], num_pairs, weight.shape[n_axis], dtype=pair_dtype(rows.dtype, config[6]))


@torch.library.custom_op("tpmoe::triton_combine", mutates_args=())
@on_tensor_device
def combine(partials: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, N] in `dtype`: the partial pair rows [SPLIT, T*K, N] summed over splits and k, fixed order."""
    return _combine(partials, num_tokens, top_k, dtype)


@combine.register_fake
def _(partials, num_tokens, top_k, dtype):
    return partials.new_empty(num_tokens, partials.shape[-1], dtype=dtype)


@torch.library.custom_op("tpmoe::triton_backward_dh", mutates_args=())
@on_tensor_device
def backward_dh(grad_output: torch.Tensor, hidden_states: torch.Tensor, w_gate_up: torch.Tensor,
                b_gate_up: Optional[torch.Tensor], w_down: torch.Tensor, b_down: Optional[torch.Tensor],
                topk_weights: torch.Tensor, h: torch.Tensor, sorted_ids_padded: torch.Tensor,
                block_expert: torch.Tensor, top_k: int, activation: str, layout: str, gated: bool, alpha: float,
                limit: float, config: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d_preact [M, R], d_topk_weights [T, K] fp32) through the down GEMM and the activation."""
    return _backward_dh(grad_output, hidden_states, w_gate_up, b_gate_up, w_down, b_down, topk_weights, h,
                        sorted_ids_padded, block_expert, top_k=top_k, activation=activation, layout=layout,
                        gated=gated, alpha=alpha, limit=limit, config=_config(config))


@backward_dh.register_fake
def _(grad_output, hidden_states, w_gate_up, b_gate_up, w_down, b_down, topk_weights, h, sorted_ids_padded,
      block_expert, top_k, activation, layout, gated, alpha, limit, config):
    gate_up_size = w_gate_up.shape[gate_up_axes(layout)[0]]
    partial_dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    # d_preact's rows are padded to 16 bytes as the real launch pads them (the same strides).
    return (empty_aligned_rows(sorted_ids_padded.shape[0], gate_up_size, hidden_states.dtype, hidden_states.device),
            hidden_states.new_empty(hidden_states.shape[0], top_k, dtype=partial_dtype))


@torch.library.custom_op("tpmoe::triton_backward_dw", mutates_args=())
@on_tensor_device
def backward_dw(a: torch.Tensor, b: torch.Tensor, routing_weights: Optional[torch.Tensor],
                sorted_ids_padded: torch.Tensor, padded_offsets: torch.Tensor, weight_like: torch.Tensor,
                n_axis: int, k_axis: int, num_pairs: int, top_k: int, a_gathered: bool, b_gathered: bool,
                bias_grad: bool, config: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dW like weight_like, db [E, N]; db is empty [0] when bias_grad is False)."""
    dw, db = _backward_dw(a, b, routing_weights, sorted_ids_padded, padded_offsets, weight_like, n_axis, k_axis,
                          num_pairs=num_pairs, top_k=top_k, a_gathered=a_gathered, b_gathered=b_gathered,
                          bias_grad=bias_grad, config=_config(config))
    return dw, (db if db is not None else weight_like.new_empty(0))


@backward_dw.register_fake
def _(a, b, routing_weights, sorted_ids_padded, padded_offsets, weight_like, n_axis, k_axis, num_pairs, top_k,
      a_gathered, b_gathered, bias_grad, config):
    db = weight_like.new_empty(weight_like.shape[0], a.shape[1]) if bias_grad else weight_like.new_empty(0)
    return weight_like.new_empty(weight_like.shape), db


@torch.library.custom_op("tpmoe::triton_align", mutates_args=())
@on_tensor_device
def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seven AlignResult tensors (tpmoe.routing.align checks the arguments first)."""
    return _align_triton(topk_ids, num_experts, block_m)


align.register_fake(empty_align_outputs)

"""Expert activations on a gate_up output, for the PyTorch paths (the Triton kernels fuse
their own copy into the GEMM epilogue; the reference keeps an independent one)."""
import torch
import torch.nn.functional as F


def split_gate_up(gate_up: torch.Tensor, layout: str):
    """Splits the gate_up output columns [S, 2I] into (gate [S, I], up [S, I]) for a layout."""
    if layout == "concatenated":
        return gate_up.chunk(2, dim=-1)
    # interleaved and gpt_oss both alternate gate and up columns.
    return gate_up[..., 0::2], gate_up[..., 1::2]


def unary_activation(value: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(value)
    if activation == "gelu":
        return F.gelu(value)
    if activation == "gelu_tanh":
        return F.gelu(value, approximate="tanh")
    if activation == "relu":
        return F.relu(value)
    if activation == "relu2":
        return F.relu(value).square()
    raise ValueError(f"activation: expected silu, gelu, gelu_tanh, relu or relu2 here, got {activation!r}")


def softcap(value: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(value / cap) * cap


def expert_activation(gate_up: torch.Tensor, *, activation: str, layout: str, gated: bool,
                      alpha: float, limit: float) -> torch.Tensor:
    """h from the gate_up pre-activation: act(g) * u, a gated-only activation (alpha and limit
    as tpmoe.MoEConfig describes them), or act(u)."""
    if not gated:
        return unary_activation(gate_up, activation)
    gate, up = split_gate_up(gate_up, layout)
    if activation == "clamped_swiglu":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * gate * torch.sigmoid(alpha * gate)
    if activation == "clamped_silu":
        return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)
    if activation == "silu_clamped":
        return F.silu(gate).clamp(max=limit) * up.clamp(min=-limit, max=limit)
    if activation == "softcapped_swiglu":
        # In float32 at least, as transformers' Inkling2SoftcappedSwiGLU computes it.
        compute_dtype = torch.promote_types(gate.dtype, torch.float32)
        gate, up = gate.to(compute_dtype), up.to(compute_dtype)
        return (softcap(gate, alpha) * torch.sigmoid(gate) * softcap(up, limit)).to(gate_up.dtype)
    return unary_activation(gate, activation) * up

"""Expert activations as Triton functions, forward and backward, for the GEMM epilogues.

Values arrive in the accumulator dtype (fp32, fp64 for float64 inputs). Formulas follow
CONTRACTS.md; tanh is written through the sigmoid (tanh z = 2 sigmoid(2z) - 1) because
the interpreter and the compiled path both have `tl.sigmoid`, and that form cannot overflow.
"""
import triton
import triton.language as tl

SQRT_HALF = 0.7071067811865476        # 1 / sqrt(2)
INV_SQRT_2PI = 0.3989422804014327     # 1 / sqrt(2 pi)
SQRT_2_OVER_PI = 0.7978845608028654   # sqrt(2 / pi)
GELU_TANH_CUBIC = 0.044715


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def unary_activation_and_grad(x, ACTIVATION: tl.constexpr):
    """(act(x), act'(x)) for silu, gelu (erf), gelu_tanh, relu."""
    if ACTIVATION == "silu":
        sig = tl.sigmoid(x)
        value = x * sig
        grad = sig * (1.0 + x * (1.0 - sig))
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        value = x * cdf
        grad = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACTIVATION == "gelu_tanh":
        tanh_inner = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        value = 0.5 * x * (1.0 + tanh_inner)
        grad = 0.5 * (1.0 + tanh_inner) + 0.5 * x * (1.0 - tanh_inner * tanh_inner) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * x * x)
    else:  # relu; gradient 0 at x == 0 as torch.relu has it; NaN passes through as there
        value = tl.where(x <= 0, 0.0, x)
        grad = tl.where(x > 0, 1.0, 0.0)
    return value, grad


@triton.jit
def _clamped_gate_up(gate, up, limit):
    # tl.minimum / tl.maximum drop NaN; torch.clamp (the reference) keeps it, and so do these.
    gate_c = tl.where(gate > limit, limit, gate)
    up_c = tl.where(up < -limit, -limit, tl.where(up > limit, limit, up))
    return gate_c, up_c


@triton.jit
def gated_forward(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    """h = act(gate) * up, or GPT-OSS's clamped swiglu (up + 1) * g' * sigmoid(alpha g')."""
    if ACTIVATION == "clamped_swiglu":
        gate_c, up_c = _clamped_gate_up(gate, up, limit)
        h = (up_c + 1.0) * gate_c * tl.sigmoid(alpha * gate_c)
    else:
        value, _ = unary_activation_and_grad(gate, ACTIVATION)
        h = value * up
    return h


@triton.jit
def gated_backward(dh, gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    """(d gate, d up) of gated_forward; the clamps pass the gradient inside [.., limit] as torch.clamp does."""
    if ACTIVATION == "clamped_swiglu":
        gate_c, up_c = _clamped_gate_up(gate, up, limit)
        sig = tl.sigmoid(alpha * gate_c)
        d_gate = dh * (up_c + 1.0) * (sig + alpha * gate_c * sig * (1.0 - sig))
        d_gate = tl.where(gate <= limit, d_gate, 0.0)
        d_up = tl.where((up >= -limit) & (up <= limit), dh * gate_c * sig, 0.0)
    else:
        value, grad = unary_activation_and_grad(gate, ACTIVATION)
        d_gate = dh * up * grad
        d_up = dh * value
    return d_gate, d_up

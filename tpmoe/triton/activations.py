"""Expert activations as Triton functions, forward and backward, for the GEMM epilogues.

Values arrive in the accumulator dtype (fp32, fp64 for float64 inputs). Formulas follow
tpmoe.reference; tanh is written through the sigmoid (tanh z = 2 sigmoid(2z) - 1) because
the interpreter and the compiled path both have `tl.sigmoid`, and that form cannot overflow.
"""
import triton
import triton.language as tl


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _silu_and_grad(x):
    sig = tl.sigmoid(x)
    return x * sig, sig * (1.0 + x * (1.0 - sig))


@triton.jit
def unary_activation_and_grad(x, ACTIVATION: tl.constexpr):
    """(act(x), act'(x)) for silu, gelu (erf), gelu_tanh, relu, relu2."""
    if ACTIVATION == "silu":
        value, grad = _silu_and_grad(x)
    elif ACTIVATION == "gelu":  # 0.7071... = 1 / sqrt(2), 0.3989... = 1 / sqrt(2 pi)
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        value = x * cdf
        grad = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACTIVATION == "gelu_tanh":  # 0.7978... = sqrt(2 / pi); 0.044715: the approximation's cubic term
        tanh_inner = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        value = 0.5 * x * (1.0 + tanh_inner)
        grad = 0.5 * (1.0 + tanh_inner) + 0.5 * x * (1.0 - tanh_inner * tanh_inner) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * x * x)
    elif ACTIVATION == "relu2":  # NaN passes through, as in relu below
        relu = tl.where(x <= 0, 0.0, x)
        value = relu * relu
        grad = 2.0 * relu
    else:  # relu; gradient 0 at x == 0 as torch.relu has it; NaN passes through as there
        value = tl.where(x <= 0, 0.0, x)
        grad = tl.where(x > 0, 1.0, 0.0)
    return value, grad


# tl.minimum / tl.maximum drop NaN; torch.clamp (the reference) keeps it, and so do these.
@triton.jit
def _clamp_max(x, limit):
    return tl.where(x > limit, limit, x)


@triton.jit
def _clamp_both(x, limit):
    return tl.where(x < -limit, -limit, tl.where(x > limit, limit, x))


@triton.jit
def _within(x, limit):
    """Where _clamp_both passes the gradient: the closed interval, never at NaN (as torch.clamp)."""
    return (x >= -limit) & (x <= limit)


@triton.jit
def gated_forward(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    """h = act(gate) * up, or a gated-only activation (alpha, limit as tpmoe.MoEConfig describes them)."""
    if ACTIVATION == "clamped_swiglu":
        gate_c = _clamp_max(gate, limit)
        h = (_clamp_both(up, limit) + 1.0) * gate_c * tl.sigmoid(alpha * gate_c)
    elif ACTIVATION == "clamped_silu":
        silu, _ = _silu_and_grad(_clamp_max(gate, limit))
        h = silu * _clamp_both(up, limit)
    elif ACTIVATION == "silu_clamped":
        silu, _ = _silu_and_grad(gate)
        h = _clamp_max(silu, limit) * _clamp_both(up, limit)
    elif ACTIVATION == "softcapped_swiglu":
        h = alpha * _tanh(gate / alpha) * tl.sigmoid(gate) * limit * _tanh(up / limit)
    else:
        value, _ = unary_activation_and_grad(gate, ACTIVATION)
        h = value * up
    return h


@triton.jit
def gated_backward(dh, gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    """(d gate, d up) of gated_forward; the clamps pass the gradient inside [.., limit] as torch.clamp does."""
    if ACTIVATION == "clamped_swiglu":
        gate_c = _clamp_max(gate, limit)
        sig = tl.sigmoid(alpha * gate_c)
        d_gate = dh * (_clamp_both(up, limit) + 1.0) * (sig + alpha * gate_c * sig * (1.0 - sig))
        d_gate = tl.where(gate <= limit, d_gate, 0.0)
        d_up = tl.where(_within(up, limit), dh * gate_c * sig, 0.0)
    elif ACTIVATION == "clamped_silu":
        silu, silu_grad = _silu_and_grad(_clamp_max(gate, limit))
        d_gate = tl.where(gate <= limit, dh * _clamp_both(up, limit) * silu_grad, 0.0)
        d_up = tl.where(_within(up, limit), dh * silu, 0.0)
    elif ACTIVATION == "silu_clamped":
        silu, silu_grad = _silu_and_grad(gate)
        # The clamp's 0 times silu'(g), in the chain's order: NaN where silu'(g) is (g = NaN,
        # +-inf), as autograd gives it in the reference.
        d_gate = tl.where(silu <= limit, dh * _clamp_both(up, limit), 0.0) * silu_grad
        d_up = tl.where(_within(up, limit), dh * _clamp_max(silu, limit), 0.0)
    elif ACTIVATION == "softcapped_swiglu":
        tanh_gate, tanh_up = _tanh(gate / alpha), _tanh(up / limit)
        sig = tl.sigmoid(gate)
        capped_gate, capped_up = alpha * tanh_gate, limit * tanh_up
        d_gate = dh * capped_up * ((1.0 - tanh_gate * tanh_gate) * sig + capped_gate * sig * (1.0 - sig))
        d_up = dh * capped_gate * sig * (1.0 - tanh_up * tanh_up)
    else:
        value, grad = unary_activation_and_grad(gate, ACTIVATION)
        d_gate = dh * up * grad
        d_up = dh * value
    return d_gate, d_up

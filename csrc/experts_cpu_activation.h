// The expert activations of the CPU path, forward and backward, one element at a time in the
// op-math type (float for bf16/fp16/fp32, double for fp64). The formulas are those of
// tpmoe.reference; the backward masks follow torch.clamp / torch.relu (gradient 0 at relu(0),
// clamp passes the gradient on the closed interval).
#pragma once

#include <cmath>
#include <cstdint>

namespace tpmoe {
namespace cpu {

enum class Activation {
  kSilu, kGelu, kGeluTanh, kRelu, kClampedSwiglu, kRelu2, kClampedSilu, kSiluClamped, kSoftcappedSwiglu
};

// Defined on the (gate, up) pair only, as tpmoe.config.GATED_ONLY_ACTIVATIONS.
inline bool is_gated_only(Activation activation) {
  return activation == Activation::kClampedSwiglu || activation == Activation::kClampedSilu ||
         activation == Activation::kSiluClamped || activation == Activation::kSoftcappedSwiglu;
}

template <typename T>
inline T sigmoid(T x) {
  // exp(-x) overflows to inf for x << 0 and gives 0, never NaN.
  return T(1) / (T(1) + std::exp(-x));
}

// f(x) and f'(x) of the non-gated activations.
template <typename T>
inline T unary_forward(Activation activation, T x) {
  switch (activation) {
    case Activation::kSilu:
      return x * sigmoid(x);
    case Activation::kGelu:
      return T(0.5) * x * (T(1) + std::erf(x * T(M_SQRT1_2)));
    case Activation::kGeluTanh: {
      const T inner = T(M_2_SQRTPI * M_SQRT1_2) * (x + T(0.044715) * x * x * x);
      return T(0.5) * x * (T(1) + std::tanh(inner));
    }
    case Activation::kRelu2: {
      const T relu = x <= T(0) ? T(0) : x;  // NaN passes through, as in relu below
      return relu * relu;
    }
    case Activation::kRelu:
    default:
      // Written so that NaN fails the test and passes through, as torch.relu lets it.
      return x <= T(0) ? T(0) : x;
  }
}

template <typename T>
inline void unary_forward_backward(Activation activation, T x, T* value, T* derivative) {
  switch (activation) {
    case Activation::kSilu: {
      const T s = sigmoid(x);
      *value = x * s;
      *derivative = s * (T(1) + x * (T(1) - s));
      return;
    }
    case Activation::kGelu: {
      const T cdf = T(0.5) * (T(1) + std::erf(x * T(M_SQRT1_2)));
      *value = x * cdf;
      *derivative = cdf + x * std::exp(T(-0.5) * x * x) * T(0.5 * M_2_SQRTPI * M_SQRT1_2);
      return;
    }
    case Activation::kGeluTanh: {
      const T k = T(M_2_SQRTPI * M_SQRT1_2);
      const T t = std::tanh(k * (x + T(0.044715) * x * x * x));
      *value = T(0.5) * x * (T(1) + t);
      *derivative = T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * k * (T(1) + T(3 * 0.044715) * x * x);
      return;
    }
    case Activation::kRelu2: {
      const T relu = x <= T(0) ? T(0) : x;
      *value = relu * relu;
      *derivative = T(2) * relu;
      return;
    }
    case Activation::kRelu:
    default:
      *value = x <= T(0) ? T(0) : x;  // NaN passes through, as in torch.relu
      *derivative = x > T(0) ? T(1) : T(0);
      return;
  }
}

struct GatedParams {
  Activation activation;
  double alpha;  // clamped_swiglu's alpha; softcapped_swiglu's gate softcap
  double limit;  // the clamps' limit; softcapped_swiglu's up softcap
};

// Comparisons written so that NaN passes through the clamps, as torch.clamp lets it.
template <typename T>
inline T clamp_max(T x, T limit) {
  return x > limit ? limit : x;
}

template <typename T>
inline T clamp_both(T x, T limit) {
  return x < -limit ? -limit : (x > limit ? limit : x);
}

// Where clamp_both passes the gradient: the closed interval, never at NaN (as torch.clamp).
template <typename T>
inline bool within(T x, T limit) {
  return x >= -limit && x <= limit;
}

// h = act(g) * u, or a gated-only activation (formulas of tpmoe.reference):
//   clamped_swiglu     (clamp(u, -L, L) + 1) * g' * sigmoid(alpha g'), g' = min(g, L)  (GPT-OSS)
//   clamped_silu       silu(min(g, L)) * clamp(u, -L, L)
//   silu_clamped       min(silu(g), L) * clamp(u, -L, L)
//   softcapped_swiglu  alpha tanh(g / alpha) * sigmoid(g) * L tanh(u / L)
template <typename T>
inline T gated_forward(const GatedParams& params, T gate, T up) {
  const T limit = T(params.limit), alpha = T(params.alpha);
  switch (params.activation) {
    case Activation::kClampedSwiglu: {
      const T gate_clamped = clamp_max(gate, limit);
      return (clamp_both(up, limit) + T(1)) * gate_clamped * sigmoid(alpha * gate_clamped);
    }
    case Activation::kClampedSilu: {
      const T gate_clamped = clamp_max(gate, limit);
      return gate_clamped * sigmoid(gate_clamped) * clamp_both(up, limit);
    }
    case Activation::kSiluClamped:
      return clamp_max(gate * sigmoid(gate), limit) * clamp_both(up, limit);
    case Activation::kSoftcappedSwiglu:
      // std::tanh saturates to +-1 rather than overflowing.
      return alpha * std::tanh(gate / alpha) * sigmoid(gate) * limit * std::tanh(up / limit);
    default:
      return unary_forward(params.activation, gate) * up;
  }
}

// h and the gradients of (gate, up) for an incoming dh; a clamp passes the gradient on its
// closed interval and gives 0 outside it and at NaN, as torch.clamp.
template <typename T>
inline T gated_backward(const GatedParams& params, T gate, T up, T grad_h, T* grad_gate, T* grad_up) {
  const T limit = T(params.limit), alpha = T(params.alpha);
  switch (params.activation) {
    case Activation::kClampedSwiglu: {
      const T gate_clamped = clamp_max(gate, limit);  // NaN passes through (forward value)
      const T up_clamped = clamp_both(up, limit);
      const T s = sigmoid(alpha * gate_clamped);
      const T glu = gate_clamped * s;
      *grad_up = within(up, limit) ? grad_h * glu : T(0);
      *grad_gate = gate <= limit ? grad_h * (up_clamped + T(1)) * (s + alpha * gate_clamped * s * (T(1) - s)) : T(0);
      return (up_clamped + T(1)) * glu;
    }
    case Activation::kClampedSilu: {
      const T gate_clamped = clamp_max(gate, limit);
      const T up_clamped = clamp_both(up, limit);
      const T s = sigmoid(gate_clamped);
      const T silu = gate_clamped * s;
      *grad_up = within(up, limit) ? grad_h * silu : T(0);
      *grad_gate = gate <= limit ? grad_h * up_clamped * s * (T(1) + gate_clamped * (T(1) - s)) : T(0);
      return silu * up_clamped;
    }
    case Activation::kSiluClamped: {
      const T up_clamped = clamp_both(up, limit);
      const T s = sigmoid(gate);
      const T silu = gate * s;
      *grad_up = within(up, limit) ? grad_h * clamp_max(silu, limit) : T(0);
      // The clamp's 0 times silu'(g), in the chain's order: NaN where silu'(g) is (g = NaN,
      // +-inf), as autograd gives it in the reference.
      *grad_gate = (silu <= limit ? grad_h * up_clamped : T(0)) * s * (T(1) + gate * (T(1) - s));
      return clamp_max(silu, limit) * up_clamped;
    }
    case Activation::kSoftcappedSwiglu: {
      const T tanh_gate = std::tanh(gate / alpha), tanh_up = std::tanh(up / limit);
      const T s = sigmoid(gate);
      const T capped_gate = alpha * tanh_gate, capped_up = limit * tanh_up;
      *grad_up = grad_h * capped_gate * s * (T(1) - tanh_up * tanh_up);
      *grad_gate = grad_h * capped_up * ((T(1) - tanh_gate * tanh_gate) * s + capped_gate * s * (T(1) - s));
      return capped_gate * s * capped_up;
    }
    default: {
      T value, derivative;
      unary_forward_backward(params.activation, gate, &value, &derivative);
      *grad_up = grad_h * value;
      *grad_gate = grad_h * up * derivative;
      return value * up;
    }
  }
}

}  // namespace cpu
}  // namespace tpmoe

// The expert activations of the CPU path, forward and backward, one element at a time in the
// op-math type (float for bf16/fp16/fp32, double for fp64). The formulas are those of
// tpmoe.reference; the backward masks follow torch.clamp / torch.relu (gradient 0 at relu(0),
// clamp passes the gradient on the closed interval).
#pragma once

#include <cmath>
#include <cstdint>

namespace tpmoe {
namespace cpu {

enum class Activation { kSilu, kGelu, kGeluTanh, kRelu, kClampedSwiglu };

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
    case Activation::kRelu:
    default:
      *value = x <= T(0) ? T(0) : x;  // NaN passes through, as in torch.relu
      *derivative = x > T(0) ? T(1) : T(0);
      return;
  }
}

struct GatedParams {
  Activation activation;
  double alpha;  // clamped_swiglu only
  double limit;  // clamped_swiglu only
};

// h = act(g) * u, or GPT-OSS's (clamp(u, -L, L) + 1) * g' * sigmoid(alpha g'), g' = min(g, L).
template <typename T>
inline T gated_forward(const GatedParams& params, T gate, T up) {
  if (params.activation == Activation::kClampedSwiglu) {
    const T limit = T(params.limit);
    // Comparisons written so that NaN passes through the clamps, as torch.clamp lets it.
    const T gate_clamped = gate > limit ? limit : gate;
    const T up_clamped = up < -limit ? -limit : (up > limit ? limit : up);
    return (up_clamped + T(1)) * gate_clamped * sigmoid(T(params.alpha) * gate_clamped);
  }
  return unary_forward(params.activation, gate) * up;
}

// h and the gradients of (gate, up) for an incoming dh.
template <typename T>
inline T gated_backward(const GatedParams& params, T gate, T up, T grad_h, T* grad_gate, T* grad_up) {
  if (params.activation == Activation::kClampedSwiglu) {
    const T limit = T(params.limit), alpha = T(params.alpha);
    const bool gate_passes = gate <= limit;
    const bool up_passes = up >= -limit && up <= limit;
    const T gate_clamped = gate > limit ? limit : gate;  // NaN passes through (forward value)
    const T up_clamped = up < -limit ? -limit : (up > limit ? limit : up);
    const T s = sigmoid(alpha * gate_clamped);
    const T glu = gate_clamped * s;
    *grad_up = up_passes ? grad_h * glu : T(0);
    *grad_gate = gate_passes ? grad_h * (up_clamped + T(1)) * (s + alpha * gate_clamped * s * (T(1) - s)) : T(0);
    return (up_clamped + T(1)) * glu;
  }
  T value, derivative;
  unary_forward_backward(params.activation, gate, &value, &derivative);
  *grad_up = grad_h * value;
  *grad_gate = grad_h * up * derivative;
  return value * up;
}

}  // namespace cpu
}  // namespace tpmoe

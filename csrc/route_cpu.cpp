// tpmoe::route on CPU: one token per iteration, tokens split over threads. Every token is
// computed on its own, so the result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "routing_checks.h"
#include "routing_common.h"

namespace tpmoe {
namespace {

struct RouteParams {
  int64_t num_experts;
  int64_t top_k;
  Scoring scoring;
  bool renormalize;
  const double* correction_bias;  // [E] or nullptr
  int64_t n_group;
  int64_t topk_group;
  double routed_scaling_factor;
};

// Per-thread buffers, sized once per chunk of tokens.
struct RouteScratch {
  std::vector<double> logit;           // [E] the row in float64
  std::vector<double> selection;       // [E] the score experts are ranked by
  std::vector<int64_t> candidates;     // experts that may be selected (kept groups)
  std::vector<double> group_score;     // [n_group]
  std::vector<int64_t> groups;         // [n_group]
  std::vector<double> weight;          // [K]

  explicit RouteScratch(const RouteParams& p)
      : logit(p.num_experts), selection(p.num_experts), group_score(p.n_group), groups(p.n_group), weight(p.top_k) {
    candidates.reserve(p.num_experts);
  }
};

// Sum of the two largest scores of each group (the DeepSeek-V3 group score), then the
// topk_group best groups; the candidates are the experts of those groups, in index order.
void keep_best_groups(const RouteParams& p, RouteScratch& s) {
  const int64_t group_size = p.num_experts / p.n_group;
  for (int64_t g = 0; g < p.n_group; ++g) {
    const double* scores = s.selection.data() + g * group_size;
    int64_t first = 0;
    for (int64_t i = 1; i < group_size; ++i) {
      if (ranks_above(scores[i], i, scores[first], first)) first = i;
    }
    if (group_size == 1) {
      s.group_score[g] = scores[first];
      continue;
    }
    int64_t second = first == 0 ? 1 : 0;
    for (int64_t i = 0; i < group_size; ++i) {
      if (i != first && ranks_above(scores[i], i, scores[second], second)) second = i;
    }
    s.group_score[g] = scores[first] + scores[second];
  }
  for (int64_t g = 0; g < p.n_group; ++g) s.groups[g] = g;
  std::partial_sort(s.groups.begin(), s.groups.begin() + p.topk_group, s.groups.end(), [&](int64_t a, int64_t b) {
    return ranks_above(s.group_score[a], a, s.group_score[b], b);
  });
  std::sort(s.groups.begin(), s.groups.begin() + p.topk_group);
  s.candidates.clear();
  for (int64_t i = 0; i < p.topk_group; ++i) {
    for (int64_t e = s.groups[i] * group_size; e < (s.groups[i] + 1) * group_size; ++e) s.candidates.push_back(e);
  }
}

template <typename scalar_t, typename weight_t>
void route_token(const scalar_t* logits_row, const RouteParams& p, RouteScratch& s, weight_t* weights_row,
                 int64_t* ids_row) {
  const int64_t E = p.num_experts;
  const int64_t K = p.top_k;
  for (int64_t e = 0; e < E; ++e) s.logit[e] = static_cast<double>(logits_row[e]);

  // softmax is monotone, so ranking by the logit ranks by the probability, exactly.
  if (p.scoring == Scoring::kSigmoidGroup) {
    for (int64_t e = 0; e < E; ++e) {
      s.selection[e] = sigmoid_f64(s.logit[e]) + (p.correction_bias ? p.correction_bias[e] : 0.0);
    }
  } else {
    std::copy(s.logit.begin(), s.logit.end(), s.selection.begin());
  }

  if (p.scoring == Scoring::kSigmoidGroup && p.n_group > 1) {
    keep_best_groups(p, s);
  } else {
    s.candidates.resize(E);
    for (int64_t e = 0; e < E; ++e) s.candidates[e] = e;
  }
  std::partial_sort(s.candidates.begin(), s.candidates.begin() + K, s.candidates.end(),
                    [&](int64_t a, int64_t b) { return ranks_above(s.selection[a], a, s.selection[b], b); });
  for (int64_t k = 0; k < K; ++k) ids_row[k] = s.candidates[k];

  double renorm_epsilon = 0.0;
  switch (p.scoring) {
    case Scoring::kSoftmax: {
      double max_logit = -INFINITY;
      for (int64_t e = 0; e < E; ++e) max_logit = std::max(max_logit, s.logit[e]);
      double denominator = 0.0;
      for (int64_t e = 0; e < E; ++e) denominator += std::exp(s.logit[e] - max_logit);
      for (int64_t k = 0; k < K; ++k) s.weight[k] = std::exp(s.logit[ids_row[k]] - max_logit) / denominator;
      break;
    }
    case Scoring::kTopkSoftmax: {
      // The first selected logit is the largest one.
      const double max_logit = s.logit[ids_row[0]];
      double denominator = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        s.weight[k] = std::exp(s.logit[ids_row[k]] - max_logit);
        denominator += s.weight[k];
      }
      for (int64_t k = 0; k < K; ++k) s.weight[k] /= denominator;
      break;
    }
    case Scoring::kSigmoidGroup: {
      for (int64_t k = 0; k < K; ++k) s.weight[k] = sigmoid_f64(s.logit[ids_row[k]]);
      renorm_epsilon = kRenormEpsilon;
      break;
    }
  }
  // topk_softmax weights already sum to one; renormalising them again would only round.
  if (p.renormalize && p.scoring != Scoring::kTopkSoftmax) {
    double total = 0.0;
    for (int64_t k = 0; k < K; ++k) total += s.weight[k];
    total += renorm_epsilon;
    for (int64_t k = 0; k < K; ++k) s.weight[k] /= total;
  }
  for (int64_t k = 0; k < K; ++k) {
    weights_row[k] = static_cast<weight_t>(s.weight[k] * p.routed_scaling_factor);
  }
}

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& router_logits, int64_t top_k,
                                             c10::string_view scoring_name, bool renormalize,
                                             const c10::optional<at::Tensor>& correction_bias, int64_t n_group,
                                             int64_t topk_group, double routed_scaling_factor) {
  const Scoring scoring = parse_scoring(scoring_name);
  check_route_args(router_logits, top_k, scoring, correction_bias, n_group, topk_group);
  const at::Tensor logits = router_logits.contiguous();
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  const auto weight_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor topk_weights = at::empty({T, top_k}, logits.options().dtype(weight_dtype));
  at::Tensor topk_ids = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  at::Tensor bias64;
  if (correction_bias.has_value()) bias64 = correction_bias->to(at::kDouble).contiguous();

  const RouteParams params{E,           top_k,     scoring,   renormalize, bias64.defined() ? bias64.data_ptr<double>() : nullptr,
                           n_group,     topk_group, routed_scaling_factor};
  // A token costs about E exponentials plus a partial sort of E: split into chunks of a few
  // thousand experts' work so that small batches stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 4096 / E);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tpmoe_route_cpu", [&] {
    using weight_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* logits_ptr = logits.data_ptr<scalar_t>();
    weight_t* weights_ptr = topk_weights.data_ptr<weight_t>();
    int64_t* ids_ptr = topk_ids.data_ptr<int64_t>();
    at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
      RouteScratch scratch(params);
      for (int64_t t = begin; t < end; ++t) {
        route_token(logits_ptr + t * E, params, scratch, weights_ptr + t * top_k, ids_ptr + t * top_k);
      }
    });
  });
  return {topk_weights, topk_ids};
}

}  // namespace
}  // namespace tpmoe

TORCH_LIBRARY_IMPL(tpmoe, CPU, m) { m.impl("route", &tpmoe::route_cpu); }

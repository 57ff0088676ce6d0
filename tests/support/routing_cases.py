"""Routing cases and exact comparisons shared by the routing tests on CPU (test_routing_ops.py)
and on CUDA (test_gpu.py): every scoring, odd shapes, odd id distributions.

Ids and all `align` metadata must be bit-identical between implementations. Weights: each side
computes in float64 and rounds once, so a float32 weight may differ by at most one float32 ulp
(|a - b| <= 2**-23 * max(|a|, |b|)); float64 weights differ only by the last bits of exp and of
the order of a sum, bounded by 1e-12 relative.
"""
import torch

from tpmoe.routing import AlignResult

LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# (name, route kwargs): each scoring, with and without the options that change the formula.
SCORING_CASES = [
    ("softmax", dict(scoring="softmax")),
    ("softmax_renorm", dict(scoring="softmax", renormalize=True)),
    ("softmax_scaled", dict(scoring="softmax", renormalize=True, routed_scaling_factor=1.5)),
    ("topk_softmax", dict(scoring="topk_softmax")),
    ("sigmoid", dict(scoring="sigmoid_group")),
    ("sigmoid_renorm_bias", dict(scoring="sigmoid_group", renormalize=True, bias=True)),
    ("deepseek", dict(scoring="sigmoid_group", renormalize=True, bias=True, n_group=4, topk_group=2,
                      routed_scaling_factor=2.5)),
]
SCORING_IDS = [name for name, _ in SCORING_CASES]
SCORINGS = [case for _, case in SCORING_CASES]

# (T, E, K): no tokens, one token, K = E, E not a power of two.
SHAPES = [(0, 8, 2), (1, 8, 8), (1, 7, 3), (37, 60, 6), (64, 16, 4)]


def route_kwargs(case, num_experts, dtype=torch.float32, device="cpu"):
    """The route() keyword arguments of a case; `bias=True` becomes a random correction bias."""
    kwargs = dict(case)
    if kwargs.pop("bias", False):
        kwargs["correction_bias"] = 0.1 * torch.randn(num_experts, dtype=dtype).to(device)
    return kwargs


def applicable(case, num_experts, top_k):
    """Whether the case's groups divide E and keep at least K experts."""
    n_group = case.get("n_group", 1)
    if num_experts % n_group:
        return False
    return top_k <= case.get("topk_group", 1) * (num_experts // n_group)


def assert_weights_match(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.double().cpu(), expected.double().cpu()
    if actual.dtype == torch.float64:
        bound = 1e-12 * torch.maximum(a.abs(), e.abs())
    else:
        bound = 2.0**-23 * torch.maximum(a.abs(), e.abs()) + 2.0**-149
    excess = (a - e).abs() - bound
    assert (excess <= 0).all(), f"weights differ by more than the rounding bound: max excess {excess.max().item():.3e}"


def masked_and_nan_logits():
    """(logits [8, 10], the rows whose weights are comparable): -inf logits (a masked expert, a row
    with one unmasked expert) and a NaN logit, which ranks first as in torch.sort/topk (its row's
    softmax is NaN throughout)."""
    logits = torch.randn(8, 10)
    logits[0, 3] = float("-inf")
    logits[1, :] = float("-inf")
    logits[1, 5] = 0.0
    logits[2, 7] = float("nan")
    return logits, [0, 1, 3, 4, 5, 6, 7]


def align_cases(id_dtype):
    """(name, topk_ids, E): the odd shapes and distributions."""
    generator = torch.Generator().manual_seed(7)

    def ids(rows, cols, high):
        return torch.randint(0, high, (rows, cols), generator=generator).to(id_dtype)

    return [
        ("no_tokens", torch.empty(0, 2, dtype=id_dtype), 8),
        ("one_token", ids(1, 2, 8), 8),
        ("expert_without_tokens", ids(40, 2, 6), 7),  # expert 6 never drawn
        ("all_on_one_expert", torch.full((23, 1), 4, dtype=id_dtype), 7),
        ("k_equals_e", torch.stack([torch.randperm(7, generator=generator) for _ in range(9)]).to(id_dtype), 7),
        ("e60", ids(101, 6, 60), 60),
        # Above the CPU kernel's chunk size: several threads sort their chunks.
        ("several_chunks", ids(4500, 8, 60), 60),
    ]


def assert_align_equal(actual, expected, case=""):
    where = f"{case}: " if case else ""
    for name, a, e in zip(AlignResult._fields, actual, expected):
        assert a.dtype == e.dtype, f"{where}{name}: dtype {a.dtype} != {e.dtype}"
        assert torch.equal(a.cpu(), e.cpu()), f"{where}{name} differs:\n{a}\n{e}"


def brute_force_align(topk_ids, num_experts, block_m):
    flat = topk_ids.reshape(-1).tolist()
    pairs = len(flat)
    rows = {e: [p for p in range(pairs) if flat[p] == e] for e in range(num_experts)}
    sorted_pair_ids = [p for e in range(num_experts) for p in rows[e]]
    counts = [len(rows[e]) for e in range(num_experts)]
    padded_rows = pairs + min(num_experts, pairs) * (block_m - 1)
    padded, block_expert, offsets, padded_offsets = [], [], [0], [0]
    for e in range(num_experts):
        segment = rows[e] + [pairs] * (-len(rows[e]) % block_m)
        padded += segment
        block_expert += [e] * (len(segment) // block_m)
        offsets.append(offsets[-1] + counts[e])
        padded_offsets.append(padded_offsets[-1] + len(segment))
    num_padded = len(padded)
    padded += [pairs] * (padded_rows - num_padded)
    block_expert += [-1] * (-(-padded_rows // block_m) - len(block_expert))
    i32, i64 = torch.int32, torch.int64
    return AlignResult(torch.tensor(sorted_pair_ids, dtype=i32), torch.tensor(counts, dtype=i64),
                       torch.tensor(offsets, dtype=i64), torch.tensor(padded, dtype=i32),
                       torch.tensor(padded_offsets, dtype=i64), torch.tensor(block_expert, dtype=i32),
                       torch.tensor([num_padded], dtype=i64))

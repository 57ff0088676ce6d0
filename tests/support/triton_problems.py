"""The Triton kernel tests' shared problem: small random experts and routing in float64 (cast to
the dtype under test), the per-row index of an alignment, the float64 references of backward_dh
and of both backward_dw launches.

Importing it skips the importing test module where the triton package is missing (the kernels
those modules define and launch need it at import); running them also needs a GPU or the
interpreter, which the `triton` marker checks (tests/conftest.py).
"""
import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton path needs the triton package (pip install tpmoe[triton])")

from tpmoe.activations import expert_activation  # noqa: E402
from tpmoe.routing import align  # noqa: E402
from tpmoe.triton import backward_dw  # noqa: E402
from tpmoe.triton.layouts import down_axes, gate_up_axes  # noqa: E402

from support.tolerances import assert_fp32_close  # noqa: E402

# conftest.py sets TRITON_INTERPRET=1 where there is no GPU: the kernels then take CPU tensors.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# alpha and limit of the clamped activations, for every kernel call and its reference.
OPTIONS = dict(alpha=1.702, limit=7.0)


def make_problem(seed, num_tokens=23, hidden=37, inter=20, experts=5, top_k=2, layout="concatenated", gated=True,
                 dtype=torch.float32, skip_expert=True):
    generator = torch.Generator().manual_seed(seed)
    rows = (2 if gated else 1) * inter
    scores = torch.rand(num_tokens, experts, generator=generator)
    if skip_expert:
        scores[:, 1] = -1.0  # expert 1 gets no token
    topk_ids = scores.topk(top_k, dim=1).indices
    problem = dict(
        x=torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64),
        w_gate_up=torch.randn(experts, rows, hidden, generator=generator, dtype=torch.float64) / hidden ** 0.5,
        w_down=torch.randn(experts, hidden, inter, generator=generator, dtype=torch.float64) / inter ** 0.5,
        b_gate_up=torch.randn(experts, rows, generator=generator, dtype=torch.float64) / 4,
        b_down=torch.randn(experts, hidden, generator=generator, dtype=torch.float64) / 4,
        topk_weights=torch.rand(num_tokens, top_k, generator=generator, dtype=torch.float64) + 0.1,
        dy=torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64))
    if layout == "gpt_oss":
        problem["w_gate_up"] = problem["w_gate_up"].transpose(1, 2).contiguous()
        problem["w_down"] = problem["w_down"].transpose(1, 2).contiguous()
    problem = {name: value.to(dtype).to(DEVICE) for name, value in problem.items()}
    problem["topk_ids"] = topk_ids.to(DEVICE)
    return problem


def expert_matrices(problem, layout, expert):
    """(W_gate_up[e] as [R, H], W_down[e] as [H, I]) whatever the storage layout."""
    w_gate_up, w_down = problem["w_gate_up"][expert], problem["w_down"][expert]
    if layout == "gpt_oss":
        return w_gate_up.t(), w_down.t()
    return w_gate_up, w_down


def row_index(routing, num_pairs, top_k):
    """(padded row, pair, token, expert) for every real row, from the alignment."""
    used = int(routing.num_padded)
    pairs = routing.sorted_ids_padded[:used].long()
    block_m = used // max(1, (routing.block_expert >= 0).sum().item()) if used else 1
    experts = routing.block_expert[: used // block_m].long().repeat_interleave(block_m)
    real = pairs < num_pairs
    rows = torch.arange(used, device=pairs.device)[real]
    return rows, pairs[real], pairs[real] // top_k, experts[real]


def dh_reference(problem, layout, gated, activation, with_bias, routing, num_pairs, top_k):
    """(rows, pairs, h [M, I] of the float64 forward in padded order, d_preact of the real rows,
    d_topk_weights [num_pairs]), all float64 from the inputs."""
    rows, pairs, tokens, experts = row_index(routing, num_pairs, top_k)
    preact = []
    for token, expert in zip(tokens.tolist(), experts.tolist()):
        w_gate_up, _ = expert_matrices(problem, layout, expert)
        value = problem["x"][token].double() @ w_gate_up.double().t()
        if with_bias:
            value = value + problem["b_gate_up"][expert].double()
        preact.append(value)
    preact = torch.stack(preact).requires_grad_(True)
    h_rows = expert_activation(preact, activation=activation, layout=layout, gated=gated, **OPTIONS)
    flat_weights = problem["topk_weights"].reshape(-1).double()
    dy_rows = problem["dy"][tokens].double()
    w_down_rows = torch.stack([expert_matrices(problem, layout, e)[1].double() for e in experts.tolist()])
    dh = flat_weights[pairs, None] * torch.einsum("sh,shi->si", dy_rows, w_down_rows)
    (d_preact,) = torch.autograd.grad(h_rows, preact, dh)
    o = torch.einsum("si,shi->sh", h_rows.detach(), w_down_rows)
    if with_bias:
        o = o + problem["b_down"][experts].double()
    d_topk = torch.zeros(num_pairs, dtype=torch.float64, device=pairs.device)
    d_topk[pairs] = (dy_rows * o).sum(-1)
    h = torch.zeros(routing.sorted_ids_padded.shape[0], h_rows.shape[1], dtype=torch.float64, device=pairs.device)
    h[rows] = h_rows.detach()
    return rows, h, d_preact, d_topk


class DwProblem:
    """What both backward_dw launches of one backward read, for `problem` aligned at `block_m`:
    the routing, its row index, and random d_preact [M, R] and h [M, I] on the real rows (zero on
    the padding rows, as backward_dh and gate_up leave them), drawn from `generator_seed`."""

    def __init__(self, problem, layout, block_m, generator_seed):
        self.problem, self.layout = problem, layout
        self.top_k, self.num_pairs = problem["topk_ids"].shape[1], problem["topk_ids"].numel()
        self.num_experts = problem["w_gate_up"].shape[0]
        self.routing = align(problem["topk_ids"], self.num_experts, block_m)
        self.rows, self.pairs, self.tokens, self.row_experts = row_index(self.routing, self.num_pairs, self.top_k)
        self.rows_axis, self.gu_hidden_axis = gate_up_axes(layout)
        self.hidden_axis, self.inter_axis = down_axes(layout)
        num_rows = self.routing.sorted_ids_padded.shape[0]
        generator = torch.Generator().manual_seed(generator_seed)
        self.d_preact = torch.zeros(num_rows, problem["w_gate_up"].shape[self.rows_axis], device=DEVICE)
        self.d_preact[self.rows] = torch.randn(len(self.rows), self.d_preact.shape[1], generator=generator).to(DEVICE)
        self.h = torch.zeros(num_rows, problem["w_down"].shape[self.inter_axis], device=DEVICE)
        self.h[self.rows] = torch.randn(len(self.rows), self.h.shape[1], generator=generator).to(DEVICE)

    def run(self, config):
        """(dW_gate_up, db_gate_up, dW_down, db_down): both call sites, A sorted (d_preact, x
        gathered) and A gathered and weighted (dy, h sorted), with the bias gradients."""
        problem, routing = self.problem, self.routing
        common = dict(num_pairs=self.num_pairs, top_k=self.top_k, config=config)
        return (*backward_dw.backward_dw(self.d_preact, problem["x"], None, routing.sorted_ids_padded,
                                         routing.padded_offsets, problem["w_gate_up"], self.rows_axis,
                                         self.gu_hidden_axis, a_gathered=False, b_gathered=True, bias_grad=True,
                                         **common),
                *backward_dw.backward_dw(problem["dy"], self.h, problem["topk_weights"], routing.sorted_ids_padded,
                                         routing.padded_offsets, problem["w_down"], self.hidden_axis,
                                         self.inter_axis, a_gathered=True, b_gathered=False, bias_grad=True,
                                         **common))

    def check(self, results, label=""):
        """Every expert's four results against float64 from the inputs; an expert with no rows
        must come out exactly zero."""
        dw_gate_up, db_gate_up, dw_down, db_down = results
        problem = self.problem
        flat_weights = problem["topk_weights"].reshape(-1).double()
        for expert in range(self.num_experts):
            mine = self.row_experts == expert
            r, t, p = self.rows[mine], self.tokens[mine], self.pairs[mine]
            got_gate_up, got_down = dw_gate_up[expert], dw_down[expert]
            if self.layout == "gpt_oss":
                got_gate_up, got_down = got_gate_up.t(), got_down.t()
            if len(r) == 0:
                for value in (got_gate_up, got_down, db_gate_up[expert], db_down[expert]):
                    assert torch.count_nonzero(value) == 0, f"expert {expert} has no token{label}"
                continue
            dy_weighted = problem["dy"][t].double() * flat_weights[p, None]
            name = f"[{expert}]{label}"
            assert_fp32_close(got_gate_up, self.d_preact[r].double().t() @ problem["x"][t].double(),
                              "dW_gate_up" + name)
            assert_fp32_close(got_down, dy_weighted.t() @ self.h[r].double(), "dW_down" + name)
            assert_fp32_close(db_gate_up[expert], self.d_preact[r].double().sum(0), "db_gate_up" + name)
            assert_fp32_close(db_down[expert], dy_weighted.sum(0), "db_down" + name)

"""Uneven shards (I_p = 77, 154): the kernels mask contiguous axes by the padded width where the
padding exists in memory (`layouts.readable_width`), so the compiled loads stay 16-byte copies
(tests/ops/test_triton_aot.py). Here, under TRITON_INTERPRET=1 against float64 references, that the
padding never changes a result:
  - gate_up and backward_dh WRITE zeros into the padding columns of h / d_preact, whatever the
    buffer held before (NaN planted in it before the writer runs);
  - the readers (down forward, dx, backward_dh, backward_dw) give the reference both with the
    wide masks (padded buffers, aligned weights whose padding holds a large finite value) and
    with the exact ones (compact user tensors, no padding in memory).
fp32 so that assert_fp32_close applies; the mask choice depends only on the strides.
"""
import os

import pytest
import torch

from support.triton_problems import DEVICE, OPTIONS, dh_reference, expert_matrices, make_problem, row_index
from support.tolerances import assert_fp32_close

pytestmark = pytest.mark.triton  # skipped where the kernels cannot run (conftest.py)

from tpmoe.activations import expert_activation  # noqa: E402
from tpmoe.routing import align  # noqa: E402
from tpmoe.sharding import aligned_storage  # noqa: E402
from tpmoe.triton import backward_dh, backward_dw, down, gate_up, layouts  # noqa: E402
from tpmoe.triton.layouts import aligned_row_stride, down_axes, gate_up_axes, readable_width  # noqa: E402
from tpmoe.triton.tile_configs import KernelConfig  # noqa: E402

PAD_VALUE = 1.0e6  # finite, large: planted in a weight's padding, it would show in any result it reached
CONFIG = KernelConfig(16, 32, 16, 4, 2, GROUP_M=2)


def _nan_rows(rows, columns, dtype, device):
    """empty_aligned_rows, but every element (the padding too) NaN: what the writer must overwrite."""
    stride = aligned_row_stride(columns, torch.empty(0, dtype=dtype).element_size())
    return torch.full((rows, stride), float("nan"), dtype=dtype, device=device)[:, :columns]


def _padding(view):
    """The padding columns of a 2-D row-padded view, [rows, stride - columns]."""
    return view.as_strided((view.shape[0], view.stride(0) - view.shape[1]), (view.stride(0), 1),
                           view.storage_offset() + view.shape[1])


def _padded_weight(weight, axis):
    """aligned_storage(weight) with PAD_VALUE in its padding along the contiguous `axis`."""
    aligned = aligned_storage(weight)
    columns = weight.shape[axis]
    padded = aligned_row_stride(columns, weight.element_size())
    if aligned.stride(axis) == 1 and padded > columns:
        outer = [d for d in range(weight.dim()) if d != axis]
        pad = aligned.as_strided([aligned.shape[d] for d in outer] + [padded - columns],
                                 [aligned.stride(d) for d in outer] + [1], aligned.storage_offset() + columns)
        pad.fill_(PAD_VALUE)
    return aligned


def _problem(seed, inter, layout, gated=True):
    problem = make_problem(seed, num_tokens=9, hidden=24, inter=inter, experts=3, skip_expert=False, layout=layout,
                           gated=gated)
    top_k, num_pairs = problem["topk_ids"].shape[1], problem["topk_ids"].numel()
    routing = align(problem["topk_ids"], 3, CONFIG.BLOCK_M)
    return problem, top_k, num_pairs, routing


# gpt_oss gate_up with wide masks computes its padding columns from PAD_VALUE weights, whose
# activation overflows exp in the interpreter's numpy; those columns are then stored as zeros.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("inter", [77, 154])
@pytest.mark.parametrize("layout,gated,activation", [("concatenated", True, "silu"), ("gpt_oss", True, "silu"),
                                                     ("gpt_oss", False, "gelu")])
def test_gate_up_writes_zero_padding_and_down_reads_it(layout, gated, activation, inter, seed, monkeypatch):
    """h through gate_up into a NaN-filled buffer, then the down kernel on (padded h, aligned
    W_down with PAD_VALUE padding) [wide masks] and (compact h, compact W_down) [exact masks].
    Not gated on gpt_oss: the B tile's rows are the I_p columns, on the contiguous axis."""
    problem, top_k, num_pairs, routing = _problem(seed, inter, layout, gated)
    monkeypatch.setattr(gate_up, "empty_aligned_rows", _nan_rows)
    rows_axis, _ = gate_up_axes(layout)
    hidden_axis, inter_axis = down_axes(layout)
    rows, pairs, tokens, experts = row_index(routing, num_pairs, top_k)
    preact = torch.stack([problem["x"][t].double() @ expert_matrices(problem, layout, e)[0].double().t()
                          + problem["b_gate_up"][e].double() for t, e in zip(tokens.tolist(), experts.tolist())])
    h_expected = expert_activation(preact, activation=activation, layout=layout, gated=gated, **OPTIONS)
    outputs = {}
    for name, w_gate_up, w_down in (
            ("wide", _padded_weight(problem["w_gate_up"], rows_axis), _padded_weight(problem["w_down"], inter_axis)),
            ("exact", problem["w_gate_up"].contiguous(), problem["w_down"].contiguous())):
        h = gate_up.gate_up(problem["x"], w_gate_up, problem["b_gate_up"], routing.sorted_ids_padded,
                            routing.block_expert, top_k=top_k, activation=activation, layout=layout, gated=gated,
                            config=CONFIG, **OPTIONS)
        assert h.stride(0) == aligned_row_stride(inter, 4) > inter
        used = int(routing.num_padded)
        assert torch.count_nonzero(_padding(h)[:used]) == 0, "gate_up must store zeros into h's padding"
        assert_fp32_close(h[rows], h_expected, f"h ({name})")
        rows_in = h if name == "wide" else h.contiguous()
        assert (readable_width(rows_in, 1, inter) > inter) == (name == "wide")
        assert readable_width(w_down, inter_axis, inter) == (
            aligned_row_stride(inter, 4) if name == "wide" and layout != "gpt_oss" else inter)
        partials = down.grouped_scatter(rows_in, w_down, hidden_axis, inter_axis, problem["b_down"],
                                        problem["topk_weights"], routing.sorted_ids_padded, routing.block_expert,
                                        num_pairs=num_pairs, config=CONFIG)[0]
        expected = torch.stack([problem["topk_weights"].reshape(-1)[p].double()
                                * (h[r].double() @ expert_matrices(problem, layout, e)[1].double().t()
                                   + problem["b_down"][e].double())
                                for r, p, e in zip(rows.tolist(), pairs.tolist(), experts.tolist())])
        assert_fp32_close(partials[pairs], expected, f"down pair rows ({name})")
        outputs[name] = partials
    assert torch.isfinite(outputs["wide"]).all()


@pytest.mark.parametrize("inter", [77, 154])
@pytest.mark.parametrize("layout,activation", [("concatenated", "silu"), ("gpt_oss", "clamped_swiglu")])
def test_backward_dh_writes_zero_padding_and_dx_dw_read_it(layout, activation, inter, seed, monkeypatch):
    """d_preact through backward_dh into a NaN-filled buffer (weights wide: aligned with PAD_VALUE
    padding; and exact: compact), then dx (down kernel on d_preact and W_gate_up) and both dW
    launches on the padded buffers and on compact copies, against float64."""
    problem, top_k, num_pairs, routing = _problem(seed, inter, layout)
    monkeypatch.setattr(backward_dh, "empty_aligned_rows", _nan_rows)
    rows_axis, gu_hidden_axis = gate_up_axes(layout)
    hidden_axis, inter_axis = down_axes(layout)
    rows, h64, d_preact_expected, d_topk_expected = dh_reference(problem, layout, True, activation, True,
                                                                  routing, num_pairs, top_k)
    _, pairs, tokens, experts = row_index(routing, num_pairs, top_k)
    h = layouts.empty_aligned_rows(h64.shape[0], inter, torch.float32, DEVICE)
    h.copy_(h64)
    _padding(h).zero_()  # as gate_up leaves it
    used = int(routing.num_padded)
    for name, w_gate_up, w_down in (
            ("wide", _padded_weight(problem["w_gate_up"], rows_axis), _padded_weight(problem["w_down"], inter_axis)),
            ("exact", problem["w_gate_up"].contiguous(), problem["w_down"].contiguous())):
        d_preact, d_topk = backward_dh.backward_dh(
            problem["dy"], problem["x"], w_gate_up, problem["b_gate_up"], w_down, problem["b_down"],
            problem["topk_weights"], h, routing.sorted_ids_padded, routing.block_expert, top_k=top_k,
            activation=activation, layout=layout, gated=True, config=CONFIG, **OPTIONS)
        assert d_preact.stride(0) == aligned_row_stride(2 * inter, 4) > 2 * inter
        assert torch.count_nonzero(_padding(d_preact)[:used]) == 0, "backward_dh must store zeros into the padding"
        assert_fp32_close(d_preact[rows], d_preact_expected, f"d_preact ({name})")
        assert_fp32_close(d_topk.reshape(-1), d_topk_expected, f"d_topk_weights ({name})")

        for rows_name, a in (("padded", d_preact), ("compact", d_preact.contiguous())):
            label = f"{name} weights, {rows_name} rows"
            dx = down.grouped_scatter(a, w_gate_up, gu_hidden_axis, rows_axis, None, None, routing.sorted_ids_padded,
                                      routing.block_expert, num_pairs=num_pairs, config=CONFIG)[0]
            expected = torch.stack([d_preact[r].double() @ expert_matrices(problem, layout, e)[0].double()
                                    for r, e in zip(rows.tolist(), experts.tolist())])
            assert_fp32_close(dx[pairs], expected, f"dx pair rows ({label})")
            b_rows = h if rows_name == "padded" else h.contiguous()
            dw_gu, db_gu = backward_dw.backward_dw(
                a, problem["x"], None, routing.sorted_ids_padded, routing.padded_offsets, w_gate_up, rows_axis,
                gu_hidden_axis, num_pairs=num_pairs, top_k=top_k, a_gathered=False, b_gathered=True, bias_grad=True,
                config=KernelConfig(16, 32, 16, 4, 2))
            dw_dn, db_dn = backward_dw.backward_dw(
                problem["dy"], b_rows, problem["topk_weights"], routing.sorted_ids_padded, routing.padded_offsets,
                w_down, hidden_axis, inter_axis, num_pairs=num_pairs, top_k=top_k, a_gathered=True, b_gathered=False,
                bias_grad=True, config=KernelConfig(16, 32, 16, 4, 2))
            flat_weights = problem["topk_weights"].reshape(-1).double()
            for expert in range(3):
                mine = experts == expert
                d_rows, x_rows = d_preact[rows[mine]].double(), problem["x"][tokens[mine]].double()
                wdy = flat_weights[pairs[mine], None] * problem["dy"][tokens[mine]].double()
                h_rows = h[rows[mine]].double()
                gu_expected, dn_expected = d_rows.t() @ x_rows, wdy.t() @ h_rows
                if layout == "gpt_oss":
                    gu_expected, dn_expected = gu_expected.t(), dn_expected.t()
                assert_fp32_close(dw_gu[expert], gu_expected, f"dW_gate_up[{expert}] ({label})")
                assert_fp32_close(db_gu[expert], d_rows.sum(0), f"db_gate_up[{expert}] ({label})")
                assert_fp32_close(dw_dn[expert], dn_expected, f"dW_down[{expert}] ({label})")
                assert_fp32_close(db_dn[expert], wdy.sum(0), f"db_down[{expert}] ({label})")


def test_readable_width_needs_the_padding_in_memory():
    """The wide mask only where every row's padding lies inside the allocation and is its own."""
    padded = torch.zeros(5, 160)
    assert readable_width(padded[:, :154], 1, 154) == 160
    assert readable_width(torch.zeros(5, 154), 1, 154) == 154            # compact: no padding
    assert readable_width(padded[:, :154].t(), 0, 154) == 160            # the axis, not the position, counts
    assert readable_width(padded[:, 6:], 1, 154) == 154                  # the last row's padding is past the end
    assert readable_width(torch.zeros(5, 154).t(), 1, 5) == 5            # not contiguous along the axis
    assert readable_width(torch.zeros(3, 10, 160)[:, :, :154], 2, 154) == 160
    assert readable_width(torch.zeros(3, 154, 160)[:, :, :154].transpose(1, 2), 2, 154) == 154
    assert readable_width(padded[:, :160], 1, 160) == 160                # a multiple of 16 already

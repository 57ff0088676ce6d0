"""How each weight layout is read in place: which axis is which, and where gate and up sit.

The kernels never repack a weight: they take the strides of the axes named here.
  w_gate_up  "concatenated"/"interleaved" [E, R, H]; "gpt_oss" [E, H, R]
  w_down     "concatenated"/"interleaved" [E, H, I]; "gpt_oss" [E, I, H]
Intermediate column j of gate sits at row j * COL_STEP of the R axis, its up partner at
j * COL_STEP + up_offset: concatenated (1, I), interleaved and gpt_oss (2, 1).
"""
import torch

# Rows of a buffer the kernels read start on a 16-byte boundary, their stride a multiple of 16
# elements: the rule and its reasons are in tpmoe.sharding, which pads the weights the same way
# (and must not import triton).
from ..sharding import ROW_ALIGN_BYTES, ROW_ALIGN_ELEMENTS, aligned_row_stride  # noqa: F401


def gate_up_axes(layout: str):
    """(rows axis R, hidden axis H) of w_gate_up."""
    return (2, 1) if layout == "gpt_oss" else (1, 2)


def down_axes(layout: str):
    """(hidden axis H, intermediate axis I) of w_down."""
    return (2, 1) if layout == "gpt_oss" else (1, 2)


def gate_up_columns(layout: str, gated: bool, intermediate_size: int):
    """(COL_STEP, up_offset) for the gate/up column pairing; (1, 0) when not gated."""
    if not gated:
        return 1, 0
    if layout == "concatenated":
        return 1, intermediate_size
    return 2, 1


def paired_load(w_gate_up, rows_axis: int, gated: bool, col_step: int) -> bool:
    """Whether backward_dh loads gate and up as one [BLOCK_K, 2 BLOCK_N] tile and splits it
    (the forward gate_up always loads them as one B tile, for every layout: gate_up.py).

    Where gate and up columns alternate along the contiguous axis (gpt_oss storage), two
    stride-2 loads cannot be vectorised: on sm_90 bf16 they cost the gate_up kernel 254
    registers and its pipelining, the paired load 145 registers (ptxas, tests/test_triton_aot.py).
    Half precision only: with fp32/fp64 (FMA dots) the split tile pushed backward_dh into spills.
    """
    return (gated and col_step == 2 and w_gate_up.stride(rows_axis) == 1
            and w_gate_up.element_size() <= 2)


def empty_aligned_rows(rows: int, columns: int, dtype, device):
    """An uninitialised [rows, columns] view whose row stride is `aligned_row_stride` (the padding
    columns are never read: every kernel masks its columns by `columns`)."""
    stride = aligned_row_stride(columns, torch.empty(0, dtype=dtype).element_size())
    return torch.empty(rows, stride, dtype=dtype, device=device)[:, :columns]

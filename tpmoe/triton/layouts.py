"""How each weight layout is read in place: which axis is which, and where gate and up sit.

The kernels never repack a weight: they take the strides of the axes named here.
  w_gate_up  "concatenated"/"interleaved" [E, R, H]; "gpt_oss" [E, H, R]
  w_down     "concatenated"/"interleaved" [E, H, I]; "gpt_oss" [E, I, H]
Intermediate column j of gate sits at row j * COL_STEP of the R axis, its up partner at
j * COL_STEP + up_offset: concatenated (1, I), interleaved and gpt_oss (2, 1).
"""
import torch


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
    """Whether a kernel loads gate and up as one [BLOCK_K, 2 BLOCK_N] tile and splits it.

    Where gate and up columns alternate along the contiguous axis (gpt_oss storage), two
    stride-2 loads cannot be vectorised: on sm_90 bf16 they cost the gate_up kernel 254
    registers and its pipelining, the paired load 145 registers (ptxas, tests/test_triton_aot.py).
    Half precision only: with fp32/fp64 (FMA dots) the split tile pushed backward_dh into spills.
    """
    return (gated and col_step == 2 and w_gate_up.stride(rows_axis) == 1
            and w_gate_up.element_size() <= 2)


# Rows of a buffer the kernels read start on a 16-byte boundary: cp.async / TMA copies and
# vectorised loads need it, and a row of 154 bf16 (I = 768 over 5 ranks) would lose them all.
ROW_ALIGN_BYTES = 16
# The row stride is rounded to a multiple of 16 ELEMENTS, not only of 16 bytes: the JIT marks an
# int argument (a stride) divisible only when its value is a multiple of 16, so a stride of 312
# bf16 (624 bytes, 2 I_p = 308 rounded to 16 bytes) still loses every 16-byte copy (gpt_oss
# gate_up and dx at I_p = 154 in `python -m tpmoe.triton.aot --intermediate 154`; dx spilled).
# 16 elements are at least 16 bytes for every dtype.
ROW_ALIGN_ELEMENTS = 16


def aligned_row_stride(columns: int, element_size: int) -> int:
    """The row stride (in elements) of a [rows, columns] buffer: columns rounded up to a multiple
    of 16 elements (hence of 16 bytes at any `element_size`)."""
    if element_size < 1:
        raise ValueError(f"element_size: expected a positive byte count, got {element_size}")
    return -(-columns // ROW_ALIGN_ELEMENTS) * ROW_ALIGN_ELEMENTS


def empty_aligned_rows(rows: int, columns: int, dtype, device):
    """An uninitialised [rows, columns] view whose row stride is `aligned_row_stride` (the padding
    columns are never read: every kernel masks its columns by `columns`)."""
    stride = aligned_row_stride(columns, torch.empty(0, dtype=dtype).element_size())
    return torch.empty(rows, stride, dtype=dtype, device=device)[:, :columns]

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
    """Whether gate and up alternate along w_gate_up's contiguous axis (gpt_oss storage), so
    that one [BLOCK_K, 2 BLOCK_N] tile of adjacent rows holds a column block's gate/up pairs.

    No kernel calls it today: the forward gate_up loads gate and up as one B tile for every
    layout (gate_up.py), and backward_dh chooses its one-dot recompute by dtype alone
    (backward_dh.one_gate_up_dot). Kept as the name of the storage property: where it holds,
    two stride-2 loads would not vectorise (on sm_90 bf16 they cost the gate_up kernel 254
    registers and its pipelining; the paired load 145 registers, ptxas).
    """
    return (gated and col_step == 2 and w_gate_up.stride(rows_axis) == 1
            and w_gate_up.element_size() <= 2)


def readable_width(tensor, axis: int, width: int) -> int:
    """How far along `axis` (of logical size `width`) a kernel may mask its loads: the padded
    width `aligned_row_stride(width)` where that many elements of every row exist in memory,
    else `width` (the exact mask).

    Why: a mask on the contiguous axis against a size that is not a multiple of 16 elements
    (an uneven shard, I_p = 154 or 77) stops the compiler from proving 16-byte uniform chunks,
    and the loads lose their 16-byte async copies; a mask by the padded width (a multiple of
    16, specialised as such at launch) keeps them. Allowed only when `axis` is contiguous,
    every other dimension of more than one element strides at least the padded width (so a
    row's padding is its own, not the next row's), and the storage holds the last row's
    padding (no read outside the allocation). What the padding holds is the caller's business:
    weights from `tpmoe.sharding.aligned_storage` have zeros there, h and d_preact get zeros
    from their writers (gate_up, backward_dh); a reduction over such an axis must make one side
    exactly zero in the padding (see down.grouped_scatter)."""
    if tensor.dim() == 0 or tensor.shape[axis] != width or tensor.stride(axis) != 1:
        return width
    padded = aligned_row_stride(width, tensor.element_size())
    if padded == width or tensor.numel() == 0:
        return width
    for dim in range(tensor.dim()):
        if dim != axis and tensor.shape[dim] > 1 and tensor.stride(dim) < padded:
            return width
    last = tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    storage_elements = tensor.untyped_storage().nbytes() // tensor.element_size()
    if last + (padded - width) >= storage_elements:
        return width
    return padded


def empty_aligned_rows(rows: int, columns: int, dtype, device):
    """An uninitialised [rows, columns] view whose row stride is `aligned_row_stride`. Its writer
    (gate_up for h, backward_dh for d_preact) stores zeros into the padding columns, so that a
    reader may mask its loads by the padded width (`readable_width`) and keep 16-byte copies."""
    stride = aligned_row_stride(columns, torch.empty(0, dtype=dtype).element_size())
    return torch.empty(rows, stride, dtype=dtype, device=device)[:, :columns]

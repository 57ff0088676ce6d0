"""`align` on the GPU: the T*K (token, expert) pairs grouped by expert, as Triton kernels.

The outputs are the seven tensors of `tpmoe.routing_torch.AlignResult` (docs/contracts.md),
allocated with torch.empty by the one allocator of their shapes
(`tpmoe.routing_torch.empty_align_outputs`) and written whole by the kernels: no fill runs before
them, so a call is its launches only.

A stable counting sort, deterministic without atomics. Within a group of pairs (the whole input,
or one chunk), each pair gets the key `bucket * BLOCK + lane` (bucket: its expert; E for an id out
of range; E + 1 for a lane past the pairs) and the keys are sorted (`tl.sort`): sorted position i
then holds the group's pairs by expert and, within an expert, in increasing pair order (the lane
breaks the ties). A pair's row is its expert's first row for the group plus its rank within the
expert in the group, i.e. plus i minus the position of the expert's first pair in the group.

- small path (`pairs <= small_max_pairs`, decode): ONE program, one launch. A histogram and its
  prefix sums give every offset (stored); a barrier makes them visible to every thread of the
  program; the whole input is sorted at once (row = sorted position), and each row block's expert
  is found by a binary search over the padded offsets;
- large path: THREE launches. `align_count_kernel`, one program per chunk of CHUNK pairs: the
  chunk's count per expert and where each expert's pairs start in the chunk's sorted order.
  `align_scan_kernel`, one program: the totals, every offset, num_padded, the sentinel in each
  expert's padding rows, and per (chunk, expert) the shift from a sorted position to the output
  row. `align_scatter_kernel`, one program per chunk (and per slice of the rows and the row
  blocks): the chunk sorted and its pairs written to their rows, the block experts, the sentinel
  past num_padded.

Every row of `sorted_ids_padded` is written once: a pair, an expert's padding (the sentinel
T*K) or a row past `num_padded` (the sentinel), so the writes of different phases never meet;
only the reads of what the same program stored need a barrier.

An expert id out of range stops the kernel with a device assert (the kernels that read ids are
compiled with debug=True for it; a check on the host would sync the device in every MoE
layer); such a pair is never used as an index.
"""
import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from ..routing_torch import empty_align_outputs
from .interpret import require_runnable

# Up to this many pairs (T*K) one program aligns everything in one launch. Decode batches
# (T*K up to a few thousand) stay on it; its sort of next_pow2(T*K) keys in one program is what
# bounds it. Not yet timed on a GPU: a tunable, not a measured crossover.
SMALL_MAX_PAIRS = 4096
# Pairs per program of the large path's count and scatter kernels.
CHUNK_PAIRS = 1024
# Experts per step of the loops over experts (the histogram bins held at once).
MAX_BLOCK_E = 1024
# Entries of the [BLOCK_E, BLOCK_PAD] tile of padding rows and of the scan's [BLOCK_C, BLOCK_E]
# tiles: 16 per thread at 4 warps, well within the registers (tests/ops/test_triton_align.py compiles
# every kernel for sm_90 and checks ptxas reports no spill).
TILE_ENTRIES = 2048
# Rows (and row blocks) per step of the loops that write the tail and the block experts.
BLOCK_ROWS = 256
# Chunks per step of the scan kernel's loops over the chunks (at most TILE_ENTRIES // BLOCK_E).
BLOCK_CHUNKS = 16


@triton.jit
def _load_experts(ids_ptr, pair, end, num_experts):
    """(expert int32, valid) of the pairs `pair` (a block of indices), those at or past `end` masked."""
    in_pairs = pair < end
    raw = tl.load(ids_ptr + pair, mask=in_pairs, other=0)
    # Compared before the cast: an int64 id past 2**31 must not wrap into range.
    valid = in_pairs & (raw >= 0) & (raw < num_experts)
    tl.device_assert(valid | (pair >= end), "tpmoe align: topk_ids: an expert id is outside [0, num_experts)")
    return tl.where(valid, raw, 0).to(tl.int32), valid


@triton.jit
def _histogram(expert, valid, e0, BLOCK_E: tl.constexpr):
    """Counts [BLOCK_E] int32 of the experts [e0, e0 + BLOCK_E) among the valid pairs."""
    rel = expert - e0
    return tl.histogram(rel, BLOCK_E, mask=valid & (rel >= 0) & (rel < BLOCK_E))


@triton.jit
def _write_offsets(counts, e0, carry, carry_padded, num_experts, block_m, pairs, tokens_per_expert_ptr,
                   expert_offsets_ptr, padded_offsets_ptr, sorted_ids_padded_ptr, BLOCK_E: tl.constexpr,
                   BLOCK_PAD: tl.constexpr):
    """Stores the counts and offsets of the experts [e0, e0 + BLOCK_E) and the sentinel in each one's
    padding rows. carry/carry_padded: the rows of the experts before e0. Returns (first rows, first
    padded rows, the carries after this block)."""
    e = e0 + tl.arange(0, BLOCK_E)
    in_e = e < num_experts
    counts = tl.where(in_e, counts.to(tl.int64), 0)
    padded = (counts + block_m - 1) // block_m * block_m
    start = carry + tl.cumsum(counts, 0) - counts
    padded_start = carry_padded + tl.cumsum(padded, 0) - padded
    tl.store(tokens_per_expert_ptr + e, counts, mask=in_e)
    tl.store(expert_offsets_ptr + e, start, mask=in_e)
    tl.store(padded_offsets_ptr + e, padded_start, mask=in_e)
    # Expert e's padding: rows [padded_start + count, padded_start + padded), fewer than block_m.
    pad = padded - counts
    sentinel = tl.full((BLOCK_E, BLOCK_PAD), 0, tl.int32) + pairs
    for j0 in range(0, block_m - 1, BLOCK_PAD):
        j = j0 + tl.arange(0, BLOCK_PAD)
        rows = (padded_start + counts)[:, None] + j[None, :]
        tl.store(sorted_ids_padded_ptr + rows, sentinel, mask=j[None, :] < pad[:, None])
    return start, padded_start, carry + tl.sum(counts, 0), carry_padded + tl.sum(padded, 0)


@triton.jit
def _write_totals(carry, carry_padded, num_experts, expert_offsets_ptr, padded_offsets_ptr, num_padded_ptr):
    tl.store(expert_offsets_ptr + num_experts, carry)
    tl.store(padded_offsets_ptr + num_experts, carry_padded)
    tl.store(num_padded_ptr, carry_padded)


@triton.jit
def _sorted_keys(ids_ptr, begin, pairs, num_experts, BLOCK: tl.constexpr, WIDE_KEYS: tl.constexpr):
    """The pairs [begin, begin + BLOCK) as sorted keys bucket * BLOCK + lane: bucket the expert (E for an
    id out of range, E + 1 past the pairs), so sorted position i holds the pairs grouped by expert and,
    within an expert, in increasing pair order (the lane breaks the ties)."""
    lane = tl.arange(0, BLOCK)
    expert, valid = _load_experts(ids_ptr, begin + lane, pairs, num_experts)
    bucket = tl.where(valid, expert, tl.where(begin + lane < pairs, num_experts, num_experts + 1))
    if WIDE_KEYS:
        keys = bucket.to(tl.int64) * BLOCK + lane
    else:
        keys = bucket * BLOCK + lane
    return tl.sort(keys)


@triton.jit
def _write_tail(sorted_ids_padded_ptr, num_padded, first, pairs, padded_rows, BLOCK_R: tl.constexpr):
    """The sentinel in the rows [first, first + BLOCK_R) at or past num_padded."""
    idx = first + tl.arange(0, BLOCK_R)
    tail = (idx >= num_padded) & (idx < padded_rows)
    tl.store(sorted_ids_padded_ptr + idx, tl.full((BLOCK_R,), 0, tl.int32) + pairs, mask=tail)


@triton.jit
def _write_block_experts(padded_offsets_ptr, block_expert_ptr, num_padded, first, num_experts, block_m, num_blocks,
                         BLOCK_R: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """The expert of the row blocks [first, first + BLOCK_R) (a binary search over padded_offsets,
    which must be visible to the calling program), -1 at or past num_padded."""
    idx = first + tl.arange(0, BLOCK_R)
    in_blocks = idx < num_blocks
    row = idx.to(tl.int64) * block_m
    used = in_blocks & (row < num_padded)
    # Invariant: padded_offsets[low] <= row < padded_offsets[high]. Then row lies in the segment
    # of expert `low` (an empty expert's segment starts where the next one does and never holds it).
    low = tl.zeros((BLOCK_R,), tl.int32)
    high = tl.zeros((BLOCK_R,), tl.int32) + num_experts
    for _ in tl.static_range(SEARCH_STEPS):
        middle = (low + high) // 2
        go_up = tl.load(padded_offsets_ptr + middle, mask=used, other=0) <= row
        low = tl.where(go_up, middle, low)
        high = tl.where(go_up, high, middle)
    tl.store(block_expert_ptr + idx, tl.where(used, low, -1), mask=in_blocks)


@triton.jit
def align_small_kernel(
    # pointers
    ids_ptr,                 # [pairs] int32 or int64 expert of each pair
    sorted_pair_ids_ptr,     # [pairs] int32 out
    tokens_per_expert_ptr,   # [E] int64 out
    expert_offsets_ptr,      # [E+1] int64 out
    sorted_ids_padded_ptr,   # [M] int32 out
    padded_offsets_ptr,      # [E+1] int64 out
    block_expert_ptr,        # [num_blocks] int32 out
    num_padded_ptr,          # [1] int64 out
    # sizes
    pairs, num_experts, block_m, padded_rows, num_blocks,
    # meta-parameters
    BLOCK_P: tl.constexpr,  # next_pow2(pairs): the keys sorted at once
    BLOCK_H: tl.constexpr,  # pairs per step of the histogram
    BLOCK_E: tl.constexpr, BLOCK_PAD: tl.constexpr, BLOCK_R: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    WIDE_KEYS: tl.constexpr,
):
    carry = tl.full((), 0, tl.int64)
    carry_padded = tl.full((), 0, tl.int64)
    for e0 in range(0, num_experts, BLOCK_E):
        counts = tl.zeros((BLOCK_E,), tl.int32)
        for first in range(0, pairs, BLOCK_H):
            expert, valid = _load_experts(ids_ptr, first + tl.arange(0, BLOCK_H), pairs, num_experts)
            counts += _histogram(expert, valid, e0, BLOCK_E)
        _, _, carry, carry_padded = _write_offsets(
            counts, e0, carry, carry_padded, num_experts, block_m, pairs, tokens_per_expert_ptr,
            expert_offsets_ptr, padded_offsets_ptr, sorted_ids_padded_ptr, BLOCK_E, BLOCK_PAD)
    _write_totals(carry, carry_padded, num_experts, expert_offsets_ptr, padded_offsets_ptr, num_padded_ptr)
    # What follows reads the offsets that other threads of this program stored.
    tl.debug_barrier()

    # Sorted position i is the pair's row in sorted_pair_ids; in sorted_ids_padded it moves by its
    # expert's padded start minus its start.
    keys = _sorted_keys(ids_ptr, 0, pairs, num_experts, BLOCK_P, WIDE_KEYS)
    position = tl.arange(0, BLOCK_P)
    sorted_expert = (keys // BLOCK_P).to(tl.int32)
    sorted_pair = (keys % BLOCK_P).to(tl.int32)
    placed = sorted_expert < num_experts
    # Every position below T*K: those past expert_offsets[E] would hold out-of-range pairs (the assert).
    tl.store(sorted_pair_ids_ptr + position, sorted_pair, mask=position < pairs)
    start = tl.load(expert_offsets_ptr + sorted_expert, mask=placed, other=0)
    padded_start = tl.load(padded_offsets_ptr + sorted_expert, mask=placed, other=0)
    tl.store(sorted_ids_padded_ptr + padded_start + (position - start), sorted_pair, mask=placed)

    for first in range(0, num_blocks, BLOCK_R):
        _write_block_experts(padded_offsets_ptr, block_expert_ptr, carry_padded, first, num_experts, block_m,
                             num_blocks, BLOCK_R, SEARCH_STEPS)
    # The rows past num_padded only (those before it hold pairs and padding, written above).
    for first in range(carry_padded // BLOCK_R * BLOCK_R, padded_rows, BLOCK_R):
        _write_tail(sorted_ids_padded_ptr, carry_padded, first, pairs, padded_rows, BLOCK_R)


@triton.jit
def align_count_kernel(
    ids_ptr,          # [pairs] int32 or int64
    counts_ptr,       # [num_chunks, E] int32 out: the pairs of each expert in the chunk
    chunk_start_ptr,  # [num_chunks, E] int32 out: where each expert's pairs start in the chunk's sorted order
    pairs, num_experts,
    CHUNK: tl.constexpr, BLOCK_E: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    expert, valid = _load_experts(ids_ptr, chunk * CHUNK + tl.arange(0, CHUNK), pairs, num_experts)
    carry = tl.full((), 0, tl.int32)
    for e0 in range(0, num_experts, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        counts = _histogram(expert, valid, e0, BLOCK_E)
        tl.store(counts_ptr + chunk * num_experts + e, counts, mask=e < num_experts)
        tl.store(chunk_start_ptr + chunk * num_experts + e, carry + tl.cumsum(counts, 0) - counts,
                 mask=e < num_experts)
        carry += tl.sum(counts, 0)


@triton.jit
def align_scan_kernel(
    counts_ptr,   # [num_chunks, E] int32 (align_count_kernel)
    shift_ptr,    # [num_chunks, E] int32 in: the chunk starts; out: output row minus sorted position in the chunk
    tokens_per_expert_ptr, expert_offsets_ptr, sorted_ids_padded_ptr, padded_offsets_ptr, num_padded_ptr,
    pairs, num_experts, block_m, num_chunks,
    BLOCK_E: tl.constexpr, BLOCK_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    carry = tl.full((), 0, tl.int64)
    carry_padded = tl.full((), 0, tl.int64)
    for e0 in range(0, num_experts, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        in_e = e < num_experts
        totals = tl.zeros((BLOCK_E,), tl.int32)
        for c0 in range(0, num_chunks, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            where = c.to(tl.int64)[:, None] * num_experts + e[None, :]
            mask = (c < num_chunks)[:, None] & in_e[None, :]
            totals += tl.sum(tl.load(counts_ptr + where, mask=mask, other=0), 0)
        start, _, carry, carry_padded = _write_offsets(
            totals, e0, carry, carry_padded, num_experts, block_m, pairs, tokens_per_expert_ptr,
            expert_offsets_ptr, padded_offsets_ptr, sorted_ids_padded_ptr, BLOCK_E, BLOCK_PAD)
        # Chunk c's pairs of expert e take the rows from start[e] + (pairs of e in the chunks before c)
        # on, in their sorted order: row = sorted position + (that first row - the chunk start).
        running = start.to(tl.int32)  # rows fit in int32: align refuses T*K >= 2**31 - 1
        for c0 in range(0, num_chunks, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            where = c.to(tl.int64)[:, None] * num_experts + e[None, :]
            mask = (c < num_chunks)[:, None] & in_e[None, :]
            counts = tl.load(counts_ptr + where, mask=mask, other=0)
            chunk_start = tl.load(shift_ptr + where, mask=mask, other=0)
            first_row = running[None, :] + tl.cumsum(counts, 0) - counts
            tl.store(shift_ptr + where, first_row - chunk_start, mask=mask)
            running += tl.sum(counts, 0)
    _write_totals(carry, carry_padded, num_experts, expert_offsets_ptr, padded_offsets_ptr, num_padded_ptr)


@triton.jit
def align_scatter_kernel(
    ids_ptr, shift_ptr, expert_offsets_ptr, padded_offsets_ptr, num_padded_ptr,
    sorted_pair_ids_ptr, sorted_ids_padded_ptr, block_expert_ptr,
    pairs, num_experts, block_m, padded_rows, num_blocks, num_chunks,
    CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, SEARCH_STEPS: tl.constexpr, WIDE_KEYS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < num_chunks:
        chunk = pid.to(tl.int64)
        keys = _sorted_keys(ids_ptr, chunk * CHUNK, pairs, num_experts, CHUNK, WIDE_KEYS)
        sorted_expert = (keys // CHUNK).to(tl.int32)
        sorted_pair = (chunk * CHUNK + keys % CHUNK).to(tl.int32)
        placed = sorted_expert < num_experts
        row = tl.arange(0, CHUNK) + tl.load(shift_ptr + chunk * num_experts + sorted_expert, mask=placed, other=0)
        tl.store(sorted_pair_ids_ptr + row, sorted_pair, mask=placed)
        start = tl.load(expert_offsets_ptr + sorted_expert, mask=placed, other=0)
        padded_start = tl.load(padded_offsets_ptr + sorted_expert, mask=placed, other=0)
        tl.store(sorted_ids_padded_ptr + padded_start + (row - start), sorted_pair, mask=placed)
    # Program pid also takes the rows [pid * BLOCK_R, (pid + 1) * BLOCK_R) and the row blocks of the
    # same numbers (the grid covers padded_rows >= num_blocks).
    num_padded = tl.load(num_padded_ptr)
    first = pid.to(tl.int64) * BLOCK_R
    _write_tail(sorted_ids_padded_ptr, num_padded, first, pairs, padded_rows, BLOCK_R)
    _write_block_experts(padded_offsets_ptr, block_expert_ptr, num_padded, first, num_experts, block_m, num_blocks,
                         BLOCK_R, SEARCH_STEPS)


def _search_steps(num_experts: int) -> int:
    """Steps of the binary search: halving [0, E) down to one expert takes ceil(log2(E))."""
    return max(1, math.ceil(math.log2(num_experts)))


def _wide_keys(num_experts: int, block: int) -> bool:
    """Whether the sort keys need int64: the largest is (E + 1) * BLOCK + BLOCK - 1."""
    return (num_experts + 2) * block >= 2**31


def align_launches(pairs: int, small_max_pairs: int = SMALL_MAX_PAIRS) -> int:
    """Kernel launches of one `align_triton` call: 1 on the small path, 3 on the large one."""
    return 1 if pairs <= small_max_pairs or pairs == 0 else 3


def align_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, small_max_pairs: int = SMALL_MAX_PAIRS,
                 chunk_pairs: int = CHUNK_PAIRS) -> Tuple[torch.Tensor, ...]:
    """The seven AlignResult tensors of topk_ids [T, K] (its arguments checked by tpmoe.routing.align).

    small_max_pairs: the largest T*K aligned by the one-launch path (0 forces the large path for
    any T*K > 0; T*K = 0 always takes the one launch); chunk_pairs: pairs per program of the large
    path (a power of two).
    """
    require_runnable(align_small_kernel, topk_ids.device)
    if isinstance(chunk_pairs, bool) or not isinstance(chunk_pairs, int) or chunk_pairs < 1 \
            or chunk_pairs & (chunk_pairs - 1):
        raise ValueError(f"chunk_pairs: expected a power of two, got {chunk_pairs!r}")
    outputs = empty_align_outputs(topk_ids, num_experts, block_m)
    (sorted_pair_ids, tokens_per_expert, expert_offsets, sorted_ids_padded, padded_offsets, block_expert,
     num_padded) = outputs
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    pairs = ids.numel()
    padded_rows, num_blocks = sorted_ids_padded.shape[0], block_expert.shape[0]
    block_e = min(MAX_BLOCK_E, triton.next_power_of_2(num_experts))
    block_pad = min(max(1, TILE_ENTRIES // block_e), triton.next_power_of_2(max(1, block_m - 1)))
    steps = _search_steps(num_experts)
    sizes = (pairs, num_experts, block_m, padded_rows, num_blocks)
    # debug=True: the kernels that read the ids keep their device assert (compiled out otherwise);
    # without sanitize_overflow=False it would also check every int32 add, none of which can overflow
    # here (align refuses sizes past int32). num_stages=1: no loop here streams tiles worth pipelining.
    if align_launches(pairs, small_max_pairs) == 1:
        block_p = triton.next_power_of_2(max(pairs, 1))
        align_small_kernel[(1,)](
            ids, sorted_pair_ids, tokens_per_expert, expert_offsets, sorted_ids_padded, padded_offsets,
            block_expert, num_padded, *sizes,
            BLOCK_P=block_p, BLOCK_H=min(1024, block_p), BLOCK_E=block_e, BLOCK_PAD=block_pad,
            BLOCK_R=min(BLOCK_ROWS, triton.next_power_of_2(max(padded_rows, 16))), SEARCH_STEPS=steps,
            WIDE_KEYS=_wide_keys(num_experts, block_p), num_warps=8 if block_p >= 2048 else 4, num_stages=1,
            debug=True, sanitize_overflow=False)
        return outputs

    num_chunks = triton.cdiv(pairs, chunk_pairs)
    counts, shift = torch.empty((2, num_chunks, num_experts), dtype=torch.int32, device=ids.device).unbind(0)
    align_count_kernel[(num_chunks,)](ids, counts, shift, pairs, num_experts, CHUNK=chunk_pairs, BLOCK_E=block_e,
                                      num_warps=4, num_stages=1, debug=True, sanitize_overflow=False)
    align_scan_kernel[(1,)](counts, shift, tokens_per_expert, expert_offsets, sorted_ids_padded, padded_offsets, num_padded,
                            pairs, num_experts, block_m, num_chunks, BLOCK_E=block_e, BLOCK_PAD=block_pad,
                            BLOCK_C=max(1, min(BLOCK_CHUNKS, TILE_ENTRIES // block_e)), num_warps=4, num_stages=1)
    grid = max(num_chunks, triton.cdiv(padded_rows, BLOCK_ROWS))  # padded_rows >= num_blocks
    align_scatter_kernel[(grid,)](
        ids, shift, expert_offsets, padded_offsets, num_padded, sorted_pair_ids, sorted_ids_padded, block_expert,
        *sizes, num_chunks, CHUNK=chunk_pairs, BLOCK_R=BLOCK_ROWS, SEARCH_STEPS=steps,
        WIDE_KEYS=_wide_keys(num_experts, chunk_pairs), num_warps=4, num_stages=1)
    return outputs

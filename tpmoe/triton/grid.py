"""The grid order of the forward GEMM kernels: a 1-D grid walked in groups of row blocks.

With a 2-D grid whose row-block index runs fastest, consecutive programs share a column
block of B but each reads a new row block of A, and A is re-read once per column block from
DRAM once it no longer fits L2. vLLM's grouped ordering (the Triton matmul tutorial's) walks
GROUP_M row blocks down one column stripe before moving to the next stripe: the programs in
flight at any moment read GROUP_M row blocks of A and a few column stripes of B, both small
enough to stay in L2. GROUP_M = 1 is the plain column-major order. The last group may be
short (row-block count not a multiple of GROUP_M): it walks only the blocks that exist.
"""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid` of a num_pid_m x num_pid_n tile grid."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    local = pid % num_pid_in_group
    pid_m = first_pid_m + local % group_size_m
    pid_n = local // group_size_m
    return pid_m, pid_n


def tile_grid_size(num_row_blocks: int, num_col_blocks: int) -> int:
    """Programs of the 1-D grid (one per tile); the swizzle only reorders them."""
    return num_row_blocks * num_col_blocks

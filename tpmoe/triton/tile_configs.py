"""Kernel tile configurations: fixed tables, looked up by (token-count bucket, N, K).

The configs are chosen from fixed tables rather than by `triton.autotune`'s timing runs:
BLOCK_M fixes the routing alignment (`tpmoe.routing.align(..., block_m)`) that every kernel of
one forward and backward shares, so it must be known before the first launch, and a fixed
choice keeps runs reproducible. Every config of each target's tables (`all_configs(kernel,
capability)`) is compiled ahead of time for its target, sm_80 and sm_90, by
tests/ops/test_triton_aot.py (shared memory within the limit, no spills).

Token-count bucket: rows per expert on average, T*K/E, rounded up to a power of two; it picks
BLOCK_M (`block_m_for`: 16 up to 16 rows per expert, 64 up to 32, 128 from 64), whatever T,
E and K make those rows.

Per architecture: the tables are the sm_90 (H100 / H200) ones; a device below compute capability
9.0 (A100: sm_80) takes `_sm80_tables()`' entries in their place, for the launches where the sm_90
config spills registers on sm_80 (`kernel_config(..., capability=...)`; tpmoe.triton.autograd
passes the device's). BLOCK_M is the same on both, so the routing alignment does not depend on
the device.

TPMOE_TRITON_CONFIG selects one fixed config for every kernel (for determinism studies, CI and
the interpreter tests), as comma-separated key=value pairs, e.g.
    TPMOE_TRITON_CONFIG="BLOCK_M=64,BLOCK_N=64,BLOCK_K=32,num_warps=4,num_stages=3"
Keys: BLOCK_M, BLOCK_N, BLOCK_K (powers of two >= 16), num_warps, num_stages, GROUP_M, SPLIT
(>= 1); missing keys keep
the table's value. For the weight-gradient kernel BLOCK_N and BLOCK_K are the tile of dW
and BLOCK_M its reduction chunk over rows. GROUP_M is the grouped grid order of the GEMMs and
backward_dw (the tables set it); SPLIT, backward_dw's split over the rows of each expert, is chosen per
call by `backward_dw_split` (launch_configs) unless TPMOE_TRITON_CONFIG sets it.
"""
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

ENV_VAR = "TPMOE_TRITON_CONFIG"
KERNELS = ("gate_up", "down", "backward_dh", "backward_dw")


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    # Row blocks per group of the grid's swizzle: consecutive programs walk GROUP_M row blocks
    # down one column stripe before moving right, so that stripe of B stays in L2 (1: no swizzle).
    GROUP_M: int = 1
    # Programs that split one output tile's reduction (split-K / split over rows), each writing
    # a partial that a fixed-order sum combines (1: no split).
    SPLIT: int = 1

    def meta(self) -> Dict[str, int]:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K)


def _gate_up_table() -> Dict[int, List[KernelConfig]]:
    # One [BLOCK_M, 2 BLOCK_N] accumulator (gate and up columns alternating, one tl.dot per
    # k-step), so the wgmma is n = 2 BLOCK_N wide. Decode (16 rows): BLOCK_N 32 so that T = 1
    # on Qwen3-30B-A3B (8 row blocks, I = 768) launches 192 programs, not 96, on 132 SMs; the
    # weights are the whole traffic and more programs keep more loads in flight. Mid-size:
    # 64 x 64 (n = 128 wgmma). Prefill (128 rows, buckets >= 1024): 128 x 128 at 8 warps, two
    # n = 256 wgmma per k-step (registers and shared memory: tests/ops/test_triton_aot.py).
    # GROUP_M 8 where there are many row blocks per expert (grid.py). Not yet timed on a
    # GPU: benchmarks/bench_kernels.py. No split over H at decode: the traffic model (T = 1)
    # gives 50.56 MB against the 50.33 MB weight floor, and a split only adds fp32 partials
    # (S = 2: +0.2 MB, +3.2 MB with padding rows) and a launch (the activation needs the sums);
    # 192 programs at 80 KB shared memory fit two per SM, so they are all resident at once.
    return {16: [KernelConfig(16, 32, 128, 4, 4), KernelConfig(16, 16, 128, 4, 4)],
            64: [KernelConfig(64, 64, 64, 4, 4, GROUP_M=8), KernelConfig(64, 32, 64, 4, 4, GROUP_M=8)],
            128: [KernelConfig(128, 128, 64, 8, 3, GROUP_M=8)]}


def _down_table() -> Dict[int, List[KernelConfig]]:
    # Decode: SPLIT 4 over the I axis (capped by the depth in `kernel_config`), each split a
    # partial that the combine sums in a fixed order. Prefill: 128 x 256 at 8 warps.
    return {16: [KernelConfig(16, 64, 128, 4, 4, SPLIT=4)],
            64: [KernelConfig(64, 128, 64, 4, 4, GROUP_M=8), KernelConfig(64, 32, 64, 4, 4, GROUP_M=8)],
            128: [KernelConfig(128, 256, 64, 8, 3, GROUP_M=8)]}


def _backward_dh_table() -> Dict[int, List[KernelConfig]]:
    # Two accumulators: dh [BM, BN] and the recomputed gate/up [BM, 2 BN] (one dot). ptxas,
    # sm_90 bf16 (the AOT tool): BM = 64 at 4 warps makes one warpgroup own the whole tile, so
    # the dots are wgmma m64n128 (gate/up) and m64n64 (dh), 182 registers; BLOCK_K 32 at 4
    # stages keeps shared memory at 76 KB (two CTAs per SM). The former 64x64x64 8-warp config
    # split N over two warpgroups (m64n32) at 112 KB (one CTA per SM). 128 rows: 8 warps (one
    # warpgroup per 64 rows), 76 KB, 186 registers (was 96 KB, m64n64, 206 registers).
    # GROUP_M = 8: the grid's grouped order (backward_dh module docstring).
    return {16: [KernelConfig(16, 64, 64, 4, 3, GROUP_M=8)],
            64: [KernelConfig(64, 64, 32, 4, 4, GROUP_M=8), KernelConfig(64, 32, 64, 4, 3, GROUP_M=8)],
            128: [KernelConfig(128, 64, 32, 8, 3, GROUP_M=8)]}


def _backward_dw_table() -> Dict[int, List[KernelConfig]]:
    # Tile of dW [BLOCK_N, BLOCK_K], reduced over rows in chunks of BLOCK_M. The row loop's
    # loads are indirect (the pair ids of the step come first), so the pipeliner gives the
    # tiles num_stages - 2 buffers: 5 stages keep two steps in flight (ptxas, sm_90 bf16:
    # 75 / 60 KB shared memory for dW_gate_up / dW_down at 64x128x64, no spills; the former
    # 3 stages waited on each step's loads, 35 KB). SPLIT is set per call (backward_dw_split).
    # GROUP_M: n tiles per group of the expert-major grid (backward_dw docstring). The bytes
    # model (traffic.py, Mixtral-8x7B T = 16384, backward dW) at GROUP_M 1 / 8 / 16 / 32:
    # 21026 / 9318 / 9698 / 8145 MB; 32 covers dW_down's 32 n tiles (its A, 34 MB an expert,
    # stays in L2 while B streams once). Qwen3-30B-A3B: an expert's rows fit L2 at any GROUP_M.
    return {16: [KernelConfig(32, 64, 64, 4, 5)],
            64: [KernelConfig(64, 128, 64, 8, 5, GROUP_M=32), KernelConfig(64, 32, 64, 4, 5, GROUP_M=32)],
            128: [KernelConfig(64, 128, 128, 8, 5, GROUP_M=32)]}


_TABLES = {"gate_up": _gate_up_table, "down": _down_table, "backward_dh": _backward_dh_table,
           "backward_dw": _backward_dw_table}


def _sm80_tables() -> Dict[str, Dict[int, List[KernelConfig]]]:
    # sm_80 has no wgmma: a tl.dot runs as mma.sync, whose A and B fragments sit in registers
    # beside the fp32 accumulator (wgmma reads them from shared memory), so the sm_90
    # configs below hit 255 registers and spill on sm_80 (ptxas -v, `python -m tpmoe.triton.aot
    # --cc 80 --intermediate 768 154 77`, bf16; the uneven shards' masks keep more values live).
    # Each entry replaces the sm_90 one at its BLOCK_M with the nearest config that compiles
    # without spills on sm_80, bias-free and biased, at I_p = 768, 154 and 77:
    # - gate_up 128 rows: BLOCK_N 128 -> 64 (the [128, 2 BN] accumulator was 128 fp32 a thread at
    #   8 warps; 64 B spilled). 200-214 registers.
    # - down 128 rows: BLOCK_N 256 -> 128 (32 B spilled). 196-206 registers.
    # - backward_dh holds three accumulators (dh [BM, BN] and gate/up [BM, 2 BN]): 96 fp32 a thread
    #   at 128x64 over 8 warps and at 64x64 over 4 (16-240 B spilled). 128 rows: BLOCK_N 32 and
    #   BLOCK_K 64 (182-190 registers; BLOCK_K 64 halves the k-steps BLOCK_N 32 would add per
    #   byte of x and dy loaded; 88 KB shared memory). 64 rows: 8 warps instead of 4, the same
    #   tile (128-174 registers). Narrow N: 64x32x32 at 4 warps, 128-182 registers (64x32x64
    #   spilled 32 B at I_p = 154 at 4 warps, 8 B at 768 at 8 warps).
    # - backward_dw 128 rows: the dW tile 128 x 128 -> 128 x 64, the 64-row entry (dW_down with
    #   the bias gradient spilled 24 B at I_p = 154 / 77 at any num_stages from 3 to 5; a
    #   32-row reduction chunk stayed under the limit at 239 registers, too close). 128-182 registers.
    # GROUP_M and num_stages are kept otherwise. sm_80 timing: not measured (no GPU lent yet).
    return {"gate_up": {128: [KernelConfig(128, 64, 64, 8, 3, GROUP_M=8)]},
            "down": {128: [KernelConfig(128, 128, 64, 8, 3, GROUP_M=8)]},
            "backward_dh": {64: [KernelConfig(64, 64, 32, 8, 4, GROUP_M=8), KernelConfig(64, 32, 32, 4, 3, GROUP_M=8)],
                            128: [KernelConfig(128, 32, 64, 8, 3, GROUP_M=8)]},
            "backward_dw": {128: [KernelConfig(64, 128, 64, 8, 5, GROUP_M=32)]}}


def table_capability(capability: Optional[int]) -> int:
    """The table set a device of this compute capability (10 * major + minor, e.g. 80 for an
    A100) takes: 80 below 9.0 (no wgmma; checked on sm_80 only), 90 from it. None: the sm_90
    tables (what the benchmarks and the traffic model assume)."""
    if capability is None:
        return 90
    if isinstance(capability, bool) or not isinstance(capability, int) or capability <= 0:
        raise ValueError(f"capability: expected None or a CUDA compute capability as a positive int "
                         f"10 * major + minor (80 for sm_80), got {capability!r}")
    return 80 if capability < 90 else 90


def _table(kernel: str, capability: Optional[int] = None) -> Dict[int, List[KernelConfig]]:
    """BLOCK_M -> configs; the first fits wide N, the second (if any) narrow N (N <= 32)."""
    if kernel not in _TABLES:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    table = _TABLES[kernel]()
    if table_capability(capability) == 80:
        table.update(_sm80_tables().get(kernel, {}))
    return table


def all_configs(kernel: str, capability: Optional[int] = None) -> List[KernelConfig]:
    """Every config the tables can return for `kernel` on a device of `capability` (None: sm_90),
    what the AOT test compiles for that target. Each once: sm_80's backward_dw takes one config
    for two BLOCK_M entries."""
    return list(dict.fromkeys(config for configs in _table(kernel, capability).values() for config in configs))


def token_bucket(num_tokens: int, top_k: int, num_experts: int) -> int:
    rows_per_expert = max(1, -(-num_tokens * top_k // num_experts))
    return 1 << (rows_per_expert - 1).bit_length()


def block_m_for(bucket: int) -> int:
    """The routing alignment for a token bucket (shared by all kernels of one call).

    By rows per expert, the quantity a row block covers: a tile about twice the average, so that
    an expert above the average (routing is uneven) still fits one row block. This is where
    measured tables cross over: vLLM's tuned H200 table for E = 128, N = 768 (Qwen3-30B-A3B,
    K = 8) takes 64-row tiles from M = 512 tokens (32 rows per expert) and 128 x 256 x 64
    from M = 1024 (64 rows per expert). The former rule (128 only above 512 rows per expert)
    kept that shape on 64 x 64 gate_up tiles up to T = 8192. No 32-row table: 16 up to 16 rows.
    """
    override = env_config()
    if "BLOCK_M" in override:
        return override["BLOCK_M"]
    if bucket <= 16:
        return 16
    if bucket <= 32:
        return 64
    return 128


def kernel_config(kernel: str, bucket: int, n: int, k: int, element_size: int = 2,
                  capability: Optional[int] = None) -> KernelConfig:
    """The config of `kernel` for a token bucket, output width n and reduction depth k, on a
    device of compute `capability` (10 * major + minor; None: the sm_90 tables).

    (For backward_dw, n and k are the two dims of the weight gradient tile.) The tables are
    tuned for bf16/fp16; fp32 (exact "ieee" dots run on FMA units, operands in registers) and
    fp64 take a shallower, less pipelined variant so that they neither spill nor overflow
    shared memory (`wide_dtype_config`).
    """
    block_m = block_m_for(bucket)
    table = _table(kernel, capability)
    configs = table.get(block_m) or table[min(table, key=lambda m: abs(m - block_m))]
    config = configs[1] if (n <= 32 and len(configs) > 1) else configs[0]
    if kernel != "backward_dw":
        config = replace(config, BLOCK_M=block_m)
    if config.SPLIT > 1:
        # Each split keeps at least two BLOCK_K steps of the depth k (a TP shard's I_p = 96
        # gets no split): a shorter slice would cost more in partial traffic than it gains.
        config = replace(config, SPLIT=max(1, min(config.SPLIT, k // (2 * config.BLOCK_K))))
    if element_size > 2:
        config = wide_dtype_config(kernel, config, element_size)
    override = env_config()
    if override:
        config = replace(config, **override)
    return config


def launch_configs(num_tokens: int, top_k: int, num_experts: int, hidden_size: int, intermediate_size: int,
                   gate_up_size: int, element_size: int = 2,
                   capability: Optional[int] = None) -> Dict[str, KernelConfig]:
    """The config of every launch of one forward and backward, by launch: what
    tpmoe.triton.autograd runs and what the benchmarks report. gate_up_size is the R axis of
    w_gate_up (2 I_p gated, I_p not); capability the device's (10 * major + minor; None: the
    sm_90 tables, which the benchmarks report). Each launch's (n, k) is its GEMM's output width and
    reduction depth; for the weight gradients, the two dims of dW.

    backward_dw's SPLIT (`backward_dw_split`) is chosen for the most loaded expert's rows, taken
    at their bound, num_tokens (`route` gives each token K distinct experts, so one expert gets at
    most T rows: reached when every token picks one hot expert): the real count lives on the
    device, and reading it would sync the GPU in every MoE layer's forward."""
    bucket = token_bucket(num_tokens, top_k, num_experts)
    shapes = {
        "gate_up": ("gate_up", intermediate_size, hidden_size),
        "down": ("down", hidden_size, intermediate_size),
        "backward_dh": ("backward_dh", intermediate_size, hidden_size),
        "dx": ("down", hidden_size, gate_up_size),  # dx runs the down kernel on W_gate_up
        "backward_dw_gate_up": ("backward_dw", gate_up_size, hidden_size),
        "backward_dw_down": ("backward_dw", hidden_size, intermediate_size),
    }
    configs = {launch: kernel_config(kernel, bucket, n, k, element_size, capability)
               for launch, (kernel, n, k) in shapes.items()}
    if "SPLIT" not in env_config():
        for launch in ("backward_dw_gate_up", "backward_dw_down"):
            _, n, k = shapes[launch]
            split = backward_dw_split(num_tokens, num_experts, n, k, configs[launch])
            configs[launch] = replace(configs[launch], SPLIT=split)
    return configs


# Streaming multiprocessors of the GPUs the tables are for (H100 / H200 SXM).
NUM_SMS = 132
# Rows each split of backward_dw reduces at least, so that its fp32 partial tile (BLOCK_N x
# BLOCK_K x 4 bytes, written and read back once: 64 KB at 128 x 64) stays a fraction of the
# rows it reads (rows x (BLOCK_N + BLOCK_K) x 2 bytes: 192 KB for 512 rows). Not yet timed.
MIN_ROWS_PER_SPLIT = 512
MAX_SPLIT = 8


def backward_dw_split(largest_expert_rows: int, num_experts: int, n: int, k: int, config: KernelConfig) -> int:
    """SPLIT for backward_dw: how many programs share the row reduction of one dW tile.

    One program per (expert, dW tile) walks the expert's whole segment, so few experts with many
    rows each (or one hot expert) leave most SMs idle while a few walk long segments. Split only
    when the grid underfills the GPU (fewer tiles than SMs) and each split of the LARGEST
    expert still gets MIN_ROWS_PER_SPLIT rows; at most MAX_SPLIT. Every expert's segment is cut
    into SPLIT chunks (backward_dw), so the longest program walks largest / SPLIT rows: the
    largest expert, not the average, is the launch's critical path (an average of 512 rows
    never split a hot expert of 4096 among 8 cold ones). Large-E models (tiles >> SMs) keep
    SPLIT = 1, which adds no launch.
    """
    tiles = num_experts * -(-n // config.BLOCK_N) * -(-k // config.BLOCK_K)
    if tiles >= NUM_SMS:
        return 1
    return max(1, min(MAX_SPLIT, -(-NUM_SMS // tiles), largest_expert_rows // MIN_ROWS_PER_SPLIT))


# fp32 accumulator tiles each program holds: gate and up; dh and the recomputed gate and up.
ACCUMULATORS = {"gate_up": 2, "down": 1, "backward_dh": 3, "backward_dw": 1}
# Exact fp32 ("ieee") and fp64 dots run on FMA units with their operands in registers too:
# measured with ptxas (tests/ops/test_triton_aot.py), more than 32 accumulator elements per thread spills.
WIDE_DTYPE_ACCUMULATORS_PER_THREAD = 32


def wide_dtype_config(kernel: str, config: KernelConfig, element_size: int) -> KernelConfig:
    """The fp32 / fp64 variant of a bf16 config: depth 32 (fp64: 16), two stages, and BLOCK_N
    halved until the accumulators fit the per-thread budget."""
    config = replace(config, BLOCK_K=min(config.BLOCK_K, 32 if element_size == 4 else 16), num_stages=2)
    if kernel == "backward_dw":  # its accumulator is [BLOCK_N, BLOCK_K], BLOCK_K is now small
        return config
    threads = 32 * config.num_warps
    block_n = config.BLOCK_N
    budget = WIDE_DTYPE_ACCUMULATORS_PER_THREAD * threads
    while block_n > 16 and config.BLOCK_M * block_n * ACCUMULATORS[kernel] > budget:
        block_n //= 2
    return replace(config, BLOCK_N=block_n)


# The down kernel's dequantized weight tile [BLOCK_K, BLOCK_N] (fp32 values and scales before the
# dot) fits beside the accumulator without spills up to 64 x 64 elements at 4 warps (ptxas,
# `python -m tpmoe.triton.aot --format fp8_block|mxfp4 --kernel down`: 64 x 128 and the decode's
# 128 x 64 took 255 registers and spilled on sm_80 and sm_90; gate_up's tables already fit).
QUANTIZED_DOWN_BLOCK_N = 64
QUANTIZED_TILE_PER_WARP = 64 * 64 // 4


def quantized_config(kernel: str, config: KernelConfig) -> KernelConfig:
    """The config of a forward launch on quantized weights (tpmoe.triton.dequant): the table's,
    with the down kernel's BLOCK_N narrowed until its weight tile fits (see above)."""
    if kernel != "down":
        return config
    block_n = min(config.BLOCK_N, QUANTIZED_DOWN_BLOCK_N)
    while block_n > 16 and block_n * config.BLOCK_K > QUANTIZED_TILE_PER_WARP * config.num_warps:
        block_n //= 2
    return replace(config, BLOCK_N=block_n)


# The fp8 x fp8 variant (tpmoe.triton.dequant.fp8_activation_dot) holds each k-step's float32
# partial product beside the accumulator until it is scaled, and the [BLOCK_M, B] activation tile
# in float32 while it is quantized: gate_up's [BLOCK_M, 2 BLOCK_N] pair is narrowed to BLOCK_N 32
# (at the prefill's 128 rows and 8 warps, BLOCK_N 64 took 255 registers and spilled 428 bytes on
# sm_90, 32 takes 232 and none), down's tile as the quantized configs narrow it (128 x 64: 195
# registers; python -m tpmoe.triton.aot --cc 90 --format fp8_block --fp8-activations).
FP8_ACTIVATION_GATE_UP_BLOCK_N = 32


def fp8_activation_config(kernel: str, config: KernelConfig, block_size: int) -> KernelConfig:
    """The config of a forward launch in the fp8 x fp8 variant: k-steps of one scale block
    (BLOCK_K = block_size), no split, the tiles narrowed (see above)."""
    config = replace(config, BLOCK_K=block_size, SPLIT=1)
    if kernel == "gate_up":
        return replace(config, BLOCK_N=min(config.BLOCK_N, FP8_ACTIVATION_GATE_UP_BLOCK_N))
    return quantized_config(kernel, config)


def env_config() -> Dict[str, int]:
    """The fixed config from TPMOE_TRITON_CONFIG, {} when the variable is unset or empty."""
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return {}
    allowed = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "GROUP_M", "SPLIT")
    values = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed or not value.strip().isdigit():
            raise ValueError(f"{ENV_VAR}: expected comma-separated key=int pairs with keys in {allowed}, "
                             f"got {text!r}")
        values[key] = int(value)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if key in values and (values[key] < 16 or values[key] & (values[key] - 1)):
            raise ValueError(f"{ENV_VAR}: {key} must be a power of two >= 16, got {values[key]}")
    for key in ("GROUP_M", "SPLIT"):  # a grid of 0 programs per tile / a group of 0 row blocks
        if key in values and values[key] < 1:
            raise ValueError(f"{ENV_VAR}: {key} must be >= 1, got {values[key]}")
    return values

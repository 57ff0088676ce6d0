"""Bytes moved through DRAM by each Triton launch of one forward and backward: a model.

    python -m tpmoe.triton.aot --model [--preset qwen3-30b-a3b mixtral-8x7b] [--tokens 1 16 1024 16384]
                                       [--tp P] [--group-m G] [--l2-mb 50]

Shapes come from tpmoe/presets.py (rank 0's shard of I over --tp ranks), tile configs from
tile_configs.launch_configs (what tpmoe.triton.autograd launches). Per launch it prints A bytes
read, B bytes read and C bytes written, twice: "row-fastest (old)", the configured tiles with
GROUP_M = 1 and SPLIT = 1 (the 2-D grid whose program_id(0), the row block, varies fastest;
for the weight gradients the former 3-D grid, expert fastest), and "as configured" (the config's GROUP_M and SPLIT; --group-m overrides GROUP_M of the
row-block kernels, to ask what a swizzle would give). Then the totals against the ideal (every
operand byte read once, every output written once) and, at decode, the weight-read floor.

The model, stated so that its numbers can be checked:
  - Routing is balanced: T*K pairs over min(E, T*K) touched experts, as evenly as possible;
    each expert's rows are padded to BLOCK_M (tile_configs.block_m_for). Padding rows are
    masked in every load (no traffic) but the gate_up / backward_dh outputs store them.
  - Operands are read in panels: a row block's A panel (its valid rows x the full reduction
    depth), an (expert, column block)'s B panel (the block's columns x the full depth); for the
    weight gradients, expert e's A panel of a dW row block and B panel of a dW column block
    over e's rows. A program touches its panels whole.
  - Programs run in waves of --wave (132: one per H200 SM), in launch order (program_id 0
    fastest, as CUDA issues blocks; with GROUP_M > 1 the grouped order of Triton's matmul
    tutorial: GROUP_M row blocks walk every column block before the next group). The programs
    of a wave walk the reduction depth side by side, so a panel that several of them read comes
    from DRAM once per wave. L2 is an LRU cache of --l2-mb (50 MB: H100 / H200) over panels,
    filled wave by wave: a panel a later wave reads again is free if still cached.
  - So, row-fastest: a column stripe of B is read once (an expert's row blocks run back to
    back) and A is re-read once per column block unless all of A fits in L2; grouped: A's
    group is read once per wave it spans, and B once per group unless the expert's whole
    weight stays cached between its groups.
  - Gathered rows (x, dy read at each pair's token) count once per pair: K experts reading the
    same token's row may in fact hit L2; the ideal counts each token once.
  - backward_dw as launched: expert (and split chunk) slowest, its dW tiles in grouped order
    over the n tiles (backward_dw's docstring), so an expert's A and B rows are read about once
    while its tiles run; the old expert-fastest grid re-read A once per k tile and B once per n
    tile once all experts' stripes no longer fit L2. A split chunk's panels are its own rows.
  - The pair rows of down and dx ([SPLIT, T*K, H]) in tpmoe.triton.down.pair_dtype: the input's
    dtype (bf16 for bf16) without a split; with SPLIT > 1 (split-K of the decode down, split
    over rows of dW) SPLIT fp32 partials written and read back by the fixed-order sum, then the
    result written once. backward_dh's d weight partials are fp32.
  - Routed experts only (no router, no shared expert); combine is the sum over k of the pair
    rows (read) into [T, H] (written).
"""
import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Sequence

from . import tile_configs
from ..presets import get_preset
from ..sharding import shard_sizes

DEFAULT_PRESETS = ("qwen3-30b-a3b", "mixtral-8x7b")
DEFAULT_TOKENS = (1, 16, 1024, 16384)
LAUNCHES = ("gate_up", "down", "combine", "backward_dh", "dx", "dx_combine", "dW_gate_up", "dW_down")
FORWARD = ("gate_up", "down", "combine")


@dataclass(frozen=True)
class Problem:
    """One rank's launch shapes: T tokens, H hidden, I_p columns, E experts, top-k K."""
    num_tokens: int
    hidden_size: int
    intermediate: int
    num_experts: int
    top_k: int
    gated: bool = True
    element_size: int = 2

    @property
    def partial_element_size(self) -> int:  # fp32 partials (fp64 for fp64): split sums, backward_dh's d weights
        return 8 if self.element_size == 8 else 4

    def pair_element_size(self, split: int) -> int:
        """Bytes per element of the [SPLIT, T*K, N] pair rows of the down and dx launches, as
        tpmoe.triton.down.pair_dtype allocates them: the input's dtype without a split (bf16 rows
        for bf16), fp32 (fp64) partials with one."""
        return self.element_size if split == 1 else self.partial_element_size

    @property
    def gate_up_rows(self) -> int:
        return (2 if self.gated else 1) * self.intermediate

    def expert_rows(self) -> List[int]:
        """Rows (pairs) of each touched expert under balanced routing."""
        pairs = self.num_tokens * self.top_k
        touched = min(self.num_experts, pairs)
        base, extra = divmod(pairs, touched)
        return [base + (1 if e < extra else 0) for e in range(touched)]


@dataclass(frozen=True)
class Machine:
    """The L2 capacity and the programs resident at once (one per SM: the tile configs' shared
    memory allows one or two; one is the cautious count)."""
    l2_bytes: float = 50e6   # H100 / H200
    wave: int = 132          # H200 SMs


@dataclass
class Traffic:
    a_read: float = 0.0
    b_read: float = 0.0
    c_written: float = 0.0

    @property
    def total(self) -> float:
        return self.a_read + self.b_read + self.c_written


class _L2:
    """Panels (key -> bytes) cached in an LRU of a fixed capacity, filled a wave at a time: the
    distinct panels of the programs running together are read once (the programs walk the
    reduction depth side by side, so one program's tile is in L2 when another asks for it), and
    one wave's panels are hits in a later wave if they are still cached. Counts the miss bytes."""

    def __init__(self, capacity: float, wave: int):
        self.capacity, self.wave, self.used = capacity, wave, 0.0
        self.panels, self.pending, self.programs = OrderedDict(), {}, 0
        self.missed = {}

    def program(self, *panels):
        """One program's panels, as (operand, key, bytes)."""
        for operand, key, size in panels:
            entry = self.pending.setdefault((operand, key), [size, 0])
            entry[1] += 1
        self.programs += 1
        if self.programs % self.wave == 0:
            self.flush()

    def flush(self):
        # The panels more programs of the wave read count as the more recently used.
        for key, (size, _) in sorted(self.pending.items(), key=lambda item: item[1][1]):
            if key in self.panels:
                self.panels.move_to_end(key)
                continue
            self.missed[key[0]] = self.missed.get(key[0], 0.0) + size
            self.panels[key] = size
            self.used += size
        self.pending = {}
        while self.used > self.capacity and self.panels:
            _, evicted = self.panels.popitem(last=False)
            self.used -= evicted

    def traffic(self) -> "Traffic":
        self.flush()
        return Traffic(a_read=self.missed.get("A", 0.0), b_read=self.missed.get("B", 0.0))


def grouped_order(num_pid_m: int, num_pid_n: int, group_m: int) -> Iterable[tuple]:
    """(pid_m, pid_n) of pid = 0, 1, ... as `grid.grouped_tile` decodes it (group_m 1: pid_n fastest)."""
    in_group = group_m * num_pid_n
    for pid in range(num_pid_m * num_pid_n):
        first_m = (pid // in_group) * group_m
        size_m = min(num_pid_m - first_m, group_m)
        yield first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


def program_order(num_pid_m: int, num_pid_n: int, group_m: int) -> Iterable[tuple]:
    """(pid_m, pid_n) in launch order: row block fastest (group_m 1), else Triton's grouped order."""
    if group_m <= 1:
        for pid_n in range(num_pid_n):
            for pid_m in range(num_pid_m):
                yield pid_m, pid_n
        return
    yield from grouped_order(num_pid_m, num_pid_n, group_m)


def _row_block_gemm(problem: Problem, config, depth: int, width: int, a_bytes_per_row: int, b_columns_per_block,
                    l2: "Machine") -> Traffic:
    """A and B reads of a kernel with one program per (row block, column block of `width`):
    A panel = valid rows x a_bytes_per_row; B panel = b_columns_per_block(n) x depth elements."""
    blocks = []  # (expert, valid rows) per row block, experts in order
    for expert, rows in enumerate(problem.expert_rows()):
        for start in range(0, rows, config.BLOCK_M):
            blocks.append((expert, min(config.BLOCK_M, rows - start)))
    num_pid_n = math.ceil(width / config.BLOCK_N)
    cache = _L2(l2.l2_bytes, l2.wave)
    for pid_m, pid_n in program_order(len(blocks), num_pid_n, config.GROUP_M):
        expert, rows = blocks[pid_m]
        cache.program(("A", pid_m, rows * a_bytes_per_row),
                      ("B", (expert, pid_n), b_columns_per_block(pid_n) * depth * problem.element_size))
    return cache.traffic()


def _columns(total: int, block: int, pid: int) -> int:
    return max(0, min(block, total - pid * block))


def padded_rows(problem: Problem, block_m: int) -> int:
    return sum(math.ceil(rows / block_m) * block_m for rows in problem.expert_rows())


def _split_rows(rows: int, block_m: int, split: int) -> List[int]:
    """Valid rows of each of the SPLIT chunks of an expert's padded segment (backward_dw: chunks
    of whole BLOCK_M steps, valid rows first, padding last)."""
    steps = math.ceil(rows / block_m)
    chunk = math.ceil(steps / split) * block_m
    return [max(0, min(rows, (s + 1) * chunk) - s * chunk) for s in range(split)]


def _weight_grad(problem: Problem, config, n_size: int, k_size: int, a_row_bytes: int, b_row_bytes: int,
                 l2: "Machine", expert_fastest: bool = False) -> Traffic:
    """backward_dw: program (slot, n, k) reads its chunk of expert e's rows of A's column block n
    and of B's column block k; writes every expert's dW (fp32 partials too where SPLIT > 1).
    Order as the kernel launches it: slot (e * SPLIT + s) slowest, its (n, k) tiles in
    `grid.grouped_tile` order (GROUP_M n tiles per group; GROUP_M = 1: k fastest).
    expert_fastest: the former 3-D grid (expert, n tile, k tile) with the expert fastest, the
    "row-fastest (old)" baseline (SPLIT 1 only, which is what the baseline configs have)."""
    rows = problem.expert_rows() + [0] * (problem.num_experts - len(problem.expert_rows()))
    num_n, num_k = math.ceil(n_size / config.BLOCK_N), math.ceil(k_size / config.BLOCK_K)
    cache = _L2(l2.l2_bytes, l2.wave)

    def program(expert, split, chunk_rows, pid_n, pid_k):
        # An expert without rows (or an empty chunk): its program skips the loop and stores
        # zeros (it still takes a slot of the wave).
        a_cols = _columns(n_size, config.BLOCK_N, pid_n)
        b_cols = _columns(k_size, config.BLOCK_K, pid_k)
        cache.program(("A", (expert, split, pid_n), chunk_rows * a_cols * a_row_bytes),
                      ("B", (expert, split, pid_k), chunk_rows * b_cols * b_row_bytes))

    if expert_fastest:
        assert config.SPLIT == 1
        for pid_k in range(num_k):
            for pid_n in range(num_n):
                for expert in range(problem.num_experts):
                    program(expert, 0, rows[expert], pid_n, pid_k)
    else:
        for expert in range(problem.num_experts):
            for split, chunk_rows in enumerate(_split_rows(rows[expert], config.BLOCK_M, config.SPLIT)):
                for pid_n, pid_k in grouped_order(num_n, num_k, config.GROUP_M):
                    program(expert, split, chunk_rows, pid_n, pid_k)
    traffic = cache.traffic()
    result = problem.num_experts * n_size * k_size
    if config.SPLIT > 1:
        traffic.c_written = config.SPLIT * result * 4 * 2 + result * problem.element_size  # partials out and in
    else:
        traffic.c_written = result * problem.element_size
    return traffic


def launch_traffic(problem: Problem, configs: Dict[str, tile_configs.KernelConfig],
                   l2: Machine, dw_expert_fastest: bool = False) -> Dict[str, Traffic]:
    """Traffic of every launch of one forward and backward (keys LAUNCHES). dw_expert_fastest:
    the weight gradients in the former expert-fastest order (the baseline), not their own."""
    es = problem.element_size
    H, I, R = problem.hidden_size, problem.intermediate, problem.gate_up_rows
    pairs = problem.num_tokens * problem.top_k
    halves = 2 if problem.gated else 1
    out = {}

    config = configs["gate_up"]
    traffic = _row_block_gemm(problem, config, H, I, H * es,
                              lambda n: halves * _columns(I, config.BLOCK_N, n), l2)
    traffic.c_written = padded_rows(problem, config.BLOCK_M) * I * es  # h, padding rows stored as zeros
    out["gate_up"] = traffic

    for launch, depth, a_rows in (("down", I, I), ("dx", R, R)):
        config = configs[launch]
        traffic = _row_block_gemm(problem, config, depth, H, a_rows * es,
                                  lambda n, c=config: _columns(H, c.BLOCK_N, n), l2)
        pair_rows_bytes = config.SPLIT * pairs * H * problem.pair_element_size(config.SPLIT)
        traffic.c_written = pair_rows_bytes
        out[launch] = traffic
        combine = Traffic(a_read=pair_rows_bytes, c_written=problem.num_tokens * H * es)
        out["combine" if launch == "down" else "dx_combine"] = combine

    config = configs["backward_dh"]
    # A: dy and x rows at each pair's token; B: W_down's and W_gate_up's columns of the block.
    traffic = _row_block_gemm(problem, config, H, I, 2 * H * es,
                              lambda n: (1 + halves) * _columns(I, config.BLOCK_N, n), l2)
    traffic.a_read += pairs * I * es  # the saved h, read once
    num_col_blocks = math.ceil(I / config.BLOCK_N)
    traffic.c_written = (padded_rows(problem, config.BLOCK_M) * R * es
                         + num_col_blocks * pairs * problem.partial_element_size)
    out["backward_dh"] = traffic

    # dW_gate_up = d_preact^T x (A sorted rows of R, B gathered x); dW_down = (w dy)^T h.
    out["dW_gate_up"] = _weight_grad(problem, configs["backward_dw_gate_up"], R, H, es, es, l2, dw_expert_fastest)
    out["dW_down"] = _weight_grad(problem, configs["backward_dw_down"], H, I, es, es, l2, dw_expert_fastest)
    return out


def ideal_traffic(problem: Problem) -> Dict[str, float]:
    """Every operand byte read once and every output written once (distinct tokens, touched weights)."""
    es, pes = problem.element_size, problem.pair_element_size(1)  # written once: no split
    H, I, R, T = problem.hidden_size, problem.intermediate, problem.gate_up_rows, problem.num_tokens
    pairs, touched, E = T * problem.top_k, len(problem.expert_rows()), problem.num_experts
    return {
        "gate_up": T * H * es + touched * R * H * es + pairs * I * es,
        "down": pairs * I * es + touched * H * I * es + pairs * H * pes,
        "combine": pairs * H * pes + T * H * es,
        "backward_dh": 2 * T * H * es + touched * (H * I + R * H) * es + pairs * I * es + pairs * R * es,
        "dx": pairs * R * es + touched * R * H * es + pairs * H * pes,
        "dx_combine": pairs * H * pes + T * H * es,
        "dW_gate_up": pairs * R * es + T * H * es + E * R * H * es,
        "dW_down": T * H * es + pairs * I * es + E * H * I * es,
    }


def weight_floor(problem: Problem) -> float:
    """The touched experts' weights, read once: the forward's floor at decode."""
    return len(problem.expert_rows()) * (problem.gate_up_rows + problem.intermediate) * problem.hidden_size \
        * problem.element_size


def problem_for(preset: str, num_tokens: int, tp: int = 1, element_size: int = 2) -> Problem:
    config = get_preset(preset).config
    intermediate = shard_sizes(config.intermediate_size, tp)[0]
    return Problem(num_tokens, config.hidden_size, intermediate, config.num_experts, config.top_k, config.gated,
                   element_size)


def configs_for(problem: Problem) -> Dict[str, tile_configs.KernelConfig]:
    """launch_configs under this module's launch names."""
    configs = tile_configs.launch_configs(problem.num_tokens, problem.top_k, problem.num_experts,
                                          problem.hidden_size, problem.intermediate, problem.gate_up_rows,
                                          problem.element_size)
    return {"gate_up": configs["gate_up"], "down": configs["down"], "backward_dh": configs["backward_dh"],
            "dx": configs["dx"], "backward_dw_gate_up": configs["backward_dw_gate_up"],
            "backward_dw_down": configs["backward_dw_down"]}


ROW_BLOCK_KERNELS = ("gate_up", "down", "backward_dh", "dx")


def report(problem: Problem, machine: Machine = Machine(), group_m: Optional[int] = None) -> List[dict]:
    """One row per launch: the row-fastest and the configured traffic, the ideal."""
    configured = configs_for(problem)
    if group_m is not None:
        configured = {name: replace(config, GROUP_M=group_m) if name in ROW_BLOCK_KERNELS else config
                      for name, config in configured.items()}
    old = {name: replace(config, GROUP_M=1, SPLIT=1) for name, config in configured.items()}
    # The baseline keeps dW's former grid (expert fastest): with GROUP_M = 1 the kernel's own
    # order is already expert-major, which is not what the old launch did.
    before = launch_traffic(problem, old, machine, dw_expert_fastest=True)
    now = launch_traffic(problem, configured, machine)
    ideal = ideal_traffic(problem)
    config_of = {"combine": "down", "dx_combine": "dx", "dW_gate_up": "backward_dw_gate_up",
                 "dW_down": "backward_dw_down"}
    rows = []
    for launch in LAUNCHES:
        config = configured[config_of.get(launch, launch)]
        rows.append(dict(launch=launch, config=config.__dict__ if launch not in ("combine", "dx_combine") else None,
                         old=before[launch].__dict__ | {"total": before[launch].total},
                         configured=now[launch].__dict__ | {"total": now[launch].total}, ideal=ideal[launch]))
    return rows


def _mb(value: float) -> str:
    return f"{value / 1e6:10.2f}"


def format_report(preset: str, problem: Problem, rows: List[dict], machine: Machine) -> str:
    lines = [f"{preset}: T={problem.num_tokens} H={problem.hidden_size} I_p={problem.intermediate} "
             f"E={problem.num_experts} K={problem.top_k} touched experts={len(problem.expert_rows())}, "
             f"L2 {machine.l2_bytes / 1e6:.0f} MB, {machine.wave} programs a wave; MB (1e6 bytes)",
             f"{'launch':11} {'config':22} | {'row-fastest (old)':^43} | {'as configured':^43} | {'ideal':>10}",
             f"{'':11} {'BMxBNxBK GM SP':22} | " + " ".join(f"{c:>10}" for c in ("A read", "B read", "C write",
                                                                                     "total")) + " | "
             + " ".join(f"{c:>10}" for c in ("A read", "B read", "C write", "total")) + f" | {'':>10}"]
    totals = {"old": [0.0, 0.0], "configured": [0.0, 0.0], "ideal": [0.0, 0.0]}
    for row in rows:
        config = row["config"]
        text = "-" if config is None else (f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']} "
                                           f"{config['GROUP_M']} {config['SPLIT']}")
        cells = []
        for key in ("old", "configured"):
            cells.append(" ".join(_mb(row[key][part]) for part in ("a_read", "b_read", "c_written", "total")))
        lines.append(f"{row['launch']:11} {text:22} | {cells[0]} | {cells[1]} | {_mb(row['ideal'])}")
        phase = 0 if row["launch"] in FORWARD else 1
        totals["old"][phase] += row["old"]["total"]
        totals["configured"][phase] += row["configured"]["total"]
        totals["ideal"][phase] += row["ideal"]
    floor = weight_floor(problem)
    for phase, name in ((0, "forward"), (1, "backward")):
        lines.append(f"{name + ' total':34} | {'':32}{_mb(totals['old'][phase])} | {'':32}"
                     f"{_mb(totals['configured'][phase])} | {_mb(totals['ideal'][phase])}"
                     f"   (configured / ideal {totals['configured'][phase] / totals['ideal'][phase]:.2f}x)")
    lines.append(f"forward vs the weight-read floor ({floor / 1e6:.2f} MB, touched experts' weights once): "
                 f"row-fastest {totals['old'][0] / floor:.2f}x, as configured {totals['configured'][0] / floor:.2f}x")
    return "\n".join(lines)


def main_rows(presets: Optional[Sequence[str]], tokens: Optional[Sequence[int]], tp: int = 1,
              dtype: str = "bfloat16", group_m: Optional[int] = None, l2_mb: float = 50.0,
              wave: int = Machine.wave) -> List[dict]:
    """Prints the report of every preset x token count; returns its rows (for --json)."""
    element_size = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}[dtype]
    machine = Machine(l2_mb * 1e6, wave)
    everything = []
    for preset in presets or DEFAULT_PRESETS:
        for num_tokens in tokens or DEFAULT_TOKENS:
            if num_tokens < 1:
                raise ValueError(f"--tokens: expected positive token counts, got {num_tokens}")
            problem = problem_for(preset, num_tokens, tp, element_size)
            rows = report(problem, machine, group_m)
            print(format_report(preset, problem, rows, machine) + "\n", flush=True)
            everything += [dict(row, preset=preset, tokens=num_tokens, tp=tp, intermediate=problem.intermediate,
                                weight_floor=weight_floor(problem)) for row in rows]
    return everything

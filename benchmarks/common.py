"""Timing helpers shared by the benchmark scripts: the median of repeats after warm-up, peak
memory of a call, and the table/JSON output."""
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    repeats: int
    samples_s: List[float] = field(default_factory=list)


def time_call(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5, min_time_s: float = 0.0) -> Timing:
    """Median wall time of fn() over `repeats` runs after `warmup` untimed runs; runs more
    repeats (up to 10x) while the total is under min_time_s, for very short calls."""
    for _ in range(warmup):
        fn()
    samples = []
    started = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - started < min_time_s and len(samples) < 10 * repeats):
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
    return Timing(statistics.median(samples), min(samples), len(samples), samples)


def time_calls_interleaved(calls: Dict[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 5,
                           min_time_s: float = 0.0) -> Dict[str, Timing]:
    """time_call for several implementations at once, in rounds: each round times every call
    once (the order reversed every other round), so that all of them sample the same
    moments of a machine whose speed drifts (a shared VM's memory bandwidth moved between 20
    and 40 GB/s within minutes). Rounds go on while fewer than `repeats`, or while the
    rounds so far took under min_time_s (up to 10x repeats)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    names = list(calls)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    started = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - started < min_time_s and rounds < 10 * repeats):
        for name in (names if rounds % 2 == 0 else reversed(names)):
            begin = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - begin)
        rounds += 1
    return {name: Timing(statistics.median(values), min(values), len(values), values)
            for name, values in samples.items()}


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated through torch's allocator during fn(), above the level
    before it (the result is freed before the count ends). On CUDA torch.cuda's peak
    statistics; on CPU the memory events of torch.profiler, summed in time order. Memory a
    library allocates on its own (oneDNN scratch, std::vector) is not counted."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    # Each event's own allocations and frees (self_cpu_memory_usage): an op's cpu_memory_usage
    # also holds those of the ops below it, so summing it counts a nested allocation once per
    # level of nesting (an op that keeps a buffer past its return showed up 3x).
    changes = sorted((event.time_range.start, event.self_cpu_memory_usage) for event in prof.events()
                     if event.self_cpu_memory_usage)
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak


def format_table(rows: List[Dict], columns: List[str], formats: Optional[Dict[str, str]] = None) -> str:
    """A Markdown table of `rows` (dicts) restricted to `columns`; None prints as '-'."""
    formats = formats or {}

    def cell(row, column):
        value = row.get(column)
        if value is None:
            return "-"
        spec = formats.get(column)
        return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, column) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, payload) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, default=lambda value: asdict(value) if hasattr(value, "__dataclass_fields__")
                  else str(value))


def touched_weight_bytes(ids, *weights):
    """(the experts the routing picks, the bytes of their slices of `weights` [E, ...])."""
    experts = torch.unique(ids).tolist()
    return experts, sum(weight[e].nbytes for weight in weights for e in experts)


def make_hf_experts(preset, w_gate_up, w_down, implementation, b_gate_up=None, b_down=None):
    """transformers' experts module of the preset's family, sharing our weight tensors (and, for
    GPT-OSS, its biases); None where transformers does not import."""
    family = preset["family"]
    try:
        if family == "qwen3_moe":
            from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts

            config = Qwen3MoeConfig(hidden_size=preset["hidden"], moe_intermediate_size=preset["inter"],
                                    num_experts=preset["experts"], num_experts_per_tok=preset["top_k"])
        elif family == "mixtral":
            from transformers.models.mixtral.configuration_mixtral import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Experts

            config = MixtralConfig(hidden_size=preset["hidden"], intermediate_size=preset["inter"],
                                   num_local_experts=preset["experts"], num_experts_per_tok=preset["top_k"])
        elif family == "gpt_oss":
            from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
            from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Experts

            config = GptOssConfig(hidden_size=preset["hidden"], intermediate_size=preset["inter"],
                                  num_local_experts=preset["experts"], num_experts_per_tok=preset["top_k"])
        else:
            raise ValueError(f"preset: no transformers experts module for family {family!r}")
    except ImportError:
        return None
    config._experts_implementation = implementation
    with torch.device("meta"):
        module = Experts(config)
    tensors = dict(gate_up_proj=w_gate_up, down_proj=w_down, gate_up_proj_bias=b_gate_up, down_proj_bias=b_down)
    for name, tensor in tensors.items():
        if tensor is not None:
            setattr(module, name, torch.nn.Parameter(tensor, requires_grad=tensor.requires_grad))
    left_on_meta = [name for name, parameter in module.named_parameters() if parameter.is_meta]
    if left_on_meta:
        raise ValueError(f"make_hf_experts: {type(module).__name__} also needs {left_on_meta} (pass the biases)")
    return module

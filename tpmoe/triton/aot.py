"""Ahead-of-time compilation of every kernel and config for a GPU target, on a machine without one.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` needs no GPU. To compile
what a real launch would, each launcher is run on CPU tensors of a representative problem
(bf16, Qwen3-30B-A3B's H=2048 and I=768, few experts) with its kernel replaced by a recorder;
the recorded arguments are then specialised exactly as the JIT does on a launch (ints equal
to 1 become constexprs, pointers and ints divisible by 16 get the divisibility attribute),
so the compiled code is the code a GPU run gets. The weights are stored as a CUDA block
stores them (tpmoe.sharding.aligned_storage) and the h / d_preact buffers with aligned rows
(tpmoe.triton.layouts.empty_aligned_rows). Every call site is recorded without biases (Qwen,
Mixtral, DeepSeek) and with them (GPT-OSS): variant "forward" and "forward+bias", and so on.
The elementwise launches are compiled too: the combine (bf16 pair rows and fp32 split
partials: variants "pairs" and "split") and backward_dw's split sum ("split_sum", recorded
from a SPLIT = 2 launch). Must run WITHOUT TRITON_INTERPRET (the kernels must be JITFunctions).

    python -m tpmoe.triton.aot [--cc 80 90] [--kernel gate_up ...] [--intermediate 768 154 77]
                               [--bias none|bias|both] [--shard i/n] [--json rows.json] [--markdown table.md]
                               [--format dense|fp8_block|mxfp4]
prints, per kernel, call site, intermediate size I_p, config (from the target's own tables:
tile_configs, where sm_80 replaces the configs that spill there) and target: shared memory, registers
and spill bytes (ptxas-blackwell -v --gpu-name sm_80 / sm_90a), the wgmma shapes, the async
copies (cp.async, TMA cp.async.bulk), mma.sync and plain global loads in the PTX.
I_p = 154 and 77 are a rank's columns of I = 768 over 5 and 10 ranks (rows of 308 and 154 bytes).
--format fp8_block / mxfp4: the forward kernels on quantized weights (tpmoe.triton.dequant), the
shard starting inside a scale block where I_p is uneven (variants "fp8", "mxfp4", and "+bias").
--format fp8_block --fp8-activations: the fp8 x fp8 variant (ACT_FP8: x and h quantized per
token and scale block in registers, fp8 wgmma; sm_90 only), at the prefill configs
(tile_configs.fp8_activation_config; variant "fp8xfp8"); the JSON rows count its e4m3 wgmma.

    python -m tpmoe.triton.aot --model [--preset qwen3-30b-a3b ...] [--tokens 1 16384] [--tp P] [--group-m G]
                               [--l2-mb 50] [--wave 132]
prints the bytes each launch of one forward and backward moves (tpmoe.triton.traffic).
"""
import argparse
import json
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget

from dataclasses import replace

from . import backward_dh, backward_dw, combine, down, gate_up, tile_configs
from .layouts import empty_aligned_rows
from .._checks import dtype_name
from ..fp8 import DEFAULT_BLOCK_SIZE as FP8_BLOCK
from ..fp8 import FP8_DTYPE, BlockScales
from ..mxfp4 import MXFP4_BLOCK
from ..weights import FP8_FORMAT, MXFP4_FORMAT, WEIGHT_FORMATS
from ..routing_torch import align_torch
from ..sharding import aligned_storage

# Shared memory per block an sm_80 / sm_90 kernel may use (opt-in maximum).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
KERNEL_MODULES = {"gate_up": (gate_up, "gate_up_kernel"), "down": (down, "grouped_scatter_kernel"),
                  "backward_dh": (backward_dh, "backward_dh_kernel"),
                  "backward_dw": (backward_dw, "backward_dw_kernel"),
                  "combine": (combine, "combine_kernel"), "split_sum": (backward_dw, "split_sum_kernel")}
# Elementwise launches: no tile table (one fixed block, recorded as KernelConfig(1, BLOCK, 1, warps,
# 3)), no dot, no shared-memory pipeline (their loads are plain, 16-byte vectorised ones).
ELEMENTWISE = ("combine", "split_sum")


@dataclass
class Launch:
    kernel_name: str   # key of KERNEL_MODULES
    variant: str       # which call of that kernel (e.g. "dW_gate_up", "dW_gate_up+bias")
    layout: str
    dtype: str
    intermediate: int  # I_p, the columns of the rank's shard
    config: tile_configs.KernelConfig
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, sink: list, attr: str):
        self.sink, self.attr = sink, attr

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.attr, args, kwargs))


def _launches_of(calls, name):
    """(args, kwargs) of the recorded launches of kernel `name` (a launcher may run two kernels:
    backward_dw with SPLIT > 1 also runs the split sum, compiled as "split_sum")."""
    attr = KERNEL_MODULES[name][1]
    return [(args, kwargs) for kernel_attr, args, kwargs in calls if kernel_attr == attr]


@contextmanager
def _recording():
    """Replaces every kernel by a recorder and lifts the device check for the duration."""
    calls: List[tuple] = []
    saved = []
    for module, attr in KERNEL_MODULES.values():
        saved.append((module, attr, getattr(module, attr), module.require_runnable))
        setattr(module, attr, _Recorder(calls, attr))
        module.require_runnable = lambda kernel, device: None
    try:
        yield calls
    finally:  # in reverse: a module holding two kernels saved the lifted check the second time
        for module, attr, kernel, check in reversed(saved):
            setattr(module, attr, kernel)
            module.require_runnable = check


def main_config(kernel_name: str, element_size: int = 2,
                capability: Optional[int] = None) -> tile_configs.KernelConfig:
    """The config a mid-size call (32 rows per expert: 64-row tiles, wide N) gets on a device of
    `capability` (None: sm_90); the 128-row prefill configs (from 64 rows per expert) are
    compiled with every config (not --main-only)."""
    return tile_configs.kernel_config(kernel_name, 32, 1024, 1024, element_size, capability)


BIAS_CHOICES = {"none": (False,), "bias": (True,), "both": (False, True)}


def representative_launches(kernel_names=None, *, layout="concatenated", gated=True, activation="silu",
                            dtype=torch.bfloat16, hidden_size=2048, intermediate_size=768, num_experts=4,
                            num_tokens=256, top_k=2, main_only=False, biases=(False, True),
                            capability=None, weight_format="dense", fp8_activations=False) -> List[Launch]:
    """Every config (or only the main one) of every kernel in the tables of a device of
    `capability` (None: sm_90), and each call site's variant (bias-free and, with True in
    `biases`, biased), on one representative problem of `intermediate_size` columns.

    weight_format "fp8_block" / "mxfp4": the forward kernels (gate_up, down) with the weights
    dequantized in their B-load, variants named after the format ("mxfp4", "mxfp4+bias"); dtype
    is then the activations'. fp8_activations (fp8_block): the fp8 x fp8 variant at each kernel's
    prefill config (128-row tiles), narrowed by tile_configs.fp8_activation_config, variant
    "fp8xfp8"."""
    if fp8_activations and weight_format != FP8_FORMAT:
        raise ValueError(f"fp8_activations: the fp8 x fp8 variant needs weight_format {FP8_FORMAT!r}, got "
                         f"{weight_format!r}")
    if weight_format != "dense":
        kernel_names = [name for name in kernel_names or QUANTIZED_KERNELS if name in QUANTIZED_KERNELS]
    kernel_names = kernel_names or list(KERNEL_MODULES)
    generator = torch.Generator().manual_seed(0)
    rows = (2 if gated else 1) * intermediate_size
    x = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype)
    if layout == "gpt_oss":
        w_gate_up = torch.zeros(num_experts, hidden_size, rows, dtype=dtype)
        w_down = torch.zeros(num_experts, intermediate_size, hidden_size, dtype=dtype)
    else:
        w_gate_up = torch.zeros(num_experts, rows, hidden_size, dtype=dtype)
        w_down = torch.zeros(num_experts, hidden_size, intermediate_size, dtype=dtype)
    # As a block on CUDA stores them: rows of an uneven shard (I_p = 154) padded to 16 bytes.
    w_gate_up, w_down = aligned_storage(w_gate_up), aligned_storage(w_down)
    quantized = {}
    if weight_format != "dense":
        w_gate_up, w_down, scales = _quantized_weights(weight_format, num_experts, rows, hidden_size,
                                                       intermediate_size, gated)
        quantized = dict(weight_format=weight_format, block_size=scales.block_size, block_offset=scales.block_offset)
        if fp8_activations:
            quantized["fp8_activations"] = True
    b_gate_up = torch.empty(num_experts, rows, dtype=dtype)
    b_down = torch.empty(num_experts, hidden_size, dtype=dtype)
    topk_ids = torch.rand(num_tokens, num_experts, generator=generator).topk(top_k, dim=1).indices
    topk_weights = torch.rand(num_tokens, top_k, generator=generator)
    rows_axis, hidden_axis = (2, 1) if layout == "gpt_oss" else (1, 2)
    down_h_axis, down_i_axis = (2, 1) if layout == "gpt_oss" else (1, 2)
    options = dict(top_k=top_k, activation=activation, layout=layout, gated=gated, alpha=1.702, limit=7.0)
    launches = []
    for name in kernel_names:
        if name in ELEMENTWISE:
            launches += _elementwise_launches(name, x, w_gate_up, d_preact_rows=rows, layout=layout,
                                              intermediate_size=intermediate_size, top_k=top_k, topk_ids=topk_ids,
                                              num_experts=num_experts, rows_axis=rows_axis, hidden_axis=hidden_axis,
                                              capability=capability)
            continue
        configs = tile_configs.all_configs(name, capability)
        if dtype.itemsize > 2:
            configs = [tile_configs.wide_dtype_config(name, config, dtype.itemsize) for config in configs]
        if main_only:
            configs = [main_config(name, dtype.itemsize, capability)]
        if weight_format != "dense":
            configs = list(dict.fromkeys(tile_configs.quantized_config(name, config) for config in configs))
        if fp8_activations:  # prefill only: the 128-row config
            prefill = tile_configs.kernel_config(name, 1024, 1024, 1024, dtype.itemsize, capability)
            configs = [tile_configs.fp8_activation_config(name, tile_configs.quantized_config(name, prefill),
                                                          scales.block_size)]
        for config in configs:
            meta = align_torch(topk_ids, num_experts, config.BLOCK_M)
            num_rows = meta.sorted_ids_padded.shape[0]
            shift = scales.block_offset if fp8_activations else 0  # the fp8 x fp8 variant's h (gate_up.h_buffer)
            h = gate_up.h_buffer(num_rows, intermediate_size, dtype, "cpu", shift)
            d_preact = empty_aligned_rows(num_rows, rows, dtype, "cpu")
            for biased in biases:
                suffix = "+bias" if biased else ""
                gu_scale, dn_scale = (scales.gate_up, scales.down) if quantized else (None, None)
                gu_bias, dn_bias = (b_gate_up, b_down) if biased else (None, None)
                with _recording() as calls:
                    if name == "gate_up":
                        gate_up.gate_up(x, w_gate_up, gu_bias, meta.sorted_ids_padded, meta.block_expert,
                                        config=config, **options, scale=gu_scale, **quantized)
                        variants = [FP8_ACTIVATIONS_VARIANT if fp8_activations else
                                    QUANTIZED_VARIANT.get(weight_format, "forward")]
                    elif name == "down":
                        down.grouped_scatter(h, w_down, down_h_axis, down_i_axis, dn_bias, topk_weights,
                                             meta.sorted_ids_padded, meta.block_expert, num_pairs=num_tokens * top_k,
                                             config=config, scale=dn_scale, **quantized)
                        variants = [FP8_ACTIVATIONS_VARIANT if fp8_activations else
                                    QUANTIZED_VARIANT.get(weight_format, "forward")]
                        if not biased and not quantized:  # dx has no bias: one variant
                            down.grouped_scatter(d_preact, w_gate_up, hidden_axis, rows_axis, None, None,
                                                 meta.sorted_ids_padded, meta.block_expert,
                                                 num_pairs=num_tokens * top_k, config=config)
                            variants.append("dx")
                    elif name == "backward_dh":
                        backward_dh.backward_dh(x, x, w_gate_up, gu_bias, w_down, dn_bias, topk_weights, h,
                                                meta.sorted_ids_padded, meta.block_expert, config=config, **options)
                        variants = ["dh"]
                    else:
                        common = dict(num_pairs=num_tokens * top_k, top_k=top_k, config=config)
                        backward_dw.backward_dw(d_preact, x, None, meta.sorted_ids_padded, meta.padded_offsets,
                                                w_gate_up, rows_axis, hidden_axis, a_gathered=False,
                                                b_gathered=True, bias_grad=biased, **common)
                        backward_dw.backward_dw(x, h, topk_weights, meta.sorted_ids_padded, meta.padded_offsets,
                                                w_down, down_h_axis, down_i_axis, a_gathered=True,
                                                b_gathered=False, bias_grad=biased, **common)
                        variants = ["dW_gate_up", "dW_down"]
                calls = _launches_of(calls, name)
                if len(calls) != len(variants):
                    raise RuntimeError(f"tpmoe.triton.aot: {name} launched {len(calls)} kernels for the call "
                                       f"sites {variants}; the recorder needs updating")
                for variant, (args, kwargs) in zip(variants, calls):
                    launches.append(Launch(name, variant + suffix, layout, dtype_name(dtype), intermediate_size,
                                           config, args, kwargs))
    return launches


QUANTIZED_KERNELS = ("gate_up", "down")  # the forward kernels, which dequantize in their B-load
QUANTIZED_VARIANT = {FP8_FORMAT: "fp8", MXFP4_FORMAT: "mxfp4"}
FP8_ACTIVATIONS_VARIANT = "fp8xfp8"


def _quantized_weights(weight_format, num_experts, rows, hidden_size, intermediate_size, gated):
    """(w_gate_up, w_down, BlockScales) of a rank's shard in `weight_format`, stored as the
    shard functions store them (contiguous, tpmoe.fp8 / tpmoe.mxfp4), for the layouts' [E, R, H]
    rows; block_offset where an uneven shard starts (rank 1 of I_p-column shards: I_p mod B)."""
    if weight_format == MXFP4_FORMAT:
        block = MXFP4_BLOCK
        offset = intermediate_size % block
        hidden_blocks, inter_blocks = -(-hidden_size // block), -(-(offset + intermediate_size) // block)
        w_gate_up = torch.zeros(num_experts, rows, hidden_blocks, 16, dtype=torch.uint8)
        w_down = torch.zeros(num_experts, hidden_size, inter_blocks, 16, dtype=torch.uint8)
        scales = BlockScales(torch.full((num_experts, rows, hidden_blocks), 127, dtype=torch.uint8),
                             torch.full((num_experts, hidden_size, inter_blocks), 127, dtype=torch.uint8), block, offset)
        return w_gate_up, w_down, scales
    block = FP8_BLOCK
    offset = intermediate_size % block
    hidden_blocks, inter_blocks = -(-hidden_size // block), -(-(offset + intermediate_size) // block)
    w_gate_up = torch.zeros(num_experts, rows, hidden_size, dtype=FP8_DTYPE)
    w_down = torch.zeros(num_experts, hidden_size, intermediate_size, dtype=FP8_DTYPE)
    scales = BlockScales(torch.ones(num_experts, 2 if gated else 1, inter_blocks, hidden_blocks),
                         torch.ones(num_experts, hidden_blocks, inter_blocks), block, offset)
    return w_gate_up, w_down, scales


def _elementwise_launches(name, x, w_gate_up, *, d_preact_rows, layout, intermediate_size, top_k, topk_ids,
                          num_experts, rows_axis, hidden_axis, capability=None) -> List[Launch]:
    """The combine (pair rows in the input dtype, and fp32 split partials: two pointer types) and
    backward_dw's split sum (recorded from a SPLIT = 2 dW_gate_up launch), as they run."""
    num_tokens, hidden_size = x.shape
    num_pairs = num_tokens * top_k
    launches = []
    with _recording() as calls:
        if name == "combine":
            combine.combine(torch.empty(1, num_pairs, hidden_size, dtype=x.dtype), num_tokens, top_k, x.dtype)
            combine.combine(torch.empty(4, num_pairs, hidden_size, dtype=torch.float32), num_tokens, top_k, x.dtype)
            variants, config = ["pairs", "split"], tile_configs.KernelConfig(1, combine.BLOCK_N, 1, combine.NUM_WARPS, 3)
        else:
            dw_config = replace(main_config("backward_dw", x.element_size(), capability), SPLIT=2)
            meta = align_torch(topk_ids, num_experts, dw_config.BLOCK_M)
            d_preact = empty_aligned_rows(meta.sorted_ids_padded.shape[0], d_preact_rows, x.dtype, "cpu")
            backward_dw.backward_dw(d_preact, x, None, meta.sorted_ids_padded, meta.padded_offsets, w_gate_up,
                                    rows_axis, hidden_axis, num_pairs=num_pairs, top_k=top_k, a_gathered=False,
                                    b_gathered=True, bias_grad=True, config=dw_config)
            variants = ["dW_gate_up+bias"]
            config = tile_configs.KernelConfig(1, backward_dw.SPLIT_SUM_BLOCK, 1, 4, 3, SPLIT=2)
    calls = _launches_of(calls, name)  # the dW launch itself is compiled as backward_dw
    if len(calls) != len(variants):
        raise RuntimeError(f"tpmoe.triton.aot: {name} launched {len(calls)} kernels for {variants}")
    for variant, (args, kwargs) in zip(variants, calls):
        launches.append(Launch(name, variant, layout, dtype_name(x.dtype), intermediate_size, config, args, kwargs))
    return launches


def compile_launch(launch: Launch, capability: int):
    """triton.compile of one recorded launch for sm_<capability>, specialised as the JIT would."""
    from triton._C.libtriton import native_specialize_impl
    from triton.compiler import ASTSource, make_backend

    module, attr = KERNEL_MODULES[launch.kernel_name]
    kernel = getattr(module, attr)
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("tpmoe.triton.aot: the kernels were decorated under TRITON_INTERPRET=1; "
                           "run the ahead-of-time compile in a process without it")
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kernel_kwargs = {k: v for k, v in launch.kwargs.items() if k in kernel.arg_names}
    bound = kernel.signature.bind(*launch.args, **kernel_kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = bound.arguments[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(backend, value, False, True, True)
        if kind == "constexpr":  # an int equal to 1
            signature[name], constexprs[name] = "constexpr", spec
        else:
            signature[name] = kind
            if isinstance(spec, str) and spec:
                attrs[(index,)] = backend.parse_attr(spec)
    # num_stages: the launch's, else Triton's default (the elementwise launches leave it unset).
    options = dict(num_warps=launch.kwargs["num_warps"], num_stages=launch.kwargs.get("num_stages", 3))
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)


def ptxas_usage(ptx: str, gpu_name: str = "sm_90a") -> Dict[str, int]:
    """Registers and spill bytes from Triton's bundled ptxas-blackwell -v."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas, "-v", "--gpu-name", gpu_name, source, "-o", os.path.join(folder, "k.o")],
                                capture_output=True, text=True, check=True)
    report = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", report)
    stores = re.search(r"(\d+) bytes spill stores", report)
    loads = re.search(r"(\d+) bytes spill loads", report)
    return dict(registers=int(registers.group(1)), spill_stores=int(stores.group(1)) if stores else 0,
                spill_loads=int(loads.group(1)) if loads else 0)


PTXAS_GPU_NAME = {80: "sm_80", 90: "sm_90a"}  # sm_90a: the wgmma instructions need the "a" target


def ptx_instructions(ptx: str) -> dict:
    """What the PTX does with memory and tensor cores: the distinct wgmma shapes ("m64n128k16"),
    the counts of wgmma, of async copies (cp.async.ca/cg, the pipelined loads of sm_80/sm_90;
    cp_async_16 those of the full 16 bytes: narrower ones mean a mask or stride the compiler
    could not prove 16-byte uniform), of TMA bulk copies (cp.async.bulk), of mma.sync, and of
    plain global loads (where a load could not become an async copy at all)."""
    shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)),
                    key=lambda shape: [int(n) for n in re.findall(r"\d+", shape)])
    # cp.async.{ca,cg}.shared.global [dst], [src], bytes(, src-size): the copy width, 4 to 16 bytes.
    copy = r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-fA-F]+|\d+)"
    widths = [int(width, 0) for width in re.findall(copy, ptx)]
    return dict(wgmma=len(re.findall(r"wgmma\.mma_async\.sync", ptx)), wgmma_shapes=shapes,
                wgmma_e4m3=len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.f32\.e4m3\.e4m3", ptx)),
                cp_async=len(widths), cp_async_16=sum(width == 16 for width in widths),
                tma=len(re.findall(r"cp\.async\.bulk", ptx)),
                mma=len(re.findall(r"mma\.sync\.aligned", ptx)),
                ld_global=len(re.findall(r"\bld\.global", ptx)))


def describe(launch: Launch, capability: int, compiled, usage: Optional[dict]) -> dict:
    row = dict(kernel=launch.kernel_name, variant=launch.variant, layout=launch.layout, dtype=launch.dtype,
               intermediate=launch.intermediate, cc=capability, shared=compiled.metadata.shared,
               **ptx_instructions(compiled.asm["ptx"]), **launch.config.__dict__)
    if usage:
        row.update(usage)
    return row


# (header, width, cell of a row): the one description of the table, printed and as Markdown.
COLUMNS = (
    ("kernel", 11, lambda r: r["kernel"]),
    ("variant", 15, lambda r: r["variant"]),
    ("layout", 12, lambda r: r["layout"]),
    ("dtype", 8, lambda r: r["dtype"]),
    ("I_p", 4, lambda r: r["intermediate"]),
    ("cc", 3, lambda r: r["cc"]),
    ("BMxBNxBK", 11, lambda r: f"{r['BLOCK_M']}x{r['BLOCK_N']}x{r['BLOCK_K']}"),
    ("w", 2, lambda r: r["num_warps"]),
    ("s", 2, lambda r: r["num_stages"]),
    ("GM", 2, lambda r: r.get("GROUP_M", 1)),
    ("SP", 2, lambda r: r.get("SPLIT", 1)),
    ("smem", 6, lambda r: r["shared"]),
    ("regs", 4, lambda r: r.get("registers", "")),
    ("spill", 5, lambda r: r.get("spill_stores", 0) + r.get("spill_loads", 0) if "registers" in r else ""),
    ("wgmma", 12, lambda r: ",".join(r["wgmma_shapes"]) or "-"),
    ("cp.async", 8, lambda r: r["cp_async"]),
    ("of 16B", 6, lambda r: r["cp_async_16"]),
    ("tma", 3, lambda r: r["tma"]),
    ("mma.sync", 8, lambda r: r["mma"]),
    ("ld.global", 9, lambda r: r["ld_global"]),
)
TABLE_HEADER = " ".join(f"{name:>{width}}" if index > 3 else f"{name:{width}}"
                        for index, (name, width, _) in enumerate(COLUMNS))


def format_row(row: dict) -> str:
    return " ".join(f"{str(cell(row)):>{width}}" if index > 3 else f"{str(cell(row)):{width}}"
                    for index, (_, width, cell) in enumerate(COLUMNS))


def markdown_table(rows: List[dict]) -> str:
    """The rows as a Markdown table (for benchmarks/RESULTS.md)."""
    lines = ["| " + " | ".join(name for name, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" if index <= 3 else "---:" for index in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(str(cell(row)) for _, _, cell in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="*", default=[80, 90], choices=sorted(PTXAS_GPU_NAME))
    parser.add_argument("--kernel", nargs="*", default=None, choices=list(KERNEL_MODULES))
    parser.add_argument("--intermediate", type=int, nargs="*", default=[768],
                        help="I_p values to compile at (a rank's columns; 154 and 77: I = 768 over 5 and 10 ranks)")
    parser.add_argument("--bias", default="both", choices=sorted(BIAS_CHOICES),
                        help="call sites without biases, with them, or both (default)")
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th launch starting at i")
    parser.add_argument("--json", default=None, help="write the rows to this file as JSON")
    parser.add_argument("--markdown", default=None, help="write the rows to this file as a Markdown table")
    parser.add_argument("--layout", default="concatenated", choices=["concatenated", "interleaved", "gpt_oss"])
    parser.add_argument("--activation", default="silu")
    parser.add_argument("--format", default="dense", choices=WEIGHT_FORMATS,
                        help="the weights' format: quantized ones compile the forward kernels' dequantizing B-load")
    parser.add_argument("--fp8-activations", action="store_true",
                        help="with --format fp8_block: the fp8 x fp8 variant (sm_90) at the prefill configs")
    parser.add_argument("--not-gated", action="store_true")
    parser.add_argument("--main-only", action="store_true", help="only each kernel's main config")
    parser.add_argument("--one-variant", action="store_true",
                        help="only the first call site of each kernel (e.g. the forward down, not dx)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "float64"])
    parser.add_argument("--model", action="store_true",
                        help="print the bytes-moved model of one forward and backward instead (tpmoe.triton.traffic)")
    parser.add_argument("--preset", nargs="*", default=None, help="with --model: presets (tpmoe/presets.py)")
    parser.add_argument("--tokens", type=int, nargs="*", default=None, help="with --model: token counts T")
    parser.add_argument("--tp", type=int, default=1, help="with --model: TP world size (rank 0's shard)")
    parser.add_argument("--group-m", type=int, default=None,
                        help="with --model: GROUP_M for the row-block kernels instead of the configured one")
    parser.add_argument("--l2-mb", type=float, default=50.0, help="with --model: L2 capacity in MB (H200: 50)")
    parser.add_argument("--wave", type=int, default=132, help="with --model: programs resident at once (H200: 132)")
    args = parser.parse_args(argv)
    if args.model:
        from . import traffic

        if args.tp < 1 or (args.group_m is not None and args.group_m < 1) or args.l2_mb <= 0 or args.wave < 1:
            parser.error(f"--tp, --group-m, --l2-mb, --wave: expected positive values, got {args.tp}, "
                         f"{args.group_m}, {args.l2_mb}, {args.wave}")
        rows = traffic.main_rows(args.preset, args.tokens, args.tp, args.dtype, args.group_m, args.l2_mb, args.wave)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(rows, handle)
        return
    if any(value < 1 for value in args.intermediate):
        parser.error(f"--intermediate: expected positive column counts, got {args.intermediate}")
    shard, num_shards = (int(part) for part in args.shard.split("/"))
    rows = []
    print(TABLE_HEADER)
    # Each target compiles its own tables (tile_configs: sm_80 replaces the configs that spill there).
    jobs = []
    for intermediate in args.intermediate:
        for capability in args.cc:
            launches = representative_launches(args.kernel, layout=args.layout, gated=not args.not_gated,
                                               activation=args.activation, main_only=args.main_only,
                                               dtype=getattr(torch, args.dtype), intermediate_size=intermediate,
                                               biases=BIAS_CHOICES[args.bias], capability=capability,
                                               weight_format=args.format, fp8_activations=args.fp8_activations)
            if args.one_variant:
                first_of_each = {}
                for launch in launches:
                    first_of_each.setdefault((launch.kernel_name, launch.config), launch)
                launches = list(first_of_each.values())
            jobs += [(launch, capability) for launch in launches]
    for launch, capability in jobs[shard::num_shards]:
        compiled = compile_launch(launch, capability)
        usage = ptxas_usage(compiled.asm["ptx"], PTXAS_GPU_NAME[capability])
        row = describe(launch, capability, compiled, usage)
        rows.append(row)
        print(format_row(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown_table(rows))


if __name__ == "__main__":
    main()

"""MoEBlock.load_quantized_experts_: a block whose routed experts are fp8 (tpmoe.fp8) or MXFP4
(tpmoe.mxfp4), frozen, against the float64 reference block run on the dequantized weights, in
one process (output and the gradients of what still trains) and under TP at world 2 and 3 with
shards that are no multiple of the block size, and EP at world 2 (the same output)."""
import pytest
import torch

import tpmoe
from tpmoe import MoEBlock, MoEConfig
from tpmoe.fp8 import quantize_fp8_experts
from tpmoe.mxfp4 import quantize_mxfp4_experts
from tpmoe.quantized import dequantize_experts
from tpmoe.reference import reference_moe_block

from support.allocations import LargestAllocation
from support.dist_utils import run_distributed
from support.tolerances import assert_fp32_close

# Qwen-like fp8 (I = 20, blocks of 8: shards of 7, 7, 6 at world 3 start inside blocks), and a
# GPT-OSS-like MXFP4 block (interleaved, biased, clamped swiglu, top-k softmax, I = 45: 23 + 22).
CONFIGS = {
    "fp8_block": MoEConfig(hidden_size=16, intermediate_size=20, num_experts=5, top_k=2, renormalize=True,
                           shared_intermediate_size=12),
    "mxfp4": MoEConfig(hidden_size=40, intermediate_size=45, num_experts=4, top_k=2, scoring="topk_softmax",
                       router_bias=True, activation="clamped_swiglu", layout="gpt_oss", expert_bias=True),
}


def _quantized_full(weight_format, config, seed):
    """(dense full weights from the seed, their quantized experts, the dense weights with the
    experts replaced by their dequantized values: what the quantized block computes)."""
    full = tpmoe.random_moe_weights(config, generator=torch.Generator().manual_seed(seed))
    w_gate_up, w_down = full["w_gate_up"], full["w_down"]
    if config.layout == "gpt_oss":  # the packed checkpoint's orientation: rows are the outputs
        w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    if weight_format == "mxfp4":
        quantized = quantize_mxfp4_experts(w_gate_up, w_down, layout="interleaved")
        spec = config.expert_spec.with_layout("interleaved")
    else:
        quantized = quantize_fp8_experts(w_gate_up, w_down, layout=config.layout, block_size=8)
        spec = config.expert_spec
    dense = dequantize_experts(quantized, spec, torch.float64)
    effective = {name: value.double() for name, value in full.items()}
    effective["w_gate_up"], effective["w_down"] = dense.w_gate_up, dense.w_down
    if config.layout == "gpt_oss":
        effective["w_gate_up"], effective["w_down"] = dense.w_gate_up.transpose(1, 2), dense.w_down.transpose(1, 2)
    return full, quantized, effective


@pytest.mark.parametrize("weight_format", sorted(CONFIGS))
def test_one_process_block_matches_reference_and_trains_around_frozen_experts(weight_format, seed):
    config = CONFIGS[weight_format]
    full, quantized, effective = _quantized_full(weight_format, config, seed)
    block = MoEBlock.from_full(config, full).load_quantized_experts_(quantized)
    assert not hasattr(block, "w_gate_up") and not any("quantized" in name for name, _ in block.named_parameters())
    x = torch.randn(7, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    grad_out = torch.randn(7, config.hidden_size, dtype=torch.float64)
    x32 = x.clone().requires_grad_(True)
    out = block(x32)
    out.backward(grad_out.float())
    leaves = {name: value.clone().requires_grad_(True) for name, value in effective.items()}
    x64 = x.double().requires_grad_(True)
    expected = reference_moe_block(x64, leaves, config)
    expected.backward(grad_out)
    assert_fp32_close(out, expected.detach())
    assert_fp32_close(x32.grad, x64.grad, name="dx")
    grads = block.local_grads()
    assert sorted(grads) == sorted(set(effective) - {"w_gate_up", "w_down"})  # the rest still trains
    for name, grad in grads.items():
        assert_fp32_close(grad, leaves[name].grad, name=f"d{name}")
    with torch.no_grad():  # the native op (no gradient wanted) gives the same output
        assert_fp32_close(block(x), expected.detach(), name="output without grad")


def _parallel_outputs(rank, world_size, mode, seed):
    """Both formats' blocks on one rank (one spawn per layout): {format: (x, output, offset)}."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    group = dist.group.WORLD if mode == "tp" else init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    outputs = {}
    for weight_format, config in CONFIGS.items():
        full, quantized, _ = _quantized_full(weight_format, config, seed)
        block = MoEBlock.from_full(config, full, group).load_quantized_experts_(quantized)
        generator = torch.Generator().manual_seed(seed + (rank if mode == "ep" else 0))  # EP: each rank's tokens
        x = torch.randn(7, config.hidden_size, generator=generator)
        # The same block quantized in one process, then parallelized (tpmoe.parallelize: rank 0's
        # weights broadcast, the quantized experts among them): the same output.
        one_process = MoEBlock.from_full(config, full).load_quantized_experts_(quantized)
        if rank > 0:  # what the broadcast must overwrite
            one_process.quantized_experts.w_down.zero_()
        with LargestAllocation() as largest:
            parallel = tpmoe.parallelize(one_process, _mesh(mode, world_size))
        assert largest.nbytes < _dense_expert_nbytes(config), f"parallelize: {largest.op} made {largest.nbytes} bytes"
        rest = {name: value for name, value in full.items() if name not in ("w_gate_up", "w_down")}
        built = MoEBlock.from_quantized(config, quantized, rest, group)
        with torch.no_grad():
            out = block(x)
            assert torch.equal(built(x), out), f"{weight_format}: from_quantized on rank {rank}"
            outputs[weight_format] = (x, out, block.quantized_experts.block_offset, parallel(x))
        # Gathered back: bitwise the whole quantized experts given, and every other weight.
        _assert_same_experts(block.gather_quantized_experts(), quantized, f"{weight_format} {mode} rank {rank}")
        _assert_same_experts(parallel.gather_quantized_experts(), quantized, f"{weight_format} parallelized")
        gathered = block.gather_full()
        assert sorted(gathered) == sorted(set(full) - {"w_gate_up", "w_down"})
        for name, tensor in gathered.items():
            assert torch.equal(tensor, full[name]), f"{weight_format} {mode} rank {rank}: {name}"
    return outputs


def _assert_same_experts(gathered, given, what):
    pairs = zip(("w_gate_up", "w_down", "gate_up scales", "down scales"),
                (gathered.w_gate_up, gathered.w_down, gathered.scales.gate_up, gathered.scales.down),
                (given.w_gate_up, given.w_down, given.scales.gate_up, given.scales.down))
    for name, mine, theirs in pairs:
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, f"{what}: {name}"
        assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8)), f"{what}: {name}"
    assert (gathered.format, gathered.scales.block_size, gathered.scales.block_offset) == (
        given.format, given.scales.block_size, 0), what


def _mesh(mode, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (world_size,), mesh_dim_names=(mode,))


@pytest.mark.distributed
@pytest.mark.parametrize("mode, world_size", [("tp", 2), ("tp", 3), ("ep", 2)])
def test_tp_and_ep_blocks_match_the_reference(mode, world_size, seed):
    per_rank = run_distributed(_parallel_outputs, world_size, mode, seed, timeout_s=60)
    for weight_format, config in CONFIGS.items():
        _, _, effective = _quantized_full(weight_format, config, seed)
        if (mode, world_size) == ("tp", 3):
            assert any(outputs[weight_format][2] > 0 for outputs in per_rank), "no shard starts inside a block"
        for rank, outputs in enumerate(per_rank):
            x, out, _, parallelized = outputs[weight_format]
            expected = reference_moe_block(x.double(), effective, config)
            assert_fp32_close(out, expected, name=f"{weight_format} {mode}{world_size} rank {rank}")
            assert torch.equal(parallelized, out), f"{weight_format} {mode}{world_size} rank {rank}: parallelized"


def test_bad_quantized_experts_are_refused():
    config = CONFIGS["fp8_block"]
    full, quantized, _ = _quantized_full("fp8_block", config, 0)
    block = MoEBlock.from_full(config, full)
    with pytest.raises(TypeError, match="experts: expected a tpmoe.ExpertWeights of format fp8_block or mxfp4, "
                                        "got dense"):
        block.load_quantized_experts_(tpmoe.ExpertWeights(full["w_gate_up"], full["w_down"]))
    with pytest.raises(ValueError, match="experts: expected no biases"):
        block.load_quantized_experts_(quantized._replace(b_down=full["w_down"][:, :, 0]))
    smaller = quantize_fp8_experts(full["w_gate_up"][:4], full["w_down"][:4], block_size=8)
    with pytest.raises(ValueError, match="experts: expected the whole experts of the config, E = 5 and I = 20, "
                                         "got E = 4, I = 20"):
        block.load_quantized_experts_(smaller)
    with pytest.raises(ValueError, match="gather_quantized_experts: this block's routed experts are dense"):
        block.gather_quantized_experts()
    block.load_quantized_experts_(quantized)
    _assert_same_experts(block.gather_quantized_experts(), quantized, "one process")
    assert sorted(block.gather_full()) == sorted(set(full) - {"w_gate_up", "w_down"})


def _dense_expert_nbytes(config, dtype=torch.float32):
    """The bytes of the smaller dense expert weight (w_down): a quantized block must never make one."""
    return config.num_experts * config.hidden_size * config.intermediate_size * torch.tensor([], dtype=dtype).element_size()


@pytest.mark.parametrize("weight_format", sorted(CONFIGS))
def test_from_quantized_makes_no_dense_experts_and_equals_loading_them(weight_format, seed):
    config = CONFIGS[weight_format]
    full, quantized, effective = _quantized_full(weight_format, config, seed)
    rest = {name: value for name, value in full.items() if name not in ("w_gate_up", "w_down")}
    with LargestAllocation() as largest:
        block = MoEBlock.from_quantized(config, quantized, rest)
    # The stored experts (1 or half a byte a value) may be copied; a dense float32 one may not.
    assert largest.nbytes < _dense_expert_nbytes(config), f"{largest.op} made {largest.nbytes} bytes"
    assert not hasattr(block, "w_gate_up") and not hasattr(block, "w_down")
    loaded = MoEBlock.from_full(config, full).load_quantized_experts_(quantized)
    assert sorted(n for n, _ in block.named_parameters()) == sorted(n for n, _ in loaded.named_parameters())
    x = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    grad_out = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(seed + 2))
    outputs = []
    for candidate in (block, loaded):
        out = candidate(x)
        out.backward(grad_out)
        outputs.append((out.detach(), candidate.local_grads()))
    assert torch.equal(outputs[0][0], outputs[1][0])
    for name, grad in outputs[0][1].items():
        assert torch.equal(grad, outputs[1][1][name]), name
    assert_fp32_close(outputs[0][0], reference_moe_block(x.double(), effective, config))
    # bf16 weights: the block computes in their dtype.
    rest16 = {name: value.to(torch.bfloat16) for name, value in rest.items()}
    assert MoEBlock.from_quantized(config, quantized, rest16)(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_from_quantized_bad_input():
    config = CONFIGS["fp8_block"]
    full, quantized, _ = _quantized_full("fp8_block", config, 0)
    rest = {name: value for name, value in full.items() if name not in ("w_gate_up", "w_down")}
    with pytest.raises(ValueError, match="weights: expected no w_gate_up or w_down \\(the quantized experts take "
                                         "their place\\), got w_gate_up, w_down"):
        MoEBlock.from_quantized(config, quantized, full)
    with pytest.raises(ValueError, match="weights: expected the block's full weights, a router_weight tensor"):
        MoEBlock.from_quantized(config, quantized, {k: v for k, v in rest.items() if k != "router_weight"})
    with pytest.raises(TypeError, match="weights: expected a dict"):
        MoEBlock.from_quantized(config, quantized, list(rest.values()))
    with pytest.raises(TypeError, match="experts: expected a tpmoe.ExpertWeights of format fp8_block or mxfp4"):
        MoEBlock.from_quantized(config, tpmoe.ExpertWeights(full["w_gate_up"], full["w_down"]), rest)
    with pytest.raises(ValueError, match="shared_gate_up"):  # the other weights are checked as from_full does
        MoEBlock.from_quantized(config, quantized, {k: v for k, v in rest.items() if k != "shared_gate_up"})

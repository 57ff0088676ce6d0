"""Bad input at the public boundaries not covered by test_fused_errors.py, test_routing_errors.py,
test_tp_errors.py and test_cli.py: MoEBlock's forward and construction, tpmoe.hf.apply's
arguments, more of the CLI, and contiguity where it matters. Each error names the argument,
what was expected and what came."""
import pytest
import torch
from torch import nn

import tpmoe
from support.tolerances import assert_fp32_close
from tpmoe.block import MoEBlock

CONFIG = tpmoe.MoEConfig(hidden_size=8, intermediate_size=6, num_experts=4, top_k=2)


def _assert_raises(exception, pieces, call):
    with pytest.raises(exception) as info:
        call()
    message = str(info.value)
    for piece in pieces:
        assert piece in message, f"{piece!r} not in {message!r}"


# ----------------------------------------------------------------------------------- MoEBlock.forward

@pytest.mark.parametrize("make_input, exception, pieces", [
    (lambda: torch.zeros(3, 8, dtype=torch.long), TypeError, ["hidden_states", "float32", "int64"]),
    (lambda: torch.zeros(3, 8, dtype=torch.float64), TypeError, ["hidden_states", "float32", "float64"]),
    (lambda: torch.zeros(3, 8, dtype=torch.bfloat16), TypeError, ["hidden_states", "float32", "bfloat16"]),
    (lambda: torch.zeros(3, 8, device="meta"), ValueError, ["hidden_states", "on cpu", "meta"]),
    (lambda: torch.zeros(3, 7), ValueError, ["hidden_states", "[..., 8]", "(3, 7)"]),
    (lambda: torch.tensor(1.0), ValueError, ["hidden_states", "[..., 8]", "()"]),
    (lambda: [[0.0] * 8], TypeError, ["hidden_states", "torch.Tensor", "list"]),
])
def test_block_forward_rejects_bad_hidden_states(make_input, exception, pieces):
    _assert_raises(exception, pieces, lambda: MoEBlock(CONFIG)(make_input()))


def test_block_forward_edge_shapes_run():
    block = MoEBlock(CONFIG)
    assert block(torch.zeros(0, 8)).shape == (0, 8)  # no tokens: an empty output, no error
    x = torch.randn(2, 3, 8)
    assert torch.equal(block(x), block(x.reshape(6, 8)).reshape(2, 3, 8))  # leading dims are tokens
    x_t = torch.randn(8, 5).t()  # non-contiguous rows: accepted; the router GEMM may then take
    # another BLAS kernel, so the result is equal to the last bits, not bitwise
    assert_fp32_close(block(x_t), block(x_t.contiguous()), "non-contiguous input")


# ----------------------------------------------------------------------------------- MoEBlock construction

def _weights(**changes):
    weights = tpmoe.random_moe_weights(CONFIG, generator=torch.Generator().manual_seed(0))
    weights.update(changes)
    return weights


@pytest.mark.parametrize("build, exception, pieces", [
    (lambda: MoEBlock(CONFIG, dtype=torch.int32), TypeError, ["dtype", "torch.float32", "torch.int32"]),
    (lambda: MoEBlock(CONFIG, dtype="float32"), TypeError, ["dtype", "'float32'"]),
    (lambda: MoEBlock(CONFIG, backend="cuda"), ValueError, ["backend", "'triton'", "'cuda'"]),
    (lambda: MoEBlock(CONFIG, sequence_parallel="yes"), TypeError, ["sequence_parallel", "bool", "'yes'"]),
    (lambda: MoEBlock(CONFIG, check_replicated=1), TypeError, ["check_replicated", "bool", "int 1"]),
    (lambda: MoEBlock(CONFIG, shard_unit=1.5), ValueError, ["shard_unit", "positive int", "1.5"]),
    (lambda: MoEBlock(CONFIG, tp_mesh_dim="tp"), ValueError, ["tp_mesh_dim", "DeviceMesh", "'tp'"]),
    (lambda: MoEBlock.from_full(CONFIG, _weights(w_down=torch.zeros(4, 8, 6, dtype=torch.long))), TypeError,
     ["shards['w_down']", "floating-point", "int64"]),
    (lambda: MoEBlock.from_full(CONFIG, _weights(w_down=torch.zeros(4, 8, 6, dtype=torch.float64))), TypeError,
     ["shards['w_down']", "float32 (that of w_gate_up)", "float64"]),
    (lambda: MoEBlock.from_full(CONFIG, _weights(w_down=[[0.0]])), TypeError,
     ["weights['w_down']", "torch.Tensor", "list"]),
    (lambda: MoEBlock.from_shards(CONFIG, {}), ValueError, ["shards", "missing 'router_weight'"]),
])
def test_block_construction_rejects_bad_arguments(build, exception, pieces):
    _assert_raises(exception, pieces, build)


def test_block_construction_accepts_what_it_should():
    # A float32 router with bf16 experts is legitimate (DeepSeek-V3 keeps its router in float32).
    weights = {name: (w if name == "router_weight" else w.to(torch.bfloat16)) for name, w in _weights().items()}
    block = MoEBlock.from_full(CONFIG, weights)
    assert block.w_gate_up.dtype == torch.bfloat16 and block.router_weight.dtype == torch.float32
    # `dtype=` converts everything, whatever the shards held.
    assert MoEBlock.from_full(CONFIG, weights, dtype=torch.float64).router_weight.dtype == torch.float64


# ----------------------------------------------------------------------------------- tpmoe.hf.apply

transformers = pytest.importorskip("transformers", reason="tpmoe.hf needs transformers (pip install tpmoe[hf])")


@pytest.mark.parametrize("call, exception, pieces", [
    (lambda apply: apply([nn.Linear(2, 2)]), TypeError, ["model", "torch.nn.Module", "list"]),
    (lambda apply: apply(nn.Linear(2, 2), jitter_seed=1.5), TypeError, ["jitter_seed", "int", "float"]),
    (lambda apply: apply(nn.Linear(2, 2), group=3), TypeError, ["group", "ProcessGroup", "int"]),
    (lambda apply: apply(nn.Linear(2, 2), tp_mesh_dim="tp"), ValueError, ["tp_mesh_dim", "'tp'"]),
    (lambda apply: apply(nn.Linear(2, 2), backend="cuda"), ValueError, ["backend", "'cuda'"]),
    (lambda apply: apply(nn.Linear(2, 2), check_replicated="no"), TypeError, ["check_replicated", "bool", "'no'"]),
    (lambda apply: apply(nn.Sequential(nn.Linear(2, 2))), ValueError, ["model", "no MoE block", "Sequential"]),
])
def test_hf_apply_rejects_bad_arguments_before_changing_anything(call, exception, pieces):
    from tpmoe.hf import apply
    _assert_raises(exception, pieces, lambda: call(apply))


# ----------------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("argv, pieces", [
    (["verify", "--world-size", "0"], ["--world-size", "positive integer", "0"]),
    (["verify", "--world-size", "two"], ["--world-size", "positive integer", "'two'"]),
    (["verify", "--tokens", "0"], ["--tokens", "positive integer", "0"]),
    (["verify", "--dtype", "int8"], ["--dtype", "float32, bfloat16, float16", "'int8'"]),
    (["verify", "--mode", "dp"], ["--mode", "tp or sp", "'dp'"]),
    (["verify", "--scale", "1.5"], ["--scale", "(0, 1]", "'1.5'"]),
    (["verify", "--backend", "cuda"], ["--backend", "auto, cpu, triton, reference", "'cuda'"]),
    (["verify", "--timeout", "-3"], ["--timeout", "positive integer", "-3"]),
    (["verify", "--seed", "x"], ["--seed", "positive integer", "'x'"]),
    (["verify", "--device", "tpu"], ["--device", "auto, cpu or cuda", "'tpu'"]),
    (["verify", "--preset", "nope"], ["nope"]),
    (["bench", "--tokens", "1,,2"], ["--tokens", "comma-separated", "'1,,2'"]),
    (["bench", "--impl", "tpmoe,magic"], ["--impl", "tpmoe", "'tpmoe,magic'"]),
    (["bench", "--mode", "bwd"], ["--mode", "fwd or train", "'bwd'"]),
    (["bench", "--repeats", "0"], ["--repeats", "positive integer", "0"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_cli_usage_errors_name_the_option(argv, pieces, capsys):
    from tpmoe.cli import EXIT_USAGE, main
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("tpmoe: error: ") and err.count("\n") == 1, err
    for piece in pieces:
        assert piece in err, f"{piece!r} not in {err!r}"


# ----------------------------------------------------------------------------------- contiguity

@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_fused_experts_accepts_non_contiguous_inputs_bitwise(backend, seed):
    """Transposed / sliced views: the CPU and Triton paths give bitwise the result of the
    contiguous copies (they read through strides or copy first)."""
    T, H, I, E, K = 5, 8, 4, 3, 2
    x = torch.randn(H, T).t()                                   # column-major rows
    w_gate_up = torch.randn(E, H, 2 * I).transpose(1, 2)       # [E, 2I, H] with a transposed inner layout
    w_down = torch.randn(E, I, H).transpose(1, 2)
    topk_ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).t().contiguous().t()  # column-major ids
    topk_weights = torch.rand(K, T).t()
    assert not any(t.is_contiguous() for t in (x, w_gate_up, w_down, topk_ids, topk_weights))
    args = (x, w_gate_up, w_down, topk_ids, topk_weights)
    y = tpmoe.fused_experts(*args, backend=backend)
    y_contiguous = tpmoe.fused_experts(*(t.contiguous() for t in args), backend=backend)
    if backend == "reference":  # plain matmuls on transposed views: another BLAS kernel, the last bits differ
        assert_fp32_close(y, y_contiguous, "reference, non-contiguous")
    else:
        assert torch.equal(y, y_contiguous)


def test_route_accepts_non_contiguous_logits():
    logits = torch.randn(6, 9).t()  # [9 tokens, 6 experts], column-major
    weights, ids = tpmoe.route(logits, 2, renormalize=True)
    weights_c, ids_c = tpmoe.route(logits.contiguous(), 2, renormalize=True)
    assert torch.equal(ids, ids_c) and torch.equal(weights, weights_c)

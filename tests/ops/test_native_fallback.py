"""Without the native ops (TPMOE_SKIP_NATIVE=1, the switch that tpmoe._native.use_native_ops
reads at each call) routing and the experts run their plain-PyTorch twins: MoEBlock forward and
backward still match the float64 reference, and the fallback is announced by one warning.
(The same with tpmoe._C really missing, in a fresh process: tests/cli/test_package.py.)"""
import warnings

import pytest
import torch

import tpmoe
import tpmoe._native
import tpmoe.routing
from tpmoe._native import NativeFallbackWarning, native_available, use_native_ops
from tpmoe.reference import reference_moe_block
from tpmoe.routing_torch import align_torch, route_torch

from support.tolerances import assert_fp32_close

CONFIGS = {
    "plain": dict(hidden_size=12, intermediate_size=10, num_experts=4, top_k=2),
    "gpt_oss": dict(hidden_size=12, intermediate_size=9, num_experts=4, top_k=2, scoring="topk_softmax",
                    activation="clamped_swiglu", layout="gpt_oss", expert_bias=True, router_bias=True,
                    swiglu_limit=0.9),
    "deepseek_v3": dict(hidden_size=12, intermediate_size=6, num_experts=8, top_k=3, scoring="sigmoid_group",
                        renormalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5, correction_bias=True,
                        shared_intermediate_size=5, shared_expert_gate=True),
}


@pytest.fixture
def native_off(monkeypatch):
    """The native ops switched off, and the once-per-process warning not yet given."""
    monkeypatch.setenv("TPMOE_SKIP_NATIVE", "1")
    monkeypatch.setattr(tpmoe._native, "_fallback_warned", False)


@pytest.mark.parametrize("name", CONFIGS)
def test_block_forward_and_backward_match_the_reference_with_one_warning(name, native_off, seed):
    config = tpmoe.MoEConfig(**CONFIGS[name])
    generator = torch.Generator().manual_seed(seed)
    weights = tpmoe.random_moe_weights(config, dtype=torch.float64, generator=generator)
    x = torch.randn(9, config.hidden_size, dtype=torch.float64, generator=generator)
    dy = torch.randn(9, config.hidden_size, dtype=torch.float64, generator=generator)
    block = tpmoe.MoEBlock.from_full(config, weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the second step warns no more
            block.zero_grad()
            x_block = x.clone().requires_grad_(True)
            y = block(x_block)
            y.backward(dy)
    fallbacks = [warning for warning in caught if issubclass(warning.category, NativeFallbackWarning)]
    assert len(fallbacks) == 1, [str(warning.message) for warning in caught]
    assert "TPMOE_SKIP_NATIVE=1" in str(fallbacks[0].message)

    reference_weights = {n: w.clone().requires_grad_(n != "correction_bias") for n, w in weights.items()}
    x_ref = x.clone().requires_grad_(True)
    y_ref = reference_moe_block(x_ref, reference_weights, config)
    y_ref.backward(dy)
    assert_fp32_close(y, y_ref, "output", rtol=1e-12)
    assert_fp32_close(x_block.grad, x_ref.grad, "dx", rtol=1e-12)
    grads = block.local_grads()  # one rank: its shards are the full weights
    trained = [n for n in reference_weights if n != "correction_bias"]
    assert sorted(grads) == sorted(trained)
    for weight_name in trained:
        assert_fp32_close(grads[weight_name], reference_weights[weight_name].grad, f"d{weight_name}", rtol=1e-12)


@pytest.mark.filterwarnings("ignore::tpmoe._native.NativeFallbackWarning")
def test_routing_runs_the_twins_without_native_ops(native_off, seed):
    logits = torch.randn(11, 8, generator=torch.Generator().manual_seed(seed))
    assert not use_native_ops()
    weights, ids = tpmoe.route(logits, 3, scoring="sigmoid_group", renormalize=True, n_group=4, topk_group=2)
    want_weights, want_ids = route_torch(logits, 3, scoring="sigmoid_group", renormalize=True, n_group=4,
                                         topk_group=2)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)
    for got, want in zip(tpmoe.align(ids, 8, 4), align_torch(ids, 8, 4)):
        assert torch.equal(got, want)


@pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built")
def test_the_switch_is_read_at_each_call(monkeypatch):
    monkeypatch.setenv("TPMOE_SKIP_NATIVE", "1")
    monkeypatch.setattr(tpmoe._native, "_fallback_warned", True)  # given already: no warning now
    assert not use_native_ops()
    monkeypatch.delenv("TPMOE_SKIP_NATIVE")
    assert use_native_ops()


@pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built")
def test_cuda_tensors_route_through_the_twin_without_cuda_kernels(monkeypatch, seed):
    """A build without nvcc has CPU kernels only: route of CUDA tensors runs route_torch, after one
    warning that names the missing CUDA kernels, and CPU tensors keep the native op, with no warning
    of their own. (Fake CUDA tensors: no GPU needed; the twin is replaced by a recorder, as a CPU
    torch cannot sort fake CUDA tensors.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if torch._C._dispatch_has_kernel_for_dispatch_key("tpmoe::route", "CUDA"):
        # This build has them: the decision is what a build without them would see.
        monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda name, key: key != "CUDA")
    monkeypatch.setattr(tpmoe._native, "_fallback_warned", False)
    twin_calls = []
    monkeypatch.setattr(tpmoe.routing, "route_torch",
                        lambda *args, **kwargs: twin_calls.append(args[0].device) or "the twin's result")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert use_native_ops(torch.device("cpu")) is not None
        with FakeTensorMode():
            logits = torch.randn(3, 8, device="cuda")
            for _ in range(2):
                assert tpmoe.route(logits, 2, scoring="softmax", renormalize=True) == "the twin's result"
        assert use_native_ops(torch.device("cuda")) is None
    assert [device.type for device in twin_calls] == ["cuda", "cuda"]
    fallbacks = [warning for warning in caught if issubclass(warning.category, NativeFallbackWarning)]
    assert len(fallbacks) == 1, [str(warning.message) for warning in caught]
    assert "no CUDA kernels" in str(fallbacks[0].message)

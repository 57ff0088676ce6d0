"""A parallel block with DTensor parameters under the tools a training loop adds (TP 2, gloo):
torch.compile traces it whole and matches eager, torch.utils.checkpoint gives bitwise equal
gradients, and the output is never a view (FSDP2's hooks on it would be bypassed by an in-place
op). Reference: the same model run eagerly without the tool, float64."""
import pytest
import torch

from support.dist_utils import run_distributed

CONFIG = dict(hidden_size=8, intermediate_size=5, num_experts=4, top_k=2, shared_intermediate_size=3,
              shared_expert_gate=True, expert_bias=True)


def _rank(rank, world_size, seed):
    from torch._dynamo.utils import counters
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils.checkpoint import checkpoint

    import tpmoe

    config = tpmoe.MoEConfig(**CONFIG)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))

    def build():
        model = torch.nn.Sequential(tpmoe.MoEBlock(config, seed=seed, dtype=torch.float64))
        return tpmoe.parallelize(model, mesh)

    x = torch.randn(2, 3, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    results = {}
    eager = build()
    y_eager = eager(x)
    y_eager.square().sum().backward()
    grads = [p.grad.to_local() for p in eager.parameters()]
    results["views"] = [eager(x)._is_view(), eager(x[0])._is_view()]  # [B, S, H] and [T, H] inputs

    counters.clear()
    compiled_model = build()
    y = torch.compile(compiled_model, backend="aot_eager")(x)
    y.square().sum().backward()
    results["graph_breaks"] = dict(counters["graph_break"])
    results["compile_errors"] = [(y - y_eager).abs().max().item()] + [
        (p.grad.to_local() - g).abs().max().item() for p, g in zip(compiled_model.parameters(), grads)]

    checkpointed = build()
    y = checkpoint(checkpointed, x, use_reentrant=False)
    y.square().sum().backward()
    results["checkpoint_bitwise"] = torch.equal(y, y_eager) and all(
        torch.equal(p.grad.to_local(), g) for p, g in zip(checkpointed.parameters(), grads))
    return results


@pytest.mark.distributed
def test_compile_checkpoint_and_output_under_tp(seed):
    for rank, results in enumerate(run_distributed(_rank, 2, seed, timeout_s=120)):
        assert results["views"] == [False, False], (rank, results["views"])
        assert results["graph_breaks"] == {}, (rank, results["graph_breaks"])
        assert max(results["compile_errors"]) <= 1e-12, (rank, results["compile_errors"])
        assert results["checkpoint_bitwise"], rank

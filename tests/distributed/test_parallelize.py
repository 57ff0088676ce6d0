"""`tpmoe.parallelize` and the MoE ParallelStyles (tpmoe/parallel_styles.py) on one-process blocks.

Each mode, applied to a model of two one-process MoEBlocks, must give what the blocks built by
MoEBlock.from_full with that mode's groups give (bitwise: the same slices, the same kernels, the
same collectives) and the float64 reference (tpmoe.reference.reference_moe_block) for the output,
the input gradient and every weight gradient (this rank's slice of the reference gradient):
TP and sequence parallel at world 2, EP x TP, EP with "dp" left alone, and a ("dp", "tp") mesh
at world 4; one plan mixing torch's ColwiseParallel / RowwiseParallel with MoETensorParallel; the
weights of the mesh's first rank broadcast (src_data_rank) where ranks were initialised apart;
misuse raising by name. Tiny float64 shapes, I = 5 so that TP shards are uneven (3, 2).
"""
import importlib.util

import pytest
import torch

from support import seed_of
from support.dist_utils import SharedSpawns
from support.tolerances import FP64_RTOL

CONFIG = dict(hidden_size=6, intermediate_size=5, num_experts=4, top_k=2, renormalize=True,
              shared_intermediate_size=3, shared_expert_gate=True, router_bias=True, expert_bias=True)


class TwoBlocks(torch.nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.first, self.second = blocks

    def forward(self, x):
        x = x + self.first(x)
        return x + self.second(x)


def _reference(config, weights, x64, dy64):
    from tpmoe.reference import reference_moe_block
    x = x64.clone().requires_grad_(True)
    leaves = [{name: w.clone().requires_grad_(name != "correction_bias") for name, w in block.items()}
              for block in weights]
    y = x
    for block in leaves:
        y = y + reference_moe_block(y, block, config)
    y.backward(dy64)
    return y.detach(), x.grad, [{name: w.grad for name, w in block.items()} for block in leaves]


def _error(actual, expected):
    scale = expected.abs().max().item() or 1.0
    return ((actual.detach() - expected).abs().max() / scale).item() if expected.numel() else 0.0


def _rows(counts, index):
    return slice(sum(counts[:index]), sum(counts[:index + 1]))


def _case(rank, world_size, seed, shape, names, kwargs, tokens_of):
    """Runs `parallelize(model, mesh, **kwargs)` and the from_full twin on this rank; returns
    (errors against the reference, bitwise equal to the twin, the blocks' roles)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import tpmoe
    from tpmoe import MoEBlock, MoEConfig
    from tpmoe.sharding import shard_moe_weights

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    config = MoEConfig(**CONFIG)
    generator = torch.Generator().manual_seed(seed)
    weights = [tpmoe.random_moe_weights(config, dtype=torch.float64, generator=generator) for _ in range(2)]
    counts, index = tokens_of(mesh)
    x64 = torch.randn(sum(counts), config.hidden_size, dtype=torch.float64, generator=generator)
    dy64 = torch.randn(sum(counts), config.hidden_size, dtype=torch.float64, generator=generator)
    y_ref, dx_ref, grads_ref = _reference(config, weights, x64, dy64)
    rows = _rows(counts, index)

    model = TwoBlocks([MoEBlock.from_full(config, w) for w in weights])
    assert tpmoe.parallelize(model, mesh, **kwargs) is model
    groups = dict(group=mesh, sequence_parallel=kwargs.get("sequence_parallel", False))
    if "ep" in names and "tp" not in names:
        groups = dict(group=None, ep_group=mesh.get_group("ep"))
    twin = TwoBlocks([MoEBlock.from_full(config, w, **groups) for w in weights])

    results = {}
    for label, net in (("parallelize", model), ("from_full", twin)):
        x = x64[rows].clone().requires_grad_(True)
        y = net(x)
        y.backward(dy64[rows])
        tpmoe.allreduce_router_grads(net)
        if "dp" in names:  # the caller's sum over data parallel ranks (FSDP's, DDP's)
            for block in (net.first, net.second):
                for grad in block.local_grads().values():
                    if grad is not None:
                        dist.all_reduce(grad, group=mesh.get_group("dp"))
        results[label] = (y.detach(), x.grad, [block.local_grads() for block in (net.first, net.second)])
    y, dx, grads = results["parallelize"]
    errors = {"y": _error(y, y_ref[rows]), "dx": _error(dx, dx_ref[rows])}
    block = model.first
    for number, (block_grads, reference_grads) in enumerate(zip(grads, grads_ref)):
        expected = shard_moe_weights(config, reference_grads, block.tp_rank, block.tp_size, ep_rank=block.ep_rank,
                                     ep_size=block.ep_size)
        for name, grad in block_grads.items():
            errors[f"block {number} {name}.grad"] = _error(grad, expected[name])
    twin_y, twin_dx, twin_grads = results["from_full"]
    bitwise = torch.equal(y, twin_y) and torch.equal(dx, twin_dx) and all(
        torch.equal(a[name], b[name]) for a, b in zip(grads, twin_grads) for name in a)
    roles = (block.tp_size, block.ep_size, block.sequence_parallel, block.I_local)
    return errors, bitwise, roles


def _replicated_tokens(mesh):
    return [7], 0


def _sequence_tokens(mesh):
    return [4, 4], mesh.get_local_rank()  # equal: uneven counts need forward(tokens_per_rank=)


def _tokens_per_ep_rank(mesh):
    names = mesh.mesh_dim_names
    replica = mesh.get_local_rank("dp") if "dp" in names else 0
    ep_rank = mesh.get_local_rank("ep") if "ep" in names else 0
    counts = [3, 1, 4, 2] if "dp" in names else [3, 1]  # the global batch, (dp, ep) order
    return counts, 2 * replica + ep_rank


def _dp_tokens(mesh):
    return [5, 2], mesh.get_local_rank("dp")


CASES = {
    "tp": (2, (2,), ("tp",), {}, _replicated_tokens, (2, 1, False)),
    "sequence parallel": (2, (2,), ("tp",), dict(sequence_parallel=True), _sequence_tokens, (2, 1, True)),
    "ep x tp": (4, (2, 2), ("ep", "tp"), {}, _tokens_per_ep_rank, (2, 2, False)),
    "dp x ep": (4, (2, 2), ("dp", "ep"), {}, _tokens_per_ep_rank, (1, 2, False)),
    "dp x tp": (4, (2, 2), ("dp", "tp"), {}, _dp_tokens, (2, 1, False)),
}


@pytest.fixture(scope="module")
def spawns(request):
    """Every test's ranks, one spawn per world size (2, 4); each case with its own test's seed."""
    module = request.node.nodeid
    cases = {case: (world_size, _case, (seed_of(f"{module}::test_parallelize_matches_from_full_and_the_reference"
                                                f"[{case}]"), shape, names, kwargs, tokens_of))
             for case, (world_size, shape, names, kwargs, tokens_of, _) in CASES.items()}
    cases["mixed plan"] = (2, _mixed_plan, (seed_of(f"{module}::test_one_plan_mixes_torch_styles_and_tpmoe_styles"),))
    seed = seed_of(f"{module}::test_src_data_rank_broadcasts_the_first_ranks_weights")
    cases["src_data_rank 0"] = (2, _apart, (seed, 0))
    cases["src_data_rank None"] = (2, _apart, (seed, None))
    cases["misuse"] = (2, _misuse, ())
    if importlib.util.find_spec("transformers") is not None:
        cases["transformers"] = (2, _hf_model, (seed_of(
            f"{module}::test_a_transformers_model_after_apply_parallelizes_as_apply_with_the_mesh"),))
    # 120 s: the transformers case's own (its ranks build an HF model between collectives).
    return SharedSpawns(cases, timeout_s=120)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_parallelize_matches_from_full_and_the_reference(case, spawns):
    roles = CASES[case][-1]
    for rank, (errors, bitwise, got_roles) in enumerate(spawns.results(case)):
        assert got_roles[:3] == roles, (case, rank, got_roles)
        for name, error in errors.items():
            assert error <= FP64_RTOL, f"{case}, rank {rank}: {name} error {error:.2e} > {FP64_RTOL:.0e}"
        assert bitwise, f"{case}, rank {rank}: parallelize differs from MoEBlock.from_full with the same groups"


def _mixed_plan(rank, world_size, seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from tpmoe import MoEBlock, MoEConfig
    from tpmoe.parallel_styles import MoETensorParallel

    class Model(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.up = torch.nn.Linear(config.hidden_size, 10, dtype=torch.float64)
            self.down = torch.nn.Linear(10, config.hidden_size, dtype=torch.float64)
            self.moe = MoEBlock(config, seed=seed, dtype=torch.float64)

        def forward(self, x):
            x = x + self.down(torch.relu(self.up(x)))
            return x + self.moe(x)

    config = MoEConfig(**CONFIG)
    torch.manual_seed(seed)
    reference = Model(config)
    torch.manual_seed(seed)
    model = Model(config)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel(), "moe": MoETensorParallel()})
    x = torch.randn(5, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for net in (reference, model):
        net(x).square().sum().backward()
    errors = {}
    for name, parameter in model.named_parameters():
        expected = reference.get_parameter(name).grad
        # Every parameter a DTensor, the block's too: its full gradient is the one-process one.
        assert isinstance(parameter.grad, DTensor), name
        errors[name] = _error(parameter.grad.full_tensor(), expected)
    errors["y"] = _error(model(x), reference(x))
    return errors, isinstance(model.up.weight, DTensor), model.moe.tp_size


@pytest.mark.distributed
def test_one_plan_mixes_torch_styles_and_tpmoe_styles(spawns):
    for rank, (errors, torch_sharded, tp_size) in enumerate(spawns.results("mixed plan")):
        assert torch_sharded and tp_size == 2, (torch_sharded, tp_size)
        for name, error in errors.items():
            assert error <= FP64_RTOL, f"rank {rank}: {name} error {error:.2e}"


def _apart(rank, world_size, seed, src_data_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from tpmoe import MoEBlock, MoEConfig
    from tpmoe.parallel_styles import MoETensorParallel

    config = MoEConfig(**CONFIG)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    rank0 = MoEBlock(config, seed=seed, dtype=torch.float64)
    block = MoEBlock(config, seed=seed + rank, dtype=torch.float64)  # initialised apart on each rank
    parallelize_module(block, mesh, MoETensorParallel(), src_data_rank=src_data_rank)
    twin = MoEBlock.from_full(config, rank0.local_shards(), mesh)
    return all(torch.equal(block.local_shards()[name], tensor) for name, tensor in twin.local_shards().items())


@pytest.mark.distributed
def test_src_data_rank_broadcasts_the_first_ranks_weights(spawns):
    assert spawns.results("src_data_rank 0") == [True, True]
    # None: each rank's own weights are sliced as they are (rank 1's then differ from rank 0's).
    assert spawns.results("src_data_rank None") == [True, False]


def _misuse(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    import tpmoe
    from support.dist_utils import error_of
    from tpmoe import MoEBlock, MoEConfig
    from tpmoe.parallel_styles import MoEExpertTensorParallel, MoETensorParallel

    config = MoEConfig(**CONFIG)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    model = TwoBlocks([MoEBlock(config), MoEBlock(config)])
    errors = {
        "no blocks": error_of(lambda: tpmoe.parallelize(torch.nn.Linear(2, 2), mesh)),
        "not a mesh": error_of(lambda: tpmoe.parallelize(model, "tp")),
        "no dimension": error_of(lambda: tpmoe.parallelize(
            model, init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",)))),
        "missing named dim": error_of(lambda: tpmoe.parallelize(model, mesh, tp="model")),
        "style on a linear": error_of(lambda: parallelize_module(torch.nn.Linear(2, 2), mesh, MoETensorParallel())),
        "2-D style on 1-D": error_of(lambda: parallelize_module(MoEBlock(config), mesh, MoEExpertTensorParallel())),
    }
    tpmoe.parallelize(model, mesh)
    errors["twice"] = error_of(lambda: tpmoe.parallelize(model, mesh))
    return errors


@pytest.mark.distributed
def test_misuse_raises_by_name(spawns):
    expected = {
        "no blocks": ("ValueError", "module: expected tpmoe.MoEBlocks inside, found none in Linear"),
        "not a mesh": ("TypeError", "mesh: expected a torch.distributed DeviceMesh, got str"),
        "no dimension": ("ValueError", "mesh: expected a dimension named 'tp' (tensor parallel) or 'ep'"),
        "missing named dim": ("ValueError", "tp: expected a dimension of the mesh ('tp',), got 'model'"),
        "style on a linear": ("TypeError", "MoETensorParallel: expected to be applied to a tpmoe.MoEBlock, got Linear"),
        "2-D style on 1-D": ("ValueError", "MoEExpertTensorParallel: expected a 2-D DeviceMesh, got a 1-D one"),
        "twice": ("ValueError", "MoETensorParallel: expected a one-process MoEBlock, got one already parallel"),
    }
    for errors in spawns.results("misuse"):
        for name, (kind, message) in expected.items():
            assert errors[name] is not None and errors[name][0] == kind and message in errors[name][1], \
                (name, errors[name])


def _hf_model(rank, world_size, seed):
    from torch.distributed.device_mesh import init_device_mesh

    import tpmoe
    import tpmoe.hf
    from support.hf_models import make_hf_causal_lm

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    input_ids = torch.randint(3, 61, (2, 5), generator=torch.Generator().manual_seed(seed))
    outputs = {}
    for label in ("apply(model, mesh)", "apply(model) then parallelize"):
        model = make_hf_causal_lm("qwen3_moe", seed, torch.float64)
        if label == "apply(model, mesh)":
            tpmoe.hf.apply(model, mesh)
        else:
            tpmoe.hf.apply(model)
            tpmoe.parallelize(model, mesh)
        output = model(input_ids, labels=input_ids)
        output.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        outputs[label] = (output.logits.detach(), grads, tpmoe.hf.gather_state_dict(model))
    (logits_a, grads_a, state_a), (logits_b, grads_b, state_b) = outputs.values()
    return dict(logits=torch.equal(logits_a, logits_b), names=sorted(grads_a) == sorted(grads_b),
                grads=all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a),
                state=sorted(state_a) == sorted(state_b) and all(torch.equal(state_a[n], state_b[n]) for n in state_a),
                blocks=sum(1 for n in grads_a if n.endswith("w_gate_up")))


@pytest.mark.distributed
def test_a_transformers_model_after_apply_parallelizes_as_apply_with_the_mesh(spawns):
    pytest.importorskip("transformers", reason="tpmoe.hf needs transformers")
    for rank, result in enumerate(spawns.results("transformers")):
        assert result.pop("blocks") >= 2, result
        assert all(result.values()), (rank, result)

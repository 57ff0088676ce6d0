"""tpmoe.distributed.clip_grad_norm_: the one-process gradient norm on every rank, and the clip.

A model of a replicated linear layer and two MoEBlocks (float64, I = 5: uneven TP shards) is
run parallel (TP and sequence parallel at world 2, EP x TP, EP beside "dp" and "dp" x TP at world 4)
and, in the test, as one process on the global batch in plain autograd (tpmoe.reference). The
norm returned must equal the one-process model's on every rank, in 2-norm and inf-norm, and
after clipping every gradient must be this rank's slice of the one-process clipped gradient.
The blocks' parameters are DTensors, so torch.nn.utils.clip_grad_norm_ gives the same norm too
once the rest of the model is on the blocks' mesh (the linear layer replicated there); with a
plain linear layer beside them it refuses the mix, which tpmoe's takes.
"""
import math

import pytest
import torch

from support import seed_of
from support.dist_utils import SharedSpawns
from support.tolerances import FP64_RTOL

CONFIG = dict(hidden_size=6, intermediate_size=5, num_experts=4, top_k=2, renormalize=True,
              shared_intermediate_size=3, shared_expert_gate=True, router_bias=True, expert_bias=True)
MAX_NORM = 0.05  # below every norm here: the clip really scales
NORM_TYPES = (2.0, math.inf)


class Model(torch.nn.Module):
    def __init__(self, linear, blocks):
        super().__init__()
        self.linear = linear
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x):
        x = self.linear(x)
        for block in self.blocks:
            x = x + block(x)
        return x


def _replicate_on(module, mesh):
    """`module`'s parameters as DTensors replicated on `mesh`, plain tensors in and out."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    replicate = [Replicate()] * mesh.ndim
    distribute_module(module, mesh,
                      input_fn=lambda _, inputs, m: tuple(DTensor.from_local(t, m, replicate) for t in inputs),
                      output_fn=lambda _, output, m: output.to_local())


def _full(tensor):
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _one_process(config, linear, weights, x, dy, norm_type):
    """Plain autograd, float64: the gradients, their norm and the clipped gradients."""
    from tpmoe.reference import reference_moe_block
    linear = {name: p.detach().clone().requires_grad_(True) for name, p in linear.named_parameters()}
    leaves = [{n: w.clone().requires_grad_(n != "correction_bias") for n, w in block.items()} for block in weights]
    y = torch.nn.functional.linear(x, linear["weight"], linear["bias"])
    for block in leaves:
        y = y + reference_moe_block(y, block, config)
    y.backward(dy)
    grads = [p.grad for p in linear.values()] + [w.grad for block in leaves for w in block.values() if w.grad is not None]
    if math.isinf(norm_type):
        norm = max(g.abs().max() for g in grads)
    else:
        norm = sum((g ** norm_type).abs().sum() for g in grads) ** (1 / norm_type)
    scale = min(1.0, MAX_NORM / (norm.item() + 1e-6))
    return norm.item(), {name: p.grad * scale for name, p in linear.items()}, \
        [{n: w.grad * scale for n, w in block.items() if w.grad is not None} for block in leaves]


def _rank(rank, world_size, seed, shape, names, sequence_parallel, fsdp=False):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return {norm_type: _clip_once(mesh, seed, names, sequence_parallel, norm_type, fsdp) for norm_type in NORM_TYPES}


def _clip_once(mesh, seed, names, sequence_parallel, norm_type, fsdp):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import tpmoe
    from tpmoe import MoEBlock, MoEConfig
    from tpmoe.distributed import clip_grad_norm_
    from tpmoe.sharding import shard_moe_weights

    config = MoEConfig(**CONFIG)
    generator = torch.Generator().manual_seed(seed)
    weights = [tpmoe.random_moe_weights(config, dtype=torch.float64, generator=generator) for _ in range(2)]
    torch.manual_seed(seed)
    linear = torch.nn.Linear(config.hidden_size, config.hidden_size, dtype=torch.float64)
    # The global batch and this rank's rows of it: replicas ("dp") and EP ranks own their rows, a
    # sequence-parallel rank its half, TP ranks of one group the same rows.
    owners = [mesh.get_local_rank(n) for n in names if n in ("dp", "ep")] or [0]
    sizes = [mesh.size(names.index(n)) for n in names if n in ("dp", "ep")] or [1]
    index, count = 0, 1
    for local, size in zip(owners, sizes):
        index, count = index * size + local, count * size
    if sequence_parallel:
        index, count = mesh.get_local_rank("tp"), mesh.size(0)
    counts = [3 + (i % 2) for i in range(count)] if not sequence_parallel else [4] * count
    x = torch.randn(sum(counts), config.hidden_size, dtype=torch.float64, generator=generator)
    dy = torch.randn(sum(counts), config.hidden_size, dtype=torch.float64, generator=generator)
    rows = slice(sum(counts[:index]), sum(counts[:index + 1]))
    norm_ref, linear_ref, blocks_ref = _one_process(config, linear, weights, x, dy, norm_type)

    results = {}
    for which in ("tpmoe",) if fsdp else ("tpmoe", "torch"):
        model = Model(torch.nn.Linear(config.hidden_size, config.hidden_size, dtype=torch.float64),
                      [MoEBlock.from_full(config, w) for w in weights])
        model.linear.load_state_dict(linear.state_dict())
        tpmoe.parallelize(model, mesh, sequence_parallel=sequence_parallel)
        if which == "torch":  # every parameter a DTensor on one mesh: the linear layer replicated there
            _replicate_on(model.linear, model.blocks[0].mesh)
        if fsdp:  # FSDP2 over "dp": it sums the gradients over "dp" (divide factor 1: a sum, as the reference)
            from torch.distributed.fsdp import fully_shard
            for block in model.blocks:
                fully_shard(block, mesh=mesh["dp"]).set_gradient_divide_factor(1.0)
            fully_shard(model, mesh=mesh["dp"]).set_gradient_divide_factor(1.0)
        model(x[rows]).backward(dy[rows])
        tpmoe.allreduce_router_grads(model)
        # The caller's data-parallel sums: the linear layer saw this rank's rows only, so its
        # gradient is summed over every dimension whose ranks hold other rows ("dp", "ep", or "tp"
        # when sequence-parallel); the blocks' over "dp" (tpmoe summed the rest).
        token_dims = [n for n in names if n in ("dp", "ep") or (n == "tp" and sequence_parallel)]
        token_group = (None if len(token_dims) == len(names) else mesh.get_group(token_dims[0])) \
            if token_dims else False
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            if fsdp:  # FSDP2 summed every gradient over "dp"; the linear layer's still wants "ep"
                if name.startswith("linear.") and "ep" in names:
                    dist.all_reduce(grad, group=mesh.get_group("ep"))
                continue
            if name.startswith("linear.") and token_group is not False:
                dist.all_reduce(grad, group=token_group)
            elif not name.startswith("linear.") and "dp" in names:
                dist.all_reduce(grad, group=mesh.get_group("dp"))
        if which == "tpmoe":
            norm = clip_grad_norm_(model, MAX_NORM, norm_type).item()
        else:
            norm = _full(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, norm_type)).item()
        errors = {"linear." + n: abs(_full(p.grad) - linear_ref[n]).max().item() / linear_ref[n].abs().max().item()
                  for n, p in model.linear.named_parameters()}
        for number, (block, reference) in enumerate(zip(model.blocks, blocks_ref)):
            expected = shard_moe_weights(config, reference, block.tp_rank, block.tp_size, ep_rank=block.ep_rank,
                                         ep_size=block.ep_size)
            for name, grad in block.local_grads().items():
                grad = _full(grad)
                scale = reference[name].abs().max().item() or 1.0
                errors[f"block {number} {name}"] = (grad - expected[name]).abs().max().item() / scale \
                    if expected[name].numel() else 0.0
        results[which] = (norm, errors)
    return norm_ref, results


CASES = {
    "tp": (2, (2,), ("tp",), False),
    "sequence parallel": (2, (2,), ("tp",), True),
    "ep x tp": (4, (2, 2), ("ep", "tp"), False),
    "dp x ep": (4, (2, 2), ("dp", "ep"), False),
    "dp x tp": (4, (2, 2), ("dp", "tp"), False),
}


FSDP2_NAMES = [("dp", "tp"), ("dp", "ep")]


@pytest.fixture(scope="module")
def spawns(request):
    """Every test's ranks, one spawn per world size (2, 4); each case with its own test's seed."""
    module = request.node.nodeid
    cases = {}
    for case, (world_size, shape, names, sequence_parallel) in CASES.items():
        seed = seed_of(f"{module}::test_clip_grad_norm_is_the_one_process_norm_on_every_rank[{case}]")
        cases[case] = (world_size, _rank, (seed, shape, names, sequence_parallel))
    for index, names in enumerate(FSDP2_NAMES):
        seed = seed_of(f"{module}::test_clip_grad_norm_under_fsdp2[names{index}]")
        cases[f"FSDP2 {names}"] = (4, _rank, (seed, (2, 2), names, False, True))
    return SharedSpawns(cases, timeout_s=60)


@pytest.mark.distributed
@pytest.mark.parametrize("names", FSDP2_NAMES)
def test_clip_grad_norm_under_fsdp2(names, spawns):
    """FSDP2 over "dp" of a ("dp", "tp") or ("dp", "ep") mesh: the blocks' DTensor gradients
    sharded over "dp" by FSDP2 and over "tp" / "ep" by tpmoe (allreduce_router_grads summing the
    replicated ones over "ep" on FSDP2's shards): the one-process gradients, norm and clip on
    every rank."""
    per_rank = spawns.results(f"FSDP2 {names}")
    for norm_type in NORM_TYPES:
        for rank, by_norm in enumerate(per_rank):
            norm_ref, results = by_norm[norm_type]
            norm, errors = results["tpmoe"]
            assert abs(norm - norm_ref) <= FP64_RTOL * norm_ref, (norm_type, rank, norm, norm_ref)
            for name, error in errors.items():
                assert error <= FP64_RTOL, f"FSDP2, {norm_type}-norm, rank {rank}: {name} after clipping: {error:.2e}"


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_clip_grad_norm_is_the_one_process_norm_on_every_rank(case, spawns):
    per_rank = spawns.results(case)
    for norm_type in NORM_TYPES:
        for rank, by_norm in enumerate(per_rank):
            norm_ref, results = by_norm[norm_type]
            norm, errors = results["tpmoe"]
            assert abs(norm - norm_ref) <= FP64_RTOL * norm_ref, (case, norm_type, rank, norm, norm_ref)
            assert norm_ref > MAX_NORM  # the clip scaled: the gradient comparison below says something
            for name, error in errors.items():
                assert error <= FP64_RTOL, f"{case}, {norm_type}-norm, rank {rank}: {name} after clipping: {error:.2e}"
            torch_norm, torch_errors = results["torch"]
            assert abs(torch_norm - norm_ref) <= FP64_RTOL * norm_ref, (case, norm_type, rank, torch_norm, norm_ref)
            for name, error in torch_errors.items():
                assert error <= FP64_RTOL, f"torch's clip, {case}, {norm_type}-norm, rank {rank}: {name}: {error:.2e}"

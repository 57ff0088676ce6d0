"""torch.distributed.checkpoint of models with parallel tpmoe blocks: save at one layout, load at
any other, model and AdamW state bitwise equal.

A model (a linear layer and two MoEBlocks: uneven sizes, I = 5, E = 5, a gated shared expert of
3, biases; float64) takes one AdamW step at the first layout, then goes through a chain of
checkpoints, each layout loading the previous one's and saving its own:
  dp2 x tp2 (FSDP2 over "dp") -> tp3 -> tp1 -> one process (no process group)
  ep2 x tp2 -> ep3 -> one process
  tp2 -> ep2 -> one process, at even sizes (I = 6, E = 4)
Every layout's full state (DTensor.full_tensor, torch's state-dict helpers) must equal the first
layout's bit for bit, and the one-process model's plain tensors too. Loading a checkpoint of
another config fails naming the key.
"""
import pytest
import torch

from support import seed_of
from support.dist_utils import SharedSpawns

CONFIG = dict(hidden_size=6, intermediate_size=5, num_experts=5, top_k=2, renormalize=True,
              shared_intermediate_size=3, shared_expert_gate=True, router_bias=True, expert_bias=True)


class Model(torch.nn.Module):
    def __init__(self, config, seed):
        super().__init__()
        from tpmoe import MoEBlock
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(config.hidden_size, config.hidden_size, dtype=torch.float64)
        self.blocks = torch.nn.ModuleList(
            [MoEBlock(config, seed=seed + index, dtype=torch.float64) for index in range(2)])

    def forward(self, x):
        x = self.linear(x)
        for block in self.blocks:
            x = x + block(x)
        return x


def _layout(shape, names, config_overrides=None, seed=0):
    """The model at a layout: (model, AdamW), parallelized over a mesh of `shape` named `names`
    (None: one process), FSDP2 over "dp" when the mesh has it."""
    import tpmoe
    config = tpmoe.MoEConfig(**{**CONFIG, **(config_overrides or {})})
    model = Model(config, seed)
    if names is not None:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        tpmoe.parallelize(model, mesh)
        if "dp" in names:
            from torch.distributed.fsdp import fully_shard
            for block in model.blocks:
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _full_state(model, optimizer):
    """{key: full tensor} of the model and the optimizer, by torch's own helpers."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    full = {f"model.{k}": v.detach().clone() for k, v in model_state.items()}
    for fqn, state in optim_state["state"].items():
        for name, value in state.items():
            full[f"optim.{fqn}.{name}"] = torch.as_tensor(value).detach().clone()
    return full


def _train_step(model, optimizer, seed):
    import tpmoe
    x = torch.randn(7, CONFIG["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    model(x).square().sum().backward()
    tpmoe.allreduce_router_grads(model)
    optimizer.step()
    optimizer.zero_grad()


def _save(model, optimizer, directory):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)


def _load(model, optimizer, directory):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _first(rank, world_size, shape, names, seed, directory, overrides=None):
    model, optimizer = _layout(shape, names, overrides, seed=seed)
    _train_step(model, optimizer, seed)
    _save(model, optimizer, directory)
    return _full_state(model, optimizer)


def _next(rank, world_size, shape, names, seed, source, target, overrides=None):
    model, optimizer = _layout(shape, names, overrides, seed=seed + 100)  # other weights: the load must replace them
    _load(model, optimizer, source)
    full = _full_state(model, optimizer)
    if target is not None:
        _save(model, optimizer, target)
    return full


def _one_process(seed, source, overrides=None):
    """The chain's end: a plain model, no process group; its plain parameters and AdamW state."""
    model, optimizer = _layout(None, None, overrides, seed=seed + 200)
    _load(model, optimizer, source)
    full = _full_state(model, optimizer)
    parameters = {f"model.{name}": p.detach().clone() for name, p in model.named_parameters()}
    return full, parameters


def _assert_bitwise(expected, actual, where):
    assert sorted(actual) == sorted(expected), (where, sorted(set(actual) ^ set(expected)))
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape and torch.equal(actual[key], tensor), f"{where}: {key} differs"


CHAINS = {
    "dp2xtp2 (FSDP2) -> tp3 -> tp1 -> one process": [((2, 2), ("dp", "tp")), ((3,), ("tp",)), ((1,), ("tp",))],
    "ep2xtp2 -> ep3 -> one process": [((2, 2), ("ep", "tp")), ((3,), ("ep",))],
    # Even sizes, where plain per-rank slices under the full names once loaded without an error
    # and silently wrong.
    "even sizes: tp2 -> ep2 -> one process": [((2,), ("tp",)), ((2,), ("ep",))],
}
EVEN = {"intermediate_size": 6, "num_experts": 4, "shared_intermediate_size": 4}


@pytest.fixture(scope="module")
def steps(request, tmp_path_factory):
    """Every test's spawns, step by step: the first layouts of all chains (and the other-config
    test's save), then the second ones (and its load), then the third; at each step the layouts
    of one world size share a spawn (5 spawns, not 9). Each step's ranks are fresh processes,
    as before: a layout never loads what its own processes saved. Each chain keeps its test's
    seed and its own directories."""
    module = request.node.nodeid
    world = lambda shape: int(torch.tensor(shape).prod())  # noqa: E731
    steps = [{} for _ in range(max(len(layouts) for layouts in CHAINS.values()))]
    chains = {}
    for chain, layouts in CHAINS.items():
        seed = seed_of(f"{module}::test_checkpoint_round_trips_across_layouts[{chain}]")
        overrides = EVEN if chain.startswith("even") else None
        folder = tmp_path_factory.mktemp("chain")
        directories = [str(folder / f"step{index}") for index in range(len(layouts))]
        chains[chain] = (seed, overrides, directories)
        for index, (shape, names) in enumerate(layouts):
            args = (shape, names, seed, directories[0], overrides) if index == 0 else \
                (shape, names, seed, directories[index - 1], directories[index], overrides)
            steps[index][chain] = (world(shape), _first if index == 0 else _next, args)
    directory = str(tmp_path_factory.mktemp("other") / "checkpoint")
    seed = seed_of(f"{module}::test_checkpoint_of_another_config_names_the_key")
    steps[0]["another config"] = (2, _first, ((2,), ("tp",), seed, directory))
    steps[1]["another config"] = (2, _load_other_config, (directory,))
    spawns = [SharedSpawns(cases, timeout_s=60) for cases in steps]
    for step in spawns:
        step.run_all()
    return spawns, chains


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the one-process load, meant so
@pytest.mark.parametrize("chain", list(CHAINS))
def test_checkpoint_round_trips_across_layouts(chain, steps):
    spawns, chains = steps
    layouts = CHAINS[chain]
    seed, overrides, directories = chains[chain]
    names = layouts[0][1]
    saved = spawns[0].results(chain)
    reference = saved[0]
    for rank, full in enumerate(saved):
        _assert_bitwise(reference, full, f"{names} rank {rank} (ranks agree)")
    assert any(key.endswith("exp_avg_sq") for key in reference)  # AdamW state is in the checkpoint
    for index, (shape, names) in enumerate(layouts[1:], start=1):
        for rank, full in enumerate(spawns[index].results(chain)):
            _assert_bitwise(reference, full, f"{names} rank {rank}")
    full, parameters = _one_process(seed, directories[-1], overrides)
    _assert_bitwise(reference, full, "one process")
    for key, tensor in parameters.items():
        assert torch.equal(tensor, reference[key]), f"one process: parameter {key} differs"


def _load_other_config(rank, world_size, directory):
    from torch.distributed.checkpoint.api import CheckpointException
    model, optimizer = _layout((world_size,), ("tp",), config_overrides={"intermediate_size": 7})
    try:
        _load(model, optimizer, directory)
    except CheckpointException as error:  # DCP's own error (a BaseException), raised on every rank
        return str(error)
    return None


@pytest.mark.distributed
def test_checkpoint_of_another_config_names_the_key(steps):
    spawns, _ = steps
    spawns[0].results("another config")  # saved
    for message in spawns[1].results("another config"):
        assert message is not None, "a checkpoint of I = 5 loaded into a model of I = 7"
        assert "model.blocks.0.w_gate_up" in message and "[5, 2, 5, 6]" in message and "[5, 2, 7, 6]" in message, \
            message

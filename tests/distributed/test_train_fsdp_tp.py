"""examples/train_fsdp_tp.py: training resumed at another layout is the uninterrupted run.

The example's own functions run in-process on gloo ranks (tests/support/dist_utils.run_distributed), in
float64 so that the only differences left are the order of the sums (FP64_RTOL):
  - dp2 x tp2 (FSDP2 over "dp") trains 6 steps, saving a distributed checkpoint at step 4;
  - that checkpoint resumes at tp2 (world 2) and at one process (no mesh) for steps 4 and 5;
  - the reference: the one-process model (no mesh, no FSDP2) trained 6 steps from scratch.
Every run's losses and final weights must equal the reference's. A ("dp", "ep", "tp") mesh at
world 8 gives the one-process gradients, and one real torchrun launch runs the script in bf16
mixed precision (FSDP2's MixedPrecisionPolicy) against the one-process float32 losses.
"""
import contextlib
import importlib.util
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
import torch

from support.dist_utils import run_distributed
from support.tolerances import FP64_RTOL

from support import ROOT  # noqa: E402
EXAMPLE = os.path.join(ROOT, "examples", "train_fsdp_tp.py")
# Tiny and float64; --max-norm low enough that the clip scales every step (it is part of the run).
COMMON = ["--dtype", "float64", "--no-progress", "--batch", "8", "--seq-len", "6", "--max-norm", "0.5",
          "--lr", "1e-2"]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="the example builds a transformers model")


def _example():
    spec = importlib.util.spec_from_file_location("train_fsdp_tp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _float64_norms():
    """Makes transformers' Qwen3-MoE RMSNorm keep float64 while active. As shipped it computes in
    float32 whatever the input's dtype, rounding a float64 model's activations to float32 (~1e-8)
    in every norm, which would hide any difference smaller than that; float32 and bf16 inputs
    compute as before."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    with mock.patch.object(modeling_qwen3_moe.Qwen3MoeRMSNorm, "forward", forward):
        yield


def _full_weights(model):
    """{name: full tensor} on every rank (FSDP2's and tpmoe's shards gathered by torch's helper)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def _train(rank, world_size, argv):
    """On a gloo rank (rank and world_size unused), or here with rank None: no process group."""
    example = _example()
    with _float64_norms():
        model, _, history = example.train(example.parse_args(argv + COMMON), log=lambda *_: None)
    return {step: loss for step, (loss, _) in history.items()}, _full_weights(model)


def _assert_close(expected, actual, where):
    losses, weights = expected
    actual_losses, actual_weights = actual
    for step, loss in actual_losses.items():
        assert abs(loss - losses[step]) <= FP64_RTOL * abs(losses[step]), (where, step, loss, losses[step])
    assert sorted(actual_weights) == sorted(weights), (where, sorted(set(actual_weights) ^ set(weights)))
    for name, tensor in weights.items():
        error = (actual_weights[name] - tensor).abs().max().item() / tensor.abs().max().item()
        assert error <= FP64_RTOL, f"{where}: {name} differs by {error:.2e} (relative to its largest entry)"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the one-process load, meant so
def test_resume_at_another_layout_equals_the_uninterrupted_run(tmp_path):
    checkpoint = str(tmp_path / "checkpoint")
    uninterrupted = run_distributed(_train, 4, ["--mesh", "dp,tp", "--shape", "2,2", "--steps", "6",
                                                "--save-every", "4", "--checkpoint", checkpoint], timeout_s=120)
    assert sorted(os.listdir(checkpoint)) == ["step-4"]
    resumed_tp = run_distributed(_train, 2, ["--mesh", "tp", "--steps", "6", "--resume", checkpoint],
                                 timeout_s=120)
    # One process: here, without a process group (DCP reads the checkpoint alone).
    reference = _train(None, 1, ["--mesh", "none", "--steps", "6"])
    resumed_one = _train(None, 1, ["--mesh", "none", "--steps", "6", "--resume", os.path.join(checkpoint, "step-4")])
    losses = reference[0]
    assert sorted(losses) == list(range(6)) and losses[5] < losses[0], losses  # it trains
    for rank, run in enumerate(uninterrupted):
        assert sorted(run[0]) == list(range(6))
        _assert_close(reference, run, f"dp2 x tp2, rank {rank}")
    for rank, run in enumerate(resumed_tp):
        assert sorted(run[0]) == [4, 5]  # only the steps after the checkpoint ran
        _assert_close(reference, run, f"resumed at tp2, rank {rank}")
    assert sorted(resumed_one[0]) == [4, 5]
    _assert_close(reference, resumed_one, "resumed at one process")


def _gradients(rank, world_size, argv):
    """The step-0 loss and every parameter's full gradient (before clipping) at this layout."""
    from torch.distributed.tensor import DTensor
    example = _example()
    args = example.parse_args(argv + COMMON)
    model, _, mesh = example.setup(args)
    with _float64_norms():
        loss = example.compute_gradients(model, mesh, args, 0)
    grads = {}
    for name, parameter in model.named_parameters():  # the same order on every rank: full_tensor is collective
        grad = parameter.grad
        grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
    return loss, grads


@pytest.mark.distributed
@pytest.mark.slow
def test_dp_ep_tp_world_8_gives_the_one_process_gradients():
    """FSDP2 over "dp", experts over "ep", their columns over "tp" (2 x 2 x 2, I = 21: uneven TP
    shards): the loss and every gradient equal the one-process model's."""
    per_rank = run_distributed(_gradients, 8, ["--mesh", "dp,ep,tp", "--shape", "2,2,2"], timeout_s=120)
    loss_ref, grads_ref = _gradients(None, 1, ["--mesh", "none"])  # here, no process group
    for rank, (loss, grads) in enumerate(per_rank):
        assert abs(loss - loss_ref) <= FP64_RTOL * loss_ref, (rank, loss, loss_ref)
        assert sorted(grads) == sorted(grads_ref)
        for name, grad in grads_ref.items():
            error = (grads[name] - grad).abs().max().item() / grad.abs().max().item()
            assert error <= FP64_RTOL, f"rank {rank}: {name}'s gradient differs by {error:.2e}"


def test_bad_flags_are_refused_with_the_reason(capsys):
    example = _example()
    cases = {
        ("--mesh", "tp,dp"): "--mesh: invalid choice",
        ("--shape", "2,x"): "--shape: expected comma-separated integers",
        ("--mesh", "dp,tp", "--shape", "2"): "--shape: expected 2 positive sizes",
        ("--save-every", "2"): "--save-every needs --checkpoint",
        ("--mesh", "tp", "--bf16"): "--bf16: FSDP2's mixed precision needs 'dp'",
        ("--mesh", "dp,tp", "--blocks", "transformers"): "--blocks transformers: its blocks run data parallel only",
        ("--seq-len", "1"): "--seq-len: expected at least 2",
        ("--resume", "/nonexistent/checkpoint"): "--resume: '/nonexistent/checkpoint' does not exist",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            example.parse_args(list(argv))
        assert exit_info.value.code == 2, argv
        assert message in capsys.readouterr().err, (argv, message)
    args = example.parse_args(["--mesh", "dp,tp"])
    with pytest.raises(ValueError, match="is not the world size 3"):
        example.mesh_shape(args, 3)
    assert example.mesh_shape(args, 4) == (2, 2) and example.mesh_shape(args, 2) == (1, 2)


def test_without_torchrun_it_says_how_to_start_it():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("RANK", None)
    finished = subprocess.run([sys.executable, EXAMPLE], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 2, finished.stderr
    assert "start it with torchrun" in finished.stderr, finished.stderr


def _bf16_router_dtypes(rank, world_size):
    """Under --bf16 at dp2: the dtypes a tpmoe block's router and experts have inside forward, and
    the routers' master values after one step (they must agree over "dp": their sum is the
    example's own, FSDP2 leaves them alone)."""
    from tpmoe import MoEBlock
    from tpmoe.distributed.dtensor_parameters import local_tensor
    example = _example()
    args = example.parse_args(["--mesh", "dp", "--bf16", "--steps", "1", "--no-progress", "--batch", "4",
                               "--seq-len", "6"])
    model, optimizer, mesh = example.setup(args)
    block = next(module for module in model.modules() if isinstance(module, MoEBlock))
    seen = {}

    def record(module, inputs):
        seen.update(router=local_tensor(module.router_weight).dtype, experts=local_tensor(module.w_gate_up).dtype,
                    input=inputs[0].dtype)
    block.register_forward_pre_hook(record)
    example.train_step(model, optimizer, mesh, args, 0)
    routers = [local_tensor(parameter).detach().clone() for parameter in example.router_parameters(model)]
    return seen, routers


@pytest.mark.distributed
def test_bf16_keeps_the_routers_float32_and_sums_them_over_dp():
    first, second = run_distributed(_bf16_router_dtypes, 2, timeout_s=120)
    assert first[0] == {"router": torch.float32, "experts": torch.bfloat16, "input": torch.bfloat16}, first[0]
    assert first[1] and all(router.dtype == torch.float32 for router in first[1])
    for mine, theirs in zip(first[1], second[1]):  # a missing "dp" sum would leave each rank its own step
        assert torch.equal(mine, theirs)


def _launch(tmp_path, *argv):
    """The script under torchrun on 2 ranks (gloo); returns its stdout's losses per step."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", EXAMPLE,
               "--no-progress", *argv]
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-4000:]
    steps = re.findall(r"^step +(\d+) +loss ([-+0-9.eE]+) +grad norm ([-+0-9.eE]+)$", finished.stdout, re.M)
    return {int(step): float(loss) for step, loss, _ in steps}, finished.stdout


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_launch_in_bf16_trains_saves_and_follows_float32(tmp_path):
    """The script itself under torchrun (2 ranks, gloo, the default mesh at world 2: dp1 x tp2)
    with --bf16 (FSDP2's MixedPrecisionPolicy: bf16 compute, float32 weights and sums, float32
    routers): it trains and saves a checkpoint, and its loss curve follows the one-process
    float32 run's within the bf16 rule: its largest relative loss error over the steps is at
    most twice that of the same model in bf16 with transformers' own (eager, plain-PyTorch)
    blocks, under the same FSDP2 policy. Resuming is the in-process tests'."""
    checkpoint = str(tmp_path / "checkpoint")
    steps = 5
    ours, stdout = _launch(tmp_path, "--bf16", "--steps", str(steps), "--save-every", str(steps), "--checkpoint",
                           checkpoint)
    assert f"saved {os.path.join(checkpoint, f'step-{steps}')}" in stdout, stdout
    assert os.path.isfile(os.path.join(checkpoint, f"step-{steps}", ".metadata"))
    theirs, _ = _launch(tmp_path, "--bf16", "--steps", str(steps), "--mesh", "dp", "--blocks", "transformers")
    assert sorted(ours) == sorted(theirs) == list(range(steps)), (ours, theirs)
    example = _example()
    _, _, history = example.train(example.parse_args(["--mesh", "none", "--steps", str(steps), "--no-progress"]),
                                  log=lambda *_: None)
    reference = {step: loss for step, (loss, _) in history.items()}
    assert reference[steps - 1] < reference[0], reference  # it trains

    def worst(run):
        return max(abs(run[step] - reference[step]) / reference[step] for step in reference)
    assert worst(ours) <= 2 * worst(theirs), (f"bf16 loss error {worst(ours):.2e} > 2 x transformers' bf16 "
                                              f"{worst(theirs):.2e}", ours, theirs, reference)

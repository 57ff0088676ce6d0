"""Train a small transformers Qwen3-MoE with FSDP2 and tpmoe's tensor / expert parallelism.

    torchrun --nproc-per-node 4 examples/train_fsdp_tp.py                        # ("dp", "tp"), 2 x 2
    torchrun --nproc-per-node 4 examples/train_fsdp_tp.py --mesh dp,ep            # FSDP2 x expert parallel
    torchrun --nproc-per-node 4 examples/train_fsdp_tp.py --mesh ep,tp
    torchrun --nproc-per-node 8 examples/train_fsdp_tp.py --mesh dp,ep,tp --shape 2,2,2
    torchrun --nproc-per-node 4 examples/train_fsdp_tp.py --steps 4 --save-every 4 --checkpoint ckpt
    torchrun --nproc-per-node 2 examples/train_fsdp_tp.py --mesh tp --steps 6 --resume ckpt   # another layout

The model is built from a config (no download), its MoE blocks swapped for tpmoe's
(`tpmoe.hf.apply`) and parallelized over the mesh (`tpmoe.parallelize`: "tp" shards each
expert's columns, "ep" the experts). "dp" is FSDP2's: each decoder layer and the model are
`fully_shard`-ed over mesh["dp"]. gloo on CPU, NCCL when CUDA is there (one GPU per rank).

Who sums which gradient, once per step after backward:
  - FSDP2 sums every gradient over "dp" (divide factor 1: a sum, the loss is already scaled);
  - tpmoe's TP blocks hold complete gradients; `tpmoe.allreduce_router_grads` sums the blocks'
    replicated parameters (router, shared expert) over "ep", whose ranks saw other tokens;
  - the rest of the model (attention, embeddings, norms) also saw only this EP rank's tokens:
    this script sums it over "ep" (`tpmoe.hf.data_parallel_parameters`);
  - nothing is summed over "tp": its ranks hold the same tokens.
Every rank's loss is its tokens' summed cross-entropy divided by the GLOBAL token count, so the
sums above give the gradient of the global mean loss, whatever the layout.

The data is synthetic and deterministic: the global batch of a step is drawn from the step's
seed on every rank, and each rank keeps its rows (different rows over "dp" and "ep", the same
over "tp"). A run resumed from a checkpoint at another layout therefore sees the same batches
and continues the same training (equal up to the reduction order of the sums).
"""
import argparse
import os
import re
import sys

import torch
import torch.distributed as dist

MESHES = ("dp,tp", "dp,ep", "ep,tp", "dp,ep,tp", "tp", "ep", "dp", "none")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="dp,tp", choices=MESHES, metavar="|".join(MESHES),
                        help="mesh dimension names, outermost first; 'none': one process, no parallelism")
    parser.add_argument("--shape", default=None,
                        help="mesh sizes, e.g. 2,2 (default: 2 for every dimension but the first, which takes "
                             "the rest of the world)")
    parser.add_argument("--steps", type=int, default=20, help="train until this step (a resumed run counts on)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (the global batch)")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-norm", type=float, default=1.0, help="gradient clipping")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--bf16", action="store_true",
                        help="mixed precision: FSDP2 computes in bf16, keeps float32 master weights and sums "
                             "gradients in float32, the routers stay float32 (needs 'dp' in the mesh)")
    parser.add_argument("--blocks", default="tpmoe", choices=("tpmoe", "transformers"),
                        help="whose MoE blocks run: tpmoe's, or transformers' own (the plain-PyTorch baseline; "
                             "data parallel only: --mesh dp or none)")
    parser.add_argument("--seed", type=int, default=0, help="the model's weights and the data")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--moe-intermediate-size", type=int, default=21,
                        help="each expert's I; odd on purpose: uneven TP shards")
    parser.add_argument("--checkpoint", default=None, help="directory for distributed checkpoints (DIR/step-N)")
    parser.add_argument("--save-every", type=int, default=0, help="save every N steps (0: never)")
    parser.add_argument("--resume", default=None,
                        help="a checkpoint to load, at whatever layout this run has: DIR/step-N, or DIR (its "
                             "latest step-N)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "layers", "experts", "moe_intermediate_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.seq_len < 2:
        parser.error(f"--seq-len: expected at least 2 (a token and the next one to predict), got {args.seq_len}")
    if args.save_every < 0:
        parser.error(f"--save-every: expected 0 (never) or a positive integer, got {args.save_every}")
    if args.save_every and not args.checkpoint:
        parser.error("--save-every needs --checkpoint DIR")
    if args.resume and not os.path.exists(args.resume):
        parser.error(f"--resume: {args.resume!r} does not exist")
    args.names = () if args.mesh == "none" else tuple(args.mesh.split(","))
    if args.shape is not None:
        try:
            args.shape = tuple(int(size) for size in args.shape.split(","))
        except ValueError:
            parser.error(f"--shape: expected comma-separated integers such as 2,2, got {args.shape!r}")
        if len(args.shape) != len(args.names) or any(size < 1 for size in args.shape):
            parser.error(f"--shape: expected {len(args.names)} positive sizes for --mesh {args.mesh}, "
                         f"got {args.shape}")
    if args.blocks == "transformers" and ("tp" in args.names or "ep" in args.names):
        parser.error(f"--blocks transformers: its blocks run data parallel only (--mesh dp or none), got --mesh "
                     f"{args.mesh}")
    if args.bf16 and "dp" not in args.names:
        parser.error(f"--bf16: FSDP2's mixed precision needs 'dp' in --mesh, got {args.mesh}")
    args.parser = parser
    return args


def mesh_shape(args, world_size: int):
    """--shape, or the default: 2 for every dimension after the first, the first the rest."""
    if not args.names:
        if world_size != 1:
            raise ValueError(f"--mesh none: expected one process, got a world of {world_size}")
        return ()
    if args.shape is not None:
        shape = args.shape
    else:
        rest = 2 ** (len(args.names) - 1)
        shape = (world_size // rest,) + (2,) * (len(args.names) - 1)
    if int(torch.tensor(shape).prod()) != world_size:
        raise ValueError(f"--shape: {','.join(map(str, shape))} ({' x '.join(args.names)}) is not the world size "
                         f"{world_size}; pass --shape with sizes whose product is {world_size}")
    return shape


def build_model(args, device):
    """A tiny Qwen3-MoE from its config, tpmoe's blocks swapped in (still one-process)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    import tpmoe.hf

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=args.layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                            moe_intermediate_size=args.moe_intermediate_size, num_experts=args.experts,
                            num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False, use_cache=False,
                            # SDPA keeps float64 in float64 (the eager attention's softmax rounds to float32).
                            attn_implementation="sdpa")
    # The same seed on every rank: every rank builds the same model (tpmoe.parallelize also
    # broadcasts the blocks' weights from the mesh's first rank).
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(config).to(device=device, dtype=DTYPES[args.dtype])
    if args.blocks == "tpmoe":
        tpmoe.hf.apply(model)
    else:
        # transformers' eager loop: the plain-PyTorch baseline (its grouped_mm path refuses odd
        # expert sizes in bf16 on CPU: "strides should be multiple of 16 bytes").
        model.set_experts_implementation("eager")
    return model


def router_parameters(module):
    """The routers' parameters of the tpmoe blocks inside `module`: under --bf16 they stay
    float32 (FSDP2 leaves them alone: its MixedPrecisionPolicy would hand the block a bf16 copy)."""
    from tpmoe import MoEBlock

    return [getattr(block, name) for block in module.modules() if isinstance(block, MoEBlock)
            for name in ("router_weight", "router_bias") if hasattr(block, name)]


def parallelize(model, mesh, args):
    """tpmoe over "tp" / "ep", then FSDP2 over "dp" (per decoder layer, then the root)."""
    import tpmoe

    if args.bf16:
        import dataclasses

        from tpmoe import MoEBlock

        # The routing decision in float32 (as DeepSeek-V3 ships it): FSDP2 hands the blocks bf16
        # weights and inputs, and bf16 logits would tie and flip experts on rounding alone.
        for block in model.modules():
            if isinstance(block, MoEBlock):
                block.config = dataclasses.replace(block.config, router_dtype=torch.float32)
    if mesh is None:
        return model
    if "tp" in args.names or "ep" in args.names:
        tpmoe.parallelize(model, mesh)
    if "dp" in args.names:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute, float32 sums; the master weights (and AdamW's state) stay float32.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 \
            else MixedPrecisionPolicy()
        # Under --bf16 the routers stay whole, float32 and outside FSDP2 (its policy casts every
        # parameter of a unit): compute_gradients sums their gradients over "dp" itself.
        kept = set(router_parameters(model)) if args.bf16 else set()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"], mp_policy=policy, ignored_params=kept & set(layer.parameters()))
        fully_shard(model, mesh=mesh["dp"], mp_policy=policy, ignored_params=kept)
        for module in list(model.model.layers) + [model]:
            # The loss is already divided by the global token count: FSDP2 must sum, not average.
            module.set_gradient_divide_factor(1.0)
            # A plain SUM in the collective: FSDP2 would otherwise ask for PREMUL_SUM(1 / factor),
            # which gloo lacks (and which multiplies by 1 here anyway).
            module.set_force_sum_reduction_for_comms(True)
    return model


def global_batch(args, step: int, vocab_size: int, device):
    """The step's whole batch, the same on every rank: counting sequences x_{t+1} = x_t + k
    (mod vocab), start and k random per row (learnable: k shows after two tokens)."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    start = torch.randint(vocab_size, (args.batch, 1), generator=generator)
    stride = torch.randint(1, 4, (args.batch, 1), generator=generator)
    return ((start + stride * torch.arange(args.seq_len)) % vocab_size).to(device)


def data_coordinates(mesh, args):
    """(this rank's data shard, how many): ranks of "dp" and "ep" hold different rows, "tp" the same."""
    index, count = 0, 1
    for name in ("dp", "ep"):
        if name in args.names:
            index, count = index * mesh[name].size() + mesh[name].get_local_rank(), count * mesh[name].size()
    return index, count


def local_rows(args, mesh, ids):
    index, count = (0, 1) if mesh is None else data_coordinates(mesh, args)
    if count > args.batch:
        raise ValueError(f"--batch: {args.batch} sequences for {count} data-parallel shards (dp x ep); expected "
                         f"at least one each")
    return torch.tensor_split(ids, count)[index]


def compute_gradients(model, mesh, args, step: int) -> float:
    """Forward and backward of the step's batch, then the sums over ranks that make every
    gradient the one-process model's (its slice of it); returns the global mean loss."""
    import tpmoe
    import tpmoe.hf
    from tpmoe.distributed import allreduce_gradients

    device = next(model.parameters()).device
    vocab_size = model.config.vocab_size
    ids = local_rows(args, mesh, global_batch(args, step, vocab_size, device))
    global_tokens = args.batch * (args.seq_len - 1)
    logits = model(input_ids=ids).logits
    # Summed over this rank's tokens, divided by the GLOBAL count: the sums over ranks below
    # then give the global mean loss's gradient, whatever the rows per rank.
    # At least float32 (bf16 logits under --bf16), float64 kept as it is.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss_sum = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab_size), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
    (loss_sum / global_tokens).backward()  # FSDP2 sums over "dp" inside
    if mesh is not None:
        tpmoe.allreduce_router_grads(model)  # the blocks' replicated parameters over "ep" (nothing under TP)
        if args.bf16 and "dp" in args.names:  # the float32 routers FSDP2 leaves alone: their "dp" sum
            allreduce_gradients(router_parameters(model), mesh.get_group("dp"), kind="DP")
        if "ep" in args.names:  # attention, embeddings, norms: this EP rank's tokens only
            allreduce_gradients(tpmoe.hf.data_parallel_parameters(model), mesh.get_group("ep"), kind="EP")
    reported = loss_sum.detach().double()
    if mesh is not None:
        # For printing: every token's loss once (one rank of each TP group contributes).
        if "tp" in args.names and mesh["tp"].get_local_rank() != 0:
            reported = torch.zeros_like(reported)
        dist.all_reduce(reported)
    return reported.item() / global_tokens


def train_step(model, optimizer, mesh, args, step: int):
    """One step; returns (the global mean loss, the one-process gradient norm before clipping)."""
    from tpmoe.distributed import clip_grad_norm_

    loss = compute_gradients(model, mesh, args, step)
    norm = clip_grad_norm_(model, args.max_norm)  # the one-process norm, whatever the layout
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm.item()


def state(model, optimizer, step: int):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state, "progress": {"step": torch.tensor(step)}}


def save(model, optimizer, step: int, directory: str):
    """A distributed checkpoint (every rank writes its shards) at DIR/step-N."""
    import torch.distributed.checkpoint as dcp

    path = os.path.join(directory, f"step-{step}")
    dcp.save(state(model, optimizer, step), checkpoint_id=path)
    return path


def checkpoint_path(path: str) -> str:
    """DIR/step-N as given, or the latest step-N inside DIR."""
    steps = [(int(m.group(1)), name) for name in (os.listdir(path) if os.path.isdir(path) else [])
             if (m := re.fullmatch(r"step-(\d+)", name))]
    if steps:
        return os.path.join(path, max(steps)[1])
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"--resume: {path!r} is neither a checkpoint (no .metadata) nor a directory of "
                                f"step-N checkpoints")
    return path


def load(model, optimizer, path: str) -> int:
    """Loads a checkpoint saved at any layout into this one (DCP reshards); returns its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    loaded = state(model, optimizer, 0)
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    return int(loaded["progress"]["step"])


def _progress(args, first: int, show: bool):
    """A tqdm bar on rank 0 when tqdm is installed (optional); None otherwise."""
    if not show or args.no_progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=args.steps, initial=first, desc="train", unit="step", dynamic_ncols=True)


def setup(args):
    """(model, AdamW, mesh or None) at this run's layout, on the caller's process group (none
    needed for --mesh none)."""
    from torch.distributed.device_mesh import init_device_mesh

    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    shape = mesh_shape(args, world_size)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=args.names) if args.names else None
    model = parallelize(build_model(args, device), mesh, args)
    # After parallelize and fully_shard: the optimizer must see the final (DTensor) parameters.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    return model, optimizer, mesh


def train(args, log=print):
    """Sets up, loads --resume, trains to --steps, saves every --save-every. Returns (model,
    optimizer, {step: (loss, grad norm)})."""
    model, optimizer, mesh = setup(args)
    shape = tuple(mesh.shape) if mesh is not None else ()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    first = 0
    if args.resume:
        path = checkpoint_path(args.resume)
        first = load(model, optimizer, path)
        if rank0:
            log(f"resumed from {path} at step {first} (mesh {args.mesh} {shape})")
    bar = _progress(args, first, rank0)
    write = bar.write if bar is not None else log
    history = {}
    for step in range(first, args.steps):
        loss, norm = train_step(model, optimizer, mesh, args, step)
        history[step] = (loss, norm)
        if rank0:
            write(f"step {step:4d}  loss {loss:.6f}  grad norm {norm:.4f}")
            if bar is not None:
                bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0:
            path = save(model, optimizer, step + 1, args.checkpoint)
            if rank0:
                write(f"saved {path}")
    if bar is not None:
        bar.close()
    return model, optimizer, history


def main(argv=None):
    args = parse_args(argv)
    if "RANK" not in os.environ:
        args.parser.error("start it with torchrun, which sets RANK and WORLD_SIZE for each process: "
                          "torchrun --nproc-per-node 4 examples/train_fsdp_tp.py")
    from tpmoe.distributed import destroy_process_group_collected

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        mesh_shape(args, dist.get_world_size())
    except ValueError as error:
        if dist.get_rank() == 0:
            print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        dist.destroy_process_group()
        sys.exit(2)
    model, optimizer, _ = train(args)
    # Every rank past its last collective, then nothing here referencing the groups, before they
    # are destroyed while the interpreter is alive (see destroy_process_group_collected).
    dist.barrier()
    del model, optimizer
    destroy_process_group_collected()


if __name__ == "__main__":
    main()

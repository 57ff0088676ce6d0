"""Which process group is the tensor-parallel (TP) group: a ProcessGroup, the TP dimension of
a DeviceMesh, or None (one process, no communication)."""
import contextlib
import gc
import socket
from typing import Callable, Optional, TypeVar, Union

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A tpmoe collective failed on this rank: another rank of the TP group raised, exited or
    did not reach the same collective within the process group's timeout. The message names
    the collective, the group and this rank; the transport's own error is chained (__cause__)."""


@contextlib.contextmanager
def naming_collective_failures(what: str, group, kind: str = "TP"):
    """Re-raises a failure of the collective(s) inside as CollectiveError naming `what` (and the
    kind of group, "TP" or "EP").

    A peer that raised or exited shows up in gloo/NCCL as "Connection closed by peer", "Connection
    reset" or "Timed out waiting ... ms": true, but silent about which tpmoe step was waiting and
    why. Only the collective call itself goes inside, so a local bug is never relabelled."""
    rank, size = group_rank(group), group_size(group)
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:
        raise CollectiveError(
            f"{what}: the collective over the {kind} group (this rank {rank} of {size}) failed: another rank "
            f"raised, exited or did not reach the same collective within the process group's timeout; "
            f"look for the first error on the other ranks. Transport error: {error}") from error


def destroy_process_group_collected() -> None:
    """dist.destroy_process_group(), with the garbage collected before and after.

    Modules and autograd graphs in reference cycles keep the process group alive past
    destroy_process_group() until the interpreter's final collection; gloo's worker threads can
    then run during finalization, where taking the GIL aborts the process ("terminate called
    without an active exception", about one run in 10 of the torchrun example on a loaded 2-core
    machine; pytorch/pytorch#179291). Collected here, the group goes while the interpreter is alive.
    """
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_Result = TypeVar("_Result")


def run_on_free_port(run: Callable[[int], _Result], failure_type: type = Exception, attempts: int = 3) -> _Result:
    """run(port) with a port from free_port(), retried on a new port when it raises a
    `failure_type` saying "address already in use" (the launcher's RankFailure, the test
    spawner's AssertionError: each reports a rank's traceback its own way).

    The port is released before the ranks start, so another process may take it before rank 0
    binds it again: the ranks then fail at once, and a new port fixes it."""
    for attempt in range(attempts):
        try:
            return run(free_port())
        except failure_type as failure:
            if attempt == attempts - 1 or "address already in use" not in str(failure).lower():
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def resolve_tp_group(group, mesh_dim: Optional[Union[str, int]] = None):
    """ProcessGroup | DeviceMesh | None -> ProcessGroup | None.

    A 1-D DeviceMesh is its own TP group; an N-D one needs `mesh_dim` (name or index of the TP
    dimension), as `DeviceMesh.get_group` does.
    """
    if group is None:
        if mesh_dim is not None:
            raise ValueError(f"tp_mesh_dim: only used with a DeviceMesh group, got {mesh_dim!r} with group=None")
        return None
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if mesh_dim is None and group.ndim != 1:
            raise ValueError(f"tp_mesh_dim: the DeviceMesh has {group.ndim} dimensions "
                             f"{group.mesh_dim_names}; expected the name or index of its TP dimension (or a "
                             f"dimension named 'tp' or 'ep'), got None")
        return group.get_group(mesh_dim) if mesh_dim is not None else group.get_group()
    if isinstance(group, dist.ProcessGroup):
        if mesh_dim is not None:
            raise ValueError(f"tp_mesh_dim: only used with a DeviceMesh group, got {mesh_dim!r} with a ProcessGroup")
        return group
    raise TypeError(f"group: expected a torch.distributed ProcessGroup, a DeviceMesh or None, "
                    f"got {type(group).__name__}")


def _mesh_dim(mesh, dim, argument: str):
    """`dim` (a name or an index) checked against the mesh's dimensions."""
    names = tuple(mesh.mesh_dim_names or ())
    if isinstance(dim, int) and not isinstance(dim, bool):
        if not 0 <= dim < mesh.ndim:
            raise ValueError(f"{argument}: expected a dimension index in [0, {mesh.ndim}) of the DeviceMesh, got {dim}")
        return dim
    if not isinstance(dim, str) or dim not in names:
        raise ValueError(f"{argument}: expected the name of a dimension of the DeviceMesh (its dimensions: "
                         f"{names or 'unnamed'}), got {dim!r}")
    return names.index(dim)


EP_DIM_NAME, TP_DIM_NAME = "ep", "tp"


def mesh_dims_by_name(mesh, tp_mesh_dim=None, ep_mesh_dim=None):
    """(tp_mesh_dim, ep_mesh_dim) of a DeviceMesh: THE rule by which MoEBlock and tpmoe.hf.apply
    read a mesh. A keyword given wins for its role; a role not given goes to the dimension of that
    name: "ep" is expert parallel, "tp" tensor parallel. Every other dimension is left alone: it is
    data parallel (each of its ranks runs its own tokens; see docs/design.md for who sums which
    gradient over it). A 1-D mesh named neither is its own TP group (resolve_tp_group)."""
    names = tuple(mesh.mesh_dim_names or ())
    if ep_mesh_dim is None and EP_DIM_NAME in names and tp_mesh_dim != EP_DIM_NAME:
        ep_mesh_dim = EP_DIM_NAME
    if tp_mesh_dim is None and TP_DIM_NAME in names and ep_mesh_dim != TP_DIM_NAME:
        tp_mesh_dim = TP_DIM_NAME
    return tp_mesh_dim, ep_mesh_dim


def resolve_groups(group, tp_mesh_dim=None, ep_group=None, ep_mesh_dim=None):
    """(TP group or None, EP group or None) from a block's arguments.

    A DeviceMesh `group` is read by mesh_dims_by_name: its "ep" dimension is the EP group and its
    "tp" dimension the TP group unless `ep_mesh_dim` / `tp_mesh_dim` name others; other dimensions
    are left alone (data parallel). Without EP this is resolve_tp_group. With EP, no TP dimension
    means the experts stay whole on their EP rank. With ProcessGroups: `ep_group` and `group`
    (None: no TP). Raises naming the argument when a named dimension is missing or both name one.
    """
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh) and ep_group is None:
        tp_mesh_dim, ep_mesh_dim = mesh_dims_by_name(group, tp_mesh_dim, ep_mesh_dim)
    if ep_group is None and ep_mesh_dim is None:
        return resolve_tp_group(group, tp_mesh_dim), None
    if ep_mesh_dim is not None:
        if ep_group is not None:
            raise ValueError("ep_group: expected None with ep_mesh_dim (the EP group is the mesh's dimension), got a "
                             "group")
        if not isinstance(group, DeviceMesh):
            raise ValueError(f"ep_mesh_dim: only used with a DeviceMesh group, got {ep_mesh_dim!r} with "
                             f"{type(group).__name__}; pass ep_group= with ProcessGroups")
        ep_dim = _mesh_dim(group, ep_mesh_dim, "ep_mesh_dim")
        if tp_mesh_dim is None:
            return None, group.get_group(ep_dim)
        tp_dim = _mesh_dim(group, tp_mesh_dim, "tp_mesh_dim")
        if tp_dim == ep_dim:
            raise ValueError(f"tp_mesh_dim: expected a dimension other than the EP one ({ep_mesh_dim!r}), got "
                             f"{tp_mesh_dim!r}")
        return group.get_group(tp_dim), group.get_group(ep_dim)
    if not isinstance(ep_group, dist.ProcessGroup):
        raise TypeError(f"ep_group: expected a torch.distributed ProcessGroup (or a DeviceMesh as group with "
                        f"ep_mesh_dim), got {type(ep_group).__name__}")
    if isinstance(group, DeviceMesh):
        raise ValueError("group: a DeviceMesh with ep_group; name the mesh's EP dimension with ep_mesh_dim instead")
    return resolve_tp_group(group, tp_mesh_dim), ep_group


def check_groups_disjoint(tp_group, ep_group) -> None:
    """Raises ValueError unless this rank is the only rank its TP and EP groups share: a TP group
    spans the ranks holding the same tokens and experts, an EP group one TP rank of each expert
    range, so a rank in both twice would be asked for two roles."""
    if tp_group is None or ep_group is None:
        return
    me = dist.get_rank()
    shared = sorted(set(dist.get_process_group_ranks(tp_group)) & set(dist.get_process_group_ranks(ep_group)))
    if shared != [me]:
        raise ValueError(f"ep_group: expected a group sharing only this rank ({me}) with the TP group, got one "
                         f"sharing the ranks {shared}; the EP group holds one rank of each EP rank's TP group "
                         f"(a DeviceMesh of dimensions ('ep', 'tp') builds both)")


def group_size(group) -> int:
    """World size of the TP group; 1 for None."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside the TP group; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def communicates(group) -> bool:
    """Whether a collective over `group` would move anything. Like Megatron, the TP Functions
    skip their collectives in a group of one: a sum over one rank is the identity."""
    return group is not None and dist.get_world_size(group) > 1


def collective_device(group) -> torch.device:
    """Where a tensor built on the host (a check's integers) must be to travel through `group`:
    the device torch's own object collectives (all_gather_object) pick, the CPU for gloo and the
    current accelerator for NCCL."""
    kind = dist.distributed_c10d._get_object_coll_device(group)
    return torch.device(kind) if kind == "cpu" else torch.device(kind, torch.accelerator.current_device_index())


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single (the old names
# warn). Looked up at each call, so a wrapper installed on torch.distributed sees every call.
def all_gather_single(output, input, group):
    """Concatenation along dim 0 of every rank's `input` into `output` (one collective)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def reduce_scatter_single(output, input, group):
    """Rank p receives the sum over ranks of chunk p (along dim 0) of `input` (one collective)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, input, op=dist.ReduceOp.SUM, group=group)

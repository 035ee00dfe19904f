"""Shared helpers for ckptio's PyTorch Distributed Checkpoint (DCP) interop scripts.

Imported by dcp_save.py and dcp_load.py; not run on its own.

    full_state(seed)        the deterministic full (unsharded) state, plain tensors, nested
    shard_plan(name)        the dimension dcp_save.py shards a tensor along, or None (replicated)
    compare(expected, got)  human-readable differences; an empty list means exactly equal
    spawn_gloo(fn, world, *args)
                            runs fn(rank, world, *args) in `world` gloo processes on 127.0.0.1

In DCP's flattened names the state reads: model.w0, model.w1, model.emb (sharded tensors),
model.bias, model.scalar (replicated tensors), model.blocks.0, model.blocks.1 (a list of
tensors is flattened item by item), optim.step, optim.lr, optim.names, epoch (plain values,
stored as pickled bytes items; a list without tensors stays one item).
"""

import datetime
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

# Imported here so that forked ranks inherit it instead of importing it again.
import torch.distributed.checkpoint  # noqa: F401

# Dimension each sharded tensor is split along, by its dotted name inside "model".
_SHARD_DIMS = {"w0": 0, "w1": 1, "emb": 0, "blocks.0": 1, "blocks.1": 0}

PG_TIMEOUT = datetime.timedelta(seconds=60)


def full_state(seed):
    """The full state for `seed`; every process that calls it gets the same values."""
    g = torch.Generator().manual_seed(seed)
    model = {
        "w0": torch.randn(13, 7, generator=g),
        "w1": torch.randn(6, 10, generator=g).to(torch.bfloat16),
        "emb": torch.randint(-(2**40), 2**40, (9, 4), generator=g, dtype=torch.int64),
        "bias": torch.randn(5, generator=g),
        "scalar": torch.randn((), generator=g),
        "blocks": [torch.randn(4, 3, generator=g), torch.randn(8, generator=g)],
    }
    return {
        "model": model,
        "optim": {"step": 3, "lr": 0.1, "names": ["a", "b"]},
        "epoch": 2,
    }


def shard_plan(name):
    """Shard dimension of the tensor at dotted `name` ("w0", "model.blocks.0"), None if replicated."""
    if name.startswith("model."):
        name = name[len("model."):]
    return _SHARD_DIMS.get(name)


def _full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def compare(expected, got, path="state"):
    """Differences between `expected` and `got`: dtype, shape and values of tensors (exact),
    nesting (container type, keys, lengths) and plain values (type and ==).

    A DTensor in `got` is compared through .full_tensor(), a collective: every rank of its mesh
    must call compare on the same structure.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return [f"{path}: expected a tensor, got {type(got).__name__}"]
        got = _full(got)
        if got.dtype != expected.dtype:
            return [f"{path}: dtype {got.dtype}, expected {expected.dtype}"]
        if got.shape != expected.shape:
            return [f"{path}: shape {list(got.shape)}, expected {list(expected.shape)}"]
        if not torch.equal(got, expected):
            n = int((got != expected).sum())
            return [f"{path}: {n} of {expected.numel()} values differ"]
        return []
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return [f"{path}: expected a dict, got {type(got).__name__}"]
        out = []
        if set(got) != set(expected):
            missing = sorted(map(str, set(expected) - set(got)))
            extra = sorted(map(str, set(got) - set(expected)))
            out.append(f"{path}: missing keys {missing}, extra keys {extra}")
        for k in expected:
            if k in got:
                out += compare(expected[k], got[k], f"{path}.{k}")
        return out
    if isinstance(expected, (list, tuple)):
        if type(got) is not type(expected):
            return [f"{path}: expected a {type(expected).__name__}, got {type(got).__name__}"]
        if len(got) != len(expected):
            return [f"{path}: length {len(got)}, expected {len(expected)}"]
        out = []
        for i, (e, v) in enumerate(zip(expected, got)):
            out += compare(e, v, f"{path}.{i}")
        return out
    if type(got) is not type(expected) or got != expected:
        return [f"{path}: {got!r} ({type(got).__name__}), expected {expected!r}"]
    return []


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=PG_TIMEOUT,
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, world, *args):
    """Runs fn(rank, world, *args) in `world` processes joined in one gloo group.

    torch.multiprocessing.start_processes, the function mp.spawn wraps, with the "fork" start
    method where the platform has it: the ranks inherit the imported torch instead of each
    importing it again, which halves the run time on a 2-core machine ("spawn" elsewhere).
    Raises (torch.multiprocessing.ProcessRaisedException / ProcessExitedException) when a
    process fails; the others are then terminated, so the caller never hangs.
    """
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _entry,
        args=(fn, world, free_port(), args),
        nprocs=world,
        join=True,
        start_method=method,
    )


def cpu_mesh(world):
    """A 1-D CPU DeviceMesh over ranks 0..world-1."""
    return DeviceMesh("cpu", list(range(world)))

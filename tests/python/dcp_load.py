"""Reads a PyTorch Distributed Checkpoint (DCP) directory with PyTorch and checks it against the
full state it should hold, for ckptio's interop tests (the directory may be written by anyone).

    dcp_load.py DIR EXPECTED_PT --world N [--shard-dim-0 | --layout {dim0,plan}]
    dcp_load.py DIR --metadata-only

EXPECTED_PT is a torch.save of the full state (plain tensors), e.g. the DIR.expected.pt that
dcp_save.py writes; it is read with weights_only=True.

N == 1, one process and no process group:
  1. the template is the expected state with every tensor replaced by zeros_like and every other
     value by None (DCP plans a bytes item for any non-tensor leaf, whatever its value, and
     load sets the unpickled value in its place); torch.distributed.checkpoint.load(template,
     checkpoint_id=DIR) fills it, then it is compared with the expected state;
  2. torch.distributed.checkpoint.format_utils.dcp_to_torch_save(DIR, tmp) followed by
     torch.load(tmp, weights_only=False) is compared with the expected state as it is: the
     converter rebuilds the nesting from the checkpoint's planner_data (dicts, and lists for
     flattened lists of tensors such as model.blocks.0), so no unflattening is needed here.
N > 1, N gloo processes on 127.0.0.1: the template holds every tensor with ndim >= 1 as a
  DTensor of zeros on a CPU DeviceMesh of the N ranks, sharded Shard(0) (--layout dim0, the
  default; --shard-dim-0 says the same), or as dcp_save.py shards it (--layout plan: the
  dimension dcp_state.shard_plan gives, plain tensors for the replicated ones, Shard(0) for
  names it does not know); 0-dim tensors stay plain. Every rank loads and compares the
  DTensors' full_tensor() with the expected state.

Prints one JSON line {"ok": bool, "world": N, "differences": [...]}; exit code 1 when not ok.
A load that raises is reported as a difference. --metadata-only prints DIR/.metadata as JSON
instead (version, tensor and bytes entries with their chunks, where each chunk is stored,
planner_data).
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dcp_state import compare, cpu_mesh, shard_plan, spawn_gloo  # noqa: E402

import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: E402

# What a failed load raises: DCP's CheckpointException derives from BaseException, not Exception.
LOAD_ERRORS = (Exception, CheckpointException)

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def map_leaves(tree, fn, path=()):
    """`tree` with every non-container leaf replaced by fn(path, leaf)."""
    if isinstance(tree, dict):
        return {k: map_leaves(v, fn, path + (str(k),)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_leaves(v, fn, path + (str(i),)) for i, v in enumerate(tree))
    return fn(path, tree)


def failure(what, err):
    """`what` failed with `err`: the message (a CheckpointException's holds every rank's
    traceback) and the innermost frames."""
    return f"{what} failed: {type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}".rstrip()


def load_single(directory, expected):
    """Differences of the one-process load and of dcp_to_torch_save."""
    template = map_leaves(
        expected,
        lambda _, v: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None,
    )
    try:
        dcp.load(template, checkpoint_id=directory)
        diffs = compare(expected, template, "load")
    except LOAD_ERRORS as e:
        diffs = [failure("dcp.load", e)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "converted.pt")
        try:
            dcp_to_torch_save(directory, path)
            diffs += compare(expected, torch.load(path, weights_only=False), "dcp_to_torch_save")
        except LOAD_ERRORS as e:
            diffs.append(failure("dcp_to_torch_save", e))
    return diffs


def template_leaf(mesh, layout):
    from torch.distributed.tensor import Shard, zeros

    def leaf(path, value):
        if not isinstance(value, torch.Tensor):
            return None
        if value.ndim == 0:
            return torch.zeros_like(value)
        dim = 0
        if layout == "plan":
            name = ".".join(path)
            dim = shard_plan(name) if name.startswith("model.") else 0
            if dim is None:
                return torch.zeros_like(value)
        return zeros(*value.shape, dtype=value.dtype, device_mesh=mesh, placements=[Shard(dim)])

    return leaf


def load_rank(rank, world, directory, expected_pt, layout, result_path):
    warnings.simplefilter("ignore")
    expected = torch.load(expected_pt, weights_only=True)
    template = map_leaves(expected, template_leaf(cpu_mesh(world), layout))
    try:
        dcp.load(template, checkpoint_id=directory)
        diffs = []
    except LOAD_ERRORS as e:
        diffs = [failure(f"rank {rank}: dcp.load", e)]
    # Compare only when every rank loaded: compare's full_tensor() calls are collectives.
    loaded = [None] * world
    dist.all_gather_object(loaded, not diffs)
    if all(loaded):
        diffs = [f"rank {rank}: {d}" for d in compare(expected, template, "load")]
    gathered = [None] * world
    dist.all_gather_object(gathered, diffs)
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump([d for rank_diffs in gathered for d in rank_diffs], f)


def load_distributed(directory, expected_pt, world, layout):
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "differences.json")
        try:
            spawn_gloo(load_rank, world, directory, expected_pt, layout, result_path)
        except Exception as e:
            return [f"a rank failed: {type(e).__name__}: {e}"]
        with open(result_path) as f:
            return json.load(f)


def jsonable(value):
    """Metadata objects (dataclasses, torch.Size, dtypes, paths) as plain JSON values."""
    if dataclasses.is_dataclass(value):
        out = {"type": type(value).__name__}
        for field in dataclasses.fields(value):
            out[field.name] = jsonable(getattr(value, field.name))
        return out
    if isinstance(value, dict):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def describe_metadata(directory):
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(directory).read_metadata()
    storage = [
        {"index": jsonable(index), "info": jsonable(info)}
        for index, info in md.storage_data.items()
    ]
    return {
        "version": md.version,
        "state_dict_metadata": jsonable(md.state_dict_metadata),
        "storage_data": storage,
        "planner_data": jsonable(md.planner_data),
        "storage_meta": jsonable(md.storage_meta),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("expected_pt", nargs="?")
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--layout", choices=["dim0", "plan"], default="dim0")
    ap.add_argument("--shard-dim-0", dest="layout", action="store_const", const="dim0")
    ap.add_argument("--metadata-only", action="store_true")
    args = ap.parse_args()
    if args.metadata_only:
        print(json.dumps(describe_metadata(args.dir)))
        return
    if args.expected_pt is None:
        ap.error("EXPECTED_PT is required unless --metadata-only")
    if args.world < 1:
        ap.error("--world must be at least 1")
    if args.world == 1:
        diffs = load_single(args.dir, torch.load(args.expected_pt, weights_only=True))
    else:
        diffs = load_distributed(args.dir, args.expected_pt, args.world, args.layout)
    print(json.dumps({"ok": not diffs, "world": args.world, "differences": diffs}))
    sys.exit(0 if not diffs else 1)


if __name__ == "__main__":
    main()

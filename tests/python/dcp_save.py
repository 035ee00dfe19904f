"""Writes a sharded PyTorch Distributed Checkpoint (DCP) with N gloo processes, for ckptio's
interop tests.

    dcp_save.py OUT_DIR --world N [--seed S]

Every rank builds dcp_state.full_state(S), turns the tensors that dcp_state.shard_plan names
into DTensors sharded over a CPU DeviceMesh of the N ranks (uneven splits included), keeps the
others as plain tensors (replicated: DCP stores one copy) and calls
torch.distributed.checkpoint.save(state, checkpoint_id=OUT_DIR).
Rank 0 also writes OUT_DIR.expected.pt = torch.save(full_state(S)) with plain tensors.

Prints one JSON line {"ok": true, "world": N, "files": [sorted names in OUT_DIR]}; exit code 0.
A failure raises (exit code 1).
"""

import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dcp_state import cpu_mesh, full_state, shard_plan, spawn_gloo  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def expected_path(out_dir):
    return os.path.normpath(out_dir) + ".expected.pt"


def sharded_state(seed, mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    state = full_state(seed)
    model = state["model"]
    for name in ("w0", "w1", "emb", "bias", "scalar"):
        dim = shard_plan(name)
        if dim is not None:
            model[name] = distribute_tensor(model[name], mesh, [Shard(dim)])
    model["blocks"] = [
        distribute_tensor(t, mesh, [Shard(shard_plan(f"blocks.{i}"))])
        for i, t in enumerate(model["blocks"])
    ]
    return state


def save_rank(rank, world, out_dir, seed):
    import torch.distributed.checkpoint as dcp

    warnings.simplefilter("ignore")
    state = sharded_state(seed, cpu_mesh(world))
    dcp.save(state, checkpoint_id=out_dir)
    if rank == 0:
        torch.save(full_state(seed), expected_path(out_dir))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.world < 1:
        ap.error("--world must be at least 1")
    spawn_gloo(save_rank, args.world, args.out_dir, args.seed)
    files = sorted(os.listdir(args.out_dir))
    print(json.dumps({"ok": True, "world": args.world, "files": files}))


if __name__ == "__main__":
    main()

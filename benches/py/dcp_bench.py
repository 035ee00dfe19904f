#!/usr/bin/env python3
"""torch.distributed.checkpoint's side of the DCP benchmark (examples/dcp_bench.rs runs it).

    dcp_bench.py save --world N --dir DIR [--size-mib 1024] [--tensors 8] [--cols 1024]
                      [--rounds 3] [--keep KEEP]
    dcp_bench.py load --job L:CKPT [--job L:CKPT ...] [--size-mib ...] [--rounds 3] [--warm]

The state is the one examples/dcp_bench.rs saves: --tensors float32 tensors `layer{t}.weight`
of shape [rows, --cols] (--size-mib in all), element [r, c] of tensor t = t * 1e6 + r, each a
DTensor sharded Shard(0) over a CPU DeviceMesh of the ranks (rows split as torch.chunk splits
them). Ranks are gloo processes on 127.0.0.1 (torch.multiprocessing, forked), one thread each.

save: an untimed dcp.save and dcp.async_save first (so that the timed rounds find the
  allocator, the threads and the process group warm, as a training loop's later checkpoints
  do), then
  --rounds rounds of dcp.save and dcp.async_save (default stager, thread executor) into new
  directories under DIR, the order swapped every other round. Each is timed from the first
  rank's start (after a barrier) until the last rank has returned (dcp.save) or its future has
  resolved (async_save): the checkpoint is committed by then. The stall of async_save is the
  time its call takes on each rank. With --keep, the last round's dcp.save directory is kept
  there (with --rounds 0, one untimed dcp.save writes it).
load: for each --job in turn, a template of DTensor zeros (Shard(0) at world L, made before
  the clock starts) is filled by dcp.load from CKPT, once untimed, then --rounds times, each
  timed from the first rank's start to the last rank's end, after
  `echo 3 > /proc/sys/vm/drop_caches` (cold) unless --warm or not root.
  Every rank checks its rows (untimed). Bytes each rank's plan reads are computed from
  CKPT/.metadata: DCP reads every saved chunk that meets a rank's rows whole (the item's
  length in its data file); and measured: the growth of /proc/self/io read_bytes (what the
  rank fetched from the disk, read-ahead included; meaningful when cold), and of its rchar
  (bytes its read system calls returned, whatever the cache).

Prints one JSON line with the figures (seconds, bytes); exit code 0.
"""

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

MIB = 1 << 20


def geometry(args):
    """(tensors, rows, cols) of the state; the same arithmetic as examples/dcp_bench.rs."""
    elems = args.size_mib * MIB // 4
    per_tensor, rest = divmod(elems, args.tensors)
    rows, rest2 = divmod(per_tensor, args.cols)
    if rest or rest2 or rows == 0:
        raise SystemExit(f"{args.size_mib} MiB does not split into {args.tensors} x [rows, {args.cols}] f32")
    return args.tensors, rows, args.cols


def torch_chunk(n, world, rank):
    """torch.chunk's split of n rows into `world` parts: (start, length) of part `rank`."""
    size = max(1, -(-n // world))
    start = min(size * rank, n)
    return start, min(size, n - start)


def rows_of(t, start, length, cols):
    """Rows start..start+length of tensor t of the benchmark's state."""
    col = torch.arange(start, start + length, dtype=torch.float64) + t * 1e6
    return col.to(torch.float32)[:, None].expand(length, cols).contiguous()


def sharded_state(mesh, rank, world, geo, fill):
    tensors, rows, cols = geo
    start, length = torch_chunk(rows, world, rank)
    state = {}
    for t in range(tensors):
        local = rows_of(t, start, length, cols) if fill else torch.zeros(length, cols)
        state[f"layer{t}.weight"] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size([rows, cols]), stride=(cols, 1)
        )
    return state


def proc_io():
    """(rchar, read_bytes) of /proc/self/io: bytes read by system calls, and fetched from disk."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(":") for line in f if ":" in line)
    return int(fields["rchar"]), int(fields["read_bytes"])


def spread(world, fn):
    """(first start, last end) over the ranks of fn's (start, end) on this rank (monotonic clock,
    shared by the processes of one machine)."""
    start, end = fn()
    out = [None] * world
    dist.all_gather_object(out, (start, end))
    return min(s for s, _ in out), max(e for _, e in out)


def timed_save(world, state, ckpt):
    dist.barrier()

    def run():
        t0 = time.monotonic()
        dcp.save(state, checkpoint_id=ckpt)
        return t0, time.monotonic()

    s, e = spread(world, run)
    return e - s


def timed_async_save(world, state, ckpt):
    dist.barrier()
    stall = [0.0]

    def run():
        t0 = time.monotonic()
        fut = dcp.async_save(state, checkpoint_id=ckpt)
        stall[0] = time.monotonic() - t0
        fut.result()
        return t0, time.monotonic()

    s, e = spread(world, run)
    stalls = [None] * world
    dist.all_gather_object(stalls, stall[0])
    return e - s, stalls


def remove(rank, path):
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def save_rank(rank, world, args, result):
    geo = geometry(args)
    state = sharded_state(DeviceMesh("cpu", list(range(world))), rank, world, geo, fill=True)
    if args.rounds > 0:
        warm = os.path.join(args.dir, "torch-warm")
        timed_save(world, state, warm)
        remove(rank, warm)
        timed_async_save(world, state, warm)
        remove(rank, warm)
    out = {"save": [], "async_done": [], "async_stall": []}
    for r in range(args.rounds):
        order = ["save", "async"] if r % 2 == 0 else ["async", "save"]
        for mode in order:
            ckpt = os.path.join(args.dir, f"torch-{mode}-r{r}")
            if mode == "save":
                out["save"].append(timed_save(world, state, ckpt))
            else:
                done, stalls = timed_async_save(world, state, ckpt)
                out["async_done"].append(done)
                out["async_stall"].append(stalls)
            if args.keep and mode == "save" and r == args.rounds - 1:
                dist.barrier()
                if rank == 0:
                    shutil.rmtree(args.keep, ignore_errors=True)
                    os.rename(ckpt, args.keep)
                dist.barrier()
            else:
                remove(rank, ckpt)
    if args.keep and args.rounds == 0:
        timed_save(world, state, args.keep)
    if rank == 0:
        with open(result, "w") as f:
            json.dump(out, f)


def plan_bytes(ckpt, world, geo):
    """Bytes each rank's dcp.load plan reads at world `world`, and the bytes it needs: every saved
    chunk that meets the rank's rows, whole."""
    tensors, rows, cols = geo
    md = FileSystemReader(ckpt).read_metadata()
    read, needed = [0] * world, [0] * world
    for r in range(world):
        start, length = torch_chunk(rows, world, r)
        for t in range(tensors):
            fqn = f"layer{t}.weight"
            needed[r] += length * cols * 4
            for c in md.state_dict_metadata[fqn].chunks:
                lo, n = c.offsets[0], c.sizes[0]
                if lo < start + length and start < lo + n and length > 0:
                    read[r] += md.storage_data[MetadataIndex(fqn, c.offsets)].length
    return read, needed


def drop_caches():
    """Empties the page cache (root only); whether it did."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def load_rank(rank, world, args, result):
    geo = geometry(args)
    tensors, rows, cols = geo
    template = sharded_state(DeviceMesh("cpu", list(range(world))), rank, world, geo, fill=False)
    start, length = torch_chunk(rows, world, rank)
    out = {"secs": [], "rchar": [], "disk_read": [], "cold": not args.warm}
    dcp.load(template, checkpoint_id=args.ckpt)  # untimed first load
    for _ in range(args.rounds):
        for v in template.values():
            v.to_local().zero_()
        if rank == 0 and not args.warm:
            out["cold"] = drop_caches() and out["cold"]
        dist.barrier()
        io0 = proc_io()

        def run():
            t0 = time.monotonic()
            dcp.load(template, checkpoint_id=args.ckpt)
            return t0, time.monotonic()

        s, e = spread(world, run)
        disk = [None] * world
        io1 = proc_io()
        dist.all_gather_object(disk, (io1[0] - io0[0], io1[1] - io0[1]))
        out["secs"].append(e - s)
        out["rchar"].append(sum(d[0] for d in disk))
        out["disk_read"].append(sum(d[1] for d in disk))
        for t in range(tensors):
            if not torch.equal(template[f"layer{t}.weight"].to_local(), rows_of(t, start, length, cols)):
                raise SystemExit(f"rank {rank}: layer{t}.weight holds other values than saved")
    if rank == 0:
        read, needed = plan_bytes(args.ckpt, world, geo)
        out["plan_read"], out["needed"] = sum(read), sum(needed)
        with open(result, "w") as f:
            json.dump(out, f)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entry(rank, fn, world, port, args, result):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, args, result)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world, args):
    """fn(rank, world, args, result) in `world` gloo ranks; what rank 0 wrote to `result`."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory(prefix="dcp-bench-") as tmp:
        result = os.path.join(tmp, "result.json")
        mp.start_processes(
            entry, args=(fn, world, free_port(), args, result), nprocs=world, join=True, start_method=method
        )
        with open(result) as f:
            return json.load(f)


def parse_job(text):
    world, sep, ckpt = text.partition(":")
    if not sep or not world.isdigit() or int(world) < 1 or not ckpt:
        raise argparse.ArgumentTypeError(f"{text!r} is not WORLD:CKPT")
    return int(world), ckpt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["save", "load"])
    ap.add_argument("--world", type=int, help="save: the number of ranks")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", help="save: where the checkpoints go (they are removed)")
    ap.add_argument("--keep", help="save: leave the last dcp.save checkpoint here")
    ap.add_argument("--job", type=parse_job, action="append", default=[],
                    help="load: WORLD:CKPT, load CKPT at WORLD ranks (repeat for more)")
    ap.add_argument("--warm", action="store_true", help="load: leave the page cache as it is")
    args = ap.parse_args()
    geometry(args)
    if args.what == "save":
        if not args.dir or not args.world or args.world < 1:
            ap.error("save needs --dir and --world >= 1")
        out = run_ranks(save_rank, args.world, args)
        out.update(world=args.world)
    else:
        if not args.job:
            ap.error("load needs at least one --job WORLD:CKPT")
        out = {"jobs": []}
        for world, ckpt in args.job:
            job = run_ranks(load_rank, world, argparse.Namespace(**vars(args), ckpt=ckpt))
            job.update(world=world, ckpt=ckpt)
            out["jobs"].append(job)
    out.update(what=args.what, torch=torch.__version__)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())

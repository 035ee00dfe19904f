#!/usr/bin/env python3
"""PyTorch peer for `examples/format_bench.rs`: times torch.save / torch.load on the same state
dict layout that the Rust side saves with ckptio.

The state dict is built from a JSON spec (a list of {"name", "dtype", "shape"}), with its own
deterministic content (torch generators seeded with --seed). Only the save/load calls are timed.

Usage:
  format_peer.py serve --spec SPEC.json [--seed N]
      Builds the state dict, prints {"ready": ...} and then answers one JSON command per stdin
      line with one JSON line on stdout (everything else the process prints goes to stderr):
        {"op": "save", "path": P, "fsync": bool}
            -> {"secs": s}   torch.save(sd, P) [+ os.fsync of the file and its directory]
        {"op": "load", "path": P, "mmap": bool}
            -> {"open_secs": s, "touched_secs": s, "checksum": n}
               torch.load(P, weights_only=True[, mmap=True]); "touched" adds reading one byte
               per 4 KiB page of every storage
        {"op": "digests", "path": P | null}
            -> {"tensors": {name: {"dtype", "shape", "sha256"}}}  (null: the in-memory state dict)
        {"op": "quit"}
  format_peer.py digests FILE      one-shot: print the digests of FILE's tensors as JSON
"""

import argparse
import collections
import hashlib
import json
import os
import sys
import time

import torch

PAGE = 4096


def dtype_of(name):
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise SystemExit(f"unknown dtype {name!r}")
    return d


def build_state_dict(spec, seed):
    g = torch.Generator().manual_seed(seed)
    sd = collections.OrderedDict()  # what nn.Module.state_dict() returns
    for item in spec:
        dtype = dtype_of(item["dtype"])
        shape = tuple(item["shape"])
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        else:
            t = torch.randint(-(2**31), 2**31, shape, generator=g, dtype=dtype)
        sd[item["name"]] = t
    return sd


def digest(t):
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(flat.numpy())).hexdigest()


def digests(sd):
    return {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": digest(t)}
        for name, t in sd.items()
    }


def touch(sd):
    """Reads one byte per 4 KiB page of every distinct storage; returns their sum."""
    total = 0
    seen = set()
    for t in sd.values():
        s = t.untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        u8 = torch.empty(0, dtype=torch.uint8).set_(s)
        total += int(u8[::PAGE].sum(dtype=torch.int64))
    return total


def fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def serve(args):
    out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # keep stray prints (warnings) off the protocol channel
    with open(args.spec) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    sd = build_state_dict(spec, args.seed)
    nbytes = sum(t.untyped_storage().nbytes() for t in sd.values())
    reply = {
        "ready": True,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "tensors": len(sd),
        "bytes": nbytes,
        "build_secs": time.perf_counter() - t0,
    }
    print(json.dumps(reply), file=out)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "save":
            path = cmd["path"]
            t0 = time.perf_counter()
            torch.save(sd, path)
            if cmd.get("fsync"):
                fsync_path(path)
                fsync_path(os.path.dirname(os.path.abspath(path)), directory=True)
            reply = {"secs": time.perf_counter() - t0}
        elif op == "load":
            path = cmd["path"]
            t0 = time.perf_counter()
            loaded = torch.load(path, weights_only=True, mmap=bool(cmd.get("mmap")))
            t1 = time.perf_counter()
            checksum = touch(loaded)
            t2 = time.perf_counter()
            del loaded
            reply = {"open_secs": t1 - t0, "touched_secs": t2 - t0, "checksum": checksum}
        elif op == "digests":
            path = cmd.get("path")
            src = sd if path is None else torch.load(path, weights_only=True)
            reply = {"tensors": digests(src)}
            del src
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), file=out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--spec", required=True)
    s.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("digests")
    d.add_argument("file")
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args)
    else:
        print(json.dumps({"tensors": digests(torch.load(args.file, weights_only=True))}))


if __name__ == "__main__":
    main()

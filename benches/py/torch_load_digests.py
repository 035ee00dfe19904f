#!/usr/bin/env python3
"""Loads checkpoints with PyTorch's own reader and prints what it found, for `examples/overlap.rs`.

Usage:
  torch_load_digests.py OUT.json FILE...

Each FILE is loaded with torch.load(FILE, weights_only=True). OUT.json gets
  {"torch": VERSION,
   "files": {FILE: {"ok": true, "step": the top-level "step" (an int) or null,
                    "tensors": {KEY PATH: SHA-256 of the elements, row-major, little-endian}}
            or {"ok": false, "error": MESSAGE}}}
Key paths join dict keys and list indices with dots ("optimizer.state.0.exp_avg"), as ckptio's
`Value::named_tensors` names them, so the two sides compare digest by digest.
"""

import hashlib
import json
import sys
import traceback

import torch


def digest(t):
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def walk(value, path, out):
    if isinstance(value, torch.Tensor):
        out[path] = digest(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            walk(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            walk(v, f"{path}.{i}" if path else str(i), out)


def check(path):
    try:
        tree = torch.load(path, weights_only=True)
    except Exception as e:  # the report carries it; the caller fails the run
        return {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=2)}"}
    tensors = {}
    walk(tree, "", tensors)
    step = tree.get("step") if isinstance(tree, dict) else None
    return {"ok": True, "step": step if isinstance(step, int) else None, "tensors": tensors}


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)
    files = {path: check(path) for path in sys.argv[2:]}
    with open(sys.argv[1], "w") as f:
        json.dump({"torch": torch.__version__, "files": files}, f)


if __name__ == "__main__":
    main()

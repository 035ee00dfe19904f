"""Canonical JSON of a torch.load tree, the same document `ckptio::json::to_json` produces.

- dicts (dict / OrderedDict) whose keys are all strings: JSON objects, in order;
- other dicts: {"$dict": [[key, value], ...]};
- lists, tuples and torch.Size: arrays;
- tensors and Parameters: {"$tensor": {"dtype", "shape", "sha256"}}, the digest over the
  elements in row-major order, little-endian (bool one byte 0/1);
- bytes: {"$bytes": BASE64}; None: null; non-finite floats: "NaN", "Infinity", "-Infinity".

Also the helpers the interop tests share: tensor key paths named like Rust's
`Value::named_tensors()`, storage-sharing groups and per-tensor flags.
"""

import base64
import collections
import hashlib
import math

import torch


def tensor_bytes(t):
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes()


def dtype_name(dt):
    return str(dt).removeprefix("torch.")


def canon(obj):
    if obj is None:
        return None
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return obj
    if isinstance(obj, str):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, torch.Tensor):
        return {
            "$tensor": {
                "dtype": dtype_name(obj.dtype),
                "shape": list(obj.shape),
                "sha256": hashlib.sha256(tensor_bytes(obj)).hexdigest(),
            }
        }
    if isinstance(obj, (list, tuple)):  # torch.Size is a tuple
        return [canon(x) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: canon(v) for k, v in obj.items()}
        return {"$dict": [[canon(k), canon(v)] for k, v in obj.items()]}
    raise TypeError(f"canon: no canonical form for {type(obj).__module__}.{type(obj).__qualname__}")


def key_name(k):
    """A dict key as Rust's `Key` Display writes it in key paths."""
    if isinstance(k, bool):
        return "True" if k else "False"
    if k is None:
        return "None"
    if isinstance(k, (int, str)):
        return str(k)
    if isinstance(k, tuple):
        return "(" + ", ".join(key_name(x) for x in k) + ")"
    if isinstance(k, (float, bytes)):
        return f"<{type(k).__name__} key>"
    raise TypeError(f"key_name: tensors under a {type(k).__name__} key are not supported here")


def named_tensors(obj):
    """(path, tensor) pairs, depth first, named like Rust's `Value::named_tensors()`."""
    out = []

    def join(p, name):
        return f"{p}.{name}" if p else str(name)

    def walk(v, p):
        if isinstance(v, torch.Tensor):
            out.append((p, v))
        elif isinstance(v, dict):
            for k, x in v.items():
                if _has_tensor(x):
                    walk(x, join(p, key_name(k)))
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, join(p, i))

    walk(obj, "")
    return out


def _has_tensor(v):
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x) for x in v)
    return False


def sharing_groups(obj):
    """[[path, group], ...]: tensors whose untyped storages have the same data_ptr share a group
    id, ids in first-seen order; empty storages never share."""
    ids = {}
    out = []
    n = 0
    for p, t in named_tensors(obj):
        s = t.untyped_storage()
        if s.nbytes() == 0:
            gid = n
            n += 1
        else:
            ptr = s.data_ptr()
            if ptr not in ids:
                ids[ptr] = n
                n += 1
            gid = ids[ptr]
        out.append([p, gid])
    return out


def flags(obj):
    """[[path, is_parameter, requires_grad], ...]."""
    return [
        [p, isinstance(t, torch.nn.Parameter), bool(t.requires_grad)] for p, t in named_tensors(obj)
    ]


def kinds(obj):
    """[[key path, kind], ...] for every container, parents first: "dict", "OrderedDict", "list"
    or "tuple" (torch.Size counts as a tuple: ckptio reads it as one). The JSON above does not
    tell these apart. Containers under float or bytes keys are left out (their path names differ
    between Python and Rust)."""
    out = []

    def join(p, name):
        return f"{p}.{name}" if p else str(name)

    def walk(v, p):
        if isinstance(v, dict):
            out.append([p, "OrderedDict" if isinstance(v, collections.OrderedDict) else "dict"])
            for k, x in v.items():
                if not isinstance(k, (float, bytes)):
                    walk(x, join(p, key_name(k)))
        elif isinstance(v, (list, tuple)):
            out.append([p, "list" if isinstance(v, list) else "tuple"])
            for i, x in enumerate(v):
                walk(x, join(p, i))

    walk(obj, "")
    return out


def pick(obj, subtrees):
    """A dict of just the named top-level entries (for trees holding objects we do not model)."""
    if subtrees is None:
        return obj
    return {k: obj[k] for k in subtrees}

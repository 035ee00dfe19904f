"""Shared fixtures and helpers for the Python package's tests."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS_SCRIPT = os.path.join(REPO, "tests", "python", "corpus.py")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The interop corpus (every dtype, views, shared storages, Lightning checkpoints, ...),
    written by real PyTorch: ``(directory, manifest entries)``."""
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run([sys.executable, CORPUS_SCRIPT, str(out), "7"], check=True, timeout=600)
    with open(out / "manifest.json") as f:
        return out, json.load(f)["files"]


def _storage_key(t):
    s = t.untyped_storage()
    return (s.device.type, s.data_ptr(), s.nbytes()) if s.data_ptr() else ("empty", id(t))


def sharing(obj):
    """Which tensors share a storage: sorted groups of key paths (only groups of two or more)."""
    groups = {}

    def walk(o, path):
        if isinstance(o, torch.Tensor):
            groups.setdefault(_storage_key(o), []).append(path)
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}/{k!r}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{path}/{i}")

    walk(obj, "")
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def _tensor_bytes(t):
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(a, b, path="root"):
    """Deep equality of two loaded trees: types, dict order, tensors' dtype, shape, strides,
    offset, flags and bytes (NaNs included)."""
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert a.stride() == b.stride() and a.storage_offset() == b.storage_offset(), path
        assert a.requires_grad == b.requires_grad, path
        assert _tensor_bytes(a) == _tensor_bytes(b), f"{path}: elements differ"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k!r}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert_same(vars(a), vars(b), f"{path}.__dict__")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


# Skips are recorded like the Rust tests' (`test<TAB>kind<TAB>reason` lines in
# $CKPTIO_SKIP_LOG): `./dev.sh test` lists them and fails on any kind but `cuda`. A test marks
# its kind with `pytest.skip(f"[cuda] reason")`; any other skip (importorskip, ...) is kind
# `python`.
def pytest_runtest_logreport(report):
    if not report.skipped:
        return
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    kind = "python"
    if reason.startswith("[") and "]" in reason:
        kind, reason = reason[1:].split("]", 1)
    log = os.environ.get("CKPTIO_SKIP_LOG")
    if log:
        name = report.nodeid.replace("\t", " ")
        with open(log, "a") as f:
            f.write(f"{name}\t{kind}\t{' '.join(reason.split())}\n")

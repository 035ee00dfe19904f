"""``ckptio.save``: ``torch.save`` to a path, written by ckptio's Rust engine."""

from __future__ import annotations

import os
from typing import Any

import torch

from . import _ckptio
from ._pickling import host_specs, pickle_checkpoint


def save(obj: Any, f: "str | os.PathLike[str]", *, durable: bool = True) -> None:
    """Saves ``obj`` to the path ``f`` in the ``torch.save`` format.

    A drop-in for ``torch.save(obj, f)`` on a path, for any object ``torch.save`` accepts: the
    structure is pickled here exactly as ``torch.save`` pickles it, and ckptio writes the
    archive with the storages straight from the tensors' memory, with the GIL released.
    ``torch.load`` reads the file, with and without ``weights_only`` and ``mmap``.

    The save is atomic: a temporary file in the same directory, renamed over ``f`` once
    complete, so ``f`` is either the old file or the new one, never a part. With ``durable``
    (the default) the file and its directory are fsynced before this returns, so the
    checkpoint survives a power loss. Parent directories are created.

    Tensors on a device are copied to the host first, as ``torch.save`` does. A file object
    (not a path) is handed to ``torch.save`` itself.

    Raises ``OSError`` (with the path) when the file cannot be written; the previous file at
    ``f``, if any, is then left as it was.
    """
    if not isinstance(f, (str, os.PathLike)):
        torch.save(obj, f)
        return
    pickle_bytes, storages = pickle_checkpoint(obj)
    _ckptio.save(os.fspath(f), pickle_bytes, host_specs(storages), durable)

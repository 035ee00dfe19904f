"""``ckptio.load``: ``torch.load`` of a path, with the archive read and checked by ckptio.

ckptio's Rust engine indexes the file and reads every storage record (on two threads, each
checking the CRC-32 of what it read) straight into a tensor torch allocated for it, or leaves
the storages to a memory map; PyTorch's own loader then rebuilds the objects, with PyTorch's own
unpicklers, from those tensors or that map, never another copy. So
``weights_only=True`` refuses exactly what ``torch.load(weights_only=True)`` refuses.
"""

from __future__ import annotations

import mmap as _mmap
import os
import pickle
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import serialization as _ser

from . import _ckptio

MapLocation = Optional[Union[Callable, torch.device, str, Dict[str, str]]]


class _ZipReader:
    """The parts of ``torch._C.PyTorchFileReader`` that ``torch.serialization._load`` uses,
    served from an archive ckptio opened and checked."""

    def __init__(self, archive: "_ckptio.Archive", storages: Dict[str, torch.Tensor]) -> None:
        self._archive = archive
        self._storages = storages

    def has_record(self, name: str) -> bool:
        return self._archive.has(name)

    def get_record(self, name: str) -> bytes:
        return self._archive.record(name)

    def get_all_records(self) -> list:
        return self._archive.names()

    def get_record_offset(self, name: str) -> int:
        return self._archive.span_of(name)[1]

    def get_record_header_offset(self, name: str) -> int:
        return self._archive.span_of(name)[0]

    def get_record_offset_no_read(self, _header: int, name: str, _numel: int, _align: int) -> int:
        return self._archive.span_of(name)[1]

    def get_storage_from_record(self, name: str, numel: int, _cls: Any) -> torch.Tensor:
        t = self._storages.get(name)
        if t is None:
            raise _ckptio.CheckpointFormatError(f"no storage record {name}")
        if numel > t.numel():
            raise _ckptio.CheckpointFormatError(
                f"record {name} holds {t.numel()} bytes, fewer than the {numel} its tensor needs"
            )
        if numel == t.numel():
            return t
        return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()[0:numel])

    def serialization_id(self) -> str:
        if self._archive.has(".data/serialization_id"):
            return self._archive.record(".data/serialization_id").decode("ascii", "replace")
        return ""


class _CheckedStorage:
    """The file's memory as ``torch.serialization._load`` slices it (``storage[a:b]``), with
    each slice checked to lie inside one storage record: a file whose pickle claims more bytes
    than a record holds is refused instead of reading its neighbours."""

    def __init__(self, archive: "_ckptio.Archive", storage: torch.UntypedStorage, path: str) -> None:
        self._storage = storage
        self._path = path
        self._records = {}
        for name in archive.names():
            if name.startswith("data/"):
                _, offset, length = archive.span_of(name)
                self._records[offset] = (name, length)

    def __getitem__(self, s: slice) -> torch.UntypedStorage:
        start, stop = s.start, s.stop
        record = self._records.get(start)
        if record is None:
            raise _ckptio.CheckpointFormatError(
                f"{self._path}: no storage record starts at byte {start}"
            )
        name, length = record
        if stop - start > length:
            raise _ckptio.CheckpointFormatError(
                f"{self._path}: record {name} holds {length} bytes, fewer than the "
                f"{stop - start} its tensor needs"
            )
        return self._storage[start:stop]


def _read(path: str, verify_crc: bool):
    """The archive, and each storage record read into a tensor of its own: allocated by torch as
    ``torch.load`` allocates them, filled by ckptio on two threads with the GIL released."""
    archive = _ckptio.Archive.open(path, verify_crc)
    storages = {}
    for name in archive.names():
        if name.startswith("data/"):
            storages[name] = torch.empty(archive.span_of(name)[2], dtype=torch.uint8)
    archive.read_storages([(n, t.data_ptr(), t.numel(), t) for n, t in storages.items()])
    return archive, storages


def _map(path: str):
    """The archive, indexed, and the file mapped as ``torch.load(mmap=True)`` maps it."""
    archive = _ckptio.Archive.open(path, False)
    shared = _ser.get_default_mmap_options() == _mmap.MAP_SHARED
    storage = torch.UntypedStorage.from_file(path, shared, os.path.getsize(path))
    return archive, _CheckedStorage(archive, storage, path)


def load(
    f: "str | os.PathLike[str]",
    map_location: MapLocation = None,
    *,
    weights_only: bool = True,
    mmap: bool = False,
    verify_crc: bool = True,
) -> Any:
    """Loads a ``torch.save`` file from the path ``f``: the counterpart of ``torch.load``.

    ckptio checks the archive's structure and reads every storage on two threads straight into
    its tensor (or memory-maps the file with ``mmap=True``), checking every record's CRC-32
    unless ``verify_crc=False`` or ``mmap=True``; the objects are rebuilt by PyTorch's own
    loader, with its weights-only unpickler when ``weights_only`` (the default), from those
    tensors, without another copy. ``map_location`` works as in ``torch.load``.

    A file object (not a path) is handed to ``torch.load`` itself. Files in the legacy format
    (``torch.save`` before PyTorch 1.6, not a zip archive) and TorchScript archives are
    refused with ``ckptio.CheckpointFormatError``: load those with ``torch.load``.

    Raises ``OSError`` (``FileNotFoundError``, ...) when the file cannot be read,
    ``ckptio.CheckpointFormatError`` when it is not a valid, intact ``torch.save`` archive, and
    ``pickle.UnpicklingError`` when ``weights_only`` refuses what it holds, as ``torch.load``
    does; no code from the file runs then.
    """
    if not isinstance(f, (str, os.PathLike)):
        return torch.load(f, map_location=map_location, weights_only=weights_only, mmap=mmap)
    path = os.fspath(f)
    if mmap:
        archive, overall = _map(path)
        storages: Dict[str, torch.Tensor] = {}
    else:
        archive, storages = _read(path, verify_crc)
        overall = None
    if archive.has("constants.pkl"):
        raise _ckptio.CheckpointFormatError(
            f"{path}: this is a TorchScript archive (torch.jit.save); load it with torch.jit.load"
        )
    reader = _ZipReader(archive, storages)
    if not weights_only:
        return _ser._load(reader, map_location, pickle, overall_storage=overall, encoding="utf-8")
    try:
        return _ser._load(
            reader,
            map_location,
            torch._weights_only_unpickler,
            overall_storage=overall,
            encoding="utf-8",
        )
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(
            f"{path}: weights-only load refused the file (load it with weights_only=False "
            f"only if you trust its source): {e}"
        ) from None

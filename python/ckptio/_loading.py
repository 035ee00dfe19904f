"""``ckptio.load``: ``torch.load`` of a path, with the archive read and checked by ckptio.

ckptio's Rust engine reads the file (on two threads, with the CRC-32 of every record checked
on a third as the bytes arrive) into one block of memory that torch owns, or indexes it for a
memory map; PyTorch's own loader then rebuilds the objects from it, with PyTorch's own
unpicklers, and every storage is a view of that memory, never another copy. So
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

    def __init__(self, archive: "_ckptio.Archive", storage: torch.UntypedStorage) -> None:
        self._archive = archive
        self._storage = storage

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
        _, offset, length = self._archive.span_of(name)
        if numel > length:
            raise _ckptio.CheckpointFormatError(
                f"record {name} holds {length} bytes, fewer than the {numel} its tensor needs"
            )
        view = self._storage[offset : offset + numel]
        return torch.empty(0, dtype=torch.uint8).set_(view)

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


def _open(path: str, mmap: bool, verify_crc: bool):
    if mmap:
        archive = _ckptio.Archive.map(path)
        shared = _ser.get_default_mmap_options() == _mmap.MAP_SHARED
        storage = torch.UntypedStorage.from_file(path, shared, os.path.getsize(path))
        return archive, storage
    nbytes = os.path.getsize(path)
    storage = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
    archive = _ckptio.Archive.read(path, storage.data_ptr(), nbytes, storage, verify_crc)
    return archive, storage


def load(
    f: "str | os.PathLike[str]",
    map_location: MapLocation = None,
    *,
    weights_only: bool = True,
    mmap: bool = False,
    verify_crc: bool = True,
) -> Any:
    """Loads a ``torch.save`` file from the path ``f``: the counterpart of ``torch.load``.

    ckptio reads the whole file at once (or memory-maps it with ``mmap=True``), checks the
    archive's structure and, unless ``verify_crc=False`` or ``mmap=True``, every record's
    CRC-32; the objects are rebuilt by PyTorch's own loader, with its weights-only unpickler
    when ``weights_only`` (the default), and the storages are views of the memory the file was
    read into, not copies. ``map_location`` works as in ``torch.load``.

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
    archive, storage = _open(path, mmap, verify_crc)
    if archive.has("constants.pkl"):
        raise _ckptio.CheckpointFormatError(
            f"{path}: this is a TorchScript archive (torch.jit.save); load it with torch.jit.load"
        )
    reader = _ZipReader(archive, storage)
    storage = _CheckedStorage(archive, storage, path)
    if not weights_only:
        return _ser._load(reader, map_location, pickle, overall_storage=storage, encoding="utf-8")
    try:
        return _ser._load(
            reader,
            map_location,
            torch._weights_only_unpickler,
            overall_storage=storage,
            encoding="utf-8",
        )
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(
            f"{path}: weights-only load refused the file (load it with weights_only=False "
            f"only if you trust its source): {e}"
        ) from None

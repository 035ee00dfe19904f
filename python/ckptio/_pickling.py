"""The object structure pickled as ``torch.save`` pickles it, with its storages set aside.

``torch.save`` pickles the object with protocol 2 and replaces each storage by a persistent id
``("storage", storage class, key, location, numel)``, keys numbered in order of first
appearance; the storages' bytes go to records ``data/<key>`` of the archive. This module does
the same on the calling thread and hands the storages to ckptio's Rust engine, which writes
them straight from their memory (or copies them into its staging pool first).
"""

from __future__ import annotations

import io
import pickle
from typing import Any, List, Tuple

import torch
from torch.serialization import location_tag, normalize_storage_type

#: ``torch.save``'s pickle protocol.
PROTOCOL = 2

#: What the engine is handed for each storage: address, bytes, location, owner, and whether it
#: may be write-protected instead of copied.
StorageSpec = Tuple[int, int, str, Any, bool]


def pickle_checkpoint(obj: Any) -> Tuple[bytes, List[torch.UntypedStorage]]:
    """Pickles ``obj`` exactly as ``torch.save`` does; returns the pickle and its storages in
    key order."""
    storages: List[torch.UntypedStorage] = []
    keys: dict = {}
    dtypes: dict = {}

    def persistent_id(o: Any):
        if isinstance(o, torch.storage.TypedStorage):
            storage = o._untyped_storage
            dtype = o.dtype
            storage_type = getattr(torch, o._pickle_storage_type())
            numel = o._size()
        elif torch.is_storage(o):
            storage = o
            dtype = torch.uint8
            storage_type = normalize_storage_type(type(o))
            numel = storage.nbytes()
        else:
            return None
        if str(storage.device) != "meta" and storage.data_ptr() != 0:
            seen = dtypes.setdefault(storage.data_ptr(), dtype)
            if seen != dtype:
                raise RuntimeError(
                    "Cannot save multiple tensors or storages that view the same data as "
                    "different types"
                )
        key = keys.get(storage._cdata)
        if key is None:
            key = keys[storage._cdata] = str(len(keys))
            storages.append(storage)
        fake = getattr(o, "_fake_device", None)
        location = str(fake) if fake is not None else location_tag(storage)
        return ("storage", storage_type, key, location, numel)

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o: Any):  # noqa: D401 - pickle's hook
            return persistent_id(o)

    buf = io.BytesIO()
    _Pickler(buf, protocol=PROTOCOL).dump(obj)
    return buf.getvalue(), storages


def storage_spec(memory: Any, location: str, protectable: bool = False) -> StorageSpec:
    """A storage as the engine takes it: the host ``memory`` that holds its bytes (the storage
    itself, or a host copy of it), with the ``torch.save`` location of the original."""
    return (memory.data_ptr(), memory.nbytes(), location, memory, protectable)


def host_specs(storages: List[torch.UntypedStorage]) -> List[StorageSpec]:
    """Each storage as the engine takes it: in place on the CPU; a device storage is copied to
    the host first, as ``torch.save`` does."""
    return [storage_spec(s if s.device.type == "cpu" else s.cpu(), location_tag(s)) for s in storages]

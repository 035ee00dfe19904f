"""The snapshot on the calling thread and the hand-over to ckptio's Rust engine, shared by
``AsyncSaver`` and the Lightning ``AsyncCheckpointIO`` plugin."""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.serialization import location_tag

from . import _ckptio
from ._pickling import StorageSpec, pickle_checkpoint, storage_spec


class PinnedPool:
    """Reusable page-locked host buffers for device-to-host copies, kept by size."""

    def __init__(self) -> None:
        self._free: Dict[int, List[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            bufs = self._free.get(nbytes)
            if bufs:
                return bufs.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def give(self, bufs: List[torch.Tensor]) -> None:
        with self._lock:
            for b in bufs:
                self._free.setdefault(b.numel(), []).append(b)


def local_path(path: Any) -> str:
    """``path`` as a local file system path; URLs are refused with a clear error."""
    p = os.fspath(path)
    if "://" in p:
        raise ValueError(f"ckptio writes to local paths only, not {p!r}")
    return p


class Runtime:
    """ckptio's engine with the Python half of a save: pickle the structure, copy device
    storages to pinned host buffers, hand everything to the engine, which copies the host
    storages into its staging pool (GIL released) before it returns."""

    def __init__(
        self,
        *,
        capacity: int = 1,
        writers: int = 1,
        backpressure: str = "block",
        pool_budget: Optional[int] = None,
        write_protect: bool = False,
    ) -> None:
        self.engine = _ckptio.Engine(
            capacity=capacity,
            writers=writers,
            backpressure=backpressure,
            pool_budget=pool_budget,
            write_protect=write_protect,
        )
        self._write_protect = write_protect
        self._pinned = PinnedPool()

    def submit(self, obj: Any, path: str, durable: bool) -> "_ckptio.Handle":
        pickle_bytes, storages = pickle_checkpoint(obj)
        specs, pinned = self._snapshot_specs(storages)
        try:
            return self.engine.save(path, pickle_bytes, specs, durable)
        finally:
            # The engine copied every storage before returning: the buffers can be reused.
            self._pinned.give(pinned)

    def reserve(self, obj: Any, saves: int) -> int:
        """Allocates the staging memory ``saves`` saves of ``obj`` will use; returns its bytes."""
        pickle_bytes, storages = pickle_checkpoint(obj)
        # Only the sizes count: the engine reads no storage's memory to reserve.
        specs = [storage_spec(s, location_tag(s)) for s in storages]
        return self.engine.reserve(pickle_bytes, specs, saves)

    def _snapshot_specs(
        self, storages: List[torch.UntypedStorage]
    ) -> Tuple[List[StorageSpec], List[torch.Tensor]]:
        """CPU storages as they are; CUDA storages copied into pinned buffers with
        non-blocking copies, all queued before one wait per device; other devices copied with
        ``.cpu()``."""
        specs: List[StorageSpec] = []
        pinned: List[torch.Tensor] = []
        devices = set()
        for s in storages:
            location = location_tag(s)
            if s.device.type == "cpu":
                protectable = self._write_protect and not s.is_pinned()
                specs.append(storage_spec(s, location, protectable))
            elif s.device.type == "cuda":
                buf = self._pinned.take(s.nbytes())
                buf.untyped_storage().copy_(s, non_blocking=True)
                devices.add(s.device)
                pinned.append(buf)
                specs.append(storage_spec(buf.untyped_storage(), location))
            else:
                specs.append(storage_spec(s.cpu(), location))
        for d in devices:
            torch.cuda.current_stream(d).synchronize()
        return specs, pinned

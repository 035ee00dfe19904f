"""``AsyncSaver``: asynchronous ``torch.save`` for plain PyTorch loops."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
from typing import Any, List, Optional

from ._ckptio import CheckpointError
from ._runtime import Runtime, local_path


@dataclasses.dataclass(frozen=True)
class SaveReport:
    """What a finished save measured."""

    #: The checkpoint's path.
    path: str
    #: Bytes of tensor storage written.
    bytes: int
    #: Whether the save was skipped (the queue was full under ``backpressure="skip"``).
    skipped: bool
    #: Whether the file and its directory were fsynced.
    durable: bool
    #: Seconds the snapshot took on the calling thread.
    stage_s: float
    #: Seconds the save waited in the queue.
    queue_wait_s: float
    #: Seconds the write took, fsync included.
    write_s: float
    #: The file's size in bytes, when written.
    file_bytes: Optional[int]


class SaveFuture(concurrent.futures.Future):
    """The result of ``AsyncSaver.save``: a ``concurrent.futures.Future`` whose result is a
    ``SaveReport`` once the checkpoint is durable (``concurrent.futures.wait`` and
    ``as_completed`` work with it). It cannot be cancelled: the snapshot was already taken."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._observed = False
        self.set_running_or_notify_cancel()

    def staged(self) -> bool:
        """Whether the snapshot was taken: always, once ``save`` returned. The tensors may be
        changed from then on; the checkpoint holds their values at the call."""
        return True

    def result(self, timeout: Optional[float] = None) -> SaveReport:
        self._observed = True
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._observed = True
        return super().exception(timeout)

    def _unobserved_error(self) -> Optional[BaseException]:
        """The error this save ended with, once, if nobody took it from the future."""
        if self._observed or not self.done():
            return None
        self._observed = True
        return super().exception()

    def _may_need_reporting(self) -> bool:
        """Whether the saver must keep this future: pending, or failed and not yet seen."""
        if not self.done():
            return True
        return not self._observed and super().exception() is not None


_STOP = object()


class AsyncSaver:
    """Saves checkpoints off the training thread, with ckptio's Rust engine.

    ``save(obj, path)`` pickles ``obj``'s structure (as ``torch.save`` does) and copies its
    storages into a reusable staging pool with the GIL released, then returns a ``SaveFuture``;
    a background writer writes the file atomically and durably. What is saved is the state at
    the call: the tensors may be changed as soon as it returns.

    - **Ordering**: operations on one path run in submission order; ``load`` waits for them.
    - **Backpressure**: at most ``capacity`` saves wait per writer; when full, ``"block"``
      (default) waits, ``"skip"`` resolves the future as skipped, ``"error"`` raises
      ``ckptio.QueueFullError``. ``pool_budget`` caps the staging memory in bytes.
    - ``write_protect=True`` (opt-in; Linux with ``userfaultfd``, e.g. as root): large CPU
      tensors are write-protected instead of copied on the calling thread, and copied by a
      background thread; a write to a part not yet copied waits for that part (at most
      8 MiB). The stall becomes a fraction of a copy. Leave it off where a device writes the
      saved CPU tensors by DMA (RDMA-registered memory) or the loop grows them in place
      (``resize_``) right after a save. Pinned tensors are always copied.
    - **Errors**: a failed save fails its future. An error no one took from its future (with
      ``result()`` or ``exception()``) is raised by the next call (``save``, ``remove``,
      ``load``, ``flush``, ``close``), once.
    - **Shutdown**: ``close()`` (or leaving a ``with`` block) waits for every save.
    """

    def __init__(
        self,
        *,
        capacity: int = 1,
        writers: int = 1,
        backpressure: str = "block",
        durable: bool = True,
        pool_budget: Optional[int] = None,
        write_protect: bool = False,
    ) -> None:
        self._runtime = Runtime(
            capacity=capacity,
            writers=writers,
            backpressure=backpressure,
            pool_budget=pool_budget,
            write_protect=write_protect,
        )
        self._durable = durable
        self._futures: List[SaveFuture] = []
        self._lock = threading.Lock()
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._watcher: Optional[threading.Thread] = None

    def save(self, obj: Any, path: "str | os.PathLike[str]") -> SaveFuture:
        """Snapshots ``obj`` and queues its write to ``path``; returns its future."""
        self._raise_unobserved()
        p = local_path(path)
        handle = self._runtime.submit(obj, p, self._durable)
        return self._track(p, handle)

    def reserve(self, checkpoint: Any, saves: int = 1) -> int:
        """Allocates now the staging memory ``saves`` saves of checkpoints shaped like
        ``checkpoint`` will use, so that no save in the loop pays for it (the first save
        otherwise does); returns the bytes reserved."""
        return self._runtime.reserve(checkpoint, saves)

    def remove(self, path: "str | os.PathLike[str]") -> SaveFuture:
        """Queues the removal of ``path`` after every save of it submitted before."""
        self._raise_unobserved()
        p = local_path(path)
        return self._track(p, self._runtime.engine.remove(p))

    def load(self, path: "str | os.PathLike[str]", map_location: Any = None, **kwargs: Any) -> Any:
        """Waits for pending operations on ``path``, then ``ckptio.load``s it."""
        from ._loading import load

        self._raise_unobserved()
        p = local_path(path)
        self._runtime.engine.wait_path(p)
        return load(p, map_location, **kwargs)

    def flush(self) -> None:
        """Waits for every pending operation, then raises errors no one took."""
        self._runtime.engine.flush()
        self._drain()
        self._raise_unobserved()

    def close(self) -> None:
        """Waits for every save, stops the threads, and raises errors no one took."""
        try:
            self._runtime.engine.flush()
        finally:
            self._drain()
            self._stop_watcher()
            self._runtime.engine.teardown()
        self._raise_unobserved()

    def status(self) -> dict:
        """The engine's counters (saves, bytes written, pending, errors, staging pool)."""
        return self._runtime.engine.status()

    def __enter__(self) -> "AsyncSaver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _track(self, path: str, handle: Any) -> SaveFuture:
        fut = SaveFuture(path)
        with self._lock:
            self._futures = [f for f in self._futures if f._may_need_reporting()]
            self._futures.append(fut)
            if self._watcher is None:
                self._watcher = threading.Thread(
                    target=self._watch, name="ckptio-futures", daemon=True
                )
                self._watcher.start()
        self._queue.put((handle, fut))
        return fut

    def _watch(self) -> None:
        """Resolves each future when the engine has finished its operation, in order."""
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            handle, fut = item
            try:
                report = handle.wait()
            except BaseException as e:  # every failure goes to the future
                fut.set_exception(e)
            else:
                report["path"] = os.fspath(report["path"])
                fut.set_result(SaveReport(**report))

    def _drain(self) -> None:
        with self._lock:
            pending = [f for f in self._futures if not f.done()]
        concurrent.futures.wait(pending)

    def _stop_watcher(self) -> None:
        with self._lock:
            watcher, self._watcher = self._watcher, None
        if watcher is not None:
            self._queue.put(_STOP)
            watcher.join()

    def _raise_unobserved(self) -> None:
        with self._lock:
            errors = [e for f in self._futures if (e := f._unobserved_error()) is not None]
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise CheckpointError(
                f"{len(errors)} background errors: " + "; ".join(str(e) for e in errors)
            ) from errors[0]

"""Lightning ``CheckpointIO`` plugins whose engine is ckptio.

``Trainer(plugins=[ckptio.AsyncCheckpointIO()])`` and ``Fabric(plugins=[...])`` use them. They
subclass ``lightning.fabric.plugins.io.CheckpointIO`` (or ``lightning_fabric``'s, when only the
standalone package is installed); without Lightning they subclass a local class with the same
methods, so this module imports, and the plugins work, everywhere.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any, Optional

from . import _ckptio
from ._loading import load
from ._runtime import Runtime, local_path
from ._saving import save


def _lightning_base() -> type:
    for module in ("lightning.fabric.plugins.io.checkpoint_io", "lightning_fabric.plugins.io.checkpoint_io"):
        try:
            return importlib.import_module(module).CheckpointIO
        except ImportError:
            continue
    return _CheckpointIO


class _CheckpointIO(abc.ABC):
    """Lightning's ``CheckpointIO`` contract, for when Lightning is not installed."""

    @abc.abstractmethod
    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None: ...

    @abc.abstractmethod
    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict: ...

    @abc.abstractmethod
    def remove_checkpoint(self, path: Any) -> None: ...

    def teardown(self) -> None:
        """Nothing to release."""


CheckpointIOBase = _lightning_base()


def _durable(storage_options: Optional[Any], default: bool) -> bool:
    """``storage_options`` as Lightning passes it: ``None``, or a dict with ``durable``."""
    if storage_options is None:
        return default
    if isinstance(storage_options, dict) and set(storage_options) <= {"durable"}:
        return bool(storage_options.get("durable", default))
    raise TypeError(
        f"ckptio's CheckpointIO accepts storage_options None or {{'durable': bool}}, "
        f"not {storage_options!r}"
    )


class TorchCheckpointIO(CheckpointIOBase):
    """Lightning's ``TorchCheckpointIO`` with ckptio's engine: the same files
    (``torch.save`` format), written atomically and durably, read with CRC checks.

    ``load_checkpoint`` loads with ``weights_only=True`` unless ``weights_only=False`` is
    passed (``None`` means ``True``, as in ``torch.load``).
    """

    def __init__(self, *, durable: bool = True) -> None:
        self._durable = durable

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        save(checkpoint, local_path(path), durable=_durable(storage_options, self._durable))

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        return load(local_path(path), map_location, weights_only=weights_only is not False)

    def remove_checkpoint(self, path: Any) -> None:
        _ckptio.remove(local_path(path))


class AsyncCheckpointIO(CheckpointIOBase):
    """Lightning's ``AsyncCheckpointIO`` with ckptio's engine.

    ``save_checkpoint`` snapshots on the calling thread (the structure pickled, the tensors
    copied into ckptio's reusable staging pool with the GIL released; CUDA tensors through
    reusable pinned buffers with non-blocking copies) and returns; the write runs on ckptio's
    background writer, atomically and durably. The checkpoint holds the state at the call,
    even if the model changes right after.

    - ``remove_checkpoint`` and ``load_checkpoint`` run after the pending saves of that path.
    - Every background error is raised once, at the next call or at ``teardown``.
    - ``teardown`` drains the queue and joins the threads.
    - At most ``capacity`` saves wait per writer; when full, ``backpressure`` ``"block"``
      (default) waits, ``"skip"`` drops the save (counted in ``status()``), ``"error"`` raises
      ``ckptio.QueueFullError``. ``pool_budget`` caps the staging memory in bytes.
    - ``write_protect=True`` (opt-in; Linux with ``userfaultfd``, e.g. as root): large CPU
      tensors are write-protected instead of copied on the calling thread, and copied by a
      background thread; a write to a part not yet copied waits for that part (at most
      8 MiB). The stall becomes a fraction of a copy. Leave it off where a device writes the
      saved CPU tensors by DMA (RDMA-registered memory) or the loop grows them in place
      (``resize_``) right after a save. Pinned tensors are always copied.
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

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        durable = _durable(storage_options, self._durable)
        # The handle is not kept: an error it ends with is raised by the next call.
        self._runtime.submit(checkpoint, local_path(path), durable)

    def reserve(self, checkpoint: Any, saves: int = 1) -> int:
        """Allocates now the staging memory ``saves`` saves of checkpoints shaped like
        ``checkpoint`` will use, so that no save in the loop pays for it (the first save
        otherwise does); returns the bytes reserved."""
        return self._runtime.reserve(checkpoint, saves)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        p = local_path(path)
        self._runtime.engine.wait_path(p)
        return load(p, map_location, weights_only=weights_only is not False)

    def remove_checkpoint(self, path: Any) -> None:
        self._runtime.engine.remove(local_path(path))

    def teardown(self) -> None:
        self._runtime.engine.teardown()

    def status(self) -> dict:
        """The engine's counters (saves, bytes written, pending, skips, errors, staging pool)."""
        return self._runtime.engine.status()

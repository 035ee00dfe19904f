"""ckptio: checkpoints that never stall the training loop.

``torch.save``-compatible files written by ckptio's Rust engine:

- ``ckptio.save`` / ``ckptio.load``: drop-ins for ``torch.save`` / ``torch.load`` on a path
  (atomic durable saves; loads with CRC checks and no extra copy).
- ``ckptio.AsyncSaver``: asynchronous saves for plain PyTorch loops, with futures.
- ``ckptio.AsyncCheckpointIO`` / ``ckptio.TorchCheckpointIO``: Lightning ``CheckpointIO``
  plugins (``Trainer(plugins=[ckptio.AsyncCheckpointIO()])``, ``Fabric(plugins=[...])``).
"""

from ._async import AsyncSaver, SaveFuture, SaveReport
from ._ckptio import (
    CheckpointError,
    CheckpointFormatError,
    QueueFullError,
    __version__,
    clean_temp_files,
)
from ._loading import load
from ._saving import save

__all__ = [
    "AsyncCheckpointIO",
    "AsyncSaver",
    "CheckpointError",
    "CheckpointFormatError",
    "QueueFullError",
    "SaveFuture",
    "SaveReport",
    "TorchCheckpointIO",
    "clean_temp_files",
    "load",
    "save",
    "__version__",
]


def __getattr__(name: str):
    # The plugins import Lightning when it is installed, which takes a while: only on use.
    if name in ("AsyncCheckpointIO", "TorchCheckpointIO"):
        from . import plugins

        return getattr(plugins, name)
    raise AttributeError(f"module 'ckptio' has no attribute {name!r}")

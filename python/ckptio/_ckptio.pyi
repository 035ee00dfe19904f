"""Type stubs for ckptio's native module (the Rust engine)."""

import os
from typing import Any, Dict, List, Optional, Tuple, Union

_Path = Union[str, os.PathLike]
#: (address, bytes, torch.save location tag, owner of the memory, may be write-protected)
_StorageSpec = Tuple[int, int, str, Any, bool]

__version__: str

class CheckpointError(RuntimeError):
    """A checkpoint operation failed (the message names the path and the cause)."""

class CheckpointFormatError(CheckpointError):
    """A file is not a valid torch.save checkpoint: truncated, corrupt (CRC-32), or malformed."""

class QueueFullError(CheckpointError):
    """The save queue was full and the backpressure policy is "error": nothing was saved."""

def save(path: _Path, pickle: bytes, storages: List[_StorageSpec], durable: bool = True) -> None:
    """Writes a pickled checkpoint in the torch.save format, atomically, GIL released."""

def remove(path: _Path) -> None:
    """Removes the checkpoint at `path` (a file or a directory); quiet when it is absent."""

def write_protect_unavailable() -> Optional[str]:
    """None when this process may write-protect memory (userfaultfd), else why not."""

def clean_temp_files(dir: _Path) -> int:
    """Removes the temporary files an interrupted save left in `dir`; returns how many."""

class Handle:
    """One queued operation."""

    @property
    def path(self) -> os.PathLike: ...
    def done(self) -> bool: ...
    def wait(self, timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """Waits until it finished; its report, or None on timeout; raises its error."""

class Engine:
    """ckptio's asynchronous runtime over the torch.save backend."""

    def __init__(
        self,
        *,
        capacity: int = 1,
        writers: int = 1,
        backpressure: str = "block",
        pool_budget: Optional[int] = None,
        write_protect: bool = False,
    ) -> None: ...
    def save(self, path: _Path, pickle: bytes, storages: List[_StorageSpec], durable: bool = True) -> Handle: ...
    def reserve(self, pickle: bytes, storages: List[_StorageSpec], saves: int = 1) -> int: ...
    def remove(self, path: _Path) -> Handle: ...
    def wait_path(self, path: _Path) -> None: ...
    def flush(self) -> None: ...
    def teardown(self, timeout: Optional[float] = None) -> None: ...
    def status(self) -> Dict[str, int]: ...

class Archive:
    """A torch.save archive opened and checked by ckptio."""

    @staticmethod
    def open(path: _Path, verify_crc: bool = True) -> "Archive": ...
    def read_storages(self, targets: List[Tuple[str, int, int, Any]]) -> None:
        """Reads each (record name, address, nbytes, owner) storage record into its buffer."""
    @property
    def prefix(self) -> str: ...
    def names(self) -> List[str]: ...
    def has(self, name: str) -> bool: ...
    def record(self, name: str) -> bytes: ...
    def span_of(self, name: str) -> Tuple[int, int, int]: ...

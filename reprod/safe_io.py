"""Files a killed job or a hostile file cannot turn against a run: atomic writes, checked reads.

- :func:`atomic_write` (and ``_text``/``_bytes``): the content goes to a temporary file in the
  same folder, is flushed to disk, then renamed over the target (``os.replace``): a job killed at
  any moment leaves the old file or the new one, never a half-written one.
- :func:`load_weights_only`: ``torch.load(weights_only=True)`` whose every failure (a pickle
  that would run code, a truncated or damaged archive) is a ValueError naming the file.
- :func:`tensor_digest`: a SHA-256 over a nested state (tensors by dtype, shape and bytes; plain
  values by ``repr``), stored inside the files ``reprod.train`` writes and checked when they are
  read back (a flipped byte that ``torch.load`` or safetensors would load silently is caught).
- :class:`RunLock`: an exclusive ``flock`` on ``<run_dir>/.lock`` (``msvcrt.locking`` where
  there is no ``fcntl``: Windows), released when the process ends however it ends (``kill -9``
  included): two trainings cannot share a run directory.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RunLock",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_digest",
    "load_safetensors_checked",
    "load_weights_only",
    "save_safetensors_checked",
    "tensor_digest",
]


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, flush it, rename it to ``path``."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def load_weights_only(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a ValueError naming ``path`` when the
    file would need to run code to load (a pickle of other objects, a TorchScript archive), or is
    truncated or damaged."""
    path = Path(path)
    try:
        with warnings.catch_warnings():           # torch warns about TorchScript before refusing
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path} cannot be read as a {what}; it is truncated or damaged "
                             f"({_reason(e)})") from e
        raise ValueError(f"{path} is not a weights-only {what}: loading it would run code from "
                         f"the file, which is refused ({_reason(e)})") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        if "TorchScript" in str(e):
            raise ValueError(f"{path} is a TorchScript archive (a program), not a weights-only "
                             f"{what}: refusing to run it") from e
        raise ValueError(f"{path} cannot be read as a {what}; it is truncated or damaged "
                         f"({_reason(e)})") from e


def _reason(e: BaseException) -> str:
    """The informative part of a loader's (often many-line) message."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if found:
        return f"it names {found.group(1)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"V{obj!r}".encode())


def tensor_digest(obj: Any) -> str:
    """Hex SHA-256 of a nested state: tensors, mappings, sequences and plain values."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _try_lock(fd: int) -> bool:
    """An exclusive, non-blocking lock on the open file ``fd``: False when another process holds
    it. ``fcntl.flock`` on POSIX; ``msvcrt.locking`` of the first byte on Windows. Imported here,
    so that every platform imports this module."""
    try:
        import fcntl
    except ImportError:                                   # Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:                                   # Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def _read_owner(fd: int) -> str:
    """The pid the lock's holder wrote ("unknown" where the locked byte cannot be read)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


class RunLock:
    """An exclusive lock on a run directory (``<run_dir>/.lock`` holds the owner's pid).

    ``acquire`` raises a ValueError when another live process holds it; the operating system
    drops the lock when its holder ends, so a killed run never leaves a stale lock behind.
    """

    NAME = ".lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            owner = _read_owner(fd)
            os.close(fd)
            raise ValueError(f"{self.path.parent} is in use by another training (pid {owner}): "
                             "two runs cannot share a run directory; wait for it to end or use "
                             "another --run-dir") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            _unlock(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_digest(state: dict, path: str | Path, key: str = "sha256") -> dict:
    """``state`` without its recorded digest, which must match (files written before digests
    were recorded have none and are taken as they are); a ValueError naming ``path`` if not."""
    state = dict(state)
    recorded = state.pop(key, None)
    if recorded is not None and recorded != tensor_digest(state):
        raise ValueError(f"{path} is damaged: its contents do not match the SHA-256 recorded when "
                         "it was written")
    return state


def load_safetensors_checked(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and header; the tensors' digest (header ``sha256``, when
    recorded) is checked; a ValueError naming ``path`` for an unreadable or damaged file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} cannot be read as safetensors; it is truncated or damaged "
                         f"({_reason(e)})") from e
    if "sha256" in meta and meta["sha256"] != tensor_digest(tensors):
        raise ValueError(f"{path} is damaged: its tensors do not match the SHA-256 recorded when "
                         "it was written")
    return tensors, meta


def save_safetensors_checked(path: str | Path, tensors: dict[str, torch.Tensor],
                             metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` atomically with their digest in the header (``sha256``), then read the
    file back and check it."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {**(metadata or {}), "sha256": tensor_digest(tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    load_safetensors_checked(path)
    return Path(path)

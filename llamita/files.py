"""Reading and writing files: atomic writes, JSON objects and torch files, each with one clear error."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from llamita.errors import LlamitaError


def atomic_write(target: Path, write_to: Callable[[Path], None]) -> None:
    """Call ``write_to`` on a temporary path beside ``target``, then rename it into place, so that
    a crash never leaves a half-written file under the real name. The file gets the mode the umask
    gives new files (mkstemp's is 0600, whatever the umask); a full disk is named as such."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write_to(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, LlamitaError) and disk_full(e, target.parent):
            raise LlamitaError(f"{target}: no space left on device (the disk is full): free some space and "
                               "run again") from e
        raise


def umask() -> int:
    """The process's umask: from /proc where Linux shows it, else by setting it and setting it back
    (Python has no getter; another thread's file created in between would get 022)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def disk_full(error: Exception, where: Path) -> bool:
    """Whether ``error`` (from writing under ``where``) is a full disk: ENOSPC or EDQUOT, or any
    error with under 1 MiB left, since torch.save's C++ writer reports only "iostream error"."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a clear error naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise LlamitaError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlamitaError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise LlamitaError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise LlamitaError(f"{path}: expected a JSON object")
    return data


def load_torch_file(file: Path, what: str = "PyTorch weights file", mmap: bool = True) -> Any:
    """A file written by ``torch.save``, read without running pickled code (``weights_only``) and
    memory-mapped where it can be: torch maps only its zip format, so a file in the legacy format
    (before torch 1.6, ``_use_new_zipfile_serialization=False``) is read into memory."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(file))
    except Exception as e:  # zip errors, unpickling refused, truncated data...
        raise LlamitaError(f"{file}: not a readable {what} ({type(e).__name__}: {e})") from None


def load_state_dict(file: Path, what: str = "PyTorch weights file") -> dict[str, torch.Tensor]:
    """``load_torch_file`` of a file that must hold names -> tensors (any pickled object would load)."""
    state = load_torch_file(file, what)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                              for k, t in state.items()):
        raise LlamitaError(f"{file}: not a state dict (a mapping of names to tensors)")
    return state


def not_utf8(path: Path | str, error: UnicodeDecodeError, offset: int = 0) -> LlamitaError:
    """The one-line error for a file that is not UTF-8: the bad byte and its offset in the file
    (``offset``: where the bytes that failed to decode start)."""
    bad = error.object[error.start]
    return LlamitaError(f"{path}: not UTF-8 text: byte 0x{bad:02X} at byte offset {offset + error.start} "
                        f"({error.reason})")

"""Reading and writing files: atomic writes, JSON objects and torch files, each with one clear error."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from llamita.errors import LlamitaError


def atomic_write(target: Path, write_to: Callable[[Path], None]) -> None:
    """Call ``write_to`` on a temporary path beside ``target``, then rename it into place, so that
    a crash never leaves a half-written file under the real name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write_to(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a clear error naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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

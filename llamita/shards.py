"""Pretraining data: a corpus tokenized once into memory-mapped token shards, read as fixed-length windows.

Each document (a ``.txt`` file, or the ``"text"`` of one line of a ``.jsonl`` file) becomes BOS, its
tokens, EOS, appended to shard files of raw tokens (uint16 where the vocabulary fits, uint32 otherwise).
``manifest.json`` records what went in (each file's size and modification time, the tokenizer files'
sha256), so running again over the same corpus reuses the shards, and a shard folder made on one
machine can be copied to the one that trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from llamita.errors import LlamitaError
from llamita.files import not_utf8, read_json, umask
from llamita.tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 28  # a new shard starts at the first document boundary past this many tokens
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def corpus_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files of a corpus: each path given, a folder standing for its ``.txt`` and ``.jsonl`` files."""
    if not paths:
        raise LlamitaError("no corpus files given")
    files: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not found:
                raise LlamitaError(f"{path}: no .txt or .jsonl files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise LlamitaError(f"{path}: no such file or folder")
    return files


def utf8(data: bytes, path: Path, offset: int = 0, where: str = "") -> str:
    """``data`` decoded, or a one-line error naming the file (and ``where`` in it) and the bad byte's offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(f"{path}{where}", e, offset) from None


def documents(path: Path) -> Iterator[str]:
    """A ``.txt`` file is one document; a ``.jsonl`` file has one per line, in its ``"text"`` field."""
    if path.suffix != ".jsonl":
        yield utf8(path.read_bytes(), path)
        return
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            text = utf8(line, path, offset, f", line {number}")
            offset += len(line)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise LlamitaError(f"{path}, line {number}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LlamitaError(f'{path}, line {number}: expected an object with a "text" string')
            yield record["text"]


def tokenizer_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            digest.update(name.encode() + (directory / name).read_bytes())
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenize_corpus(paths: Sequence[str | Path], tokenizer_dir: str | Path, out: str | Path,
                    progress: bool = True) -> Path:
    """Tokenize the corpus into shards in ``out`` (written in a hidden folder beside it, then renamed);
    a folder whose manifest already records this corpus and tokenizer is kept as it is."""
    files, out, tokenizer_dir = corpus_files(paths), Path(out), Path(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise LlamitaError(f"{tokenizer_dir}: the tokenizer needs BOS and EOS tokens to separate documents")
    sources = [{"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]
    key = {"sources": sources, "tokenizer": tokenizer_sha256(tokenizer_dir)}
    if (out / MANIFEST).is_file() and {k: read_json(out / MANIFEST).get(k) for k in key} == key:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        manifest = write_shards(files, tokenizer, tmp, progress) | key
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_shards(files: list[Path], tokenizer: Tokenizer, folder: Path, progress: bool) -> dict:
    """Every document as BOS + tokens + EOS into ``shard-NNNNN.bin`` files; what they hold."""
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    shards: list[dict] = []
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="tokenize",
               disable=not progress, dynamic_ncols=True)
    f = None
    try:
        for path in files:
            for text in documents(path):
                if not shards or shards[-1]["tokens"] >= SHARD_TOKENS:
                    if f:
                        f.close()
                    shards.append({"file": f"shard-{len(shards):05d}.bin", "tokens": 0, "documents": 0})
                    f = open(folder / shards[-1]["file"], "wb")
                ids = tokenizer.encode(text, bos=True, eos=True)
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                shards[-1]["tokens"] += len(ids)
                shards[-1]["documents"] += 1
            bar.update(path.stat().st_size)
    finally:
        if f:
            f.close()
        bar.close()
    if not shards or all(s["tokens"] == 2 * s["documents"] for s in shards):
        raise LlamitaError(f"the corpus ({', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}) "
                           "holds no text")
    return {"format": "llamita-shards-1", "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "shards": shards,
            "tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards)}


def open_shards(folder: str | Path) -> tuple[dict, list[np.ndarray]]:
    """The manifest and each shard memory-mapped; a shard whose size disagrees with it is named."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST)
    try:
        dtype, shards = np.dtype(manifest["dtype"]), manifest["shards"]
        arrays = []
        for s in shards:
            file = folder / s["file"]
            if not file.is_file() or file.stat().st_size != s["tokens"] * dtype.itemsize:
                raise LlamitaError(f"{file}: missing or not the {s['tokens']} tokens {folder / MANIFEST} records")
            arrays.append(np.memmap(file, dtype=dtype, mode="r"))
    except (KeyError, TypeError) as e:
        raise LlamitaError(f"{folder / MANIFEST}: not a llamita shard manifest (field {e})") from None
    return manifest, arrays


def is_shard_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class Windows:
    """Training sequences: ``seq_len + 1`` tokens each (the inputs and, shifted by one, their targets),
    at a stride of ``seq_len`` so every token is a target once, never crossing a shard's end; the
    windows ``lo`` .. ``hi`` of that sequence. Items are int64 arrays, read from the memory maps."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int, lo: int = 0, hi: int | None = None):
        self.arrays, self.seq_len = arrays, seq_len
        counts = [max(0, (len(a) - 1) // seq_len) for a in arrays]
        self.starts = np.cumsum([0] + counts)
        self.lo, self.hi = lo, int(self.starts[-1]) if hi is None else hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int | slice):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = self.lo + i
        shard = int(np.searchsorted(self.starts, k, side="right")) - 1
        at = (k - int(self.starts[shard])) * self.seq_len
        return np.asarray(self.arrays[shard][at: at + self.seq_len + 1], dtype=np.int64)


def split_windows(arrays: list[np.ndarray], seq_len: int, val_split: float) -> tuple[Windows, Windows | None]:
    """(training, validation): the last ``val_split`` of the windows (at least one) held out, so the
    validation text is a stretch the model never trains on."""
    every = Windows(arrays, seq_len)
    n = len(every)
    n_val = max(1, round(n * val_split)) if val_split else 0
    if n - n_val < 1:
        tokens = sum(len(a) for a in arrays)
        raise LlamitaError(f"--seq-len {seq_len}: the data's {tokens} tokens make {n} sequences of {seq_len + 1} "
                           f"tokens, too few to train on{' and hold out --val-split' if val_split else ''}; "
                           "lower --seq-len or add text")
    return Windows(arrays, seq_len, 0, n - n_val), Windows(arrays, seq_len, n - n_val, n) if n_val else None


def collate_windows(windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """A batch of windows: the first ``seq_len`` tokens as input, each position's next token as its target."""
    x = torch.from_numpy(np.stack(windows))
    return {"ids": x[:, :-1], "targets": x[:, 1:]}


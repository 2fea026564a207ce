"""The compiled CPU kernel for quantized layers (``csrc/qgemv.c``), built at first use.

Decoding reads every weight once per token, so its speed is the speed of reading the 4- or 8-bit
codes; torch has no CPU kernel that does this at memory speed (its int4 kernel computes at about a
fifth of it on AVX2). The C file is compiled with the machine's own instruction set (``-march=native``)
into ``~/.cache/llamita/kernels``, once per source, compiler and CPU, and called through ctypes, which
releases the GIL. Where no C compiler is found, or ``LLAMITA_KERNELS=0`` is set, ``available()`` is
False and the quantized layers use their pure-PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "qgemv.c"
CACHE = Path(os.environ.get("LLAMITA_CACHE", Path.home() / ".cache" / "llamita")) / "kernels"


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LLAMITA_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        warnings.warn("llamita: no C compiler found; quantized layers use the slower pure-PyTorch path", stacklevel=2)
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + compiler.encode() + _cpu_flags().encode()).hexdigest()[:16]
    path = CACHE / f"qgemv-{key}.so"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=CACHE, suffix=".so")
        os.close(fd)
        cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            warnings.warn(f"llamita: building {SOURCE.name} failed, quantized layers use the slower pure-PyTorch "
                          f"path: {result.stderr.strip()[:300]}", stacklevel=2)
            return None
        os.replace(tmp, path)  # atomic: a concurrent build or a killed one never leaves half a library
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.quant_matmul.argtypes = [p, i64, i64, p, ctypes.c_int, p, p, i64, i64, p, ctypes.c_int]
    lib.quant_matmul.restype = None
    lib.kquant_matmul.argtypes = [p, i64, i64, p, ctypes.c_int, i64, p, ctypes.c_int]
    lib.kquant_matmul.restype = None
    return lib


def available() -> bool:
    return _library() is not None


@torch.library.custom_op("llamita::quant_matmul", mutates_args=())
def quant_matmul(x: Tensor, codes: Tensor, scales: Tensor, offsets: Tensor | None, bits: int,
                 group_size: int) -> Tensor:
    """x [M, K] float32 @ w.T -> [M, N] float32, with w held as codes (int4: [N, K/2] uint8, int8:
    [N, K] int8), scales and offsets (float16 [N, K/g]; offsets None for w = code * scale). x is
    quantized to int8 per block of 32 on the way in, as llama.cpp does (relative error ~1e-2)."""
    x = x.contiguous()
    M, K = x.shape
    y = x.new_empty(M, codes.shape[0])
    _library().quant_matmul(
        x.data_ptr(), M, K, codes.data_ptr(), bits, scales.data_ptr(),
        None if offsets is None else offsets.data_ptr(), codes.shape[0], group_size, y.data_ptr(),
        torch.get_num_threads())
    return y


@quant_matmul.register_fake
def _(x, codes, scales, offsets, bits, group_size):
    return x.new_empty(x.shape[0], codes.shape[0])


KQUANT_FORMATS = {"Q4_K": 0, "Q6_K": 1}


@torch.library.custom_op("llamita::kquant_matmul", mutates_args=())
def kquant_matmul(x: Tensor, blocks: Tensor, format: str) -> Tensor:
    """x [M, K] float32 @ w.T -> [M, N] float32, with w held as GGUF blocks of ``format`` ("Q4_K",
    "Q6_K") [N, K/256 * block bytes], read as stored; x quantized to int8 per block of 256, as
    llama.cpp's Q8_K, so that a block's scaled products add up in integers."""
    x = x.contiguous()
    M, K = x.shape
    y = x.new_empty(M, blocks.shape[0])
    _library().kquant_matmul(x.data_ptr(), M, K, blocks.data_ptr(), KQUANT_FORMATS[format], blocks.shape[0],
                             y.data_ptr(), torch.get_num_threads())
    return y


@kquant_matmul.register_fake
def _(x, blocks, format):
    return x.new_empty(x.shape[0], blocks.shape[0])

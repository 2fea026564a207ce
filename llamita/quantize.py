"""Weight-only int4 and float16 for inference: smaller linear layers, read faster.

Decoding one token reads every weight once, so its speed is the bytes read per token. int4 runs on
torch's tinygemm kernels (``_weight_int4pack_mm``): 4-bit weights read about 4x faster than
float32, the fastest single stream. float16 (CPU) runs on fbgemm's float16 GEMM, which reads half
float32's bytes and computes in float32: nearly float32's accuracy, and the fastest for batches
(``llamita serve``), whose rows torch's int4 kernel handles only four at a time.

int4 quantization is affine per group of ``group_size``
weights along the input dim, ``w = (q - 8) * scale + zero`` with q in 0..15: the kernels' format.

GGUF's Q4_1 blocks (32 weights, ``w = d * q + m``) are that same format with ``scale = d`` and
``zero = m + 8 d``, so a Q4_1 file's codes can be packed as stored instead of requantized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from llamita import layout
from llamita.errors import LlamitaError
from llamita.formats.gguf import q4_1_tensors
from llamita.model import Llama


def group_quantize(w: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """Codes (int32 [N, K], 0..15), scales and zeros (float32 [N, K/g]) from min/max per group.

    A group's min lands exactly on code 0 and its max on 15, as in llama.cpp's Q4_1, so weights
    that were Q4_1 come back with the same codes and values.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of group_size {group_size}")
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = wg.aminmax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)  # a constant group gets all codes 0
    codes = ((wg - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
    return codes.reshape(N, K), scales, lo + 8 * scales


# Rows (tokens) from which a CPU layer dequantizes its weights and calls float32 GEMM instead of
# the int4 kernel: decoding a few rows is bound by reading weights, where int4 wins; a prompt's
# many rows are bound by arithmetic, where the int4 kernel runs at half MKL's float32 speed.
DEQUANTIZE_FROM_ROWS = 64
DEQUANTIZE_CHUNK = 1536  # output features dequantized and multiplied at once


def _inner_k_tiles(in_features: int) -> int:
    """The CUDA kernel's tile count along K: the largest of 8, 4, 2 that divides K / 16."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


class Int4Linear(nn.Module):
    """``nn.Linear`` (no bias) over int4 weights; the kernel computes in its scales' dtype.

    bfloat16 is the fast path (the CPU kernel's float32 path is a slow but exact reference, and
    CUDA has only bfloat16). Buffers: ``codes`` (two per byte, the even column in the high nibble:
    what CUDA's packer takes, and what ``dequantize`` reads), ``weight`` (the kernel's own packing,
    which differs between CPU instruction sets and CUDA: a layer runs where it was packed) and
    ``scales_and_zeros`` [K/g, N, 2]. About 1 byte a weight in all, a quarter of float32.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, *,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        if group_size not in (32, 64, 128, 256) or in_features % group_size:
            raise ValueError(f"group_size must be 32, 64, 128 or 256 and divide in_features {in_features}; "
                             f"got {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        device = torch.device(device or "cpu")
        self.is_cuda = device.type == "cuda"
        if self.is_cuda:
            tiles = _inner_k_tiles(in_features)
            packed = torch.empty(out_features // 8, in_features // (16 * tiles), 32, tiles // 2, dtype=torch.int32,
                                 device=device)
        else:
            packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("weight", packed)
        self.register_buffer("codes", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // group_size, out_features, 2, dtype=dtype, device=device))

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int = 32, *,
                   dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """Pack codes [N, K] (0..15) with scales and zeros [N, K/g], on the codes' device."""
        N, K = codes.shape
        layer = cls(K, N, group_size, dtype=dtype, device=codes.device)
        codes = codes.to(torch.int32).contiguous()
        layer.codes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        if codes.is_cuda:
            layer.weight = torch._convert_weight_to_int4pack(layer.codes, _inner_k_tiles(K))
        else:  # the CPU packer takes one int32 code per weight
            layer.weight = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        layer.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).to(dtype).contiguous()
        return layer

    @classmethod
    def from_float(cls, w: Tensor, group_size: int = 32, *, dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        return cls.from_codes(*group_quantize(w, group_size), group_size, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        # Decoding calls this ~200 times a token, so it keeps to plain attributes and skips no-op casts.
        x2 = x.reshape(-1, self.in_features)
        if self.is_cuda or x2.shape[0] < DEQUANTIZE_FROM_ROWS:
            sz = self.scales_and_zeros
            mm = torch._weight_int4pack_mm if self.is_cuda else torch._weight_int4pack_mm_for_cpu
            y = mm(x2 if x2.dtype == sz.dtype else x2.to(sz.dtype), self.weight, self.group_size, sz)
        else:  # a chunk of output features at a time, into one output: less memory than whole weights
            x2 = x2.float()
            y = x2.new_empty(x2.shape[0], self.out_features)
            for i in range(0, self.out_features, DEQUANTIZE_CHUNK):
                w = self.dequantize(i, i + DEQUANTIZE_CHUNK)
                torch.mm(x2, w.T, out=y[:, i: i + w.shape[0]])
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def dequantize(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of the weights [N, K] in float32: ``(q - 8) * scale + zero``, the
        values the kernel uses. A prompt dequantizes every layer, so each nibble goes from its byte
        to its float in one pass (``addcmul`` converts uint8 as it reads)."""
        codes = self.codes[start:stop]
        N, K, g = codes.shape[0], self.in_features, self.group_size
        scales, zeros = self.scales_and_zeros[:, start:stop].float().unbind(-1)  # [K/g, N] each
        scales, offsets = scales.T[..., None], (zeros - 8 * scales).T[..., None]
        pairs = codes.view(N, K // g, g // 2)
        w = torch.empty(N, K // g, g // 2, 2, device=codes.device)  # even columns in the high nibbles
        torch.addcmul(offsets, pairs >> 4, scales, out=w[..., 0])
        torch.addcmul(offsets, pairs & 15, scales, out=w[..., 1])
        return w.view(N, K)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Float16Linear(nn.Module):
    """``nn.Linear`` (no bias) over float16 weights on CPU, float32 in and out: fbgemm's packed
    float16 GEMM converts the weights as it reads them. Measured here against float32 (MKL) over
    the default model's layers: 2.7x faster for one row, 2x for 16, 10% for 512; against the int4
    kernel, 1.4x slower for one row and 1.3-1.5x faster for 8 to 16 (docs/speed.md)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), None)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.quantized.linear_dynamic_fp16(x2 if x2.dtype == torch.float32 else x2.float(), self.packed)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def dequantize(self) -> Tensor:
        """The weights [N, K] the GEMM uses (the float16 values), in float32."""
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class ScreenedLMHead(nn.Module):
    """The output layer of an int4 model: int4 logits for the whole vocabulary pick a shortlist,
    whose logits are then recomputed exactly from the 16-bit weights (shared with the embedding).

    An int4 output layer alone costs accuracy (docs/speed.md), a 16-bit one costs time, most of
    all on a batch of rows on CPU; the words that decide greedy decoding and top-p/top-k sampling
    are all in the shortlist, where the logits are exact. The rest keep their int4 values.
    """

    def __init__(self, weight: nn.Parameter, shortlist: int = 64, group_size: int = 32, *,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.weight = weight
        self.shortlist = min(shortlist, weight.shape[0])
        self.screen = Int4Linear.from_float(weight, group_size, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.screen(x).float()
        top = logits.topk(self.shortlist, dim=-1).indices  # [..., k]
        exact = (self.weight[top].float() @ x.float()[..., None])[..., 0]  # [..., k, D] @ [..., D, 1]
        return logits.scatter_(-1, top, exact)


def replace_linears(model: Llama, make: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Replace each block's linear layers, in place, with ``make(name, linear)``."""
    for name, module in list(model.layers.named_modules(prefix="layers")):
        if isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, make(name, module))


def quantize_int4(model: Llama, group_size: int = 32, *, gguf_path: str | Path | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> Llama:
    """Replace the blocks' linear layers with ``Int4Linear``, in place, q/k/v and gate/up fused.

    ``gguf_path``: the GGUF file the model was loaded from (unchanged since, e.g. no merged
    adapter); with group_size 32 its Q4_1 tensors are packed as stored, lossless by construction,
    the others quantized from the model's weights. ``dtype``: the kernel's (its activations' and
    scales'); bfloat16 is the fast one. On CUDA the rest of the model becomes ``dtype`` too. On
    CPU the rest runs in float32, since without bfloat16 hardware attention and elementwise ops
    are several times slower in bfloat16, and the embedding and ``lm_head`` (often tied to it)
    are held in float16. ``lm_head`` becomes a ``ScreenedLMHead``: int4 to find the likely
    words, the 16-bit weights for their exact logits.
    """
    stored: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    if gguf_path is not None and group_size == 32:
        stored = {name: (codes.to(torch.uint8), scales, zeros)  # a byte a code until packed
                  for name, codes, scales, zeros in q4_1_tensors(gguf_path, model.config)}

    def int4(name: str, linear: nn.Linear) -> Int4Linear:
        """The layer's stored Q4_1 codes where the file has them (part by part: q/k/v, gate/up)."""
        pieces = []
        for part, start, stop in layout.parts(model.config, name):
            w = linear.weight[start:stop]
            if part in stored:
                codes, scales, zeros = stored[part]
                if codes.shape != w.shape:
                    raise ValueError(f"{gguf_path}: {part} has shape {tuple(codes.shape)}, the model {tuple(w.shape)}")
                pieces.append((codes.to(w.device), scales.to(w.device), zeros.to(w.device)))
            else:
                pieces.append(group_quantize(w, group_size))
        return Int4Linear.from_codes(*(torch.cat(x) for x in zip(*pieces)), group_size, dtype=dtype)

    replace_linears(model, int4)
    cuda = model.lm_head.weight.is_cuda
    body, head = (dtype, dtype) if cuda else (torch.float32, torch.float16)
    for name, p in model.named_parameters():  # Int4Linear holds buffers only
        p.data = p.data.to(head if name.startswith(("embed_tokens", "lm_head")) else body)
    model.lm_head = ScreenedLMHead(model.lm_head.weight, group_size=group_size, dtype=dtype)
    return model


def quantize_float16(model: Llama) -> Llama:
    """Replace the linear layers, ``lm_head`` included, with ``Float16Linear``, in place, q/k/v and
    gate/up fused; the rest runs in float32 and the embedding is kept in float16. CPU only (fbgemm
    is x86's): on CUDA, ``dtype=torch.float16`` is the native way."""
    device = model.embed_tokens.weight.device
    if device.type != "cpu":
        raise LlamitaError(f"quantize='float16' runs on CPU only (the model is on {device}); "
                           "on CUDA use --dtype float16")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise LlamitaError("quantize='float16' needs fbgemm (x86 CPUs); this torch has "
                           f"{torch.backends.quantized.supported_engines}: use --quantize int4")

    replace_linears(model, lambda name, linear: Float16Linear(linear.weight))
    model.lm_head = Float16Linear(model.lm_head.weight)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float16 if name.startswith("embed_tokens") else torch.float32)
    return model

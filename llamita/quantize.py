"""Weight-only quantized layers for inference: smaller linear layers, read faster.

Decoding one token reads every weight once, so its speed is the bytes read per token. A
``QuantizedWeight`` holds a matrix in one of two forms:

- integer codes with a float16 scale, and optionally an offset, per group along the input dim
  (``w = code * scale + offset``): 4 bits (two a byte; Q4_0 and Q4_1 as stored, or float weights by
  min/max per group of 32, as Q4_1) or 8 bits (Q5_0, Q5_1, Q5_K and Q8_0 hold their exact values;
  float weights by absmax per group of 32, as Q8_0);
- GGUF's own Q4_K and Q6_K blocks, byte for byte, as compact as llama.cpp reads them.

``QuantLinear`` runs either on CPU through the compiled kernel (``llamita.kernels``: int8
activations, integer products, as llama.cpp); a prompt of many rows dequantizes a chunk of weights
at a time into the float32 GEMM instead (codes only: decoding blocks in PyTorch costs more than the
kernel). CUDA's 4-bit layers run on torch's tinygemm kernel. ``Float16Linear`` (fbgemm's float16
GEMM) is the fastest for batches on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor, nn

from llamita import kernels
from llamita.errors import LlamitaError
from llamita.formats import blocks
from llamita.model import Llama

KINDS = ("auto", "none", "int4", "int8", "float16")
# GGUF blocks the CPU kernel reads as stored (256 weights each): bytes a block, bits a weight's code
BLOCKS = {"Q4_K": (144, 4), "Q6_K": (210, 6)}


@dataclass
class QuantizedWeight:
    """A weight matrix [N, K] as codes, scales and offsets, rows first in each: ``codes`` uint8
    [N, K/2] for 4 bits (in each run of 32 weights, byte j holds weight j in its low nibble and
    weight j + 16 in its high one: GGUF's order) or int8 [N, K] for 8; ``scales`` and ``offsets``
    [N, K/group_size] (float16 in layers, float32 as read from a file), offsets None where all zero.

    ``blocks``: instead, GGUF's own blocks of that type ("Q4_K", "Q6_K": 256 weights in 144 and 210
    bytes), ``codes`` their bytes [N, K/256 * block bytes], scales and offsets None: the CPU kernel
    reads them as stored, as compact as llama.cpp's; ``decoded()`` gives the plain layout."""

    codes: Tensor
    scales: Tensor | None
    offsets: Tensor | None
    bits: int
    group_size: int
    blocks: str | None = None

    @property
    def shape(self) -> torch.Size:
        if self.blocks:
            return torch.Size((self.codes.shape[0], self.codes.shape[1] // BLOCKS[self.blocks][0] * 256))
        return torch.Size((self.codes.shape[0], self.scales.shape[1] * self.group_size))

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> "QuantizedWeight":
        """The same weight with ``fn`` (a reordering or slicing of rows) applied to each part."""
        return replace(self, codes=fn(self.codes), scales=None if self.scales is None else fn(self.scales),
                       offsets=None if self.offsets is None else fn(self.offsets))

    def decoded(self) -> "QuantizedWeight":
        """The plain layout of the same values (GGUF blocks decoded to codes, scales and offsets)."""
        if not self.blocks:
            return self
        return QuantizedWeight(*blocks.decode(self.codes, self.blocks))

    def unpacked_codes(self) -> Tensor:
        """The codes one a weight, [N, K] (uint8 for 4 bits, int8 for 8)."""
        if self.blocks:
            return self.decoded().unpacked_codes()
        if self.bits == 8:
            return self.codes
        N, K = self.shape
        runs = self.codes.view(N, K // 32, 16)
        return torch.cat([runs & 15, runs >> 4], dim=-1).view(N, K)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weights [N, K] in ``dtype``; each code goes from its byte to its float in one pass
        (``addcmul`` converts integers as it reads), since a prompt dequantizes every layer."""
        if self.blocks:
            return self.decoded().dequantize(dtype)
        N, K = self.shape
        runs = K // 32  # runs of 32 weights; a group is one or more runs, or half of one (16)
        per_run = lambda t: t.to(dtype).repeat_interleave(max(self.group_size // 32, 1), 1)  # noqa: E731
        if self.bits == 4:
            scales, codes = per_run(self.scales).view(N, runs, 1), self.codes.view(N, runs, 16)
            offsets = per_run(self.offsets).view(N, runs, 1) if self.offsets is not None else None
            w = torch.empty(N, runs, 2, 16, dtype=dtype, device=self.codes.device)
            for half, part in ((0, codes & 15), (1, codes >> 4)):
                if offsets is None:
                    torch.mul(part, scales, out=w[:, :, half])
                else:
                    torch.addcmul(offsets, part, scales, out=w[:, :, half])
            return w.view(N, K)
        groups = K // self.group_size
        codes, scales = self.codes.view(N, groups, self.group_size), self.scales.to(dtype)[..., None]
        w = torch.empty(N, groups, self.group_size, dtype=dtype, device=self.codes.device)
        if self.offsets is None:
            return torch.mul(codes, scales, out=w).view(N, K)
        return torch.addcmul(self.offsets.to(dtype)[..., None], codes, scales, out=w).view(N, K)


def pack_int4(codes: Tensor) -> Tensor:
    """Codes 0..15 [N, K] -> [N, K/2] bytes in QuantizedWeight's order."""
    N, K = codes.shape
    runs = codes.to(torch.uint8).view(N, K // 32, 2, 16)
    return (runs[:, :, 0] | runs[:, :, 1] << 4).view(N, K // 2)


def cat_rows(parts: list) -> Tensor | QuantizedWeight | list[QuantizedWeight]:
    """The parts of a fused module (q/k/v, gate/up), rows one after the other. Quantized parts stored
    in different layouts (Q4_K_M's q and k in 4 bits, v in 6 in some layers) stay apart, a list of
    parts that ``quantized_layer`` runs side by side, each read as compactly as it is stored."""
    if not any(isinstance(p, QuantizedWeight) for p in parts):
        return torch.cat(parts)
    parts = [p if isinstance(p, QuantizedWeight) else group_quantize(p, 32, bits=8) for p in parts]
    if len({(p.bits, p.group_size, p.offsets is None, p.blocks) for p in parts}) > 1:
        return parts
    first = parts[0]
    cat = lambda field: None if getattr(first, field) is None else torch.cat([getattr(p, field) for p in parts])  # noqa: E731
    return replace(first, codes=cat("codes"), scales=cat("scales"), offsets=cat("offsets"))


def group_quantize(w: Tensor, group_size: int = 32, bits: int = 4, rows: int = 1024) -> QuantizedWeight:
    """Float weights [N, K] -> codes per group: 4 bits by min/max (a group's min lands exactly on code
    0 and its max on 15, as in llama.cpp's Q4_1), 8 bits by absmax (as in Q8_0). ``rows`` at a time,
    so the float32 temporaries stay small whatever the layer's size."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of group_size {group_size}")
    if N > rows:
        return cat_rows([group_quantize(w[i: i + rows], group_size, bits, rows) for i in range(0, N, rows)])
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    if bits == 8:
        scales = (wg.abs().amax(dim=-1) / 127).clamp(min=1e-10).half()
        codes = (wg / scales.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight(codes.reshape(N, K), scales, None, 8, group_size)
    lo, hi = wg.aminmax(dim=-1)
    lo, scales = lo.half(), ((hi - lo) / 15).clamp(min=1e-7).half()  # a constant group gets all codes 0
    codes = (wg - lo.float()[..., None]).div_(scales.float()[..., None]).round_().clamp_(0, 15)  # stored values
    return QuantizedWeight(pack_int4(codes.reshape(N, K)), scales, lo, 4, group_size)


# Rows (tokens) from which a CPU layer dequantizes its weights into the float32 GEMM instead of using
# the kernel: the kernel's integer products keep their rate at any row count, the GEMM pays for
# dequantizing the whole layer and catches up only at a few hundred rows (bench/kernel.py).
DEQUANTIZE_FROM_ROWS = 384
DEQUANTIZE_CHUNK = 1536  # output features dequantized and multiplied at once


def _inner_k_tiles(in_features: int) -> int:
    """The CUDA kernel's tile count along K: the largest of 8, 4, 2 that divides K / 16."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


class QuantLinear(nn.Module):
    """``nn.Linear`` (no bias) over a ``QuantizedWeight``'s buffers: ``codes``, ``scales``,
    ``offsets`` (absent where zero). On CUDA, int4 also holds tinygemm's packing (``weight``,
    ``scales_and_zeros``, bfloat16), which is what runs there."""

    def __init__(self, q: QuantizedWeight):
        super().__init__()
        if q.blocks and (q.codes.is_cuda or not kernels.available()):
            q = q.decoded()  # GGUF blocks run only on the CPU kernel; elsewhere the plain layout
        self.out_features, self.in_features = q.shape
        self.bits, self.group_size, self.blocks = q.bits, q.group_size, q.blocks
        self.register_buffer("codes", q.codes)
        self.register_buffer("scales", None if q.scales is None else q.scales.half())  # k-quants' products round here
        self.register_buffer("offsets", None if q.offsets is None else q.offsets.half())
        # tinygemm's tiles: output features in eights, input features in 32s; other shapes take the plain path
        self.tinygemm = q.codes.is_cuda and q.bits == 4 and self.out_features % 8 == 0 and self.in_features % 32 == 0
        self.kernel = not q.codes.is_cuda and kernels.available()
        if self.tinygemm:
            codes = q.unpacked_codes().to(torch.int32)
            # Buffers, not attributes: they follow .to(), and CUDA graphs read them where they are.
            self.register_buffer("weight", torch._convert_weight_to_int4pack(
                (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), _inner_k_tiles(self.in_features)),
                persistent=False)
            offsets = q.offsets if q.offsets is not None else torch.zeros_like(q.scales)
            zeros = offsets.float() + 8 * q.scales.float()  # tinygemm's zero: the value of code 8
            self.register_buffer("scales_and_zeros", torch.stack([q.scales.float(), zeros], -1).transpose(0, 1)
                                 .bfloat16().contiguous(), persistent=False)

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scales, self.offsets, self.bits, self.group_size, self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        # Decoding calls this ~200 times a token, so it keeps to plain attributes and skips no-op casts.
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if self.tinygemm:
            y = torch._weight_int4pack_mm(x2.bfloat16(), self.weight, self.group_size, self.scales_and_zeros)
        elif self.blocks and self.kernel:  # decoding GGUF blocks costs more than the kernel at any size
            y = kernels.kquant_matmul(x2 if x2.dtype == torch.float32 else x2.float(), self.codes, self.blocks)
        elif self.kernel and rows < DEQUANTIZE_FROM_ROWS:
            y = kernels.quant_matmul(x2 if x2.dtype == torch.float32 else x2.float(), self.codes, self.scales,
                                     self.offsets, self.bits, self.group_size)
        else:  # a chunk of output features at a time, into one output: less memory than whole weights
            dtype = torch.float32 if x2.device.type == "cpu" else x2.dtype
            x2 = x2.to(dtype)
            y = x2.new_empty(rows, self.out_features)
            for i in range(0, self.out_features, DEQUANTIZE_CHUNK):
                w = self.dequantize(i, i + DEQUANTIZE_CHUNK, dtype)
                torch.mm(x2, w.T, out=y[:, i: i + w.shape[0]])
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def dequantize(self, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows ``start:stop`` of the weights [N, K]: the values the kernels use."""
        return self.quantized.map_rows(lambda t: t[start:stop]).dequantize(dtype)

    def rows(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the weights in float32: an embedding lookup."""
        flat = ids.reshape(-1)
        return self.quantized.map_rows(lambda t: t[flat]).dequantize().view(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


class ConcatLinear(nn.Module):
    """A fused layer (q/k/v) whose parts are stored in different layouts: each part its own layer,
    their outputs side by side, as the fused matrix would give them."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)

    def dequantize(self) -> Tensor:
        return torch.cat([part.dequantize() for part in self.parts])


class QuantEmbedding(nn.Module):
    """An embedding over a ``QuantLinear``'s codes (a GGUF's quantized token_embd): each token's row is
    dequantized as it is looked up, so the table stays as small as stored, and a tied output layer
    is the same module."""

    def __init__(self, table: QuantLinear):
        super().__init__()
        self.table = table

    def forward(self, ids: Tensor) -> Tensor:
        return self.table.rows(ids)


class Float16Linear(nn.Module):
    """``nn.Linear`` (no bias) over float16 weights on CPU, float32 in and out: fbgemm's packed
    float16 GEMM converts the weights as it reads them. Measured here against float32 (MKL) over
    the default model's layers: 2.7x faster for one row, 2x for 16, 10% for 512 (docs/speed.md)."""

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
    """The output layer of a model quantized to int4 from float weights: int4 logits for the whole
    vocabulary pick a shortlist, whose logits are then recomputed exactly from the 16-bit weights
    (shared with the embedding).

    An int4 output layer alone costs accuracy (docs/speed.md), a 16-bit one costs time; the words
    that decide greedy decoding and top-p/top-k sampling are all in the shortlist, where the logits
    are exact. The rest keep their int4 values.
    """

    def __init__(self, weight: nn.Parameter, shortlist: int = 64, group_size: int = 32):
        super().__init__()
        self.weight = weight
        self.shortlist = min(shortlist, weight.shape[0])
        self.screen = QuantLinear(group_quantize(weight, group_size))

    def forward(self, x: Tensor) -> Tensor:
        logits = self.screen(x).float()
        top = logits.topk(self.shortlist, dim=-1).indices  # [..., k]
        exact = (self.weight[top].float() @ x.float()[..., None])[..., 0]  # [..., k, D] @ [..., D, 1]
        return logits.scatter_(-1, top, exact)


def check_kind(quantize: str, device: torch.device | str = "cpu") -> None:
    if quantize not in KINDS:
        raise LlamitaError(f"unknown quantization {quantize!r} (known: {', '.join(KINDS)})")
    if quantize == "float16" and torch.device(device).type != "cpu":
        raise LlamitaError(f"quantize='float16' runs on CPU only (the model is on {device}); "
                           "on CUDA use --dtype float16")
    if quantize == "float16" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise LlamitaError("quantize='float16' needs fbgemm (x86 CPUs); this torch has "
                           f"{torch.backends.quantized.supported_engines}: use --quantize int4")


def quantized_layer(weight: Tensor | QuantizedWeight | list[QuantizedWeight], quantize: str,
                    group_size: int = 32) -> nn.Module | None:
    """The layer for one linear weight under ``quantize`` ("auto": as stored), or None where it stays a
    plain float weight. A stored layout is kept where it has no more bits than asked for (GGUF's Q4_*
    under int4 or int8), so its codes come back exactly; anything else is quantized from float values."""
    if isinstance(weight, list):  # parts stored in different layouts (``cat_rows``)
        return ConcatLinear([quantized_layer(part, quantize, group_size) for part in weight])
    stored = isinstance(weight, QuantizedWeight)
    if quantize == "none":
        return None
    if quantize == "auto":
        return QuantLinear(weight) if stored else None
    if quantize == "float16":
        return Float16Linear(weight.dequantize() if stored else weight)
    bits = {"int4": 4, "int8": 8}[quantize]
    if stored and weight.bits <= bits:
        return QuantLinear(weight)
    return QuantLinear(group_quantize(weight.dequantize() if stored else weight, group_size, bits))


def finish(model: Llama, quantize: str, group_size: int = 32) -> Llama:
    """The rest of a model whose block layers are quantized: the output layer and the dtypes.

    On CPU the rest runs in float32, since without bfloat16 hardware attention and elementwise ops
    are several times slower in bfloat16, and the embedding is held in float16. A float output layer
    becomes, under int4, a ``ScreenedLMHead`` (int4 to find the likely words, the 16-bit weights for
    their exact logits), under int8 or float16 that layer. On CUDA the rest becomes bfloat16.
    """
    cuda = model.norm.weight.is_cuda
    body, head = (torch.bfloat16, torch.bfloat16) if cuda else (torch.float32, torch.float16)
    for name, p in model.named_parameters():  # a tied output layer's weight is the embedding's
        p.data = p.data.to(head if name.startswith(("embed_tokens", "lm_head")) else body)
    if not isinstance(model.lm_head, nn.Linear):
        return model
    if quantize == "int4":
        model.lm_head = ScreenedLMHead(model.lm_head.weight, group_size=group_size)
    elif quantize in ("int8", "float16"):
        model.lm_head = quantized_layer(model.lm_head.weight, quantize, group_size)
    elif not cuda:  # "auto" with a float output layer (an F16 GGUF tensor): float16 weights, float32 out
        if "fbgemm" in torch.backends.quantized.supported_engines:
            model.lm_head = Float16Linear(model.lm_head.weight)
        else:
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.float(), requires_grad=False)
    return model


def quantize(model: Llama, kind: str, group_size: int = 32) -> Llama:
    """Quantize a loaded float model in place (e.g. after an adapter is merged into it); loading with
    ``load_model(..., quantize=kind)`` does the same layer by layer, never holding the float model."""
    check_kind(kind, model.norm.weight.device)
    if kind in ("auto", "none"):
        return model
    for name, module in list(model.layers.named_modules(prefix="layers")):
        if isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, quantized_layer(module.weight, kind, group_size))
    return finish(model, kind, group_size)

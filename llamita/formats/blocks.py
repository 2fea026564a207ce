"""GGUF's quantized blocks -> codes, scales and offsets (``w = code * scale + offset``), in torch.

Each decoder takes one tensor's blocks as bytes [N rows, blocks per row, block bytes] and returns
(codes: 8 bits one a weight, 4 bits two a byte in ``QuantizedWeight``'s order; scales and offsets
[N, K / group] in float32; bits; group size), every weight exactly as llama.cpp computes it.
"""

from __future__ import annotations

from typing import Callable

import gguf
import torch
from torch import Tensor


def _f16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).float()[..., 0]


def _nibbles(qs: Tensor) -> Tensor:
    """Bytes [..., n] -> [..., 2n]: the low nibbles, then the high ones."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _high_bits(qh: Tensor, count: int) -> Tensor:
    """Bit j of a little-endian bit field [..., bytes] for j < count."""
    bits = qh[..., :, None] >> torch.arange(8, dtype=torch.uint8, device=qh.device)
    return (bits & 1).flatten(-2)[..., :count]


def _k_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block's 12 scale bytes."""
    d, m, md = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    scales = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mins = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return scales.float(), mins.float()


def _q4_0(b):
    d = _f16(b[..., 0:2])
    return b[..., 2:18], d, -8 * d, 4, 32  # already QuantizedWeight's packing


def _q4_1(b):
    return b[..., 4:20], _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4, 32


def _q8_0(b):
    return b[..., 2:34].view(torch.int8), _f16(b[..., 0:2]), None, 8, 32


def _q5_0(b):
    q = _nibbles(b[..., 6:22]) | _high_bits(b[..., 2:6], 32) << 4
    return q.to(torch.int8) - 16, _f16(b[..., 0:2]), None, 8, 32


def _q5_1(b):
    q = _nibbles(b[..., 8:24]) | _high_bits(b[..., 4:8], 32) << 4
    return q.to(torch.int8), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 8, 32


def _k_affine(b, q):
    """Super-blocks of 8 groups of 32: w = d * scale * q - dmin * min."""
    scales, mins = _k_scales(b[..., 4:16])
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    return q, (d * scales).flatten(-2), (-dmin * mins).flatten(-2)


def _q4_k(b):
    # 4 runs of 32 bytes: the low nibbles are one group of 32, the high nibbles the next. Repacked
    # straight into QuantizedWeight's order (byte j of a group: weights j and j + 16).
    qs = b[..., 16:144].unflatten(-1, (4, 2, 16))
    first, second = qs[..., 0, :], qs[..., 1, :]  # bytes 0..15 and 16..31 of each run
    packed = torch.stack([(first & 15) | (second << 4), (first >> 4) | (second & 0xF0)], dim=-2)
    return (*_k_affine(b, packed.flatten(-3)), 4, 32)


def _q5_k(b):
    low = _nibbles(b[..., 48:176].unflatten(-1, (4, 32))).flatten(-2)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)[:, None]
    high = (b[..., 16:48][..., None, :] >> shifts) & 1  # group g: bit g
    return (*_k_affine(b, (low | high.flatten(-2) << 4).to(torch.int8)), 8, 32)


def _q6_k(b):
    # two halves of 128 weights: 64 bytes of low nibbles (weights 0..63, then 64..127) and 32 bytes of
    # 2-bit high parts (weights 0..31, 32..63, 64..95, 96..127 at shifts 0, 2, 4, 6); 16 groups of 16.
    ql = _nibbles(b[..., 0:128].unflatten(-1, (2, 64)))
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)[:, None]
    qh = (b[..., 128:192].unflatten(-1, (2, 1, 32)) >> shifts) & 3
    q = (ql | qh.flatten(-2) << 4).flatten(-2).to(torch.int8) - 32
    return q, _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(torch.int8).float(), None, 8, 16


DECODERS: dict[str, Callable] = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q5_0": _q5_0, "Q5_1": _q5_1,
                                 "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def decode(raw: Tensor, qtype: str) -> tuple[Tensor, Tensor, Tensor | None, int, int]:
    """Blocks [N, row bytes] of GGUF type ``qtype`` -> (codes [N, ...], scales and offsets [N, groups]
    in float32 (exact: k-quants multiply two stored numbers), bits, group size)."""
    N = raw.shape[0]
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    codes, scales, offsets, bits, group = DECODERS[qtype](raw.view(N, -1, block_bytes))
    return (codes.reshape(N, -1).contiguous(), scales.reshape(N, -1),
            None if offsets is None else offsets.reshape(N, -1), bits, group)



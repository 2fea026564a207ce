"""Weight-only int4 for inference, on torch's tinygemm kernels (``_weight_int4pack_mm``).

Decoding one token reads every weight once, so its speed is bytes read per token: 4-bit weights
read about 4x faster than float32. Quantization is affine per group of ``group_size`` weights
along the input dim, ``w = (q - 8) * scale + zero`` with q in 0..15, the layout the kernels take.

GGUF's Q4_1 blocks (32 weights, ``w = d * q + m``) are that same format with ``scale = d`` and
``zero = m + 8 d``, so a Q4_1 file's codes are packed as they are instead of requantized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from llamita.model import Llama

# The CUDA kernel's tile width along K; the CPU kernel ignores it.
INNER_K_TILES = 8


def group_quantize(w: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """Codes (int32 [N, K], 0..15), scales and zeros (float32 [N, K/g]) from min/max per group.

    The group's min lands exactly on code 0 and its max on code 15, as llama.cpp's Q4_1 does.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of group_size {group_size}")
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)  # a constant group: any scale, every code 0
    codes = ((wg - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
    return codes.reshape(N, K), scales, lo + 8 * scales


class Int4Linear(nn.Module):
    """``nn.Linear`` (no bias) over packed int4 weights; computes in its scales' dtype.

    bfloat16 is the fast path (the CPU kernel's float32 path is a slow reference, and CUDA only
    has bfloat16). The packed layout differs between CPU and CUDA, so pack on the device it runs on.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, *,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        device = torch.device(device or "cpu")
        if device.type == "cuda":
            packed_shape, packed_dtype = (out_features // 8, in_features // (INNER_K_TILES * 16), 32, INNER_K_TILES // 2), torch.int32
        else:
            packed_shape, packed_dtype = (out_features, in_features // 2), torch.uint8
        self.register_buffer("weight", torch.empty(packed_shape, dtype=packed_dtype, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=dtype, device=device))

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int = 32, *,
                   dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """Pack codes [N, K] (0..15) with scales, zeros [N, K/g], on the codes' device."""
        N, K = codes.shape
        layer = cls(K, N, group_size, dtype=dtype, device=codes.device)
        codes = codes.to(torch.int32).contiguous()
        if codes.is_cuda:  # CUDA packs uint8 pairs, even column in the high nibble
            layer.weight = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), INNER_K_TILES)
        else:  # CPU packs int32 codes itself
            layer.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        layer.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).to(dtype).contiguous()
        return layer

    @classmethod
    def from_float(cls, w: Tensor, group_size: int = 32, *, dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        return cls.from_codes(*group_quantize(w, group_size), group_size, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.scales_and_zeros.dtype
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if self.weight.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> Tensor:
        """The weights [N, K] the kernel computes with (the packed layout is the kernel's own)."""
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype, device=self.weight.device)
        return self(eye).T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def q4_1_codes(path: str | Path, n_heads: int, n_kv_heads: int) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Codes, scales and zeros of every Q4_1 tensor in a GGUF file, by llamita name, q/k rows
    permuted to the rotate-half layout as ``load_model`` permutes the float weights."""
    import gguf

    from llamita.formats import interleaved_to_half
    from llamita.formats.gguf import llamita_name, open_gguf

    path = Path(path)
    out = {}
    for t in open_gguf(path).tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1 or (name := llamita_name(t.name, path)) is None:
            continue
        N, K = int(t.shape[1]), int(t.shape[0])
        # A block: d, m (float16), then 16 bytes: weights 0..15 in the low nibbles, 16..31 in the high.
        blocks = np.asarray(t.data).reshape(N, K // 32, 20)
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0]).float()
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]).float()
        qs = torch.from_numpy(blocks[..., 4:].copy()).to(torch.int32)
        codes = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(N, K)
        scales, zeros = d, m + 8 * d
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_heads if "q_proj" in name else n_kv_heads
            codes, scales, zeros = (interleaved_to_half(x, heads) for x in (codes, scales, zeros))
        out[name.removesuffix(".weight")] = codes, scales, zeros
    return out


def quantize_int4(model: Llama, group_size: int = 32, *, gguf_path: str | Path | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> Llama:
    """Replace the blocks' linear layers with ``Int4Linear``, in place; the rest goes to ``dtype``.

    ``gguf_path``: the GGUF file the model was loaded from; its Q4_1 tensors are packed as stored
    (lossless) when ``group_size`` is 32, the others quantized from the model's weights.
    ``lm_head`` stays as it is (tied to the embedding in small models; see docs/speed.md).
    """
    c = model.config
    stored = q4_1_codes(gguf_path, c.n_heads, c.n_kv_heads) if gguf_path is not None and group_size == 32 else {}
    for name, module in list(model.layers.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        full = f"layers.{name}"
        w = module.weight
        if full in stored:
            codes, scales, zeros = (x.to(w.device) for x in stored[full])
            layer = Int4Linear.from_codes(codes, scales, zeros, group_size, dtype=dtype)
        else:
            layer = Int4Linear.from_float(w, group_size, dtype=dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.layers.get_submodule(parent), attr, layer)
    return model.to(dtype)

"""NF4, the 4-bit NormalFloat of the QLoRA paper (Dettmers et al. 2023), in plain PyTorch.

Weights are cut into blocks of 64; each block is divided by its absolute maximum and every value
is rounded to the nearest of 16 levels (quantiles of a normal distribution, with an exact zero).
Two 4-bit codes share a byte, so a weight costs 4 bits plus 32/64 bits of float32 absmax: 4.5 bits,
0.28 of bfloat16's 16. The frozen base of a QLoRA model is held this way and dequantized block by
block on the fly in ``forward``; gradients flow to the input (and so to the LoRA adapters), never
to the codes. (The paper's double quantization of the absmax would save another 0.37 bit.)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK = 64

# The paper's NF4 levels, as bitsandbytes ships them (functional.py, get_4bit_type("nf4")).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


@functools.cache
def levels_on(device: torch.device) -> Tensor:
    """The levels where the codes are, copied there once (not at every layer's every forward)."""
    return NF4_LEVELS.to(device)


def nf4_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """(codes packed two per byte, uint8 [numel/2]; absmax, float32 [numel/64]) of ``w``."""
    if w.numel() % BLOCK:
        raise ValueError(f"NF4 needs a multiple of {BLOCK} weights; got shape {tuple(w.shape)}")
    blocks = w.detach().float().reshape(-1, BLOCK)
    absmax = blocks.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny)
    levels = NF4_LEVELS.to(w.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # nearest level = how many midpoints lie below
    codes = torch.bucketize(blocks / absmax[:, None], midpoints).to(torch.uint8).reshape(-1, 2)
    return codes[:, 0] << 4 | codes[:, 1], absmax


def nf4_dequantize(packed: Tensor, absmax: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1, BLOCK).long()
    values = levels_on(packed.device)[codes] * absmax[:, None]
    return values.reshape(shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` (no bias) stored in NF4; computes in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("NF4Linear: Llama's linear layers have no bias")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_shape = linear.weight.shape
        packed, absmax = nf4_quantize(linear.weight)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return nf4_dequantize(self.packed, self.absmax, self.weight_shape, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.absmax.numel() * self.absmax.element_size()


def quantize_nf4(model: nn.Module) -> nn.Module:
    """Replace the linear layers of the transformer blocks by NF4Linear, in place.

    The embedding and the output layer stay as they are, as in the QLoRA paper's setup.
    """
    for name, module in list(model.named_modules()):
        if name.startswith("layers.") and isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, NF4Linear(module))
    return model

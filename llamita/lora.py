"""LoRA (Hu et al. 2021): low-rank adapters beside frozen linear layers, and merging them in.

``W x + (alpha / r) * B A x``, with A [r, in] random and B [out, r] zero, so an adapted model starts
out equal to its base. An adapter belongs to a checkpoint module (q_proj, v_proj...): on a fused
layer (qkv_proj, gate_up_proj) it updates that part's rows, so adapters keep PEFT's names and
shapes (``llamita.peft`` reads and writes PEFT's files).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llamita import layout
from llamita.errors import LlamitaError
from llamita.nf4 import NF4Linear

# Short names (litgpt's style, as --lora-targets takes them) -> the module path inside a block.
TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
DEFAULT_TARGETS = ("q", "v")  # PEFT's default for Llama, and litgpt's (query and value)


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        if self.r < 1:
            raise LlamitaError(f"LoRA rank must be at least 1; got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LlamitaError(f"LoRA dropout must be in [0, 1); got {self.dropout}")


def parse_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """"q,v" / "all" / ("q_proj", "v") -> ("q", "v"); HF's names are accepted too."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [n.strip().removesuffix("_proj") for n in names if n.strip()]
    if names == ["all"]:
        return tuple(TARGETS)
    if unknown := [n for n in names if n not in TARGETS]:
        raise LlamitaError(f"--lora-targets: unknown module {unknown[0]!r} (known: {', '.join(TARGETS)}, all)")
    if not names:
        raise LlamitaError("--lora-targets: name at least one module")
    return tuple(t for t in TARGETS if t in names)


class LoRADropout(nn.Module):
    """Dropout of a LoRA layer's input, one mask per call, shared by the layer's adapters (q, k
    and v's read one input, as with litgpt's fused qkv).

    Drawn from 16-bit random numbers, four per 64-bit draw: on CPU the generator, not the
    arithmetic, is dropout's cost, and this is 3x cheaper than ``F.dropout``. p is rounded to a
    multiple of 2^-16 and the scale follows it, so the expectation stays exact.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        n, drop = x.numel(), round(self.p * 65536)
        draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
        keep = draws.view(torch.int16)[:n].view_as(x) >= drop - 32768
        return torch.where(keep, x * (65536 / (65536 - drop)), 0.0)


class LoRAUpdate(nn.Module):
    """One adapter: ``scaling * B A x``, for the rows ``rows`` (start, end) of its layer's output."""

    def __init__(self, in_features: int, rows: tuple[int, int], r: int, scaling: float, device: torch.device):
        super().__init__()
        self.rows, self.scaling = rows, scaling
        # Adapters stay float32 whatever the base's dtype: they are what the optimizer updates.
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, rows[1] - rows[0], bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(x))

    def delta(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


class LoRALinear(nn.Module):
    """A frozen linear layer (``base_layer``: nn.Linear or NF4Linear) plus trainable adapters of
    some of its rows, each named by its checkpoint module ("q_proj"): on a fused layer (qkv_proj)
    one per adapted part, on any other one for all its rows. ``parts`` maps those names to rows;
    ``r`` and ``scaling`` may differ per part (PEFT's rank_pattern, alpha_pattern)."""

    def __init__(self, base_layer: nn.Module, parts: dict[str, tuple[int, int]], r: int | dict[str, int],
                 alpha: float, dropout: float = 0.0, scaling: dict[str, float] | None = None):
        super().__init__()
        self.base_layer = base_layer
        ranks = r if isinstance(r, dict) else dict.fromkeys(parts, r)
        scaling = scaling or {name: alpha / ranks[name] for name in parts}
        device = next(base_layer.buffers(), None)
        device = device.device if device is not None else base_layer.weight.device
        self.adapters = nn.ModuleDict({
            name: LoRAUpdate(base_layer.in_features, rows, ranks[name], scaling[name], device)
            for name, rows in parts.items()})
        self.dropout = LoRADropout(dropout) if dropout else nn.Identity()
        self.disabled = False  # ``adapters_disabled``: the base layer alone

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else torch.float32
        x = self.dropout(x).to(dtype)
        for adapter in self.adapters.values():
            start, stop = adapter.rows
            y[..., start:stop].add_(adapter(x).to(y.dtype), alpha=adapter.scaling)
        return y

    def merged_weight(self) -> Tensor:
        """The base weight with the updates folded in, in the base's dtype (float32 for NF4)."""
        base, nf4 = self.base_layer, isinstance(self.base_layer, NF4Linear)
        w = (base.dequantize(torch.float32) if nf4 else base.weight).float().clone()
        for adapter in self.adapters.values():
            w[adapter.rows[0]: adapter.rows[1]] += adapter.delta()
        return w if nf4 else w.to(base.weight.dtype)


def target_parts(model: nn.Module, modules: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """Checkpoint module names ("layers.0.self_attn.q_proj") -> {the model's module: {part: rows}}."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for name in modules:
        fused = layout.fused_name(name)
        module = fused[0] if fused else name
        for part, start, stop in layout.parts(model.config, module):
            if part == name:
                stop = stop if stop is not None else model.get_submodule(module).out_features
                out.setdefault(module, {})[part.rpartition(".")[2]] = (start, stop)
    return out


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze the model and wrap each target layer in a LoRALinear, in place; step 0 equals the base."""
    model.requires_grad_(False)
    names = [f"layers.{i}.{TARGETS[t]}" for i in range(len(model.layers)) for t in config.targets]
    for module, parts in target_parts(model, names).items():
        lora = LoRALinear(model.get_submodule(module), parts, config.r, config.alpha, config.dropout)
        replace_module(model, module, lora)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every adapter switched off: its base, the same weights, no copy (DPO's
    reference model, as PEFT's ``disable_adapter`` gives TRL)."""
    layers = list(lora_layers(model).values())
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back, in place."""
    for name, m in lora_layers(model).items():
        w = m.merged_weight().detach()
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        linear.weight = nn.Parameter(w, requires_grad=False)
        replace_module(model, name, linear)
    return model


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)

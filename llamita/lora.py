"""LoRA (Hu et al. 2021): low-rank adapters beside frozen linear layers; merging; PEFT's file format.

``W x + (alpha / r) * B A x``, with A [r, in] random and B [out, r] zero, so an adapted model starts
out equal to its base. Module names are Hugging Face's, and llamita keeps q/k in HF's rotary layout,
so an adapter's tensors map one to one onto PEFT's (``base_model.model.model.layers.0.self_attn.
q_proj.lora_A.weight``): adapters written here load with ``peft.PeftModel.from_pretrained`` and
adapters PEFT trained load here.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from llamita.errors import LlamitaError
from llamita.files import atomic_write
from llamita.formats.hf import hf_name, llamita_name
from llamita.nf4 import NF4Linear

# Short names (litgpt's style, as --lora-targets takes them) -> the module path inside a block.
TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
DEFAULT_TARGETS = ("q", "v")  # PEFT's default for Llama, and litgpt's (query and value)
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


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


class SharedDropout(nn.Module):
    """Dropout that reuses its mask while the same input tensor comes back.

    q, k and v's adapters read one input (the attention norm's output), gate and up's another, so
    one mask serves each group, as with litgpt's fused qkv: drawing a mask per module was a fifth
    of a LoRA step's time on CPU. PEFT draws one per module; the adapters' expected update and
    their format are the same. One instance serves the whole model and holds only the last pair.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._last: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if self._last is None or self._last[0] is not x:  # the reference keeps x alive: ids can't repeat
            self._last = (x, self.drop(x))
        return self._last[1]

    def drop(self, x: Tensor) -> Tensor:
        """Dropout from 16-bit random numbers, four per 64-bit draw: on CPU the generator, not the
        arithmetic, is dropout's cost, and this is 3x cheaper than ``F.dropout``. p is rounded to
        a multiple of 2^-16 and the scale follows it, so the expectation stays exact."""
        n, drop = x.numel(), round(self.p * 65536)
        draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
        keep = draws.view(torch.int16)[:n].view_as(x) >= drop - 32768
        return torch.where(keep, x * (65536 / (65536 - drop)), 0.0)


class LoRALinear(nn.Module):
    """A frozen linear layer (``base_layer``: nn.Linear or NF4Linear) plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: nn.Module | None = None,
                 scaling: float | None = None):
        super().__init__()
        self.base_layer = base_layer
        device = next(base_layer.buffers(), None)
        device = device.device if device is not None else base_layer.weight.device
        # Adapters stay float32 whatever the base's dtype: they are what the optimizer updates.
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = scaling if scaling is not None else alpha / r
        self.dropout = dropout or nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else torch.float32
        update = self.lora_B(self.lora_A(self.dropout(x).to(dtype)))
        return torch.add(y, update.to(y.dtype), alpha=self.scaling)

    def merged_weight(self) -> Tensor:
        """The base weight with the update folded in, in the base's dtype (float32 for NF4)."""
        base = self.base_layer
        w = base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return (w.float() + delta).to(w.dtype)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze the model and wrap each target layer in a LoRALinear, in place; step 0 equals the base."""
    model.requires_grad_(False)
    dropout = SharedDropout(config.dropout) if config.dropout else None
    for i in range(len(model.layers)):
        for t in config.targets:
            name = f"layers.{i}.{TARGETS[t]}"
            _replace(model, name, LoRALinear(model.get_submodule(name), config.r, config.alpha, dropout))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back, in place."""
    for name, m in lora_layers(model).items():
        w = m.merged_weight().detach()
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        linear.weight = nn.Parameter(w, requires_grad=False)
        _replace(model, name, linear)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


# --- PEFT's format ---------------------------------------------------------------------------------


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The adapters under PEFT's key names, as ``save_pretrained`` writes them."""
    out = {}
    for name, m in lora_layers(model).items():
        for ab, layer in (("A", m.lora_A), ("B", m.lora_B)):
            out[_PEFT_PREFIX + hf_name(f"{name}.lora_{ab}.weight")] = layer.weight.detach().float().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, config: LoRAConfig, directory: str | Path, base_model: str = "") -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT does, each atomically."""
    directory = Path(directory)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(TARGETS[t].rpartition(".")[2] for t in config.targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    tensors = adapter_tensors(model)
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(peft_config, indent=2) + "\n"))


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, tuple[Tensor, Tensor]]]:
    """(adapter_config.json, {llamita module name: (A, B)}) from a PEFT LoRA adapter directory."""
    directory = Path(directory).expanduser()
    cfg_file, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise LlamitaError(f"{directory}: not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlamitaError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LlamitaError(f"{cfg_file}: expected a JSON object")
    checks = [("peft_type", "LORA"), ("use_dora", False), ("bias", "none"), ("lora_bias", False),
              ("fan_in_fan_out", False)]
    for field, want in checks:
        if cfg.get(field, want) != want:
            raise LlamitaError(f"{cfg_file}: field {field!r} is {cfg[field]!r}; llamita loads LoRA adapters with {want!r}")
    if cfg.get("modules_to_save"):
        raise LlamitaError(f"{cfg_file}: field 'modules_to_save' is not supported (only LoRA layers)")
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)) or isinstance(cfg.get(field), bool):
            raise LlamitaError(f"{cfg_file}: field {field!r} must be a number")
    if not weights.is_file():
        raise LlamitaError(f"{directory}: no {WEIGHTS_FILE}")
    pairs: dict[str, dict[str, Tensor]] = {}
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if not m:
                    raise LlamitaError(f"{weights}: tensor {key!r} is not a LoRA A/B weight of PEFT's format")
                pairs.setdefault(llamita_name(m["module"]), {})[m["ab"]] = f.get_tensor(key)
    except SafetensorError as e:
        raise LlamitaError(f"{weights}: not a readable safetensors file ({e})") from None
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LlamitaError(f"{weights}: module {name!r} has lora_{''.join(ab)} but not both A and B")
    if not pairs:
        raise LlamitaError(f"{weights}: holds no tensors")
    return cfg, {name: (ab["A"], ab["B"]) for name, ab in pairs.items()}


def _pattern_value(pattern: dict, name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name's end."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", hf_name(name)):
            return value
    return default


def load_adapter(model: nn.Module, directory: str | Path, merge: bool = False) -> nn.Module:
    """Put a PEFT LoRA adapter onto ``model`` in place: as LoRALinear layers, or folded into the
    weights (``merge=True``, for inference at the base model's speed)."""
    cfg, pairs = read_adapter(directory)
    where = Path(directory) / WEIGHTS_FILE
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))}
    for name, (A, B) in pairs.items():
        if name not in linears or name.rpartition(".")[2] not in {p.rpartition(".")[2] for p in TARGETS.values()}:
            raise LlamitaError(f"{where}: adapter for module {hf_name(name)!r}, which this model does not have "
                               "(an adapter for a different base?)")
        base = model.get_submodule(name)
        r = A.shape[0]
        if A.shape != (r, base.in_features) or B.shape != (base.out_features, r):
            raise LlamitaError(
                f"{where}: {hf_name(name)} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                f"{base.out_features}x{base.in_features} layer: an adapter for a different base")
        alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"])
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        lora = LoRALinear(base, r, alpha, scaling=scaling)
        with torch.no_grad():
            lora.lora_A.weight.copy_(A)
            lora.lora_B.weight.copy_(B)
        lora.requires_grad_(False)
        _replace(model, name, lora)
    return merge_lora(model) if merge else model


# --- merged checkpoints -----------------------------------------------------------------------------


def merge(base: str | Path | None, adapter: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> None:
    """``llamita merge``: the base with the adapter folded in, as a Hugging Face checkpoint with the
    base's tokenizer, which llamita and transformers both load."""
    from llamita.formats import load_model, save_model

    model = load_model(base, dtype=dtype)
    load_adapter(model, adapter, merge=True)
    save_model(model, out)
    write_tokenizer(base, out)


def write_tokenizer(source: str | Path | None, directory: str | Path) -> None:
    """The tokenizer of ``source`` as Hugging Face files: ``tokenizer.model`` (SentencePiece) or
    ``tokenizer.json``, with ``tokenizer_config.json`` carrying the special tokens and chat template."""
    from llamita.formats import detect
    from llamita.tokenizer import load_tokenizer, sentencepiece_model_from_gguf

    fmt, path = detect(source)
    directory = Path(directory)
    if fmt == "hf":  # copy the files as they are: nothing is lost
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                     "chat_template.jinja", "generation_config.json"):
            if (path / name).is_file():
                atomic_write(directory / name, lambda p, src=path / name: shutil.copyfile(src, p))
        return
    tok = load_tokenizer(source)
    if tok.kind == "sentencepiece":
        model = sentencepiece_model_from_gguf(path) if fmt == "gguf" else Path(tok.source).read_bytes()
        atomic_write(directory / "tokenizer.model", lambda p: p.write_bytes(model))
        cls = "LlamaTokenizer"
    else:
        atomic_write(directory / "tokenizer.json", tok.save_tokenizer_json)
        cls = "PreTrainedTokenizerFast"
    name = lambda i: tok.id_to_token(i) if i is not None else None  # noqa: E731
    config = {"tokenizer_class": cls, "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id),
              "add_bos_token": tok.add_bos, "add_eos_token": False, "legacy": True}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    atomic_write(directory / "tokenizer_config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))

"""PEFT's LoRA adapter format: ``adapter_config.json`` and ``adapter_model.safetensors``.

Module names are Hugging Face's, and llamita keeps q/k in HF's rotary layout, so an adapter's
tensors map one to one onto PEFT's (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.
weight``): adapters written here load with ``peft.PeftModel.from_pretrained`` and adapters PEFT
trained load here. The weights file's metadata also records the prompt template the adapter was
trained with (``llamita_template``, which PEFT ignores), so that chatting with it uses the same one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from llamita import layout
from llamita.errors import LlamitaError
from llamita.files import atomic_write, read_json
from llamita.formats.hf import from_hf_name, hf_name
from llamita.lora import TARGETS, LoRAConfig, LoRALinear, lora_layers, merge_lora, replace_module, target_parts
from llamita.nf4 import NF4Linear

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
TEMPLATE_KEY = "llamita_template"
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The adapters under PEFT's key names, as ``save_pretrained`` writes them."""
    out = {}
    for name, m in lora_layers(model).items():
        parent = name.rpartition(".")[0]
        for part, adapter in m.adapters.items():  # a part's checkpoint module is a sibling of the fused one
            for ab, layer in (("A", adapter.lora_A), ("B", adapter.lora_B)):
                key = _PEFT_PREFIX + hf_name(f"{parent}.{part}.lora_{ab}.weight")
                out[key] = layer.weight.detach().float().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, config: LoRAConfig, directory: str | Path, base_model: str = "",
                 template: str | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT does, each atomically;
    ``template``: the prompt format it was trained with, recorded in the weights' metadata."""
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
    metadata = {"format": "pt", **({TEMPLATE_KEY: template} if template else {})}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=metadata))
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(peft_config, indent=2) + "\n"))


def adapter_template(directory: str | Path) -> str | None:
    """The prompt template the adapter was trained with, if ``save_adapter`` recorded one."""
    weights = Path(directory).expanduser() / WEIGHTS_FILE
    try:
        with safe_open(weights, framework="pt") as f:
            return (f.metadata() or {}).get(TEMPLATE_KEY)
    except (SafetensorError, OSError) as e:
        raise LlamitaError(f"{weights}: not a readable safetensors file ({e})") from None


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, tuple[Tensor, Tensor]]]:
    """(adapter_config.json, {checkpoint module name: (A, B)}) from a PEFT LoRA adapter directory."""
    directory = Path(directory).expanduser()
    cfg_file, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise LlamitaError(f"{directory}: not a PEFT adapter directory (no {CONFIG_FILE})")
    cfg = read_json(cfg_file)
    checks = [("peft_type", "LORA"), ("use_dora", False), ("bias", "none"), ("lora_bias", False),
              ("fan_in_fan_out", False)]
    for field, want in checks:
        if cfg.get(field, want) != want:
            raise LlamitaError(f"{cfg_file}: field {field!r} is {cfg[field]!r}; "
                               f"llamita loads LoRA adapters with {want!r}")
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
                pairs.setdefault(from_hf_name(m["module"]), {})[m["ab"]] = f.get_tensor(key)
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
    kinds = {p.rpartition(".")[2] for p in TARGETS.values()}
    for name in pairs:
        fused = layout.fused_name(name)
        if (fused[0] if fused else name) not in linears or name.rpartition(".")[2] not in kinds:
            raise LlamitaError(f"{where}: adapter for module {hf_name(name)!r}, which this model does not have "
                               "(an adapter for a different base?)")
    targets = target_parts(model, list(pairs))
    for module, parts in targets.items():
        base, names = model.get_submodule(module), {part: f"{module.rpartition('.')[0]}.{part}" for part in parts}
        ranks, scaling = {}, {}
        for part, name in names.items():
            A, B = pairs[name]
            r, (start, stop) = A.shape[0], parts[part]
            if A.shape != (r, base.in_features) or B.shape != (stop - start, r):
                raise LlamitaError(
                    f"{where}: {hf_name(name)} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                    f"{stop - start}x{base.in_features} layer: an adapter for a different base")
            alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"])
            ranks[part], scaling[part] = r, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        lora = LoRALinear(base, parts, ranks, 0.0, scaling=scaling)
        with torch.no_grad():
            for part, name in names.items():
                lora.adapters[part].lora_A.weight.copy_(pairs[name][0])
                lora.adapters[part].lora_B.weight.copy_(pairs[name][1])
        lora.requires_grad_(False)
        replace_module(model, module, lora)
    return merge_lora(model) if merge else model

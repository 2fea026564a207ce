"""Pretraining from scratch with the Llama 2 recipe (Touvron et al. 2023, section 2.2).

AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, linear warmup then cosine decay to 10% of the peak
rate, gradient clipping at 1.0, fixed-length sequences drawn from a corpus tokenized once into token
shards (``shards.py``). The weights start as llama2.c and nanoGPT start them: normal with std 0.02,
the two projections that write into the residual stream (attention's output and the feed-forward's
down projection) scaled by 1/sqrt(2 x layers). Everything else -- the loop, checkpoints, exact resume,
DDP and FSDP2 under torchrun -- is ``train.py``'s, shared with fine-tuning.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist

from llamita.config import PRESETS, Config, config_from_hf
from llamita.data import Dataset
from llamita.errors import LlamitaError
from llamita.files import read_json
from llamita.model import Llama
from llamita.options import option
from llamita.shards import (
    MANIFEST,
    is_shard_folder,
    open_shards,
    split_windows,
    tokenize_corpus,
    tokenizer_sha256,
)
from llamita.tokenizer import load_tokenizer
from llamita.train import (
    LoopConfig,
    Run,
    checkpoint_blocks,
    claim,
    finish,
    init_distributed,
    start_run,
    train,
    warn_step_size,
)

# Datasheet dense bfloat16 rates; another device's peak is measured (``measured_flops``).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@dataclass
class PretrainConfig(LoopConfig):
    """Every pretraining option; ``llamita pretrain``'s flags are made from these fields."""

    objective: ClassVar[str] = "pretrain"
    method: ClassVar[str] = "full"

    lr: float | None = option(3e-4, "peak learning rate (Llama 2 7B and 13B: 3e-4)")
    steps: int | None = option(None, "optimizer steps (default: from --tokens, else one pass over the data)")
    warmup: int | None = option(None, "linear warmup steps (default: a hundredth of the steps, at most Llama 2's 2000)")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (Llama 2: 0.1)")
    batch_size: int = option(8, "sequences per micro-batch per process")
    val_split: float = option(0.01, "fraction of the sequences held out for validation loss (the corpus's last)")
    seq_len: int | None = option(None, "tokens per training sequence (default: the model's context)")
    tokens: int | None = option(None, "tokens to train on, instead of --steps (default: one pass over the data)")
    batch_tokens: int | None = option(None, "tokens per optimizer step (Llama 2: 4M); micro-batches accumulate to "
                                            "it (default: one micro-batch per process)")
    compile: bool = option(False, "torch.compile the model")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("seq_len", "tokens", "batch_tokens"):
            if (value := getattr(self, name)) is not None and not value >= 1:
                raise LlamitaError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if self.steps and self.tokens:
            raise LlamitaError("--steps and --tokens both say how long to train: give one")
        if self.lr is None:
            self.lr = 3e-4


def model_config(config: str | Path | Config, vocab_size: int) -> Config:
    """The architecture: a preset (its vocabulary made the tokenizer's) or an HF config.json (a file, or
    a folder holding one), whose vocabulary must hold every token id."""
    if isinstance(config, Config):
        c, where = config, "the config"
    elif str(config) in PRESETS:
        return replace(Config.from_name(str(config)), vocab_size=vocab_size)
    else:
        path = Path(config).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise LlamitaError(f"--config {config}: neither a preset ({', '.join(PRESETS)}) nor a config.json file")
        c, where = config_from_hf(read_json(path), str(path)), str(path)
    if c.vocab_size < vocab_size:
        raise LlamitaError(f"{where}: vocab_size {c.vocab_size} is smaller than the tokenizer's {vocab_size} pieces")
    return c


def init_weights(model: Llama, std: float = 0.02) -> None:
    """Normal(0, std) matrices, residual-stream outputs scaled by 1/sqrt(2 x layers); norm gains 1."""
    scaled = std / math.sqrt(2 * model.config.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, scaled if name.endswith(("o_proj.weight", "down_proj.weight")) else std)


def flops_per_token(c: Config, seq_len: int) -> float:
    """Training FLOPs a token costs, as PaLM's appendix B and nanoGPT count them: 6 per weight it meets
    (every matrix and the output layer; the embedding is a lookup) plus attention's 12 x layers x
    dim x seq_len."""
    per_layer = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
    per_layer += 3 * c.dim * c.hidden_dim
    weights = c.n_layers * per_layer + c.dim * c.vocab_size
    return 6.0 * weights + 12.0 * c.n_layers * c.dim * seq_len


def measured_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """The rate of dense square matmuls in ``dtype`` on ``device``, measured for about ``seconds``."""
    n = 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
        sync()
    return 2.0 * n**3 * count / (time.perf_counter() - t0)


def peak_flops(device: torch.device, amp: torch.dtype | None) -> float:
    """What MFU divides by: a known GPU's datasheet bfloat16 rate, else the measured matmul rate in the
    precision the run computes in (on a CPU: float32, or bfloat16 under autocast)."""
    if device.type == "cuda" and amp == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        if peak := next((v for k, v in PEAK_BF16.items() if k in name), None):
            return peak
    return measured_flops(device, amp or torch.float32)


def prepare(config: str | Path | Config, data: list[str | Path], tokenizer: Path, out: Path,
            cfg: PretrainConfig) -> Run:
    """Tokens (the shards, made once), the model, the schedule, and where a resumed run stands."""
    d = init_distributed(cfg.device)
    load_tokenizer(tokenizer)  # a tokenizer that does not load is named before any work
    if len(data) == 1 and is_shard_folder(data[0]):
        folder = Path(data[0])
    else:
        folder = out / "tokens"
        if d.main:
            tokenize_corpus(data, tokenizer, folder, progress=cfg.progress)
        if d.world > 1:
            dist.barrier()
    manifest, arrays = open_shards(folder)
    if manifest.get("tokenizer") != tokenizer_sha256(tokenizer):
        raise LlamitaError(f"{folder}: these token shards were made with another tokenizer than {tokenizer}")
    c = model_config(config, manifest["vocab_size"])
    seq_len = cfg.seq_len or c.max_seq_len
    if seq_len > c.max_seq_len:
        raise LlamitaError(f"--seq-len {seq_len}: longer than the model's context ({c.max_seq_len} tokens)")
    train_windows, val_windows = split_windows(arrays, seq_len, cfg.val_split)
    per_micro = cfg.batch_size * seq_len * d.world
    cfg.grad_accum = math.ceil(cfg.batch_tokens / per_micro) if cfg.batch_tokens else 1
    per_step = cfg.batch_size * cfg.grad_accum * d.world
    if cfg.batch_tokens and d.main and cfg.grad_accum * per_micro != cfg.batch_tokens:
        print(f"llamita: --batch-tokens {cfg.batch_tokens}: a step takes {cfg.grad_accum * per_micro} tokens "
              f"({cfg.grad_accum} micro-batches of {cfg.batch_size} x {seq_len} tokens x {d.world} processes)",
              file=sys.stderr)
    if cfg.tokens:
        total = math.ceil(cfg.tokens / (per_step * seq_len))
    else:
        total = cfg.steps or max(1, math.ceil(len(train_windows) / per_step))
    if cfg.warmup is None:
        cfg.warmup = min(2000, math.ceil(0.01 * total))
    identity = {"config": asdict(c), "data_sha256": hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest(),
                "seq_len": seq_len, "records_per_step": per_step, "steps": total,
                **{name: getattr(cfg, name) for name in ("lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip",
                                                         "precision", "seed", "val_split")}}
    resumed = claim(out, cfg, identity, d)
    torch.manual_seed(cfg.seed)  # every process starts from the same weights
    random.seed(cfg.seed)
    net = Llama(c).to(d.device)
    init_weights(net)
    net.train()
    if cfg.grad_checkpoint:
        checkpoint_blocks(net)
    if cfg.compile:
        net.compile()
    warn_step_size(per_step, len(train_windows), d.main)
    run = start_run(cfg, tokenizer, out, d, net, None, train_windows,
                    Dataset(val_windows) if val_windows is not None else None, per_step, total, resumed, identity)
    # tokens/s counts every process's tokens: MFU is over all of their devices
    run.flops_per_token, run.peak_flops = flops_per_token(c, seq_len), peak_flops(d.device, run.amp) * d.world
    return run


def pretrain(config: str | Path | Config, data: str | Path | list[str | Path], tokenizer: str | Path,
             out: str | Path, **options) -> Path:
    """Train a model of architecture ``config`` (a preset, a config.json) from random weights on ``data``
    (text files, folders of them, or a shard folder) tokenized by ``tokenizer`` (a folder of HF tokenizer
    files, e.g. ``llamita tokenizer train``'s); writes ``out/model`` (an HF checkpoint with the tokenizer),
    ``metrics.jsonl``, ``loss.png`` and checkpoints. Options are PretrainConfig's fields."""
    known = {f.name for f in fields(PretrainConfig)}
    if unknown := sorted(set(options) - known):
        raise LlamitaError(f"pretrain: unknown option {unknown[0]!r}")
    files = [data] if isinstance(data, (str, Path)) else list(data)
    run = prepare(config, files, Path(tokenizer).expanduser(), Path(out), PretrainConfig(**options))
    train(run)
    return finish(run)


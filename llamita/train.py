"""Fine-tuning in plain sight: LoRA, QLoRA or every weight, one loop, nanoGPT style.

Two objectives share the loop: SFT (cross entropy of the responses) and DPO (Rafailov et al. 2023:
prefer each pair's chosen completion over its rejected one, relative to a reference model, with
TRL's loss variants). The objective is only how a batch becomes a loss (``objective_sum``).

AdamW with Llama 2's betas (0.9, 0.95) and eps 1e-5; linear warmup then cosine decay to 10% of
the peak learning rate (as Llama 2 trained); gradient accumulation; clipping; optional gradient
checkpointing per block; bfloat16 autocast where the device has fast bfloat16.

The data order is a pure function of (seed, step) -- an endless stream of seeded epoch permutations
-- and the loss of a step is the sum over its response tokens divided by their count over the whole
global batch. So a step is the same whatever the split into processes and micro-batches, and a
checkpoint needs only the step number to know where the data stands: resuming after a SIGKILL
continues exactly as the uninterrupted run would have.

Under ``torchrun`` every process trains its slice of each global batch through DDP (gloo on CPU,
NCCL on CUDA), or, for ``--method full`` on CUDA (or with ``--fsdp``), through FSDP2's
``fully_shard``: each process then holds a shard of the weights, gradients and optimizer state,
which checkpoints and the final model gather whole. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llamita.data import (
    IGNORE,
    PREFERENCE,
    Dataset,
    Pair,
    collate,
    collate_pairs,
    fingerprint,
    load_dataset,
    load_pairs,
    order,
    pack,
    split,
)
from llamita.errors import LlamitaError
from llamita.files import atomic_write, load_torch_file, read_json, umask
from llamita.formats import load_model
from llamita.formats.export import copy_tokenizer_files, write_tokenizer
from llamita.lora import LoRAConfig, adapters_disabled, apply_lora
from llamita.model import Llama
from llamita.nf4 import quantize_nf4
from llamita.options import option
from llamita.peft import save_adapter
from llamita.shards import collate_windows
from llamita.tokenizer import load_tokenizer

METHODS = ("lora", "qlora", "full")
OBJECTIVES = ("sft", "dpo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
# What a DPO step reports, named as TRL names it (each a mean over the step's pairs).
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


@dataclass
class LoopConfig:
    """The training loop's options, shared by ``llamita finetune`` and ``llamita pretrain``."""

    lr: float | None = option(None, "peak learning rate (default 2e-4; 2e-5 for full)")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at this fraction of the peak rate (Llama 2: 0.1)")
    batch_size: int = option(4, "records per micro-batch per process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    warmup: int | None = option(10, "linear warmup steps")
    steps: int | None = option(None, "optimizer steps (default: from --epochs)")
    weight_decay: float = option(0.0, "AdamW weight decay (on matrices; norms are not decayed)")
    grad_clip: float = option(1.0, "gradient norm clip (0: none)")
    grad_checkpoint: bool = option(False, "recompute activations in backward")
    precision: str = option("auto", "auto: bfloat16 autocast on CUDA with bf16, float32 otherwise",
                            choices=("auto", "bf16", "fp32"))
    seed: int = option(1337, "random seed (data order, initialisation, dropout)")
    val_split: float = option(0.0, "fraction of records held out for eval loss")
    eval_every: int = option(0, "steps between eval losses (0: at the end)")
    save_every: int = option(0, "steps between checkpoints (0: none)")
    keep_last: int = option(2, "checkpoints kept")
    resume: bool = option(False, "continue the run in --out from its latest checkpoint (same options, model, data)")
    overwrite: bool = option(False, "replace the run --out holds (its checkpoints, metrics and result) with a new one")
    device: str = option("cpu", "cpu, cuda, cuda:1 ...")
    fsdp: bool = option(False, "under torchrun, shard every weight with FSDP2 (the default on CUDA for full "
                               "training; DDP otherwise)")
    progress: bool = option(True, "a progress bar")

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise LlamitaError(f"--precision {self.precision!r}: known are auto, bf16, fp32")
        for name, least in (("batch_size", 1), ("grad_accum", 1), ("keep_last", 1), ("steps", 1), ("warmup", 0),
                            ("save_every", 0), ("eval_every", 0), ("grad_clip", 0), ("weight_decay", 0)):
            value = getattr(self, name)
            if value is not None and not value >= least:  # `not >=`: NaN too
                raise LlamitaError(f"--{name.replace('_', '-')} {value}: must be at least {least}")
        if self.lr is not None and not self.lr > 0:
            raise LlamitaError(f"--lr {self.lr}: must be more than 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise LlamitaError(f"--min-lr-ratio {self.min_lr_ratio}: must be in [0, 1]")
        if self.resume and self.overwrite:
            raise LlamitaError("--resume continues the run in --out, --overwrite replaces it: give one")
        if not 0.0 <= self.val_split < 1.0:
            raise LlamitaError("--val-split must be in [0, 1)")


@dataclass
class TrainConfig(LoopConfig):
    """Every fine-tuning option; ``llamita finetune``'s flags are made from these fields."""

    method: str = option("lora", "lora, qlora (NF4 base) or full (every weight)", choices=METHODS)
    objective: str = option("sft", "sft: learn the responses; dpo: prefer each pair's chosen completion over its "
                                   "rejected one (preference data)", choices=OBJECTIVES)
    # DPO
    beta: float = option(0.1, "DPO: the reward scale; higher keeps the model nearer the reference")
    dpo_loss: str = option("sigmoid", "DPO loss as TRL defines it: sigmoid (DPO), ipo, hinge", choices=DPO_LOSSES)
    label_smoothing: float = option(0.0, "DPO sigmoid: the assumed probability that a preference is flipped "
                                         "(conservative DPO), in [0, 0.5)")
    # data
    format: str = option("auto", "record format (auto: per record)",
                         choices=("auto", "alpaca", "chat", "sharegpt", "text", *PREFERENCE))
    template: str = option("alpaca", "prompt format: alpaca, or a chat format: auto (the checkpoint's), llama-2, "
                                     "chatml; recorded with the result, which chat/serve then use")
    max_length: int = option(512, "tokens per record (longer ones are truncated)")
    train_on_prompt: bool = option(False, "put loss on prompt tokens too")
    pack: bool = option(False, "pack short records into full sequences")
    eval_data: str | None = option(None, "a separate evaluation data file")
    epochs: float | None = option(None, "passes over the data (default 1 when --steps is not given)")
    # LoRA
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: float = option(16.0, "LoRA alpha (updates are scaled by alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the adapters' input")
    lora_targets: str = option("q,v", "comma-separated: q,k,v,o,gate,up,down or all")
    dtype: str | None = option(None, "the frozen weights' dtype (default float32; bfloat16 for qlora)",
                               choices=("float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise LlamitaError(f"--method {self.method!r}: known methods are {', '.join(METHODS)}")
        if not self.max_length >= 2:
            raise LlamitaError(f"--max-length {self.max_length}: must be at least 2 (a token and the next, which "
                               "it learns to predict)")
        if self.epochs is not None and not self.epochs > 0:
            raise LlamitaError(f"--epochs {self.epochs}: must be more than 0")
        if self.warmup is None:
            raise LlamitaError("--warmup: give a number of steps")
        self.check_dpo()
        if self.fsdp and self.method != "full":
            raise LlamitaError("--fsdp shards --method full only (adapters are small: DDP serves them)")
        if self.lr is None:
            self.lr = 2e-5 if self.method == "full" else 2e-4

    def check_dpo(self) -> None:
        if self.objective not in OBJECTIVES:
            raise LlamitaError(f"--objective {self.objective!r}: known are {', '.join(OBJECTIVES)}")
        if self.dpo_loss not in DPO_LOSSES:
            raise LlamitaError(f"--dpo-loss {self.dpo_loss!r}: known are {', '.join(DPO_LOSSES)}")
        if not self.beta > 0:
            raise LlamitaError(f"--beta {self.beta}: must be more than 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise LlamitaError(f"--label-smoothing {self.label_smoothing}: must be in [0, 0.5)")
        if self.label_smoothing and self.dpo_loss != "sigmoid":
            raise LlamitaError(f"--label-smoothing applies to --dpo-loss sigmoid, not {self.dpo_loss}")
        if self.objective == "dpo":
            for flag, on in (("--pack", self.pack), ("--train-on-prompt", self.train_on_prompt),
                             ("--format text", self.format == "text")):
                if on:
                    raise LlamitaError(f"{flag} is for --objective sft; --objective dpo trains on preference pairs")


# --- setup ------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """One process, or one of torchrun's (RANK/WORLD_SIZE in the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device(device))
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}") if cuda else torch.device(device)
    if cuda:
        torch.cuda.set_device(dev)
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def model_to_train(source, cfg: TrainConfig, device: torch.device) -> tuple[Llama, LoRAConfig | None]:
    """The model to train: all weights (full), or frozen (NF4 for qlora) with LoRA adapters."""
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else (torch.bfloat16 if cfg.method == "qlora" else torch.float32)
    if cfg.method == "full":
        dtype = torch.float32  # the optimizer updates these weights: keep them in full precision
    model = load_model(source, dtype=dtype, device=device)
    lora = None
    if cfg.method == "full":
        model.requires_grad_(True)
    else:
        if cfg.method == "qlora":
            quantize_nf4(model)
        lora = LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        apply_lora(model, lora)
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    return model.train(), lora


def checkpoint_blocks(model: Llama) -> None:
    """Recompute each block's activations in backward: memory for time."""
    for block in model.layers:
        block.forward = lambda *args, f=block.forward: checkpoint(f, *args, use_reentrant=False)


def autocast_dtype(cfg: LoopConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPU: bfloat16 matmuls are slower than float32 without AMX, and less exact


def lr_at(step: int, cfg: LoopConfig, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from lr to ``min_lr_ratio`` x lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - 1 - cfg.warmup)
    low = cfg.min_lr_ratio
    return cfg.lr * (low + (1 - low) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --- the loss --------------------------------------------------------------------------------------


def token_losses(model: nn.Module, batch: dict[str, Tensor], device: torch.device, amp: torch.dtype | None) -> Tensor:
    """Cross entropy of every labelled token given the tokens before it, row by row ([N]).

    Only positions that predict a labelled token go through the output layer (``logits_at``).
    With responses a small share of the tokens, this skips most of the largest matmul and the
    [tokens, vocab] logits, the biggest activation in training. Pretraining windows carry their
    ``targets`` (every position predicts one): all positions, no indexing.
    """
    ids = batch["ids"].to(device)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        if "targets" in batch:
            return F.cross_entropy(model(ids).flatten(0, 1).float(), batch["targets"].to(device).flatten(),
                                   reduction="none")
        targets = batch["labels"][:, 1:].to(device)
        predicts = F.pad(targets != IGNORE, (0, 1))  # position t predicts token t + 1
        if "mask" in batch:  # packed records: each attends only to itself, from position 0
            logits = model(ids, batch["positions"].to(device), mask=batch["mask"].to(device), logits_at=predicts)
        else:
            logits = model(ids, logits_at=predicts)
    return F.cross_entropy(logits.float(), targets[targets != IGNORE], reduction="none")


def loss_sum(model: nn.Module, batch: dict[str, Tensor], device: torch.device, amp: torch.dtype | None) -> Tensor:
    """SFT: the summed cross entropy of the batch's labelled tokens."""
    return token_losses(model, batch, device, amp).sum()


def sequence_logps(model: nn.Module, batch: dict[str, Tensor], device: torch.device,
                   amp: torch.dtype | None) -> Tensor:
    """Each row's log-probability of its labelled tokens (a completion), summed ([B])."""
    rows = (batch["labels"][:, 1:] != IGNORE).nonzero(as_tuple=True)[0].to(device)
    token = -token_losses(model, batch, device, amp)
    return torch.zeros(len(batch["ids"]), dtype=token.dtype, device=device).index_add(0, rows, token)


def reference_logps(net: nn.Module, batch: dict[str, Tensor], device: torch.device,
                    amp: torch.dtype | None) -> Tensor:
    """DPO's reference: the cached log-probs of the model before training (full fine-tuning), or the
    same network with its adapters switched off (LoRA, QLoRA), which is that model."""
    if "ref_logps" in batch:
        return batch["ref_logps"].to(device)
    with torch.no_grad(), adapters_disabled(net):
        return sequence_logps(net, batch, device, amp)


def dpo_losses(logps: Tensor, ref: Tensor, lengths: Tensor, cfg: TrainConfig) -> Tensor:
    """Per pair, TRL's definitions: sigmoid -(1-ls) logsigmoid(beta d) - ls logsigmoid(-beta d) with d
    the chosen minus the rejected log-ratio (conservative DPO when ls > 0); hinge relu(1 - beta d);
    ipo (d per completion token - 1/(2 beta))^2, the log-ratios averaged over each completion's tokens."""
    chosen, rejected = (logps - ref).chunk(2)
    if cfg.dpo_loss == "ipo":
        n_chosen, n_rejected = lengths.to(logps.dtype).clamp(min=1).chunk(2)
        return (chosen / n_chosen - rejected / n_rejected - 1 / (2 * cfg.beta)) ** 2
    delta = cfg.beta * (chosen - rejected)
    if cfg.dpo_loss == "hinge":
        return torch.relu(1 - delta)
    return -(1 - cfg.label_smoothing) * F.logsigmoid(delta) - cfg.label_smoothing * F.logsigmoid(-delta)


def dpo_sum(model: nn.Module, net: nn.Module, batch: dict[str, Tensor], cfg: TrainConfig, device: torch.device,
            amp: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """A batch of pairs (chosen rows, then rejected rows, in one forward): the summed DPO loss, and
    the sums of DPO_METRICS over its pairs."""
    logps = sequence_logps(model, batch, device, amp)
    ref = reference_logps(net, batch, device, amp)
    lengths = (batch["labels"][:, 1:] != IGNORE).sum(1).to(device)
    loss = dpo_losses(logps, ref, lengths, cfg).sum()
    with torch.no_grad():
        rewards = cfg.beta * (logps - ref).double()
        chosen, rejected = rewards.chunk(2)
        lp_chosen, lp_rejected = logps.double().chunk(2)
        metrics = torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                               (chosen > rejected).double().sum(), lp_chosen.sum(), lp_rejected.sum()])
    return loss, metrics


def objective_sum(model: nn.Module, net: nn.Module, batch: dict[str, Tensor], cfg: TrainConfig,
                  device: torch.device, amp: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """The batch's summed loss under ``cfg.objective`` (over response tokens for SFT, pairs for DPO)
    and the sums of its metrics (none for SFT). ``model`` is what trains (DDP's wrapper), ``net`` the
    module inside it."""
    if cfg.objective == "dpo":
        return dpo_sum(model, net, batch, cfg, device, amp)
    return loss_sum(model, batch, device, amp), torch.zeros(0, dtype=torch.float64, device=device)


def units(batch: dict[str, Tensor], cfg: TrainConfig) -> int:
    """What a loss is a mean over: response tokens (SFT), pairs (DPO) or every next token (pretraining)."""
    if cfg.objective == "pretrain":
        return batch["targets"].numel()
    return len(batch["ids"]) // 2 if cfg.objective == "dpo" else n_labels(batch)


def n_labels(batch: dict[str, Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def make_batch(examples: list, cfg: TrainConfig) -> dict[str, Tensor]:
    if cfg.objective == "pretrain":
        return collate_windows(examples)
    return collate_pairs(examples) if cfg.objective == "dpo" else collate(examples)


def n_tokens(example) -> int:
    """Real tokens (padding not counted); both sequences of a pair; a pretraining window's inputs."""
    if isinstance(example, Pair):
        return len(example.chosen.ids) + len(example.rejected.ids)
    return len(example) - 1 if isinstance(example, np.ndarray) else len(example.ids)


def metric_names(cfg: TrainConfig) -> tuple[str, ...]:
    return DPO_METRICS if cfg.objective == "dpo" else ()


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """The mean loss over the whole evaluation set (per response token, or per pair with the DPO
    metrics), each process taking every world-th batch.

    Every process runs as many forward passes (FSDP gathers weights in each): one left without a
    batch of its own at the end runs the first record again and counts nothing."""
    cfg, d, data, names = run.cfg, run.d, run.eval_set, metric_names(run.cfg)
    run.net.eval()
    total = torch.zeros(2 + len(names), dtype=torch.float64, device=d.device)
    for start in range(0, len(data), cfg.batch_size * d.world):
        i = start + d.rank * cfg.batch_size
        weight = 1.0 if i < len(data) else 0.0
        batch = make_batch(data.examples[i: i + cfg.batch_size] if weight else data.examples[:1], cfg)
        loss, metrics = objective_sum(run.net, run.net, batch, cfg, d.device, run.amp)
        count = torch.tensor([units(batch, cfg)], dtype=torch.float64, device=d.device)
        total += weight * torch.cat([loss.double().reshape(1), count, metrics])
    if d.world > 1:
        dist.all_reduce(total)
    run.net.train()
    mean = (total / total[1].clamp(min=1)).tolist()
    return {"eval_loss": mean[0], **{f"eval_{name}": value for name, value in zip(names, mean[2:])}}


# --- the run's folder --------------------------------------------------------------------------------

# The options that make a run what it is: --resume continues a run only with the values its checkpoint
# recorded (and the same model, data and records per step: ``run_identity``). The others (--save-every,
# --keep-last, --eval-every, --eval-data, --device, --grad-checkpoint, --progress...) may change between a run
# and its resumption: the steps compute the same.
SAME_RUN = ("method", "objective", "beta", "dpo_loss", "label_smoothing", "format", "template", "max_length",
            "train_on_prompt", "pack", "val_split", "lora_r",
            "lora_alpha", "lora_dropout", "lora_targets", "lr", "warmup", "steps", "epochs", "weight_decay",
            "grad_clip", "precision", "dtype", "seed")
REFERENCE_FILE = "reference_logps.safetensors"  # full-weight DPO's reference log-probs, computed once
OUTPUTS = ("checkpoints", "adapter", "model", "metrics.jsonl", "loss.png", "train_config.json",
           REFERENCE_FILE)  # what a run writes


def run_identity(cfg: TrainConfig, source: str | Path | None, data: str | Path, world: int) -> dict:
    """What a run is, recorded with it and with each checkpoint for --resume to compare: the model,
    the data file's sha256, the records per step (a step is the same however they are split) and
    the SAME_RUN options."""
    from llamita.assets import DEFAULT_MODEL_NAME

    model = Path(source).expanduser() if source is not None else None
    return {"model": str(model.resolve()) if model and model.exists() else str(source or DEFAULT_MODEL_NAME),
            "data_sha256": fingerprint(data), "records_per_step": cfg.batch_size * cfg.grad_accum * world,
            **{name: getattr(cfg, name) for name in SAME_RUN}}


def differences(ours: dict, recorded: dict) -> list[str]:
    """``name value (the run's: value)`` for each entry of ``ours`` that ``recorded`` holds otherwise;
    an entry it lacks (a run recorded by an older llamita) is not compared."""
    def show(name: str, value) -> str:
        return f"{value[:12]}..." if name == "data_sha256" and isinstance(value, str) else repr(value)

    return [f"{name} {show(name, value)} (the run's: {show(name, recorded[name])})"
            for name, value in ours.items() if name in recorded and recorded[name] != value]


def claim(out: Path, cfg: TrainConfig, identity: dict, d: Dist) -> tuple[Path, dict] | None:
    """Where this run starts in ``out``: the newest readable checkpoint of the same run (--resume),
    or nothing. A folder holding another run is refused (--overwrite clears it), and so is a
    checkpoint of a run with other options; what interrupted writes left behind is removed."""
    held = [name for name in OUTPUTS if (out / name).exists()]
    found = None
    if cfg.resume:
        found = newest_checkpoint(out, d.main)
        if found:
            recorded = found[1]["run"]
        else:
            saved = read_json(out / "train_config.json") if (out / "train_config.json").is_file() else {}
            recorded = saved.get("run", saved)  # an older llamita wrote the options alone
        if diffs := differences(identity, recorded):
            raise LlamitaError(f"{out}: --resume: this is not the run that {out} holds: {'; '.join(diffs)}. Resume "
                               "with that run's options, model and data, or start anew with --overwrite "
                               "(or another --out)")
        if not found and d.main:
            print(f"llamita: --resume: no checkpoint in {out / 'checkpoints'}: starting from step 0", file=sys.stderr)
    elif held and not cfg.overwrite:
        raise LlamitaError(f"{out} holds another run ({', '.join(held)}): continue it with --resume, replace it "
                           "with --overwrite, or give another --out")
    if d.world > 1:
        dist.barrier()  # every process has read the folder before rank 0 changes it
    if d.main:
        remove_stale(out)
        for name in held if cfg.overwrite else ():
            discard(out / name)
    return found


def discard(path: Path) -> None:
    """Delete a file, or a folder after renaming it to a hidden name: a kill while it is deleted
    leaves no part of it under a name that counts (``remove_stale`` clears the rest)."""
    if path.is_file():
        path.unlink()
        return
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash)


def remove_stale(out: Path) -> None:
    """What a killed or failed run left: hidden checkpoint folders (being written or deleted) and
    the temporary files of ``atomic_write`` and ``discard`` beside the run's outputs."""
    root = out / "checkpoints"
    stale = list(root.glob(".*")) if root.is_dir() else []
    stale += [p for p in out.glob(".*") if p.name.startswith(".trash-") or
              any(p.name.startswith(f".{name}.") for name in OUTPUTS)]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# --- checkpoints -------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def shard(model: Llama) -> Llama:
    """FSDP2: each block a unit of its own, the embedding, final norm and lm_head the root's."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    return fully_shard(model)


def whole_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, sharded: bool) -> tuple[dict, dict | None]:
    """The trainable weights and (given an optimizer) its state, whole, on the CPU. Sharded, every
    process must call this (the shards are gathered) and rank 0 gets the result."""
    if not sharded:
        return ({n: p.detach().contiguous().cpu() for n, p in trainable(model).items()},
                optimizer.state_dict() if optimizer else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = set(trainable(model))
    weights = {n: t.contiguous() for n, t in get_model_state_dict(model, options=options).items() if n in names}
    return weights, get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None


def save_checkpoint(out: Path, step: int, weights: dict[str, Tensor], optimizer_state: dict,
                    rng: list[dict], cfg: TrainConfig, identity: dict) -> None:
    """``out/checkpoints/step-N``: written into a hidden temporary folder, then renamed, so a crash
    never leaves a half-written checkpoint under a real name; the last ``keep_last`` are kept, the
    others renamed away before they are deleted (``discard``)."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step}."))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's is 0700, whatever the umask
        state = {"step": step, "run": identity, "config": asdict(cfg)}
        atomic_write(tmp / "trainable.safetensors", lambda p: save_file(weights, p))
        atomic_write(tmp / "optimizer.pt", lambda p: torch.save(optimizer_state, p))
        atomic_write(tmp / "rng.pt", lambda p: torch.save(rng, p))
        atomic_write(tmp / "state.json", lambda p: p.write_text(json.dumps(state) + "\n"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / f"step-{step}"
    if final.exists():  # left by a run that went further before this one resumed from earlier
        discard(final)
    os.rename(tmp, final)
    for old in checkpoints(out)[: -cfg.keep_last]:
        discard(old)


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with a dot and are ignored)."""
    root = out / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def read_training_checkpoint(path: Path) -> dict:
    """All a checkpoint holds but its weights' values, read and checked before anything is restored:
    one cut short (a kill, a full disk) or damaged raises LlamitaError."""
    try:
        state = json.loads((path / "state.json").read_text())
        with safe_open(path / "trainable.safetensors", framework="pt") as f:
            names = set(f.keys())
        step = state["step"]
    except Exception as e:  # a missing file, JSON cut short, a safetensors file shorter than its header says
        raise LlamitaError(f"{path}: not a complete checkpoint ({type(e).__name__}: {e})") from None
    if step != int(path.name[5:]):
        raise LlamitaError(f"{path}: its state.json says step {step}")
    return {"step": step, "run": state.get("run") or state.get("config", {}), "names": names,
            "optimizer": load_torch_file(path / "optimizer.pt", "optimizer state", mmap=False),
            "rng": load_torch_file(path / "rng.pt", "random state", mmap=False)}


def newest_checkpoint(out: Path, say: bool) -> tuple[Path, dict] | None:
    """The newest checkpoint that reads whole, and what it holds; newer damaged ones are passed
    over (and, with ``say``, named)."""
    for path in reversed(checkpoints(out)):
        try:
            return path, read_training_checkpoint(path)
        except LlamitaError as e:
            if say:
                print(f"llamita: passing over a damaged checkpoint: {e}", file=sys.stderr)
    return None


def load_checkpoint(path: Path, held: dict, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                    sharded: bool = False) -> int:
    """Restore the weights, the optimizer and this process's random state from a checkpoint
    ``read_training_checkpoint`` has read (``held``); returns its step."""
    params, optimizer_state = trainable(model), held["optimizer"]
    if held["names"] != set(params):
        raise LlamitaError(f"{path}: its weights do not match this run's trainable weights "
                           "(another --method or --lora-targets?)")
    with safe_open(path / "trainable.safetensors", framework="pt") as f, torch.no_grad():
        if sharded:  # every process reads the whole checkpoint and keeps its shards
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(model, {n: f.get_tensor(n) for n in params}, options=options)
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        else:
            for name, p in params.items():
                p.copy_(f.get_tensor(name))
            optimizer.load_state_dict(optimizer_state)
    rng = held["rng"]
    set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    return held["step"]


# --- metrics -----------------------------------------------------------------------------------------


def plot_series(ax, rows: list[dict], series: list[tuple[str, str, str]], ylabel: str) -> None:
    for key, label, style in series:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def read_metrics(out: Path) -> list[dict]:
    file = out / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line] if file.is_file() else []


def plot_loss(out: Path, unit: str = "response token") -> None:
    """``loss.png``: train loss per step and eval loss (nats per ``unit``), from metrics.jsonl; for DPO a
    second panel with the reward margin and accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out)
    dpo = any("rewards/margins" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if dpo else 1, figsize=(12 if dpo else 7, 4), squeeze=False)
    ax = axes[0][0]
    series = [("loss", "train", "-"), ("eval_loss", "eval", "o-")]
    if dpo:
        extra = [("rewards/margins", "rewards/margins", "-"), ("rewards/accuracies", "rewards/accuracies", "-"),
                 ("eval_rewards/accuracies", "eval rewards/accuracies", "o-")]
        plot_series(axes[0][1], rows, extra, "DPO rewards (beta x log-ratio to the reference)")
    plot_series(ax, rows, series, "DPO loss (per pair)" if dpo else f"loss (nats per {unit})")
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


# --- the loop -------------------------------------------------------------------------------------


def finetune(model: str | Path | None, data: str | Path, out: str | Path, **options) -> Path:
    """Train ``model`` on ``data`` and write ``out/adapter`` (LoRA, QLoRA) or ``out/model`` (full),
    plus ``metrics.jsonl``, ``loss.png`` and checkpoints. Options are TrainConfig's fields.
    Returns the folder of the result."""
    known = {f.name for f in fields(TrainConfig)}
    if unknown := sorted(set(options) - known):
        raise LlamitaError(f"finetune: unknown option {unknown[0]!r}")
    run = prepare(model, data, Path(out), TrainConfig(**options))
    train(run)
    return finish(run)


@dataclass
class Run:
    """A training run as ``start_run`` sets it up: what the loop reads and updates."""

    cfg: TrainConfig  # or PretrainConfig
    source: str | Path | None
    out: Path
    d: Dist
    net: nn.Module  # the model (sharded in place under FSDP)
    ddp: nn.Module  # what the loop calls: ``net``, or DDP around it
    lora: LoRAConfig | None
    examples: list
    eval_set: Dataset | None
    optimizer: torch.optim.Optimizer
    per_step: int  # records in one optimizer step, over every process
    total: int  # optimizer steps
    start: int  # the step resumed from
    amp: torch.dtype | None
    sharded: bool
    identity: dict  # what the run is (``run_identity``), recorded in train_config.json and each checkpoint
    flops_per_token: float = 0.0  # training FLOPs a token costs (pretraining reports MFU with it)
    peak_flops: float = 0.0  # the devices' rate those FLOPs are measured against (all processes')


def prepare(source: str | Path | None, data: str | Path, out: Path, cfg: TrainConfig) -> Run:
    """The model, the data, the optimizer, and where a resumed run stands."""
    d = init_distributed(cfg.device)
    identity = run_identity(cfg, source, data, d.world)
    resumed = claim(out, cfg, identity, d)
    torch.manual_seed(cfg.seed + d.rank)  # LoRA's init is overwritten by rank 0's through DDP
    random.seed(cfg.seed + d.rank)
    net, lora = model_to_train(source, cfg, d.device)
    tokenizer = load_tokenizer(source)
    max_length = min(cfg.max_length, net.config.max_seq_len)  # no longer than the model's context
    data_options = dict(format=cfg.format, template=cfg.template, max_length=max_length)
    if cfg.objective == "dpo":
        load = load_pairs
    else:
        load, data_options["train_on_prompt"] = load_dataset, cfg.train_on_prompt
    train_set = load(data, tokenizer, **data_options)
    eval_set = load(cfg.eval_data, tokenizer, **data_options) if cfg.eval_data else None
    if cfg.objective == "dpo":
        check_pairs(train_set, eval_set, max_length, d.main)
    if cfg.val_split:
        train_set, eval_set = split(train_set, cfg.val_split, cfg.seed)
    examples = pack(train_set.examples, max_length) if cfg.pack else train_set.examples
    per_step = cfg.batch_size * cfg.grad_accum * d.world
    if cfg.objective == "sft":
        check_data(train_set, len(train_set) + (len(eval_set) if cfg.val_split else 0), max_length, d.main)
    warn_step_size(per_step, len(examples), d.main)
    amp = autocast_dtype(cfg, d.device)
    if cfg.objective == "dpo" and cfg.method == "full":  # before any step changes the weights
        cache_reference(net, {"train": train_set, "eval": eval_set}, out, identity, cfg, d, amp)
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * len(examples) / per_step))
    return start_run(cfg, source, out, d, net, lora, examples, eval_set, per_step, total, resumed, identity)


def start_run(cfg: LoopConfig, source: str | Path | None, out: Path, d: Dist, net: nn.Module,
              lora: LoRAConfig | None, examples, eval_set: Dataset | None, per_step: int, total: int,
              resumed: tuple[Path, dict] | None, identity: dict) -> Run:
    """What every run does once its model and data are ready: shard (FSDP) or wrap (DDP) the model,
    make the optimizer, restore a checkpoint, and start the metrics and the run's record."""
    amp = autocast_dtype(cfg, d.device)
    sharded = d.world > 1 and (cfg.fsdp or (cfg.method == "full" and d.device.type == "cuda"))
    if sharded:
        shard(net)
    params = trainable(net).values()  # matrices decay; norm gains (1-D) do not, as in nanoGPT and litgpt
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # One fused kernel per step rather than a dozen passes over the weights (not for FSDP's sharded tensors).
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-5,
                                  fused=not sharded and all(p.dtype == torch.float32 for p in params))
    start = 0
    if resumed:
        start = load_checkpoint(*resumed, net, optimizer, d.rank, sharded)
        if d.main:
            print(f"llamita: resuming from {resumed[0]}", file=sys.stderr)
    if d.main:  # the metrics of steps after the checkpoint belong to the run that was cut short
        out.mkdir(parents=True, exist_ok=True)
        kept = "".join(json.dumps(r) + "\n" for r in read_metrics(out) if r["step"] <= start) if start else ""
        atomic_write(out / "metrics.jsonl", lambda p: p.write_text(kept))
        record = {"run": identity, "options": asdict(cfg)}
        atomic_write(out / "train_config.json", lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    ddp = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False) if d.world > 1 and not sharded else net
    return Run(cfg, source, out, d, net, ddp, lora, examples, eval_set, optimizer, per_step, total, start,
               amp, sharded, identity)


def check_pairs(train_set: Dataset, eval_set: Dataset | None, max_length: int, say: bool) -> None:
    """Refuse preference data left without a pair within --max-length; say (with ``say``) how many pairs
    were dropped (a prompt of max_length tokens or more) and how many cut to max_length."""
    for name, data in (("training", train_set), ("evaluation", eval_set)):
        if data is None:
            continue
        if not data.examples:
            raise LlamitaError(f"--max-length {max_length}: the prompt of every {name} pair in {data.source} takes "
                               "that many tokens or more, leaving no completion token; raise --max-length")
        if say and data.dropped:
            print(f"llamita: {data.dropped} of {len(data) + data.dropped} {name} pairs dropped: their prompt alone "
                  f"takes --max-length {max_length} tokens or more", file=sys.stderr)
        if say and data.truncated:
            print(f"llamita: {data.truncated} of {len(data) + data.dropped} {name} pairs truncated to {max_length} "
                  "tokens (prompt and completion; the prompt kept whole)", file=sys.stderr)


def warn_step_size(per_step: int, sequences: int, say: bool) -> None:
    if say and per_step > sequences:
        print(f"llamita: warning: a step takes {per_step} records (--batch-size x --grad-accum x processes) but "
              f"the data has {sequences}: each step goes over it {per_step / sequences:.4g} times", file=sys.stderr)


def check_data(train_set: Dataset, records: int, max_length: int, say: bool) -> None:
    """Refuse data with nothing to learn within --max-length; say (with ``say``) how many records were
    cut and how many lost every response token."""
    mute = sum(all(label == IGNORE for label in e.labels[1:]) for e in train_set.examples)  # position 0 predicts none
    if mute == len(train_set):
        raise LlamitaError(f"--max-length {max_length}: no record keeps a response token within it, so there is "
                           "nothing to learn; raise --max-length")
    if not say:
        return
    if train_set.truncated:
        print(f"llamita: {train_set.truncated} of {records} records truncated to {max_length} tokens", file=sys.stderr)
    if mute:
        print(f"llamita: {mute} of {len(train_set)} training records keep no response token within --max-length "
              f"{max_length}: they teach nothing", file=sys.stderr)


def cache_reference(net: nn.Module, sets: dict[str, Dataset | None], out: Path, identity: dict, cfg: TrainConfig,
                    d: Dist, amp: torch.dtype | None) -> None:
    """Full-weight DPO's reference: every pair's log-probs under the model before training, computed
    once and kept in OUT/reference_logps.safetensors, keyed by the pairs' tokens, the model and the
    precision (a run resumed, or rerun on the same data, reads them back), so no frozen copy of the
    weights is held. Each process computes every world-th batch; the sums are shared."""
    sets = {name: data for name, data in sets.items() if data is not None}
    key = reference_key(sets, identity, cfg, amp)
    file = out / REFERENCE_FILE
    cached = read_reference(file, key)
    if cached is None or any(name not in cached or len(cached[name]) != len(data) for name, data in sets.items()):
        cached = {}
        net.eval()
        for name, data in sets.items():
            logps = torch.zeros(len(data), 2, dtype=torch.float32, device=d.device)
            for start in range(0, len(data), cfg.batch_size * d.world):
                i = start + d.rank * cfg.batch_size
                pairs = data.examples[i: i + cfg.batch_size] if i < len(data) else data.examples[:1]
                with torch.no_grad():
                    row = sequence_logps(net, collate_pairs(pairs), d.device, amp).float()
                if i < len(data):
                    logps[i: i + len(pairs)] = torch.stack(row.chunk(2), dim=1)
            if d.world > 1:
                dist.all_reduce(logps)
            cached[name] = logps.cpu()
        net.train()
        if d.main:
            tensors = {name: t.contiguous() for name, t in cached.items()}
            atomic_write(file, lambda p: save_file(tensors, p, metadata={"key": key}))
    for name, data in sets.items():
        for pair, (chosen, rejected) in zip(data.examples, cached[name].tolist()):
            pair.ref = (chosen, rejected)


def reference_key(sets: dict[str, Dataset], identity: dict, cfg: TrainConfig, amp: torch.dtype | None) -> str:
    """sha256 of what the reference log-probs depend on: each pair's tokens and labels, the model
    (its name or path, and its files' sizes and modification times) and the precision."""
    digest = hashlib.sha256(json.dumps([identity["model"], cfg.dtype, str(amp)]).encode())
    model = Path(identity["model"])
    files = sorted(model.rglob("*")) if model.is_dir() else [model] if model.is_file() else []
    for f in files:
        if f.is_file():
            digest.update(f"{f.relative_to(model.parent)}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    for name, data in sets.items():
        digest.update(name.encode())
        for pair in data.examples:
            for e in (pair.chosen, pair.rejected):
                digest.update(json.dumps([e.ids, e.labels]).encode())
    return digest.hexdigest()


def read_reference(file: Path, key: str) -> dict[str, Tensor] | None:
    """The cached reference log-probs, if ``file`` holds those of ``key``; None otherwise (or damaged)."""
    try:
        with safe_open(file, framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # missing, cut short or not safetensors: compute anew
        return None


def train(run: Run) -> None:
    """The loop: each step takes its slice of the data stream, accumulates gradients over its
    micro-batches, clips, steps, then writes its metrics row and (every ``save_every``) a checkpoint."""
    cfg, d, examples = run.cfg, run.d, run.examples
    params = list(trainable(run.net).values())
    bar = progress_bar(run) if d.main and cfg.progress else None
    metrics = open(run.out / "metrics.jsonl", "a") if d.main else None
    t0, seen = time.perf_counter(), 0
    for step in range(run.start, run.total):
        lr = lr_at(step, cfg, run.total)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        # This step's records: a slice of the stream; process r takes the r-th share, in micro-batches.
        idx = order(len(examples), step * run.per_step, run.per_step, cfg.seed)
        batches = [make_batch([examples[i] for i in idx[k: k + cfg.batch_size]], cfg)
                   for k in range(0, run.per_step, cfg.batch_size)]
        count = sum(units(b, cfg) for b in batches)  # over the global batch: every process knows it
        tokens = sum(n_tokens(examples[i]) for i in idx)  # real tokens, padding not counted
        seen += tokens
        sums = backward(run, batches[d.rank * cfg.grad_accum: (d.rank + 1) * cfg.grad_accum], count)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)

        done = step + 1
        means = [value / max(count, 1) for value in sums]
        elapsed = time.perf_counter() - t0
        row = {"step": done, "loss": means[0], **dict(zip(metric_names(cfg), means[1:])), "lr": lr,
               "tokens": tokens, "elapsed_s": round(elapsed, 3), "tok_s": round(seen / max(elapsed, 1e-9), 1)}
        if run.flops_per_token and run.peak_flops:
            row["mfu"] = round(row["tok_s"] * run.flops_per_token / run.peak_flops, 4)
        if run.eval_set is not None and (done == run.total or cfg.eval_every and done % cfg.eval_every == 0):
            row.update(evaluate(run))
        if metrics:  # before the checkpoint: a run resumed from it must find this step's row
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if cfg.save_every and done % cfg.save_every == 0 and done < run.total:
            checkpoint_run(run, done)
        if bar:
            shown = {name: f"{row[name]:.4g}" for name in ("loss", *metric_names(cfg))}
            shown |= {"lr": f"{lr:.2e}", "tok_s": f"{row['tok_s']:.0f}"}
            bar.set_postfix(shown | ({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}))
            bar.update(1)
    if bar:
        bar.close()
    if metrics:
        metrics.close()


def backward(run: Run, micro_batches: list[dict[str, Tensor]], count: int) -> list[float]:
    """Gradients of this process's micro-batches, scaled so that the sum over every process is the
    global batch's mean loss (per response token for SFT, per pair for DPO); returns the global
    batch's summed loss and summed metrics."""
    d, sharded = run.d, run.sharded
    sums = torch.zeros(1 + len(metric_names(run.cfg)), dtype=torch.float64, device=d.device)
    for k, batch in enumerate(micro_batches):
        sync = k == len(micro_batches) - 1 or d.world == 1
        if sharded:
            run.net.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if sync or sharded else run.ddp.no_sync():
            s, metrics = objective_sum(run.ddp, run.net, batch, run.cfg, d.device, run.amp)
            # DDP and FSDP average gradients over processes: scale so the sum over all is the global mean.
            (s * d.world / max(count, 1)).backward()
        sums += torch.cat([s.detach().double().reshape(1), metrics])
    if d.world > 1:
        dist.all_reduce(sums)
    return sums.tolist()


def checkpoint_run(run: Run, step: int) -> None:
    """Every process's random state and the whole weights and optimizer state, written by rank 0."""
    rng = [None] * run.d.world
    if run.d.world > 1:
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    weights, optimizer_state = whole_state(run.net, run.optimizer, run.sharded)
    if run.d.main:
        save_checkpoint(run.out, step, weights, optimizer_state, rng, run.cfg, run.identity)


def learned_template(cfg: TrainConfig) -> str | None:
    """The prompt template the records were rendered in; None for plain text (no template)."""
    return None if cfg.objective == "pretrain" or cfg.format == "text" else cfg.template


def progress_bar(run: Run):
    from tqdm import tqdm

    desc = "pretrain" if run.cfg.objective == "pretrain" else "finetune"
    return tqdm(total=run.total, initial=run.start, desc=desc, unit="step", dynamic_ncols=True)


def finish(run: Run) -> Path:
    """The adapter (with its template) or the whole model (with the tokenizer), and the loss plot."""
    cfg, d = run.cfg, run.d
    result = run.out / ("model" if cfg.method == "full" else "adapter")
    weights = whole_state(run.net, None, run.sharded)[0] if run.sharded else None  # every weight is trainable here
    if d.main:
        if run.lora is not None:
            from llamita.assets import DEFAULT_MODEL_NAME

            base = str(run.source or DEFAULT_MODEL_NAME)
            save_adapter(run.net, run.lora, result, base, template=learned_template(cfg))
        else:
            from llamita.formats import save_model

            save_model(run.net, result, state_dict=weights, template=learned_template(cfg))
            if cfg.objective == "pretrain":  # the source is the tokenizer's folder
                copy_tokenizer_files(Path(run.source), result)
            else:
                write_tokenizer(run.source, result)
        plot_loss(run.out, "token" if cfg.objective == "pretrain" else "response token")
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result

"""The training loop: loss goes down, SIGKILL + resume equals an uninterrupted run, torchrun with 2
processes equals one process with twice the batch, QLoRA's NF4 memory, full fine-tuning, bad input."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import llamita
from helpers import (
    FAST,
    kill_at_first_checkpoint,
    losses,
    run_in_process_like,
    tiny_base,
    two_processes_and_one,
    write_data,
)
from llamita import cli
from llamita.errors import LlamitaError
from llamita.files import atomic_write
from llamita.nf4 import NF4_LEVELS, NF4Linear, nf4_dequantize, nf4_quantize
from llamita.train import TrainConfig, lr_at, model_to_train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.mark.slow
def test_lora_loss_goes_down_and_outputs(base, data, tmp_path):
    out = tmp_path / "run"
    result = llamita.finetune(base, data, out, steps=40, val_split=0.25, eval_every=20, **FAST)
    assert result == out / "adapter"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    loss = losses(out)
    assert sum(loss[-5:]) / 5 < 0.9 * sum(loss[:5]) / 5
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < loss[0]
    assert rows[0]["lr"] == pytest.approx(5e-3) and rows[-1]["lr"] == pytest.approx(1e-3)  # warmup, cosine to 10%
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in result.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup=4)
    lrs = [lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(0.1)


@pytest.mark.slow
def test_grad_checkpoint_and_accumulation_give_the_same_steps(base, data, tmp_path):
    plain = dict(steps=4, lora_dropout=0.0, **{**FAST, "batch_size": 4})
    llamita.finetune(base, data, tmp_path / "a", **plain)
    llamita.finetune(base, data, tmp_path / "b", grad_checkpoint=True, **plain)
    llamita.finetune(base, data, tmp_path / "c", **{**plain, "batch_size": 2, "grad_accum": 2})
    a, b, c = (losses(tmp_path / x) for x in "abc")
    assert a == pytest.approx(b, abs=1e-6) and a == pytest.approx(c, abs=1e-5)
    assert a[0] != a[-1]


@pytest.mark.slow
def test_every_checkpoint_finds_its_steps_metrics_on_disk(base, data, tmp_path, monkeypatch):
    """A run killed right after writing a checkpoint must resume with that step's metrics row, so
    the row is on disk before the checkpoint is written."""
    import llamita.train as train

    seen = {}
    write = train.save_checkpoint

    def save_checkpoint(out, step, *args, **kwargs):
        seen[step] = [r["step"] for r in train.read_metrics(out)]
        return write(out, step, *args, **kwargs)

    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    llamita.finetune(base, data, tmp_path / "run", steps=6, save_every=2, **FAST)
    assert seen == {2: [1, 2], 4: [1, 2, 3, 4]}


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(base, data, tmp_path):
    args = [sys.executable, "-m", "llamita", "finetune", str(base), "--data", str(data), "--steps", "30",
            "--save-every", "5", "--keep-last", "2", "--lr", "1e-2", "--warmup", "3", "--batch-size", "3",
            "--grad-accum", "2", "--lora-dropout", "0.2", "--lora-targets", "q,v,down", "--no-progress"]
    run_in_process_like(args, tmp_path / "whole")

    cut = tmp_path / "cut"
    kill_at_first_checkpoint(args, cut, ENV)
    assert not (cut / "adapter").exists()
    killed_at = max(int(p.name[5:]) for p in (cut / "checkpoints").glob("step-*"))
    assert killed_at < 30

    subprocess.run(args + ["--out", str(cut), "--resume"], env=ENV, check=True, capture_output=True)
    assert losses(cut) == losses(tmp_path / "whole")  # exactly, step by step
    a = load_file(cut / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step-20", "step-25"]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_twice_the_batch(base, data, tmp_path):
    common = ["finetune", str(base), "--data", str(data), "--steps", "3", "--lr", "1e-2", "--warmup", "1",
              "--lora-dropout", "0", "--lora-targets", "all", "--no-progress"]
    two, one = two_processes_and_one(common, tmp_path, ENV)
    assert len(two) == 3 and two == pytest.approx(one, abs=1e-5)
    a = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


@pytest.mark.slow
def test_fsdp_full_finetune_equals_one_process_and_resumes(base, data, tmp_path):
    """FSDP2 (--fsdp, gloo on CPU): 2 processes with batch 2 train as 1 process with batch 4, and
    a run resumed from a checkpoint gathered from the shards ends where the uninterrupted one did."""
    common = ["finetune", str(base), "--data", str(data), "--method", "full", "--steps", "4", "--lr", "3e-3",
              "--warmup", "1", "--save-every", "2", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "llamita", *common, "--batch-size", "2", "--fsdp"]
    subprocess.run([*torchrun, "--out", str(tmp_path / "fsdp")], env=ENV, check=True, capture_output=True)
    assert cli.main([*common, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    sharded, one = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    assert len(sharded) == 4 and sharded == pytest.approx(one, abs=1e-5)
    a = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)

    resumed = tmp_path / "resumed"  # the run as it stood at its step-2 checkpoint
    (resumed / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "fsdp" / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    state = torch.load(resumed / "checkpoints" / "step-2" / "optimizer.pt", weights_only=True)["state"]
    assert "layers.0.mlp.down_proj.weight" in state  # gathered by parameter name from FSDP's shards
    (resumed / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()[:2]))
    subprocess.run([*torchrun, "--out", str(resumed), "--resume"], env=ENV, check=True, capture_output=True)
    assert losses(resumed) == pytest.approx(sharded, abs=1e-6)
    c = load_file(resumed / "model" / "model.safetensors")
    assert all((a[k] - c[k]).abs().max() < 1e-6 for k in a)


# --- QLoRA / NF4 -----------------------------------------------------------------------------------


def test_nf4_rounds_to_the_nearest_level():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    packed, absmax = nf4_quantize(w)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2 and absmax.numel() == w.numel() // 64
    blocks = w.reshape(-1, 64)
    scale = blocks.abs().amax(-1, keepdim=True)
    nearest = (blocks / scale)[..., None].sub(NF4_LEVELS).abs().argmin(-1)  # brute force over the 16 levels
    expected = (NF4_LEVELS[nearest] * scale).reshape(w.shape)
    assert torch.equal(nf4_dequantize(packed, absmax, w.shape, torch.float32), expected)
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[7] == 0 and NF4_LEVELS[0] == -1 and NF4_LEVELS[-1] == 1


@pytest.mark.slow
def test_qlora_trains_and_frozen_weights_take_under_a_third(base, data, tmp_path):
    model, _ = model_to_train(base, TrainConfig(method="qlora", lora_targets="all"), torch.device("cpu"))
    quantized = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(quantized) == 4 * 3  # every projection of every block (q/k/v and gate/up fused)
    nf4_bytes = sum(m.nbytes for m in quantized)
    bf16_bytes = sum(m.in_features * m.out_features * 2 for m in quantized)
    assert nf4_bytes <= bf16_bytes / 3
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    out = tmp_path / "qlora"
    llamita.finetune(base, data, out, method="qlora", steps=40, **{**FAST, "lr": 3e-2})
    loss = losses(out)
    assert sum(loss[-5:]) / 5 < 0.9 * sum(loss[:5]) / 5
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_full_finetune_writes_a_checkpoint_transformers_loads(base, data, tmp_path):
    out = tmp_path / "full"
    result = llamita.finetune(base, data, out, method="full", steps=8, lr=3e-3, warmup=1, batch_size=4, progress=False)
    loss = losses(out)
    assert loss[-1] < loss[0]
    ours = llamita.load_model(result, dtype=torch.float32)
    theirs = LlamaForCausalLM.from_pretrained(result, dtype=torch.float32).eval()
    start = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4
        assert (start(ids).logits - theirs(ids).logits).abs().max() > 1e-3  # the weights did move
    assert llamita.load_tokenizer(result).encode("el gato") == llamita.load_tokenizer(base).encode("el gato")


# --- bad input -------------------------------------------------------------------------------------


def test_bad_options_are_one_line_errors(base, data, tmp_path, capsys):
    with pytest.raises(LlamitaError, match="--method 'dora'"):
        llamita.finetune(base, data, tmp_path, method="dora")
    with pytest.raises(LlamitaError, match="unknown option 'learning_rate'"):
        llamita.finetune(base, data, tmp_path, learning_rate=1.0)
    with pytest.raises(LlamitaError, match="--lora-targets: unknown module 'qq'"):
        llamita.finetune(base, data, tmp_path, lora_targets="qq,v")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n')
    assert cli.main(["finetune", str(base), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"llamita: error: {bad}:2: field 'output' must be a string, not int"
    assert cli.main(["finetune", str(base), "--data", str(data), "--out", str(tmp_path / "o"),
                     "--template", "vicuna"]) == 2
    assert "unknown chat template 'vicuna'" in capsys.readouterr().err


# --- the run's folder: another run's, checkpoints cut short, a full disk, file modes ------------------


def test_a_folder_holding_another_run_is_refused_unless_overwrite(base, data, tmp_path):
    """A second run in the first one's --out used to prune the first's checkpoints and mix them with its own."""
    out = tmp_path / "run"
    llamita.finetune(base, data, out, steps=3, save_every=1, **FAST)
    held = r"holds another run \(checkpoints, adapter, metrics.jsonl, loss.png, train_config.json\): "
    with pytest.raises(LlamitaError, match=held + "continue it with --resume, replace it with --overwrite"):
        llamita.finetune(base, data, out, steps=2, save_every=1, seed=7, **FAST)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]  # untouched
    llamita.finetune(base, data, out, steps=2, save_every=1, seed=7, overwrite=True, **FAST)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    assert json.loads((out / "checkpoints" / "step-1" / "state.json").read_text())["run"]["seed"] == 7
    assert len(losses(out)) == 2
    with pytest.raises(LlamitaError, match="--resume continues the run in --out, --overwrite replaces it"):
        llamita.finetune(base, data, out, resume=True, overwrite=True)


def test_resume_refuses_another_runs_checkpoint_and_says_when_there_is_none(base, data, tmp_path, capsys):
    """--resume used to load another run's step (other seed, lr and steps), train nothing and write it as its result."""
    out = tmp_path / "run"
    llamita.finetune(base, data, out, steps=3, save_every=2, **FAST)
    with pytest.raises(LlamitaError) as e:
        llamita.finetune(base, data, out, steps=5, resume=True, **{**FAST, "lr": 2e-2, "seed": 7})
    assert (f"{out}: --resume: this is not the run that {out} holds: lr 0.02 (the run's: 0.01); "
            "steps 5 (the run's: 3); seed 7 (the run's: 1337). Resume with that run's options") in str(e.value)
    other = write_data(tmp_path / "other.jsonl", n=8)
    with pytest.raises(LlamitaError, match=r"holds: data_sha256 \w{12}\.\.\. \(the run's: \w{12}\.\.\.\)\."):
        llamita.finetune(base, other, out, steps=3, resume=True, **FAST)
    with pytest.raises(LlamitaError, match=r"records_per_step 8 \(the run's: 4\)"):
        llamita.finetune(base, data, out, steps=3, resume=True, **{**FAST, "batch_size": 8})
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    capsys.readouterr()
    llamita.finetune(base, data, tmp_path / "fresh", steps=1, resume=True, **FAST)
    assert f"llamita: --resume: no checkpoint in {tmp_path / 'fresh' / 'checkpoints'}: starting from step 0" in \
        capsys.readouterr().err


def test_resume_passes_over_a_damaged_checkpoint_and_removes_stale_temporaries(base, data, tmp_path, capsys):
    """A kill while pruning left step-3 holding only rng.pt, and hidden folders of interrupted saves stayed forever."""
    options = dict(steps=4, save_every=1, keep_last=3, **FAST)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    llamita.finetune(base, data, whole, **options)
    shutil.copytree(whole, cut)
    for name in ("trainable.safetensors", "optimizer.pt", "state.json"):
        (cut / "checkpoints" / "step-3" / name).unlink()
    (cut / "checkpoints" / ".step-4.x1y2").mkdir()
    (cut / "checkpoints" / ".step-4.x1y2" / ".optimizer.pt.abc").write_bytes(b"cut")
    (cut / "checkpoints" / ".trash-step-1").mkdir()
    (cut / ".metrics.jsonl.k3j4").write_text("{")
    capsys.readouterr()
    llamita.finetune(base, data, cut, resume=True, **options)
    err = capsys.readouterr().err
    assert f"passing over a damaged checkpoint: {cut / 'checkpoints' / 'step-3'}: not a complete checkpoint" in err
    assert f"resuming from {cut / 'checkpoints' / 'step-2'}" in err
    assert losses(cut) == pytest.approx(losses(whole), abs=1e-6)
    a = load_file(cut / "adapter" / "adapter_model.safetensors")
    b = load_file(whole / "adapter" / "adapter_model.safetensors")
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    assert not [p for p in cut.iterdir() if p.name.startswith(".")]


def test_an_interrupted_prune_leaves_no_partial_checkpoint(base, data, tmp_path, monkeypatch):
    """Pruning deleted a checkpoint in place, so a kill midway left part of it under its valid name."""
    import llamita.train as train

    rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        if not Path(path).exists():
            return rmtree(path, ignore_errors=ignore_errors)
        next(p for p in sorted(Path(path).iterdir()) if p.name != "rng.pt").unlink()
        raise RuntimeError("killed while pruning")

    monkeypatch.setattr(train.shutil, "rmtree", killed_midway)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed while pruning"):
        llamita.finetune(base, data, out, steps=3, save_every=1, keep_last=1, **FAST)
    complete = {"trainable.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    assert [p.name for p in train.checkpoints(out)] == ["step-2"]
    assert {p.name for p in (out / "checkpoints" / "step-2").iterdir()} == complete


def test_a_full_disk_is_named_and_leaves_no_temporary_checkpoint(base, data, tmp_path, monkeypatch):
    """A full disk gave a traceback (torch.save's: "basic_ios::clear: iostream error") and left a hidden folder."""
    import llamita.train as train

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train, "save_file", no_space)
    with pytest.raises(LlamitaError, match=r"step-1\.\w+/trainable.safetensors: no space left on device \(the disk is"):
        llamita.finetune(base, data, tmp_path / "a", steps=2, save_every=1, **FAST)
    assert list((tmp_path / "a" / "checkpoints").iterdir()) == []
    monkeypatch.undo()

    def iostream_error(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(train.torch, "save", iostream_error)  # what torch.save says; the free space tells why
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=1 << 30, used=1 << 30, free=0))
    with pytest.raises(LlamitaError, match=r"optimizer.pt: no space left on device"):
        llamita.finetune(base, data, tmp_path / "b", steps=2, save_every=1, **FAST)
    assert list((tmp_path / "b" / "checkpoints").iterdir()) == []


def test_written_files_take_the_umask_mode(base, data, tmp_path):
    """Every file written had mkstemp's mode 0600 (and checkpoints mkdtemp's 0700), whatever the umask."""
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        llamita.finetune(base, data, out, steps=2, save_every=1, **FAST)
        os.umask(0o027)
        atomic_write(tmp_path / "private.txt", lambda p: p.write_text("x"))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert {"checkpoints/step-1", "checkpoints/step-1/optimizer.pt", "adapter/adapter_model.safetensors",
            "metrics.jsonl", "loss.png", "train_config.json"} <= set(modes)
    assert modes == {name: 0o755 if (out / name).is_dir() else 0o644 for name in modes}
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o640


# --- numbers and records that teach nothing ------------------------------------------------------------


def test_blank_records_and_numbers_that_teach_nothing_are_refused(base, data, tmp_path, capsys):
    """Whitespace-only records, --max-length 1 (loss 0, exit 0) and --epochs -1 were accepted."""
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"instruction": "a", "output": "b"}\n{"instruction": " ", "output": " \\n\\t"}\n')
    with pytest.raises(LlamitaError, match=r"blank.jsonl:2: the response is blank \(empty or only whitespace\)"):
        llamita.finetune(base, blank, tmp_path / "a", steps=1, **FAST)
    spaces = tmp_path / "spaces.txt"
    spaces.write_text("  \n\n \t\n")
    with pytest.raises(LlamitaError, match=r"spaces.txt: no text \(the dataset is empty or only whitespace\)"):
        llamita.finetune(base, spaces, tmp_path / "b", steps=1, format="text", **FAST)
    assert cli.main(["finetune", str(base), "--data", str(data), "--out", str(tmp_path / "c"),
                     "--max-length", "1"]) == 2
    assert "--max-length 1: must be at least 2 (a token and the next" in capsys.readouterr().err
    for option, value, message in [("epochs", -1.0, "--epochs -1.0: must be more than 0"),
                                   ("epochs", 0.0, "--epochs 0.0: must be more than 0"),
                                   ("lr", -1e-3, "--lr -0.001: must be more than 0"),
                                   ("warmup", -1, "--warmup -1: must be at least 0"),
                                   ("grad_accum", 0, "--grad-accum 0: must be at least 1")]:
        with pytest.raises(LlamitaError, match=re.escape(message)):
            TrainConfig(**{option: value})
    with pytest.raises(LlamitaError, match="--max-length 8: no record keeps a response token within it"):
        llamita.finetune(base, data, tmp_path / "d", steps=1, max_length=8, **FAST)


def test_a_step_larger_than_the_data_is_warned(base, data, tmp_path, capsys):
    """--grad-accum 1000000 took 3 GB and minutes per step over 12 records, without a word."""
    import llamita.train as train

    train.prepare(base, data, tmp_path / "run", TrainConfig(grad_accum=1000, steps=1, **FAST))
    assert ("llamita: warning: a step takes 4000 records (--batch-size x --grad-accum x processes) but the data has "
            "12: each step goes over it 333.3 times") in capsys.readouterr().err

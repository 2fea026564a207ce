"""DPO (``finetune --objective dpo``): TRL's DPOTrainer computes the same log-probabilities, losses and
reward metrics on the same pairs; the reference is the adapter-off model and stays so while the
adapter trains; full fine-tuning's cached reference; accumulation and resume; bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import llamita
from helpers import WORDS, losses, tiny_base
from llamita import cli
from llamita.data import collate_pairs, load_pairs, order, pair_files, prompt_length
from llamita.errors import LlamitaError
from llamita.peft import adapter_tensors
from llamita.train import (
    REFERENCE_FILE,
    TrainConfig,
    dpo_sum,
    model_to_train,
    prepare,
    reference_logps,
    sequence_logps,
    train,
)

# Summed log-probs here are tens of nats, where float32's spacing is 4e-6 to 8e-6: they are compared to
# 1e-5 or one part in a million, whichever is larger; losses and rewards (beta x differences) to 1e-5.
LOGPS = dict(abs=1e-5, rel=1e-6)
DPO = dict(objective="dpo", template="auto", lora_targets="q,v", lora_dropout=0.0, progress=False)


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def preference_records(n: int = 8) -> list[dict]:
    """Chat-shaped pairs of varied lengths: repeating the word is preferred to other words."""
    out = []
    for i, w in enumerate((WORDS * 2)[:n]):
        other = " ".join(WORDS[(i + 1 + k) % len(WORDS)] for k in range(1 + i % 4))
        out.append({"chosen": conversation(f"repite {w}", " ".join([w] * (1 + i % 3))),
                    "rejected": conversation(f"repite {w}", other)})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_records())


@pytest.fixture(scope="module")
def trl_trainer(base, pairs, tmp_path_factory):
    """TRL's DPOTrainer on the same records, with peft's LoRA on q and v (r 8, alpha 16, dropout 0)
    and beta 0.1; it tokenizes the records itself with the checkpoint's chat template."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4, beta=0.1,
                     max_length=256, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                     save_strategy="no", seed=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return DPOTrainer(model=LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), args=args,
                      train_dataset=Dataset.from_list(records), processing_class=AutoTokenizer.from_pretrained(base),
                      peft_config=lora)


def trl_step(trainer, rows: list[int], **loss) -> tuple[float, dict[str, float]]:
    """TRL's own loss and logged metrics for the pairs ``rows``, collated by its collator; ``loss``
    sets the trainer's loss_types / loss_weights / label_smoothing / beta."""
    saved = {k: getattr(trainer, k) for k in loss}
    for k, v in loss.items():
        setattr(trainer, k, v)
    mode = "train" if trainer.model.training else "eval"  # where TRL logs
    trainer._metrics[mode].clear()
    try:
        with torch.no_grad():
            value = trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[i] for i in rows]))
    finally:
        for k, v in saved.items():
            setattr(trainer, k, v)
    return value.item(), {k: v[-1] for k, v in trainer._metrics[mode].items()}


def put_adapter(trainer, model) -> None:
    """llamita's adapter (PEFT's key names) into TRL's peft model."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(trainer.model, adapter_tensors(model))
    assert not [k for k in result.unexpected_keys if "lora" in k]


def test_log_probs_losses_and_rewards_equal_trls(base, pairs, trl_trainer):
    """With the adapter away from zero (random B), so that policy and reference differ: per pair,
    the chosen and rejected log-probs, the reference's, the loss and the rewards; per batch, the
    loss and TRL's six metrics; for sigmoid, ipo, hinge and label smoothing."""
    tokenizer = llamita.load_tokenizer(base)
    ours = load_pairs(pairs, tokenizer, template="auto", max_length=256).examples
    theirs = trl_trainer.train_dataset
    for pair, row in zip(ours, theirs):  # the same tokens: TRL rendered the chat template itself
        assert pair.chosen.ids == row["prompt_ids"] + row["chosen_ids"]
        assert pair.rejected.ids == row["prompt_ids"] + row["rejected_ids"]
        assert sum(label != -100 for label in pair.chosen.labels) == len(row["chosen_ids"])

    cfg = TrainConfig(**DPO)
    model, _ = model_to_train(base, cfg, torch.device("cpu"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    put_adapter(trl_trainer, model)
    model.eval()
    trl_trainer.model.eval()

    rows = [0, 3, 5, 6]
    batch = collate_pairs([ours[i] for i in rows])
    with torch.no_grad():
        logps = sequence_logps(model, batch, torch.device("cpu"), None)
        ref = reference_logps(model, batch, torch.device("cpu"), None)
    trl_ref = torch.cat(trl_trainer.compute_ref_log_probs(trl_trainer.model, trl_trainer.data_collator(
        [theirs[i] for i in rows])))
    assert ref.tolist() == pytest.approx(trl_ref.tolist(), **LOGPS)
    assert (logps - ref).abs().max() > 0.1  # the adapter matters: the comparison below is not of the base twice
    for k, i in enumerate(rows):
        loss, m = trl_step(trl_trainer, [i])
        assert logps[k].item() == pytest.approx(m["logps/chosen"], **LOGPS)
        assert logps[k + len(rows)].item() == pytest.approx(m["logps/rejected"], **LOGPS)
        one, metrics = dpo_sum(model, model, collate_pairs([ours[i]]), cfg, torch.device("cpu"), None)
        assert one.item() == pytest.approx(loss, abs=1e-5)
        assert metrics[0].item() == pytest.approx(m["rewards/chosen"], abs=1e-5)
        assert metrics[1].item() == pytest.approx(m["rewards/rejected"], abs=1e-5)

    # TRL 1.16's sigmoid loss has no label smoothing; conservative DPO, -(1-e) logsigmoid(bd) - e logsigmoid(-bd),
    # is TRL's weighted sum of its sigmoid and robust losses: 2(1-e) sigmoid - (1-2e) robust.
    e = 0.2
    variants = [(dict(dpo_loss="sigmoid"), dict(loss_types=["sigmoid"], loss_weights=[1.0])),
                (dict(dpo_loss="ipo", beta=0.5), dict(loss_types=["ipo"], loss_weights=[1.0], beta=0.5)),
                (dict(dpo_loss="hinge"), dict(loss_types=["hinge"], loss_weights=[1.0])),
                (dict(dpo_loss="sigmoid", label_smoothing=e),
                 dict(loss_types=["sigmoid", "robust"], loss_weights=[2 * (1 - e), -(1 - 2 * e)], label_smoothing=e))]
    for options, trl_options in variants:
        cfg = TrainConfig(**{**DPO, **options})
        with torch.no_grad():
            total, metrics = dpo_sum(model, model, batch, cfg, torch.device("cpu"), None)
        loss, m = trl_step(trl_trainer, rows, **trl_options)
        assert total.item() / len(rows) == pytest.approx(loss, abs=1e-5), options
        names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"]
        for name, value in zip(names, (metrics / len(rows)).tolist()):
            assert value == pytest.approx(m[name], **(LOGPS if name.startswith("logps") else dict(abs=1e-5))), name
    assert 0 < m["rewards/accuracies"] < 1  # a metric that can tell a wrong comparison


def test_training_steps_follow_trls_from_ln2(base, pairs, trl_trainer, tmp_path):
    """Three AdamW steps, the same initial adapter, data order, learning rates and clipping: the first
    loss is ln 2 (B is zero) on both sides, and the losses stay within 1e-5. What differs is only
    float32 summation order (our fused q/k/v matmul and one log-softmax per labelled position against
    transformers' separate projections and TRL's tiled LM head), which AdamW's normalized steps carry on."""
    cfg = TrainConfig(**DPO, steps=3, lr=1e-2, warmup=0, batch_size=4, seed=3)
    run = prepare(base, pairs, tmp_path / "run", cfg)
    put_adapter(trl_trainer, run.net)  # A as llamita drew it, B zero
    train(run)
    rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == 0.0 and rows[0]["rewards/accuracies"] == 0.0

    model = trl_trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    theirs = []
    for step, row in enumerate(rows):
        idx = order(len(run.examples), step * 4, 4, cfg.seed)
        trl_trainer._metrics["train"].clear()
        loss = trl_trainer.compute_loss(model, trl_trainer.data_collator([trl_trainer.train_dataset[i] for i in idx]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = row["lr"]
        optimizer.step()
        optimizer.zero_grad()
        theirs.append(loss.item())
    assert theirs[0] == pytest.approx(math.log(2), abs=1e-6)
    assert [r["loss"] for r in rows] == pytest.approx(theirs, abs=1e-5)  # measured: within 2e-7
    assert theirs[-1] < theirs[0] - 0.01  # it trained


def test_the_reference_is_the_adapter_off_model_and_stays_so(base, pairs, trl_trainer, tmp_path):
    """After steps that move the adapter, the reference log-probs are those from before them, and
    equal TRL's reference (peft's disabled adapter) for the trained adapter loaded into peft."""
    cfg = TrainConfig(**DPO, steps=4, lr=3e-2, warmup=0, batch_size=4)
    run = prepare(base, pairs, tmp_path / "run", cfg)
    batch = collate_pairs(run.examples[:4])
    cpu = torch.device("cpu")
    before = reference_logps(run.net, batch, cpu, None)
    train(run)
    after = reference_logps(run.net, batch, cpu, None)
    with torch.no_grad():
        policy = sequence_logps(run.net, batch, cpu, None)
    assert torch.equal(before, after)
    assert (policy - after).abs().max() > 0.05  # the adapter moved the policy away from it
    put_adapter(trl_trainer, run.net)
    trl_ref = torch.cat(trl_trainer.compute_ref_log_probs(trl_trainer.model, trl_trainer.data_collator(
        [trl_trainer.train_dataset[i] for i in range(4)])))
    assert after.tolist() == pytest.approx(trl_ref.tolist(), **LOGPS)
    assert losses(run.out)[-1] < losses(run.out)[0]


def test_full_finetuning_caches_the_reference_once(base, pairs, trl_trainer, tmp_path, monkeypatch):
    """--method full: the reference log-probs are the base model's (TRL's reference), written once
    beside the run and read back rather than recomputed; the model trains."""
    from safetensors.torch import load_file

    import llamita.train as train_module

    out = tmp_path / "full"
    llamita.finetune(base, pairs, out, method="full", steps=3, lr=3e-3, warmup=0, **DPO)
    cached = load_file(out / REFERENCE_FILE)["train"]
    trl_ref = trl_trainer.compute_ref_log_probs(trl_trainer.model, trl_trainer.data_collator(
        list(trl_trainer.train_dataset)))
    assert cached.flatten().tolist() == pytest.approx(torch.stack(trl_ref, dim=1).flatten().tolist(), **LOGPS)
    assert losses(out)[0] == pytest.approx(math.log(2), abs=1e-5) and losses(out)[-1] < losses(out)[0]

    def no_forward(*args, **kwargs):
        raise AssertionError("the cached reference was computed again")

    monkeypatch.setattr(train_module, "sequence_logps", no_forward)
    run = prepare(base, pairs, out, TrainConfig(method="full", steps=3, lr=3e-3, warmup=0, resume=True, **DPO))
    assert [p.ref for p in run.examples] == [tuple(r) for r in cached.tolist()]


def test_accumulation_and_resume_give_the_same_steps(base, pairs, tmp_path):
    plain = dict(steps=4, lr=2e-2, warmup=1, **DPO)
    llamita.finetune(base, pairs, tmp_path / "a", batch_size=4, save_every=2, **plain)
    llamita.finetune(base, pairs, tmp_path / "b", batch_size=2, grad_accum=2, **plain)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a == pytest.approx(b, abs=1e-5) and a[0] != a[-1]

    cut = tmp_path / "cut"  # the run as it stood at its step-2 checkpoint
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    shutil.copy(tmp_path / "a" / "train_config.json", cut)
    (cut / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[:2]))
    llamita.finetune(base, pairs, cut, batch_size=4, save_every=2, resume=True, **plain)
    assert losses(cut) == pytest.approx(a, abs=1e-6)
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/accuracies" in r for r in rows)
    assert (cut / "adapter" / "adapter_config.json").is_file() and (cut / "loss.png").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_twice_the_batch(base, pairs, tmp_path):
    """The reference forward (adapters off) runs on each process's own rows, outside DDP."""
    import os
    import subprocess
    import sys

    common = ["finetune", str(base), "--data", str(pairs), "--objective", "dpo", "--template", "auto", "--steps", "3",
              "--lr", "2e-2", "--warmup", "1", "--lora-dropout", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "llamita", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")],
                   env=env, check=True, capture_output=True)
    assert cli.main([*common, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    two, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(two) == 3 and two == pytest.approx(one, abs=1e-5) and two[0] != two[-1]
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ones = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rewards/margins"] for r in rows] == pytest.approx([r["rewards/margins"] for r in ones], abs=1e-5)


# --- data: formats, pairs from two files, bad input ---------------------------------------------------------


def test_string_pairs_render_like_sft_records_and_pair_files(base, tmp_path):
    """{"prompt", "chosen", "rejected"} renders each side exactly as the SFT record with that
    instruction and output (labels on the answer only); pair_files joins two SFT files by prompt."""
    from llamita.data import encode_record

    tokenizer = llamita.load_tokenizer(base)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "repite gato", "chosen": "gato", "rejected": "perro"}])
    pair = load_pairs(data, tokenizer, max_length=256).examples[0]
    sft = encode_record(tokenizer, {"instruction": "repite gato", "output": "gato"}, "x")
    assert (pair.chosen.ids, pair.chosen.labels) == (sft.ids, sft.labels)

    good = write_jsonl(tmp_path / "es.jsonl", [{"instruction": f"di {w}", "output": w} for w in WORDS[:3]])
    bad = write_jsonl(tmp_path / "en.jsonl", [{"instruction": f"di {w}", "output": "cat"} for w in WORDS[2::-1]])
    records = pair_files(good, bad)
    assert [r["chosen"][1]["content"] for r in records] == WORDS[:3]
    assert all(r["rejected"][1]["content"] == "cat" and r["rejected"][0] == r["chosen"][0] for r in records)
    out = tmp_path / "pairs.jsonl"
    assert cli.main(["pair", str(good), str(bad), str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    lonely = write_jsonl(tmp_path / "lonely.jsonl", [{"instruction": "di agua", "output": "agua"}])
    with pytest.raises(LlamitaError, match=f"{lonely}:1: no record of {bad} answers this prompt"):
        pair_files(lonely, bad)


def test_bad_preference_data_is_a_one_line_error(base, tmp_path, capsys):
    tokenizer = llamita.load_tokenizer(base)
    ok = {"prompt": "repite gato", "chosen": "gato", "rejected": "perro"}
    cases = [({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
             ({**ok, "rejected": "gato"}, "fields 'chosen' and 'rejected' are the same answer: nothing to prefer"),
             ({**ok, "rejected": 3}, "field 'rejected' must be a string, not int"),
             ({**ok, "chosen": "  "}, "field 'chosen': the completion is blank"),
             ({"chosen": conversation("a", "b"), "rejected": conversation("c", "d")},
              "fields 'chosen' and 'rejected' share no prompt turn"),
             ({"instruction": "a", "output": "b"}, "--objective dpo takes preference records")]
    for record, message in cases:
        data = write_jsonl(tmp_path / "bad.jsonl", [ok, record])
        with pytest.raises(LlamitaError) as e:
            load_pairs(data, tokenizer, max_length=256)
        assert str(e.value).startswith(f"{data}:2: ") and message in str(e.value), str(e.value)
    with pytest.raises(LlamitaError, match=r":1: a preference record \(chosen / rejected\): train on it with "
                                           "--objective dpo"):
        llamita.finetune(base, tmp_path / "bad.jsonl", tmp_path / "sft", steps=1, progress=False)
    assert cli.main(["finetune", str(base), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o"),
                     "--objective", "dpo"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "bad.jsonl:2: --objective dpo takes preference records ({'prompt', 'chosen', 'rejected'} or "
        "{'chosen': [messages], 'rejected': [messages]}), not a alpaca record")
    with pytest.raises(LlamitaError, match="--label-smoothing applies to --dpo-loss sigmoid, not ipo"):
        TrainConfig(objective="dpo", dpo_loss="ipo", label_smoothing=0.1)
    with pytest.raises(LlamitaError, match="--pack is for --objective sft"):
        TrainConfig(objective="dpo", pack=True)


def test_a_prompt_longer_than_max_length_drops_its_pair_and_is_counted(base, tmp_path, capsys):
    """TRL's rule: a pair whose prompt alone takes --max-length tokens is dropped; the others keep
    their first --max-length tokens. Both counted at the start; no pair left is an error."""
    long = {"prompt": "repite " + " ".join(WORDS * 4), "chosen": "gato", "rejected": "perro"}
    short = {"prompt": "repite gato", "chosen": "gato gato gato gato gato gato", "rejected": "perro"}
    data = write_jsonl(tmp_path / "d.jsonl", [long, short, short])
    tokenizer = llamita.load_tokenizer(base)
    prompt = prompt_length(load_pairs(data, tokenizer, max_length=512).examples[1].chosen)
    loaded = load_pairs(data, tokenizer, max_length=prompt + 3)
    assert (len(loaded), loaded.dropped, loaded.truncated) == (2, 1, 2)
    assert len(loaded.examples[0].chosen.ids) == prompt + 3 and len(loaded.examples[0].rejected.ids) <= prompt + 3
    llamita.finetune(base, data, tmp_path / "run", steps=1, max_length=prompt + 3, **{**DPO, "template": "alpaca"})
    err = capsys.readouterr().err
    assert f"1 of 3 training pairs dropped: their prompt alone takes --max-length {prompt + 3} tokens or more" in err
    assert f"2 of 3 training pairs truncated to {prompt + 3} tokens" in err
    with pytest.raises(LlamitaError, match=r"--max-length 8: the prompt of every training pair in .*d.jsonl takes"):
        llamita.finetune(base, data, tmp_path / "none", steps=1, max_length=8, **{**DPO, "template": "alpaca"})

"""DPO training speed and peak memory: llamita against TRL's DPOTrainer with peft, same model, pairs and batches.

    python bench/dpo.py --data ../shared/data/es_sft/health_en_es.jsonl            # the default model
    python bench/dpo.py --data FILE --model DIR --steps 4 --batch-size 2 --max-length 256 --threads 2

The pairs: each Spanish question (``instruction_es``) with its Spanish answer chosen and its English
answer rejected, in the model's chat template, the first ones whose two sequences fit in
``--max-length``. llamita renders them (llamita.data.load_pairs) and both sides get the very same
token ids: TRL's own collator pads them (chosen rows then rejected rows, one forward, as both do),
and TRL's ``compute_loss`` runs its concatenated forward and the reference forward with peft's
adapter disabled; llamita's ``dpo_sum`` does the same with its adapters switched off. float32
weights, LoRA r=8, alpha 16, dropout 0 (TRL turns dropout off) on all seven projections, beta 0.1,
AdamW. A GGUF model (the default) is first written as a float32 Hugging Face checkpoint, which
both sides load. Each side runs in its own subprocess; peak memory is that process's VmHWM
(resident high-water mark). The first step warms up and is not timed; tokens are real ones, padding excluded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pairs(args) -> list:
    """The first preference pairs of ``--data`` that fit in --max-length, rendered by llamita."""
    from llamita.data import load_pairs, read_records
    from llamita.tokenizer import load_tokenizer

    records = []
    for _, r in read_records(args.data):
        if not (r["output_es"].strip() and r["output_en"].strip()) or r["output_es"] == r["output_en"]:
            continue  # a few answers are blank in the source
        ask = [{"role": "user", "content": r["instruction_es"]}]
        records.append({"chosen": ask + [{"role": "assistant", "content": r["output_es"]}],
                        "rejected": ask + [{"role": "assistant", "content": r["output_en"]}]})
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "pairs.jsonl"
        file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        loaded = load_pairs(file, load_tokenizer(args.model), template="auto", max_length=10**9).examples
    fit = [p for p in loaded if max(len(p.chosen.ids), len(p.rejected.ids)) <= args.max_length]
    return fit[: args.steps * args.batch_size]


def high_water_gb() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024**2


def llamita_side(args, data):
    import torch

    from llamita.data import collate_pairs
    from llamita.train import TrainConfig, dpo_sum, model_to_train

    cfg = TrainConfig(objective="dpo", lora_targets="all", lora_r=8, lora_alpha=16, lora_dropout=0.0, beta=0.1)
    model, _ = model_to_train(args.model, cfg, torch.device("cpu"))

    def loss_of(chunk):
        loss, _ = dpo_sum(model, model, collate_pairs(chunk), cfg, torch.device("cpu"), None)
        return loss / len(chunk)

    return model, loss_of


def trl_side(args, data):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from llamita.data import prompt_length

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = []
    for p in data:  # llamita's token ids, split where TRL splits them: prompt, then each completion
        n = prompt_length(p.chosen)
        rows.append({"prompt_ids": p.chosen.ids[:n], "chosen_ids": p.chosen.ids[n:],
                     "rejected_ids": p.rejected.ids[n:]})
    text = [{"prompt": "a", "chosen": "b", "rejected": "c"}]  # the trainer wants a dataset; the batches are `rows`
    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(
            model=base, processing_class=tokenizer, train_dataset=Dataset.from_list(text),
            args=DPOConfig(output_dir=out, beta=0.1, max_length=args.max_length, report_to="none", use_cpu=True,
                           bf16=False, gradient_checkpointing=False, save_strategy="no"),
            peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    model = trainer.model
    model.train()
    index = {id(p): row for p, row in zip(data, rows)}

    def loss_of(chunk):
        return trainer.compute_loss(model, trainer.data_collator([index[id(p)] for p in chunk]))

    return model, loss_of


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = pairs(args)
    model, loss_of = (llamita_side if args.impl == "llamita" else trl_side)(args, data)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5)
    times, losses, tokens = [], [], []
    for i in range(0, len(data), args.batch_size):
        chunk = data[i: i + args.batch_size]
        t = time.perf_counter()
        loss = loss_of(chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        tokens.append(sum(len(p.chosen.ids) + len(p.rejected.ids) for p in chunk))
    seconds = sum(times[1:])  # the first step warms up allocators and kernels
    print(json.dumps({"impl": args.impl, "steps_timed": len(times) - 1, "s_per_step": seconds / (len(times) - 1),
                      "tok_s": sum(tokens[1:]) / seconds, "peak_rss_gb": high_water_gb(), "first_loss": losses[0],
                      "losses": losses}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="health_en_es.jsonl: instruction_es, output_es, output_en")
    p.add_argument("--model", default=None, help="default: the embedded smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2, help="pairs per step (twice as many sequences)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs of each, alternating; the fastest is shown")
    p.add_argument("--impl", choices=["llamita", "trl"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return worker(args)
    import torch

    from llamita.formats import detect
    from llamita.formats.export import convert

    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if detect(args.model)[0] != "hf":  # a GGUF model loads in transformers as "quantized", which Trainer refuses
            model = str(convert(args.model, Path(tmp) / "hf", dtype=torch.float32))
        for _ in range(args.repeats):  # alternate the two: a busy machine slows whichever runs at the wrong moment
            for impl in ("llamita", "trl"):
                result = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--impl", impl, "--model", model],
                                        capture_output=True, text=True)
                if result.returncode:
                    sys.exit(f"{impl} failed:\n{result.stderr[-3000:]}")
                row = json.loads(result.stdout.strip().splitlines()[-1])
                if impl not in best or row["s_per_step"] < best[impl]["s_per_step"]:
                    best[impl] = row
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    print(f"- machine: {cpu}, {args.threads} threads; date: {datetime.date.today()}")
    print(f"- torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"- setup: {args.batch_size} pairs per step (max {args.max_length} tokens), {args.steps - 1} timed steps, "
          f"best of {args.repeats}")
    print(f"- command: python {' '.join(sys.argv)}\n")
    print("| | tokens/s | s/step | peak RSS GB | first loss |\n| --- | ---: | ---: | ---: | ---: |")
    for r in (best["llamita"], best["trl"]):
        print(f"| {r['impl']} | {r['tok_s']:.1f} | {r['s_per_step']:.2f} | {r['peak_rss_gb']:.2f} | "
              f"{r['first_loss']:.4f} |")
    print(f"\nllamita / TRL speed: {best['llamita']['tok_s'] / best['trl']['tok_s']:.2f}x; "
          f"memory: {best['llamita']['peak_rss_gb'] / best['trl']['peak_rss_gb']:.2f}x")


if __name__ == "__main__":
    main()

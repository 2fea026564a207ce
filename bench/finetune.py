"""LoRA training speed and peak memory: llamita against transformers + peft, same model, data and batches.

    python bench/finetune.py --data ../shared/data/es_sft/squad_es.jsonl            # the default model
    python bench/finetune.py --data FILE --model DIR --steps 6 --batch-size 4 --seq-len 256 --threads 2

Both sides get the very same batches: the first Alpaca records that fit in ``--seq-len`` tokens,
rendered by llamita.data and padded to ``--seq-len``, loss on the responses only; float32 weights,
LoRA r=8 (alpha 16, dropout 0.05) on all
seven projections, AdamW. Each side runs in its own subprocess, so its peak resident memory
(ru_maxrss) is its own; the first step is a warm-up and is not timed. "real" tokens exclude padding.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(args) -> list[dict]:
    import torch

    from llamita.data import IGNORE, collate, encode_record, read_records
    from llamita.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    examples = []
    for where, r in read_records(args.data):  # records that fit, so every one has its response
        ex = encode_record(tok, r, where, "alpaca")
        if len(ex.ids) <= args.seq_len:
            examples.append(ex)
        if len(examples) == args.steps * args.batch_size:
            break
    out = []
    for i in range(0, len(examples), args.batch_size):
        b = collate(examples[i: i + args.batch_size])
        pad = args.seq_len - b["ids"].shape[1]  # pad every batch to the full length, as the reference setup does
        b["ids"] = torch.nn.functional.pad(b["ids"], (0, pad), value=0)
        b["labels"] = torch.nn.functional.pad(b["labels"], (0, pad), value=IGNORE)
        b["real"] = sum(len(e.ids) for e in examples[i: i + args.batch_size])
        out.append(b)
    return out


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = batches(args)
    if args.impl == "llamita":
        from llamita.train import TrainConfig, loss_sum, model_to_train, n_labels

        cfg = TrainConfig(lora_targets="all", lora_r=8, lora_alpha=16, lora_dropout=0.05)
        model, _ = model_to_train(args.model, cfg,
                               torch.device("cpu"))

        def loss_of(b):
            return loss_sum(model, b, torch.device("cpu"), None) / n_labels(b)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from llamita.formats import detect

        fmt, path = detect(args.model)
        kw = dict(gguf_file=path.name) if fmt == "gguf" else {}
        base = AutoModelForCausalLM.from_pretrained(path.parent if fmt == "gguf" else path, dtype=torch.float32, **kw)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
        model.train()

        def loss_of(b):
            return model(input_ids=b["ids"], labels=b["labels"]).loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5)
    times, losses = [], []
    for b in data:
        t = time.perf_counter()
        loss = loss_of(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    timed = slice(1, None)  # the first step warms up allocators and kernels
    seconds = sum(times[timed])
    print(json.dumps({
        "impl": args.impl, "steps_timed": len(times) - 1, "s_per_step": seconds / (len(times) - 1),
        "real_tok_s": sum(b["real"] for b in data[timed]) / seconds,
        "padded_tok_s": sum(b["ids"].numel() for b in data[timed]) / seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "first_loss": losses[0], "trainable": sum(p.numel() for p in params),
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default=None, help="default: the embedded smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs of each, alternating; the fastest is shown")
    p.add_argument("--impl", choices=["llamita", "transformers"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return worker(args)
    best: dict[str, dict] = {}
    for _ in range(args.repeats):  # alternate the two, keep each one's fastest run: a busy machine
        for impl in ("llamita", "transformers"):  # slows whichever runs at the wrong moment
            cmd = [sys.executable, __file__, "--impl", impl] + sys.argv[1:]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"{impl} failed:\n{result.stderr[-2000:]}")
            row = json.loads(result.stdout.strip().splitlines()[-1])
            if impl not in best or row["s_per_step"] < best[impl]["s_per_step"]:
                best[impl] = row
    rows = [best["llamita"], best["transformers"]]
    import torch
    import transformers

    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; batch {args.batch_size} x {args.seq_len} padded, "
          f"{args.steps - 1} timed steps, best of {args.repeats}")
    print(f"{'':14}{'real tok/s':>12}{'padded tok/s':>14}{'s/step':>9}{'peak RSS GB':>13}{'first loss':>12}")
    for r in rows:
        print(f"{r['impl']:14}{r['real_tok_s']:12.1f}{r['padded_tok_s']:14.1f}{r['s_per_step']:9.2f}"
              f"{r['peak_rss_gb']:13.2f}{r['first_loss']:12.4f}")
    print(f"llamita / transformers speed: {rows[0]['real_tok_s'] / rows[1]['real_tok_s']:.2f}x")


if __name__ == "__main__":
    main()

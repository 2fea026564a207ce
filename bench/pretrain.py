"""Pretraining speed: ``llamita pretrain`` against a plain transformers ``LlamaForCausalLM`` loop, same
model shape, token windows, batches, optimizer and schedule.

    python bench/pretrain.py --tokens runs/es_pretrain/tokens --tokenizer runs/es_pretrain/tokenizer \\
        --config llama2c-15m --seq-len 256 --batch-size 16 --steps 12

The transformers side is the loop people write (nanoGPT's, with transformers' model): the windows of
llamita's shards in llamita's data order, ``model(input_ids).logits``, cross entropy on the next
tokens, AdamW (0.9, 0.95, eps 1e-5, decay 0.1 on matrices), clipping at 1.0, the same warmup + cosine
learning rate. Both in float32 on the CPU (bfloat16 autocast on CUDA), each in its own subprocess
with ``--threads`` threads; the first ``--warm`` steps are not timed. Peak memory is the process's
VmHWM (resident high-water mark).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def high_water_gb() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024**2


def llamita_side(args) -> dict:
    import llamita

    with tempfile.TemporaryDirectory() as tmp:
        llamita.pretrain(args.config, args.tokens, args.tokenizer, tmp, steps=args.steps, seq_len=args.seq_len,
                         batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, val_split=0.0,
                         compile=args.compile, device=args.device, progress=False)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warm:]
    seconds = rows[-1]["elapsed_s"] - rows[args.warm - 1]["elapsed_s"] if args.warm else rows[-1]["elapsed_s"]
    return {"tok_s": sum(r["tokens"] for r in timed) / seconds, "loss": rows[-1]["loss"],
            "mfu": rows[-1].get("mfu"), "peak_gb": high_water_gb()}


def transformers_side(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamita.config import config_to_hf
    from llamita.data import order
    from llamita.pretraining import PretrainConfig, model_config
    from llamita.shards import Windows, collate_windows, open_shards
    from llamita.train import lr_at

    manifest, arrays = open_shards(args.tokens)
    c = model_config(args.config, manifest["vocab_size"])
    device = torch.device(args.device)
    torch.manual_seed(1337)
    model = LlamaForCausalLM(LlamaConfig(**config_to_hf(c))).to(device).train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-5)
    schedule = PretrainConfig(lr=args.lr, warmup=args.warmup)
    windows = Windows(arrays, args.seq_len)
    amp = torch.bfloat16 if device.type == "cuda" else None
    times, loss = [], None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule, args.steps)
        batch = collate_windows([windows[i] for i in order(len(windows), step * args.batch_size, args.batch_size,
                                                            1337)])
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=batch["ids"].to(device)).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].to(device).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = args.batch_size * args.seq_len
    return {"tok_s": tokens * (args.steps - args.warm) / sum(times[args.warm:]), "loss": float(loss),
            "peak_gb": high_water_gb()}


def run_side(side: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--side", side], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", required=True, help="a shard folder (llamita tokenizer encode's, or OUT/tokens)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--config", default="llama2c-15m")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warm", type=int, default=2, help="first steps not timed")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="llamita's side with --compile")
    p.add_argument("--side", choices=["llamita", "transformers"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(llamita_side(args) if args.side == "llamita" else transformers_side(args)))
        return
    argv = [a for a in sys.argv[1:]]
    ours, theirs = run_side("llamita", argv), run_side("transformers", argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from generate import cpu_model

    print(f"machine: {cpu_model()}, {args.threads} threads; {datetime.date.today()}")
    print(f"command: python bench/pretrain.py {' '.join(argv)}")
    print("| side | tokens/s | loss at step {0} | peak memory (GB) |".format(args.steps))
    print("|---|---|---|---|")
    mfu = f" (MFU {ours['mfu']:.1%})" if ours.get("mfu") else ""
    print(f"| llamita{' --compile' if args.compile else ''} | {ours['tok_s']:.0f}{mfu} | {ours['loss']:.3f} | "
          f"{ours['peak_gb']:.2f} |")
    print(f"| transformers LlamaForCausalLM loop | {theirs['tok_s']:.0f} | {theirs['loss']:.3f} | "
          f"{theirs['peak_gb']:.2f} |")
    print(f"speed-up: {ours['tok_s'] / theirs['tok_s']:.2f}x")


if __name__ == "__main__":
    main()

"""A small Spanish Llama trained from scratch on this CPU: a tokenizer, the pretraining run, held-out
perplexity, samples, and beside it the same shape and data in a plain transformers loop (tokens/s).

    python scripts/spanish_pretrain_demo.py --data ../shared/data/es_text --out runs/es_pretrain --minutes 30

The corpus: Don Quijote (Project Gutenberg's header and footer cut) and the seven CLiGS novels, each
a document. Held out: Don Quijote's last five chapters (LXX-LXXIV of part II), which neither the
tokenizer nor the model sees; perplexity is measured on them with ``llamita eval perplexity``.
Writes OUT/report.md (the numbers for docs/pretraining.md) and OUT/run/loss.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import llamita
from llamita.shards import tokenize_corpus

HELD_OUT_FROM = "Capítulo LXX. Que sigue al de sesenta y nueve"
PROMPTS = ["En un lugar de la Mancha", "El caballero respondió", "—¿Qué dices, Sancho? —dijo don Quijote—",
           "Aquella noche, en Madrid,"]


def corpus(data: Path, out: Path) -> tuple[Path, Path]:
    """OUT/corpus (the training documents) and OUT/heldout.txt (Don Quijote's last five chapters)."""
    folder, held = out / "corpus", out / "heldout.txt"
    folder.mkdir(parents=True, exist_ok=True)
    quijote = (data / "pg2000.txt").read_text(encoding="utf-8-sig")
    body = quijote.split("*** START OF THE PROJECT GUTENBERG EBOOK DON QUIJOTE ***")[1]
    body = body.split("*** END OF THE PROJECT GUTENBERG EBOOK DON QUIJOTE ***")[0].replace("\r\n", "\n")
    cut = body.index(HELD_OUT_FROM)
    (folder / "quijote.txt").write_text(body[:cut].strip() + "\n", encoding="utf-8")
    held.write_text(body[cut:].strip() + "\n", encoding="utf-8")
    for novel in sorted((data / "cligs_novela_espanola").glob("*.txt")):
        (folder / novel.name).write_text(novel.read_text(encoding="utf-8").replace("\r\n", "\n"), encoding="utf-8")
    return folder, held


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/es_text"))
    p.add_argument("--out", type=Path, default=Path("runs/es_pretrain"))
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--config", default="llama2c-15m")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=30, help="training time budget: steps are sized to it")
    p.add_argument("--steps", type=int, default=None, help="instead of --minutes")
    p.add_argument("--bench-steps", type=int, default=8, help="steps of each side in the transformers comparison")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    out: Path = args.out
    report: list[str] = [f"# Spanish pretraining demo ({datetime.date.today()})", ""]

    folder, held = corpus(args.data, out)
    t0 = time.time()
    tok = llamita.train_tokenizer(sorted(folder.glob("*.txt")), out / "tokenizer", args.vocab_size)
    tokens = tokenize_corpus([folder], tok, out / "tokens")
    manifest = json.loads((tokens / "manifest.json").read_text())
    chars = sum(len(f.read_text(encoding="utf-8")) for f in folder.glob("*.txt"))
    report += [f"Tokenizer: SentencePiece BPE, {args.vocab_size} pieces, Llama 2's trainer settings, trained in "
               f"{time.time() - t0:.0f} s (with tokenizing). Corpus: {manifest['documents']} documents, {chars:,} "
               f"characters, {manifest['tokens']:,} tokens ({chars / manifest['tokens']:.2f} characters a token).", ""]
    sp = llamita.load_tokenizer(tok)
    line = "—¿Qué dices, Sancho? —dijo don Quijote—. En 1605 salió la primera parte."
    report += ["Pieces of a sentence: `" + " | ".join(sp.id_to_token(i) for i in sp.encode(line)) + "`", ""]

    steps = args.steps
    if steps is None:  # time a few steps, then size the run to the budget
        probe = out / "probe"
        llamita.pretrain(args.config, [tokens], tok, probe, steps=6, seq_len=args.seq_len, batch_size=args.batch_size,
                         lr=args.lr, val_split=0.0, compile=args.compile, progress=False, overwrite=True)
        rows = [json.loads(r) for r in (probe / "metrics.jsonl").read_text().splitlines()]
        per_step = (rows[-1]["elapsed_s"] - rows[1]["elapsed_s"]) / (len(rows) - 2)
        steps = max(10, int(args.minutes * 60 / (per_step * 1.05)))  # 5% for validation passes
    run = out / "run"
    t0 = time.time()
    model = llamita.pretrain(args.config, [tokens], tok, run, steps=steps, seq_len=args.seq_len,
                             batch_size=args.batch_size, lr=args.lr, val_split=0.02,
                             eval_every=max(1, steps // 12), save_every=max(1, steps // 6), compile=args.compile,
                             overwrite=True)
    minutes = (time.time() - t0) / 60
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    seen = sum(r["tokens"] for r in rows)
    report += [f"Run: `{args.config}` ({sum(p.numel() for p in llamita.load_model(model).parameters()) / 1e6:.1f}M "
               f"parameters), {steps} steps of {args.batch_size} x {args.seq_len} tokens, {seen:,} tokens "
               f"({seen / manifest['tokens']:.2f} epochs), peak lr {args.lr}, {minutes:.1f} minutes; "
               f"{rows[-1]['tok_s']:.0f} tokens/s, MFU {rows[-1].get('mfu', 0):.1%} (against this CPU's measured "
               "float32 matmul rate).", "",
               "| step | train loss | validation loss |", "|---|---|---|"]
    by_step = {r["step"]: r["loss"] for r in rows}
    report += [f"| {s} | {by_step[s]:.3f} | {v:.3f} |" for s, v in evals] + [""]

    ppl = subprocess.run([sys.executable, "-m", "llamita", "eval", "perplexity", str(held), "--model", str(model),
                          "--mode", "stride", "--ctx", str(args.seq_len), "--stride", str(args.seq_len // 2),
                          "--json", str(out / "heldout_ppl.json")], capture_output=True, text=True)
    if ppl.returncode:
        raise SystemExit(ppl.stderr)
    scores = json.loads((out / "heldout_ppl.json").read_text())
    report += ["Held-out perplexity (Don Quijote II, chapters LXX-LXXIV, never seen), `llamita eval perplexity "
               f"--mode stride --ctx {args.seq_len}`:", "", "```", json.dumps(scores, indent=1)[:1200], "```", ""]

    llm = llamita.LLM.load(model)
    report += ["Samples (temperature 0.8, top-p 0.95, seed 1, 60 new tokens):", ""]
    for prompt in PROMPTS:
        text = llm.generate(prompt, max_new_tokens=60, temperature=0.8, top_p=0.95, seed=1)
        report += [f"> **{prompt}**{text}".replace("\n", " "), ""]

    bench = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "pretrain.py"), "--tokens",
                            str(tokens), "--tokenizer", str(tok), "--config", args.config, "--seq-len",
                            str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", str(args.bench_steps),
                            *(["--compile"] if args.compile else [])], capture_output=True, text=True)
    report += ["Training speed beside a plain transformers loop (bench/pretrain.py, same shape, data, batches):", "",
               bench.stdout.strip() or bench.stderr[-2000:], ""]
    (out / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    print("\n".join(report))
    print(f"perplexity {math.exp(evals[-1][1]):.1f} (validation windows)", file=sys.stderr)


if __name__ == "__main__":
    main()

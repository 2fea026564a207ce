"""Does a LoRA run on Spanish instruction data make the default model better at Spanish?

    python scripts/spanish_lora_demo.py --data ../shared/data/es_sft/squad_es.jsonl --out runs/es_demo \
        --text ../shared/data/bench/es_ud_gsd_dev.txt --prompts ../shared/data/es_eval/vicuna80_es.jsonl

Holds out whole paragraphs of the SQuAD-es records, trains a LoRA adapter on the rest in the model's
own chat format (or takes ``--adapter`` from an earlier run), then scores the model before and after
with ``llamita eval``:
- ``qa``: exact match and token F1 of greedy answers to the held-out questions (SQuAD's scoring with
  Spanish articles, ``--lang es``);
- ``perplexity`` of held-out Spanish text (``--text``; llama.cpp's convention, 512-token chunks);
- ``lang``: the share of replies to open Spanish prompts (``--prompts``) that py3langid labels
  Spanish, and the share stuck in a loop.
It takes tens of minutes on 2 cores: run by hand, not a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import llamita
from llamita.data import read_records
from llamita.eval import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="squad_es.jsonl (instruction, input, output)")
    p.add_argument("--out", default="runs/es_demo")
    p.add_argument("--model", default=None, help="default: the embedded smollm2-135m-instruct")
    p.add_argument("--adapter", default=None, help="an adapter trained earlier: skip training")
    p.add_argument("--text", required=True, help="held-out Spanish text for perplexity")
    p.add_argument("--prompts", required=True, help="Spanish prompts for language adherence")
    p.add_argument("--train-records", type=int, default=2000)
    p.add_argument("--eval-records", type=int, default=100)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--max-chars", type=int, default=900, help="longest instruction + paragraph kept")
    p.add_argument("--ppl-chunks", type=int, default=40, help="512-token chunks of --text scored")
    p.add_argument("--prompt-tokens", type=int, default=128, help="tokens generated per --prompts reply")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Held out by paragraph, so no evaluation question's context was seen in training.
    # Short paragraphs only: a record cut at --max-length would lose its answer, which comes last.
    records = [r for _, r in read_records(args.data)
               if len(r["instruction"]) + len(r.get("input", "")) < args.max_chars]
    paragraphs = list(dict.fromkeys(r.get("input", "") for r in records))
    held = set(paragraphs[-max(1, len(paragraphs) // 10):])
    evals = [r for r in records if r.get("input", "") in held][: args.eval_records]
    train = [r for r in records if r.get("input", "") not in held][: args.train_records]
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", evals)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    adapter = args.adapter or llamita.finetune(
        args.model, out / "train.jsonl", out, template="auto", steps=args.steps, lora_targets="all", lr=2e-4,
        batch_size=4, max_length=args.max_length, warmup=20, val_split=0.02, eval_every=max(1, args.steps // 5),
        overwrite=True)  # a rerun replaces the last run's adapter and metrics
    results = {}
    for name, llm in (("before", lambda: llamita.LLM.load(args.model, quantize="none")),
                      ("after", lambda: llamita.LLM.load(args.model, adapter=adapter, quantize="none"))):
        model = llm()
        results[name] = {
            "qa": evaluate("qa", out / "heldout.jsonl", model, lang="es", batch_size=16).as_json(),
            "perplexity": evaluate("perplexity", args.text, model, limit=args.ppl_chunks).as_json(),
            "lang": evaluate("lang", args.prompts, model, lang="es", batch_size=16,
                             max_new_tokens=args.prompt_tokens).as_json(),
        }
    results.update(adapter=str(adapter), eval_records=len(evals), train_records=len(train), steps=args.steps)
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    print(f"held-out questions: {len(evals)}; trained on {len(train)} records for {args.steps} steps\n")
    print("| | QA exact match | QA F1 | perplexity (es text) | replies in Spanish | replies looping |")
    print("|---|---|---|---|---|---|")
    for name in ("before", "after"):
        r = results[name]
        print(f"| {name} | {r['qa']['exact_match']:.1f} | {r['qa']['f1']:.1f} | {r['perplexity']['perplexity']:.2f} | "
              f"{r['lang']['lang_share']:.1%} | {r['lang']['loop_rate']:.1%} |")
    print(f"\nloss plot: {out / 'loss.png'}; every number and example: {out / 'results.json'}")


if __name__ == "__main__":
    main()

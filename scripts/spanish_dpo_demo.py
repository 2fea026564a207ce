"""SFT then DPO: does a preference for Spanish answers keep the default model in Spanish and out of loops?

    python scripts/spanish_dpo_demo.py --data ../shared/data/es_sft/health_en_es.jsonl \
        --prompts ../shared/data/es_eval/vicuna80_es.jsonl --out runs/es_dpo
    python scripts/spanish_dpo_demo.py ... --rejected own     # the SFT model's own looping replies as rejected

The two steps Llama-2-Chat was made with, on consumer-health questions (each with a Spanish and an
English answer), holding out the last ``--heldout`` questions:
1. SFT: a LoRA adapter on the Spanish answers to the Spanish questions (chat template), folded into
   the base (``llamita merge``): the SFT model.
2. DPO on the SFT model (its reference: the same network with the new adapter switched off): the
   Spanish question as prompt, the Spanish answer chosen, and rejected the English answer
   (``--rejected english``), or the SFT model's own reply to the question where that reply loops
   or is not Spanish, the English answer elsewhere (``--rejected own``).
Before SFT, after SFT and after DPO it reports the share of greedy replies (``--max-new-tokens``, 64)
in Spanish and the share that loop (``llamita eval lang``) on the held-out questions and on
``--prompts`` (out of domain), the loss of the held-out Spanish answers, the reward accuracy on
held-out pairs (DPO's eval), and three example replies; ``results.json``, ``stages.png`` and each
run's ``loss.png`` go to ``--out``. A full run takes hours on 2 cores: run by hand, not a test.
``results.json`` is written after each stage, and a rerun with the same settings starts after the
last stage it holds (with other DPO settings only, at DPO).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import llamita
from llamita.data import read_records

STAGES = ("before SFT", "after SFT", "after DPO")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def heldout_loss(source: str | Path, adapter: Path | None, data: Path, max_length: int) -> float:
    """Nats per answer token of the held-out Spanish answers, as the training loop scores eval data."""
    from llamita.data import collate, load_dataset
    from llamita.peft import load_adapter
    from llamita.train import loss_sum, n_labels

    model = llamita.load_model(source, dtype=torch.float32)
    if adapter is not None:
        load_adapter(model, adapter, merge=True)
    examples = load_dataset(data, llamita.load_tokenizer(source), template="auto", max_length=max_length).examples
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = collate(examples[i: i + 8])
            total += loss_sum(model, batch, torch.device("cpu"), None).item()
            count += n_labels(batch)
    return total / count


def own_rejections(llm, rows: list[dict], max_new_tokens: int) -> list[str | None]:
    """The model's own greedy reply to each question where it loops or is not Spanish, else None."""
    from llamita.eval.lang import detect_language, loop_coverage, loops

    replies = llm.chat_batch([ask(r["instruction_es"]) for r in rows], max_new_tokens=max_new_tokens, temperature=0)
    return [t if t.strip() and (loops(loop_coverage(t)) or detect_language(t) != "es") else None for t in replies]


def score(llm_of, files: dict[str, Path], args, examples: list[str]) -> dict:
    """The language share and loop rate on each prompt file, and replies to the example questions."""
    from llamita.eval import evaluate

    llm = llm_of()
    out = {name: evaluate("lang", file, llm, lang="es", batch_size=16, max_new_tokens=args.max_new_tokens,
                          limit=args.limit).metrics for name, file in files.items()}
    out["examples"] = [{"question": q, "reply": r} for q, r in zip(examples, llm.chat_batch(
        [ask(q) for q in examples], max_new_tokens=args.max_new_tokens, temperature=0))]
    return out


DPO_ONLY = ("rejected", "dpo_steps", "beta", "dpo_lr")  # settings the stages before DPO do not depend on


def finished_stages(out: Path, settings: dict) -> dict:
    """The stages an earlier run finished (see ``save``): all of them with the same settings, those
    before DPO where only DPO's settings differ, else none."""
    file = out / "results.json"
    if not file.exists():
        return {}
    results = json.loads(file.read_text(encoding="utf-8"))
    before = {k: v for k, v in results.get("settings", {}).items() if k not in DPO_ONLY}
    if results.get("settings") == settings:
        return results
    if before == {k: v for k, v in settings.items() if k not in DPO_ONLY}:
        return {k: v for k, v in results.items() if k in ("before SFT", "after SFT")} | {"settings": settings}
    return {}


def save(out: Path, results: dict) -> None:
    from llamita.files import atomic_write

    text = json.dumps(results, ensure_ascii=False, indent=2) + "\n"
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "lang_share", "replies in Spanish"), (axes[1], "loop_rate", "replies looping")):
        for k, name in enumerate(("heldout", "vicuna80_es")):
            values = [results[s][name][metric] for s in STAGES]
            ax.bar([i + 0.4 * k for i in range(len(STAGES))], values, width=0.4, label=name)
        ax.set_xticks([i + 0.2 for i in range(len(STAGES))], STAGES)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="health_en_es.jsonl: instruction_es, output_es, output_en")
    p.add_argument("--prompts", required=True, help="Spanish prompts out of domain (vicuna80_es.jsonl)")
    p.add_argument("--out", default="runs/es_dpo")
    p.add_argument("--model", default=None, help="default: the embedded smollm2-135m-instruct")
    p.add_argument("--heldout", type=int, default=100, help="questions held out (the file's last ones)")
    p.add_argument("--rejected", choices=("english", "own"), default="english")
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--dpo-steps", type=int, default=200)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--dpo-lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="prompts scored per file (default: all)")
    p.add_argument("--train-limit", type=int, default=None, help="training questions used (default: all)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from llamita.assets import DEFAULT_MODEL_NAME
    from llamita.formats.export import merge

    rows = [r for _, r in read_records(args.data)  # a few answers are blank in the source
            if r["output_es"].strip() and r["output_en"].strip() and r["output_es"] != r["output_en"]]
    train, held = rows[: -args.heldout][: args.train_limit], rows[-args.heldout:]
    sft = write_jsonl(out / "sft.jsonl",
                      [{"instruction": r["instruction_es"], "output": r["output_es"]} for r in train])
    held_sft = write_jsonl(out / "heldout_sft.jsonl",
                           [{"instruction": r["instruction_es"], "output": r["output_es"]} for r in held])
    held_pairs = write_jsonl(out / "heldout_pairs.jsonl", [
        {"prompt": r["instruction_es"], "chosen": r["output_es"], "rejected": r["output_en"]} for r in held])
    files = {"heldout": held_sft, "vicuna80_es": Path(args.prompts)}
    examples = [r["instruction_es"] for r in held[:3]]
    source = args.model or DEFAULT_MODEL_NAME
    settings = {**vars(args), "train_questions": len(train), "heldout_questions": len(held)}
    results = finished_stages(out, settings) or {"settings": settings}
    merged = out / "sft_model"

    if "before SFT" not in results:
        results["before SFT"] = score(lambda: llamita.LLM.load(args.model, quantize="none"), files, args, examples)
        results["before SFT"]["heldout_loss"] = heldout_loss(source, None, held_sft, args.max_length)
        save(out, results)

    if "after SFT" not in results:
        sft_adapter = llamita.finetune(args.model, sft, out / "sft", template="auto", steps=args.sft_steps,
                                       lora_targets="all", lr=2e-4, batch_size=4, max_length=args.max_length,
                                       warmup=min(20, args.sft_steps // 10), eval_data=str(held_sft),
                                       eval_every=max(1, args.sft_steps // 5), overwrite=True)
        merge(source, sft_adapter, merged)
        results["after SFT"] = score(lambda: llamita.LLM.load(merged, quantize="none", template="auto"), files,
                                     args, examples)
        results["after SFT"]["heldout_loss"] = heldout_loss(merged, None, held_sft, args.max_length)
        save(out, results)

    if "after DPO" not in results:
        own = own_rejections(llamita.LLM.load(merged, quantize="none", template="auto"), train,
                             args.max_new_tokens) if args.rejected == "own" else [None] * len(train)
        pairs = write_jsonl(out / "pairs.jsonl", [
            {"prompt": r["instruction_es"], "chosen": r["output_es"], "rejected": mine or r["output_en"]}
            for r, mine in zip(train, own)])
        dpo_adapter = llamita.finetune(merged, pairs, out / "dpo", objective="dpo", beta=args.beta,
                                       template="auto", steps=args.dpo_steps, lora_targets="all", lr=args.dpo_lr,
                                       batch_size=2, grad_accum=2, max_length=args.max_length,
                                       warmup=min(10, args.dpo_steps // 10), eval_data=str(held_pairs),
                                       eval_every=max(1, args.dpo_steps // 2), overwrite=True)
        results["after DPO"] = score(lambda: llamita.LLM.load(merged, adapter=dpo_adapter, quantize="none"), files,
                                     args, examples)
        results["after DPO"]["heldout_loss"] = heldout_loss(merged, dpo_adapter, held_sft, args.max_length)
        dpo_rows = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
        results["after DPO"]["reward_accuracy"] = [r for r in dpo_rows if "eval_rewards/accuracies" in r][-1][
            "eval_rewards/accuracies"]
        results["after DPO"]["own_rejected"] = sum(x is not None for x in own)
        save(out, results)
    plot(results, out)

    print("| | Spanish (held-out) | looping (held-out) | Spanish (vicuna80_es) | looping (vicuna80_es) | "
          "held-out loss | reward accuracy |\n|---|---|---|---|---|---|---|")
    for stage in STAGES:
        r = results[stage]
        accuracy = f"{r['reward_accuracy']:.1%}" if "reward_accuracy" in r else ""
        print(f"| {stage} | {r['heldout']['lang_share']:.1%} | {r['heldout']['loop_rate']:.1%} | "
              f"{r['vicuna80_es']['lang_share']:.1%} | {r['vicuna80_es']['loop_rate']:.1%} | "
              f"{r['heldout_loss']:.4f} | {accuracy} |")
    for stage in STAGES:
        print(f"\n{stage}:")
        for e in results[stage]["examples"]:
            print(f"- {e['question']}\n  -> {e['reply'][:300]!r}")
    print(f"\nplots: {out / 'stages.png'}, {out / 'sft' / 'loss.png'}, {out / 'dpo' / 'loss.png'}; "
          f"every number: {out / 'results.json'}")


if __name__ == "__main__":
    from llamita.errors import LlamitaError

    try:
        main()
    except LlamitaError as e:  # bad input (a missing file, a bad record): one line, as the CLI says it
        raise SystemExit(f"spanish_dpo_demo: error: {e}") from None

"""Evaluation speed and scores: ``llamita eval choice`` against lm-evaluation-harness's HF backend
(transformers) on the same model, the same records and lm-eval's own task definitions, in one run.

    python bench/eval.py                                   # ../shared/data/bench, the default model
    python bench/eval.py --limit 200 --tasks arc_easy,piqa --batch-size 16
    python bench/eval.py --data DIR --only llamita-fp32,lm-eval
    python bench/eval.py --tasks none --perplexity ../shared/data/bench/wikitext2_test.raw --windows 8

Rows: llamita with float32 weights (``--quantize none``: equal numbers to transformers' float32),
llamita with the GGUF as stored (``--quantize auto``: the default), and lm-eval's HF backend
with transformers' float32 load of the same GGUF. Each task runs once per row, the rows in turn;
the table gives accuracy, seconds and tokens/s (tokens: what lm-eval feeds, context plus
continuation per choice, so both rows divide the same count) and the largest difference of any
choice's log-likelihood from lm-eval's, over the questions that transformers' tokenizer tokenizes
as llamita does (the count of the others is given). ``--perplexity FILE``: ``llamita eval perplexity --mode
gptq`` against GPTQ's evaluation loop run with transformers on the same windows (lm-eval's own
perplexity tasks use a fourth convention, rolling windows per document).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import cpu_ticks, machine, others_load  # noqa: E402  (the sibling bench's helpers)

# task -> (file under --data, llamita --format, lm-eval task YAML to include, extra YAML)
TASKS = {
    "arc_easy": ("arc_easy_test.jsonl", "arc", "arc/arc_easy.yaml"),
    "hellaswag": ("hellaswag_validation.jsonl", "hellaswag", "hellaswag/hellaswag.yaml"),
    "piqa": ("piqa_validation.jsonl", "piqa", "piqa/piqa.yaml"),
    "mmlu": ("mmlu_val.jsonl", "mmlu", None),  # every subject: one YAML of lm-eval's MMLU prompt
    "xnli_es": ("xnli_es_dev.jsonl", "xnli", "xnli/xnli_es.yaml"),
    "exams_es": ("exams_es_test.jsonl", "arc", "arc/arc_easy.yaml"),  # ARC-style Spanish questions
}
ROWS = ["llamita-fp32", "llamita-auto", "lm-eval"]
MMLU_TASK = """output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
fewshot_config:
  sampler: first_n
doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n\\
  D. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
"""


def subset(src: Path, out: Path, limit: int, fmt: str) -> Path:
    """The first ``limit`` records, in the shape lm-eval's task reads."""
    lines = [line for line in src.read_text(encoding="utf-8").split("\n") if line.strip()][:limit]
    records = [json.loads(x) for x in lines]
    if fmt == "arc":  # the HF dataset's shape, which lm-eval's YAML reads
        records = [{"question": r["question"], "answerKey": "ABCDE"[r["answer"]],
                    "choices": {"text": r["choices"], "label": list("ABCDE"[: len(r["choices"])])}} for r in records]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def task_yamls(directory: Path, task: str, data: Path, dev: Path | None) -> list[str]:
    """lm-eval tasks over ``data``: the benchmark's own YAML; for MMLU one task per subject (as
    lm-eval has), each with its subject's dev records for few-shot examples."""
    _, fmt, include = TASKS[task]
    import lm_eval

    if fmt != "mmlu":
        head = f"include: {Path(lm_eval.__file__).parent / 'tasks' / include}\n"
        if fmt == "hellaswag":  # the shared records hold lm-eval's processed query, not ctx_a / ctx_b
            head += "process_docs: null\ndoc_to_text: '{{query}}'\ndoc_to_choice: '{{endings}}'\n"
        return [_write_task(directory, f"b_{task}", head, data, None)]
    records = [json.loads(x) for x in data.read_text(encoding="utf-8").splitlines()]
    names = []
    for subject in dict.fromkeys(r["subject"] for r in records):
        test = directory / f"mmlu_{subject}.jsonl"
        test.write_text("".join(json.dumps(r) + "\n" for r in records if r["subject"] == subject))
        shots = directory / f"mmlu_{subject}_dev.jsonl"
        shots.write_text("".join(x + "\n" for x in dev.read_text(encoding="utf-8").splitlines()
                                 if json.loads(x)["subject"] == subject))
        head = MMLU_TASK.replace("{subject}", subject.replace("_", " "))
        names.append(_write_task(directory, f"b_mmlu_{subject}", head, test, shots))
    return names


def _write_task(directory: Path, name: str, head: str, test: Path, dev: Path | None) -> str:
    files = f"test: {test}" + (f", dev: {dev}" if dev else "")
    (directory / f"{name}.yaml").write_text(
        f"{head}task: {name}\ntag: null\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files: {{{files}}}\n"
        f"training_split: null\nvalidation_split: null\ntest_split: test\nfewshot_split: {'dev' if dev else 'null'}\n")
    return name


def run_llamita(llm, data: Path, fmt: str, batch_size: int, shots: int,
                dev: Path | None) -> tuple[dict, list[list[float]], float]:
    from llamita.eval import evaluate

    start = time.perf_counter()
    result = evaluate("choice", data, llm, format=fmt, batch_size=batch_size, shots=shots,
                      fewshot_file=str(dev) if dev else None)
    return result.metrics, [q["loglikelihoods"] for q in result.details["questions"]], time.perf_counter() - start


def run_lm_eval(lm, manager, tasks: list[str], shots: int) -> tuple[dict, list[list[float]], float]:
    """Scores of every doc (the tasks in order) and acc / acc_norm over all of them."""
    import lm_eval

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, verbosity="ERROR",
                                  num_fewshot=shots)
    seconds = time.perf_counter() - start
    samples = [s for t in tasks for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])]
    metrics = {m: sum(s[m] for s in samples) / len(samples) for m in ("acc", "acc_norm") if m in samples[0]}
    return metrics, [[ll for ll, _ in s["filtered_resps"]] for s in samples], seconds


def fed_tokens(llm, data: Path, fmt: str, shots: int, dev: Path | None) -> int:
    """What lm-eval feeds: context plus continuation, per choice (the same few-shot prompts)."""
    import random

    from llamita.eval.choice import encode_pair, fewshot_prefix, read_questions

    questions = read_questions(data, fmt)
    pool = read_questions(dev, fmt) if dev else questions
    rnd = random.Random(1234)
    return sum(len(c) + len(x) for q in questions for c, x in
               (encode_pair(llm.tokenizer, *p) for p in q.pairs(fewshot_prefix(q, pool, shots, rnd, dev is None))))


def perplexity_rows(llm, model, file: Path, ctx: int, windows: int) -> list[dict]:
    """GPTQ's convention by llamita and by a transformers loop (GPTQ's code: one window at a time)."""
    import math

    from llamita.eval import evaluate
    from llamita.eval.perplexity import read_text

    start = time.perf_counter()
    ours = evaluate("perplexity", file, llm, mode="gptq", ctx=ctx, limit=windows)
    seconds = time.perf_counter() - start
    rows = [{"engine": "llamita-fp32", "perplexity": ours.metrics["perplexity"], "seconds": seconds}]
    ids = llm.tokenizer.encode(read_text([file]), bos=llm.tokenizer.add_bos, special=True)  # as GPTQ's code reads it
    start, nlls = time.perf_counter(), []
    with torch.no_grad():
        for i in range(windows):
            window = torch.tensor([ids[i * ctx:(i + 1) * ctx]])
            nlls.append(float(model(window, labels=window).loss))
    rows.append({"engine": "transformers (GPTQ's loop)", "perplexity": math.exp(sum(nlls) / len(nlls)),
                 "seconds": time.perf_counter() - start})
    for r in rows:
        r["tokens_per_second"] = round(windows * ctx / r["seconds"])
    return rows


def tokenized_alike(llm, hf_tokenizer, data: Path, fmt: str, shots: int, dev: Path | None) -> list[bool]:
    """Per question, whether transformers' tokenizer gives each prompt + choice the tokens llamita's
    does (transformers' GGUF tokenizer splits some whitespace runs before digits otherwise)."""
    import random

    from llamita.eval.choice import fewshot_prefix, read_questions

    questions = read_questions(data, fmt)
    pool = read_questions(dev, fmt) if dev else questions
    rnd = random.Random(1234)
    return [all(llm.tokenizer.encode(c + x, special=True) == hf_tokenizer(c + x)["input_ids"]
                for c, x in q.pairs(fewshot_prefix(q, pool, shots, rnd, dev is None))) for q in questions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).parents[2] / "shared" / "data" / "bench"))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples (MMLU: from mmlu_dev.jsonl)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=",".join(ROWS))
    parser.add_argument("--json", help="write the table's numbers here too")
    parser.add_argument("--perplexity", help="a text file: perplexity (GPTQ's convention) against transformers")
    parser.add_argument("--ctx", type=int, default=2048, help="--perplexity's window")
    parser.add_argument("--windows", type=int, default=8, help="--perplexity's windows scored")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = args.only.split(",")

    import tempfile

    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llamita import assets
    from llamita.llm import LLM

    gguf = assets.default_model_path()
    engines = {}
    if "llamita-fp32" in rows:
        engines["llamita-fp32"] = LLM.load(gguf, quantize="none")
    if "llamita-auto" in rows:
        engines["llamita-auto"] = LLM.load(gguf, quantize="auto")
    directory = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    if "lm-eval" in rows:
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                  dtype=torch.float32).eval()
        engines["lm-eval"] = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    any_llm = next(e for name, e in engines.items() if name != "lm-eval")
    table, ticks, wall = [], cpu_ticks(), time.perf_counter()
    for task in [t for t in args.tasks.split(",") if t != "none"]:
        file, fmt, _ = TASKS[task]
        data = subset(Path(args.data) / file, directory / f"{task}.jsonl", args.limit, fmt)
        if fmt == "mmlu":  # lm-eval's order: subject by subject
            records = [json.loads(x) for x in data.read_text(encoding="utf-8").splitlines()]
            order = {s: i for i, s in enumerate(dict.fromkeys(r["subject"] for r in records))}
            data.write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: order[r["subject"]])))
        dev = Path(args.data) / "mmlu_dev.jsonl" if fmt == "mmlu" and args.shots else None
        names = task_yamls(directory, task, data, dev or Path(args.data) / "mmlu_dev.jsonl")
        tokens = fed_tokens(any_llm, data, fmt, args.shots, dev)
        results = {}
        for row, engine in engines.items():
            print(f"{task}: {row} ...", file=sys.stderr, flush=True)
            results[row] = (run_lm_eval(engine, TaskManager(include_path=str(directory)), names, args.shots)
                            if row == "lm-eval" else run_llamita(engine, data, fmt, args.batch_size, args.shots, dev))
        reference = results.get("lm-eval")
        alike = tokenized_alike(any_llm, tok, data, fmt, args.shots, dev) if reference else []
        for row, (metrics, lls, seconds) in results.items():
            diff = (max(abs(a - b) for x, y, same in zip(lls, reference[1], alike) if same for a, b in zip(x, y))
                    if reference and row != "lm-eval" else None)
            table.append({"task": task, "row": row, "n": len(lls), "acc": metrics["acc"],
                          "acc_norm": metrics.get("acc_norm"), "seconds": round(seconds, 1),
                          "tokens_per_second": round(tokens / seconds), "max_ll_diff": diff,
                          "tokenized_differently": alike.count(False) if diff is not None else None})
    ppl = (perplexity_rows(engines["llamita-fp32"], model, Path(args.perplexity), args.ctx, args.windows)
           if args.perplexity else [])
    busy = others_load(ticks, time.perf_counter() - wall)
    print(f"\n{machine()}; {datetime.date.today()}; others' CPU share during the runs: {busy:.0%}")
    print(f"`python bench/eval.py --limit {args.limit} --batch-size {args.batch_size} --shots {args.shots} "
          f"--tasks {args.tasks}`\n")
    print("| task | engine | n | acc | acc_norm | seconds | tokens/s | max \\|Δ log-likelihood\\| vs lm-eval "
          "(questions tokenized differently, left out) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        norm = "" if r["acc_norm"] is None else f"{r['acc_norm']:.4f}"
        diff = "" if r["max_ll_diff"] is None else f"{r['max_ll_diff']:.1e} ({r['tokenized_differently']})"
        print(f"| {r['task']} | {r['row']} | {r['n']} | {r['acc']:.4f} | {norm} | {r['seconds']} | "
              f"{r['tokens_per_second']} | {diff} |")
    if ppl:
        print(f"\n`--perplexity {args.perplexity} --ctx {args.ctx} --windows {args.windows}` (GPTQ's convention)\n")
        print("| engine | perplexity | seconds | tokens/s |\n|---|---|---|---|")
        for r in ppl:
            print(f"| {r['engine']} | {r['perplexity']:.4f} | {r['seconds']:.1f} | {r['tokens_per_second']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"choice": table, "perplexity": ppl}, indent=2))


if __name__ == "__main__":
    main()

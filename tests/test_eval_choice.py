"""Multiple choice: llamita's scores against lm-evaluation-harness itself (its HF backend, its own
task definitions pointed at fixture records in each benchmark's official shape)."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from llamita import LlamitaError, cli
from llamita.eval import evaluate

TASKS = Path(lm_eval.__file__).parent / "tasks"

# A few records per benchmark, in the shape its official release (the HF dataset lm-eval reads) has;
# multi-token choices, a context with a trailing space, WikiHow's bracket artifacts.
RECORDS = {
    "arc": [
        {"id": "1", "question": "What do plants need to grow?", "answerKey": "A",
         "choices": {"text": ["sunlight and water", "darkness and ice"], "label": ["A", "B"]}},
        {"id": "2", "question": "Which animal lays eggs?", "answerKey": "3",
         "choices": {"text": ["a dog", "a cat", "a chicken", "a horse"], "label": ["1", "2", "3", "4"]}},
        {"id": "3", "question": "What melts when it is warm?", "answerKey": "B",
         "choices": {"text": ["stone", "ice cream", "iron nails"], "label": ["A", "B", "C"]}},
    ],
    "hellaswag": [
        {"ind": 1, "activity_label": "Making tea", "ctx_a": "A woman fills a kettle with water.",
         "ctx_b": "she", "endings": ["puts it on the stove.", "throws it [title] out of the window.",
                                     "eats the kettle.", "paints the [step] wall."], "label": "0"},
        {"ind": 2, "activity_label": "Running", "ctx_a": "A man ties his shoes.", "ctx_b": "then he",
         "endings": ["starts running down the road.", "sleeps.", "sings to a fish.", "flies away."],
         "label": "0"},
    ],
    "piqa": [
        {"goal": "How do I open a jar?", "sol1": "Twist the lid counterclockwise.",
         "sol2": "Twist the lid with a feather.", "label": 0},
        {"goal": "Keep bread fresh", "sol1": "Leave it in the sun.", "sol2": "Store it in a bag.", "label": 1},
    ],
    "winogrande": [
        {"sentence": "The trophy did not fit in the suitcase because the _ was too big.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"},
        {"sentence": "Sarah gave Anna a gift because _ had a birthday.", "option1": "Sarah", "option2": "Anna",
         "answer": "2"},
    ],
    "mmlu": [
        {"question": "What is 2 + 3?", "subject": "abstract_algebra", "choices": ["4", "5", "6", "7"], "answer": 1},
        {"question": "The order of the group Z_4 is ", "subject": "abstract_algebra", "choices": ["2", "4", "8", "1"],
         "answer": 1},
        {"question": "Is Z_2 a field?", "subject": "abstract_algebra", "choices": ["Yes", "No", "Maybe", "Never"],
         "answer": 0},
    ],
    "xnli": [
        {"premise": "El gato duerme en el sofá.", "hypothesis": "Un animal está descansando.", "label": 0},
        {"premise": "Llovió toda la mañana.", "hypothesis": "El suelo está seco.", "label": 2},
    ],
    "generic": [
        {"context": "The capital of France is ", "choices": ["Paris", "a small village in Peru"], "answer": 0},
        {"context": "Two plus two equals", "choices": [" four", " seventeen point five"], "answer": 0},
        {"context": "Él dijo:", "choices": ["sí señor, claro que sí", "ñññ ñññ"], "answer": 0},  # bytes != chars
    ],
}
MMLU_DEV = [
    {"question": "What is 1 + 1?", "subject": "abstract_algebra", "choices": ["1", "2", "3", "4"], "answer": 1},
    {"question": "How many elements has Z_3?", "subject": "abstract_algebra", "choices": ["3", "2", "1", "0"],
     "answer": 0},
]
# lm-eval's own task definition for each format (generic: a YAML of our own, the plainest task).
INCLUDE = {"arc": "arc/arc_easy.yaml", "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml",
           "winogrande": "winogrande/default.yaml", "mmlu": "mmlu/default/mmlu_abstract_algebra.yaml",
           "xnli": "xnli/xnli_es.yaml"}
GENERIC_TASK = """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def task_yaml(directory: Path, fmt: str, data: Path, dev: Path) -> None:
    head = f"include: {TASKS / INCLUDE[fmt]}\n" if fmt in INCLUDE else GENERIC_TASK
    files = f"test: {data}" + (f", dev: {dev}" if fmt == "mmlu" else "")
    (directory / f"t_{fmt}.yaml").write_text(
        f"{head}task: t_{fmt}\ntag: null\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files: {{{files}}}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n")


@pytest.fixture(scope="module")
def lm_eval_results(tmp_path_factory, hf_default_model, hf_smol, monkeypatch_module):
    """lm-eval's HF backend on every fixture task: zero-shot, and MMLU 2-shot from its dev split."""
    directory = tmp_path_factory.mktemp("tasks")
    dev = write_jsonl(directory / "mmlu_dev.jsonl", MMLU_DEV)
    for fmt, records in RECORDS.items():
        task_yaml(directory, fmt, write_jsonl(directory / f"{fmt}.jsonl", records), dev)
    manager = TaskManager(include_path=str(directory))
    lm = HFLM(pretrained=hf_default_model, tokenizer=hf_smol, batch_size=4)
    zero = lm_eval.simple_evaluate(model=lm, tasks=[f"t_{f}" for f in RECORDS], task_manager=manager,
                                   log_samples=True)
    shots = lm_eval.simple_evaluate(model=lm, tasks=["t_mmlu"], task_manager=manager, num_fewshot=2,
                                    log_samples=True)
    return directory, zero, shots


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield mp


def compare(ours, theirs: dict, task: str) -> None:
    samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
    assert len(samples) == ours.metrics["n"] == len(ours.details["questions"])
    for question, sample in zip(ours.details["questions"], samples):
        expected = [ll for ll, _ in sample["filtered_resps"]]
        assert question["loglikelihoods"] == pytest.approx(expected, abs=1e-4), question["where"]
        assert question["greedy"] == [bool(g) for _, g in sample["filtered_resps"]]
    for metric in ("acc", "acc_norm", "acc_bytes"):
        if f"{metric},none" in theirs["results"][task]:
            assert ours.metrics[metric] == theirs["results"][task][f"{metric},none"], metric


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_choice_matches_lm_eval(fmt, lm_eval_results, default_llm):
    directory, zero, _ = lm_eval_results
    ours = evaluate("choice", directory / f"{fmt}.jsonl", default_llm, format=fmt, batch_size=3)
    compare(ours, zero, f"t_{fmt}")


@pytest.mark.slow
def test_mmlu_few_shot_matches_lm_eval(lm_eval_results, default_llm):
    directory, _, shots = lm_eval_results
    ours = evaluate("choice", directory / "mmlu.jsonl", default_llm, format="mmlu", shots=2,
                    fewshot_file=str(directory / "mmlu_dev.jsonl"))
    compare(ours, shots, "t_mmlu")


@pytest.mark.parametrize("record, message", [
    ({"context": "x", "answer": 0}, "d.jsonl:2: missing field 'choices'"),
    ({"context": "x", "choices": ["a", "b"], "answer": 2}, "d.jsonl:2: answer 2 is out of range for 2 choices"),
    ({"context": "x", "choices": ["a", "b"]}, "d.jsonl:2: missing field 'answer'"),
    ({"context": 3, "choices": ["a", "b"], "answer": 0}, "d.jsonl:2: field 'context' must be str, not int"),
])
def test_bad_records_name_file_line_and_field(tmp_path, capsys, record, message):
    """The CLI in process: the data is read and refused before any model loads."""
    data = write_jsonl(tmp_path / "d.jsonl", [RECORDS["generic"][0], record])
    assert cli.main(["eval", "choice", str(data), "--quantize", "none"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith(message), err


def test_context_longer_than_the_window(tmp_path, default_llm, monkeypatch):
    monkeypatch.setattr(default_llm.model.config, "max_seq_len", 32)
    data = write_jsonl(tmp_path / "d.jsonl", [{"context": "word " * 40, "choices": [" a", " b c"], "answer": 0}])
    with pytest.raises(LlamitaError, match=r"d.jsonl:1: the prompt and choice 0 take \d+ tokens; the context window "
                                           r"is 32 \(--truncate drops the prompt's start\)"):
        evaluate("choice", data, default_llm)
    kept = evaluate("choice", data, default_llm, truncate=True)  # lm-eval's left truncation: 33 tokens fed
    assert kept.metrics["n"] == 1 and all(v < 0 for v in kept.details["questions"][0]["loglikelihoods"])

"""Multiple-choice benchmarks scored as lm-evaluation-harness scores them, to the digit.

Each choice is scored by the summed log-likelihood of its continuation given the context: the
pair is encoded together and split after the context's own tokens (trailing spaces of the context
moved into the continuation); an empty context is BOS (or EOS) alone. ``acc`` takes the most
likely choice, ``acc_norm`` divides by the choice's length in characters and ``acc_bytes`` by its
UTF-8 bytes, as lm-eval's code does. Each ``--format`` builds the prompt lm-eval's task builds:

- arc: ``Question: {question}\\nAnswer:`` + " " + choice (also for EXAMS-style records);
- hellaswag: ``{activity_label}: {ctx_a} {Ctx_b}`` cleaned as lm-eval does + " " + ending;
- piqa: ``Question: {goal}\\nAnswer:`` + " " + solution;
- winogrande: the sentence up to "_" with each option as the contexts, the rest as the continuation;
- mmlu: the subject's description, the question with lettered choices, ``Answer:`` + " " + letter;
- xnli: no context; ``premise, correcto? Sí|Asi que|No, hypothesis`` (lm-eval's xnli_es);
- generic: ``{"context", "choices", "answer"}`` + " " + choice.

Few-shot examples (``--shots K``) come from ``--fewshot-file`` (default: the data file, never the
question itself), drawn with ``random.Random(seed)`` as lm-eval's sampler does; for MMLU the first
K of the same subject, as lm-eval's ``first_n`` sampler does.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamita.data import read_records
from llamita.errors import LlamitaError
from llamita.eval import loaded
from llamita.eval.generation import first
from llamita.eval.report import Common, Result, Timer
from llamita.eval.score import score
from llamita.options import option
from llamita.tokenizer import Tokenizer

DATA_HELP = "a JSON / JSON Lines file of questions in the shape --format names"
DELIMITER = " "  # lm-eval's target delimiter
FEWSHOT_DELIMITER = "\n\n"


@dataclass
class Options(Common):
    format: str = option("generic", "the records' shape and lm-eval's prompt for it",
                         choices=("arc", "hellaswag", "piqa", "winogrande", "mmlu", "xnli", "generic"))
    shots: int = option(0, "few-shot examples before each question")
    fewshot_file: str | None = option(None, "where few-shot examples come from (default: the data file; for MMLU "
                                      "its dev split)")
    truncate: bool = option(False, "drop the start of a context too long for the window (lm-eval does so "
                            "silently); by default it is an error")


@dataclass
class Question:
    """A record as lm-eval's task sees it: the prompt text, the choices and the answer's index.
    ``target``: winogrande's shared continuation, where the choices are the contexts."""

    where: str
    text: str
    choices: list[str]
    answer: int
    description: str = ""
    target: str | None = None
    group: str = ""  # MMLU's subject: few-shot examples come from the same one

    def example(self) -> str:
        """The question answered, as a few-shot example."""
        if self.target is not None:
            return self.choices[self.answer] + DELIMITER + self.target
        return self.text + DELIMITER + self.choices[self.answer]

    def pairs(self, prefix: str) -> list[tuple[str, str]]:
        """(context, continuation) per choice, after ``prefix`` (description and examples)."""
        if self.target is not None:
            return [(prefix + c, DELIMITER + self.target) for c in self.choices]
        return [(prefix + self.text, DELIMITER + c) for c in self.choices]


# -- formats: a record -> a Question ----------------------------------------------------------------
def _field(record: dict, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in record:
        raise LlamitaError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise LlamitaError(f"{where}: field {key!r} must be {names}, not {type(value).__name__}")
    return value


def _choices(record: dict, where: str, key: str = "choices") -> list[str]:
    """A list of strings; also ARC's official {"text": [...], "label": [...]} and [{"text", "label"}]."""
    value = _field(record, key, where, (list, dict))
    if isinstance(value, dict):
        value = _field(value, "text", f"{where}: {key}", list)
    texts = [c.get("text") if isinstance(c, dict) else c for c in value]
    if len(texts) < 2 or not all(isinstance(t, str) for t in texts):
        raise LlamitaError(f"{where}: field {key!r} must be a list of at least two strings")
    return texts


def _answer(record: dict, where: str, n: int, key: str = "answer") -> int:
    """An index; also a letter (ARC's answerKey "A".."E" or "1".."5") or a numeric string."""
    for k in (key, "answerKey", "label", "gold"):
        if k in record:
            value = record[k]
            break
    else:
        raise LlamitaError(f"{where}: missing field {key!r}")
    labels = record.get("choices", {}).get("label") if isinstance(record.get("choices"), dict) else None
    if isinstance(value, str):
        if labels and value in labels:
            value = labels.index(value)
        elif value.isdigit():
            value = int(value)
        elif len(value) == 1 and value.isalpha():
            value = ord(value.upper()) - ord("A")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise LlamitaError(f"{where}: answer {value!r} is out of range for {n} choices")
    return value


def arc(record: dict, where: str) -> Question:
    question = record.get("question")
    if isinstance(question, dict):  # ARC's official release: {"stem", "choices": [{"text", "label"}]}
        record = {**record, "choices": question.get("choices"), "question": question.get("stem")}
    choices = _choices(record, where)
    return Question(where, f"Question: {_field(record, 'question', where)}\nAnswer:", choices,
                    _answer(record, where, len(choices)))


def _clean_hellaswag(text: str) -> str:
    """lm-eval's hellaswag preprocess: WikiHow's bracketed artifacts out."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(record: dict, where: str) -> Question:
    if "query" in record:  # already built (lm-eval's processed docs)
        query = record["query"]
    else:
        ctx = _field(record, "ctx_a", where) + " " + _field(record, "ctx_b", where).capitalize()
        query = _field(record, "activity_label", where) + ": " + ctx
    choices = [_clean_hellaswag(e) for e in _choices(record, where, "endings")]
    return Question(where, _clean_hellaswag(query), choices, _answer(record, where, len(choices), "label"))


def piqa(record: dict, where: str) -> Question:
    choices = [_field(record, "sol1", where), _field(record, "sol2", where)]
    return Question(where, f"Question: {_field(record, 'goal', where)}\nAnswer:", choices,
                    _answer(record, where, 2, "label"))


def winogrande(record: dict, where: str) -> Question:
    sentence = _field(record, "sentence", where)
    if "_" not in sentence:
        raise LlamitaError(f"{where}: field 'sentence' has no '_' to fill")
    cut = sentence.index("_")
    options = [_field(record, "option1", where), _field(record, "option2", where)]
    answer = _field(record, "answer", where, (str, int))
    if str(answer) not in ("1", "2"):
        raise LlamitaError(f"{where}: answer {answer!r} is out of range (1 or 2)")
    return Question(where, "", [sentence[:cut] + o for o in options], int(answer) - 1,
                    target=sentence[cut + 1:].strip())


def mmlu(record: dict, where: str) -> Question:
    choices = _choices(record, where)
    if len(choices) != 4:
        raise LlamitaError(f"{where}: field 'choices' must hold 4 choices (A-D), not {len(choices)}")
    subject = _field(record, "subject", where)
    lettered = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices))
    return Question(where, f"{_field(record, 'question', where).strip()}{lettered}\nAnswer:", list("ABCD"),
                    _answer(record, where, 4),
                    f"The following are multiple choice questions (with answers) about "
                    f"{subject.replace('_', ' ')}.\n\n", group=subject)


def xnli(record: dict, where: str) -> Question:
    premise, hypothesis = _field(record, "premise", where), _field(record, "hypothesis", where)
    joins = (", correcto? Sí, ", ", correcto? Asi que, ", ", correcto? No, ")
    return Question(where, "", [premise + j + hypothesis for j in joins], _answer(record, where, 3, "label"))


def generic(record: dict, where: str) -> Question:
    choices = _choices(record, where)
    return Question(where, _field(record, "context", where), choices, _answer(record, where, len(choices)))


FORMATS: dict[str, Callable[[dict, str], Question]] = {
    "arc": arc, "hellaswag": hellaswag, "piqa": piqa, "winogrande": winogrande, "mmlu": mmlu, "xnli": xnli,
    "generic": generic,
}


def read_questions(path: str | Path, format: str) -> list[Question]:
    build = FORMATS[format]
    questions = []
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise LlamitaError(f"{where}: expected a JSON object, not {type(record).__name__}")
        questions.append(build(record, where))
    return questions


# -- encoding, as lm-eval's HF backend encodes ------------------------------------------------------
def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces move into the continuation; the pair is encoded whole and
    cut after the context's own tokens. An empty context is BOS (EOS without one) alone. Special
    tokens written in the text are parsed (``special=True``), as transformers' tokenizer, which lm-eval's
    HF backend calls, parses them."""
    if not context:
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        cont = tok.encode(continuation, special=True)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, bos=tok.add_bos, special=True)
    ctx = tok.encode(context, bos=tok.add_bos, special=True)
    return ctx, whole[len(ctx):]


def sequences_for(tok: Tokenizer, q: Question, prefix: str, window: int, truncate: bool) -> list[tuple[list[int], int]]:
    """Per choice, its context and continuation tokens and where the continuation starts (the
    scorer feeds a shared context once)."""
    out = []
    for i, (context, continuation) in enumerate(q.pairs(prefix)):
        ctx, cont = encode_pair(tok, context, continuation)
        if not cont:
            raise LlamitaError(f"{q.where}: choice {i} is empty")
        over = len(ctx) + len(cont) - 1 - window
        if over > 0:
            if not truncate or over >= len(ctx):
                raise LlamitaError(f"{q.where}: the prompt and choice {i} take {len(ctx) + len(cont)} tokens; the "
                                   f"context window is {window}" + ("" if truncate else
                                                                    " (--truncate drops the prompt's start)"))
            ctx = ctx[over:]
        out.append((ctx + cont, len(ctx)))
    return out


def fewshot_prefix(q: Question, pool: list[Question], shots: int, rnd: random.Random, same_file: bool) -> str:
    """The description and ``shots`` answered examples, as lm-eval's context builder writes them."""
    if not shots:
        return q.description
    if q.group:  # MMLU: the first examples of the same subject
        examples = [e for e in pool if e.group == q.group and e is not q][:shots]
    else:
        examples = [e for e in rnd.sample(pool, shots + 1 if same_file else shots) if e is not q][:shots]
    return q.description + FEWSHOT_DELIMITER.join(e.example() for e in examples) + FEWSHOT_DELIMITER


def run(llm, data: str | Path, **options) -> Result:
    o = Options(**options)
    questions = first(read_questions(data, o.format), o.limit)
    pool = read_questions(o.fewshot_file, o.format) if o.fewshot_file else questions
    if o.shots and len(pool) < o.shots + (o.fewshot_file is None):  # the question itself is not an example
        raise LlamitaError(f"--shots {o.shots}: the few-shot source has only {len(pool)} questions")
    llm = loaded(llm)
    rnd, tok, window = random.Random(o.seed), llm.tokenizer, llm.model.config.max_seq_len
    timer = Timer()
    sequences = [sequences_for(tok, q, fewshot_prefix(q, pool, o.shots, rnd, o.fewshot_file is None), window,
                               o.truncate) for q in questions]
    scored = iter(score(llm.model, [s for seqs in sequences for s in seqs], o.batch_size,
                        desc=f"choice ({o.format})"))
    lls, greedy = [], []
    for seqs in sequences:
        results = [next(scored) for _ in seqs]
        lls.append([s.total for s in results])
        greedy.append([s.greedy for s in results])
    metrics = _accuracies(questions, lls)
    per_question = [{"where": q.where, "answer": q.answer, "loglikelihoods": ll, "greedy": g}
                    for q, ll, g in zip(questions, lls, greedy)]
    settings = {"format": o.format, "shots": o.shots, "fewshot_file": o.fewshot_file, "seed": o.seed,
                "data": str(data), "limit": o.limit, "batch_size": o.batch_size, "truncate": o.truncate}
    return Result("choice", metrics, settings,
                  {**timer.details(sum(len(ids) - 1 for seqs in sequences for ids, _ in seqs)),
                   "questions": per_question})


def _accuracies(questions: list[Question], lls: list[list[float]]) -> dict[str, float | int]:
    """acc, acc_norm (by characters), acc_bytes (by UTF-8 bytes), with acc's standard error."""
    def argmax(values: list[float]) -> int:
        return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equals, as numpy's

    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for q, ll in zip(questions, lls):
        hits["acc"] += argmax(ll) == q.answer
        hits["acc_norm"] += argmax([v / len(c) for v, c in zip(ll, q.choices)]) == q.answer
        hits["acc_bytes"] += argmax([v / len(c.encode()) for v, c in zip(ll, q.choices)]) == q.answer
    n = len(questions)
    metrics: dict[str, float | int] = {k: v / n for k, v in hits.items()}
    p = metrics["acc"]
    metrics["acc_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0
    metrics["n"] = n
    return metrics

"""Extractive question answering: exact match and token F1 of greedy answers (SQuAD v1.1's scoring).

The model reads a paragraph and a question in one chat turn (``prompt``) and answers greedily; the
first line of its reply is the prediction. It is scored against every gold answer and the best
score kept, after SQuAD v1.1's official normalisation (``normalize_answer``): lowercase, drop
punctuation, drop the articles a / an / the, collapse whitespace. ``lang="es"`` applies MLQA's
Spanish rule instead: every Unicode punctuation character goes (so ``¿ ¡ « »`` too), the articles
removed are el / la / los / las / un / una / unos / unas, and accents stay ("canción" is not
"cancion"). EM and F1 are averaged over the questions and reported as percentages (0-100), as the
official script reports them.

Data: SQuAD's own JSON file ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}), or records
(JSON Lines or a JSON array) with ``question``, ``context`` and ``answers`` (a list of strings or of
{"text": ...} objects, or Hugging Face's {"text": [...]}), or ``instruction`` (the question),
``input`` (the paragraph) and ``output`` (the answer): those are asked as ``llamita finetune``
renders such records (instruction, blank line, paragraph), so a model tuned on them is asked the
way it learned.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamita.chat import Message
from llamita.data import _string, read_records, to_messages
from llamita.errors import LlamitaError
from llamita.eval import loaded
from llamita.eval.generation import first, generated_tokens, replies, settings
from llamita.eval.report import Common, Result, Timer
from llamita.options import option

DATA_HELP = ("SQuAD-format JSON, or JSON Lines records with question / context / answers, or "
             "instruction (question) / input (paragraph) / output (answer)")
ARTICLES = {"en": re.compile(r"\b(a|an|the)\b"), "es": re.compile(r"\b(el|la|los|las|un|una|unos|unas)\b")}
N_EXAMPLES = 5


@dataclass
class Options(Common):
    lang: str = option("en", "normalisation of answers: en (SQuAD v1.1's) or es (Spanish articles, ¿¡ and all "
                             "Unicode punctuation removed, accents kept)", choices=tuple(ARTICLES))
    max_new_tokens: int = option(32, "tokens to generate at most per answer")


@dataclass
class Question:
    where: str  # file:line (or the place in a SQuAD file), for messages and examples
    question: str
    context: str
    answers: list[str]
    messages: list[Message] | None = None  # instruction records: asked as finetune renders them


# --- scoring: SQuAD v1.1's official functions, with a Spanish variant ------------------------------------


def _is_punctuation(ch: str, lang: str) -> bool:
    return ch in string.punctuation or (lang == "es" and unicodedata.category(ch).startswith("P"))


def _check_lang(lang: str) -> None:
    if lang not in ARTICLES:
        raise LlamitaError(f"unknown QA language {lang!r} (known: {', '.join(ARTICLES)})")


def normalize_answer(text: str, lang: str = "en") -> str:
    """SQuAD v1.1's normalisation (lowercase, no punctuation, no articles, single spaces); for
    ``lang="es"`` MLQA's: Unicode punctuation and Spanish articles removed, accents kept."""
    _check_lang(lang)
    text = "".join(ch for ch in text.lower() if not _is_punctuation(ch, lang))
    return " ".join(ARTICLES[lang].sub(" ", text).split())


def exact_match(prediction: str, golds: list[str], lang: str = "en") -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction, lang)
    return float(any(pred == normalize_answer(g, lang) for g in golds))


def f1(prediction: str, golds: list[str], lang: str = "en") -> float:
    """The best token F1 (0-1) of the prediction against any gold answer, as SQuAD v1.1 computes it."""
    pred = normalize_answer(prediction, lang).split()
    return max(_token_f1(pred, normalize_answer(g, lang).split()) for g in golds)


def _token_f1(pred: list[str], gold: list[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_of(reply: str) -> str:
    """The prediction: the reply's first line, stripped (models add explanations after it)."""
    return reply.strip().split("\n", 1)[0].strip()


def prompt(question: str, context: str) -> list[Message]:
    """One user turn, so that single-turn formats (Alpaca's) take it too."""
    return [{"role": "user", "content": "Answer the question with a short span copied from the paragraph, in the "
             f"language of the question. Reply with the answer only.\n\nParagraph: {context}\n\nQuestion: {question}"}]


# --- reading --------------------------------------------------------------------------------------------


def read_questions(source: str | Path) -> list[Question]:
    """The questions of a SQuAD JSON file or of a file of records (``read_records``)."""
    squad = _squad_document(source)
    if squad is not None:
        return _squad_questions(squad, Path(source))
    return [_question(record, where) for where, record in read_records(source)]


def _squad_document(source: str | Path) -> dict | None:
    """The parsed file if it is one JSON object with "data" (SQuAD's layout), else None: then it is
    read as records, and ``read_records`` reports what is wrong with it."""
    path = Path(source).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig") if path.is_file() else ""
        doc = json.loads(text) if text.lstrip().startswith("{") else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # JSON Lines, or unreadable
        return None
    return doc if isinstance(doc, dict) and "data" in doc else None


def _squad_questions(doc: dict, path: Path) -> list[Question]:
    out = []
    for i, article in enumerate(_list(doc, "data", f"{path}")):
        for j, paragraph in enumerate(_list(article, "paragraphs", f"{path}: data[{i}]")):
            at = f"{path}: data[{i}].paragraphs[{j}]"
            context = _string(_object(paragraph, at), "context", at)
            for k, qa in enumerate(_list(paragraph, "qas", at)):
                out.append(_question({**_object(qa, f"{at}.qas[{k}]"), "context": context}, f"{at}.qas[{k}]"))
    if not out:
        raise LlamitaError(f"{path}: no questions (the dataset is empty)")
    return out


def _question(record: Any, where: str) -> Question:
    record = _object(record, where)
    if "instruction" in record:
        output = _string(record, "output", where)
        return Question(where, _string(record, "instruction", where), _string(record, "input", where),
                        _golds([output], where, "output"), to_messages(record, where)[:-1])
    if "question" not in record:
        raise LlamitaError(f"{where}: missing field 'question' (a QA record has question, context and answers, "
                           "or instruction, input and output)")
    return Question(where, _string(record, "question", where), _string(record, "context", where),
                    _answers(record, where))


def _answers(record: dict, where: str) -> list[str]:
    """SQuAD's [{"text", "answer_start"}], plain strings, or Hugging Face's {"text": [...], ...}."""
    if "answers" not in record:
        raise LlamitaError(f"{where}: missing field 'answers'")
    answers = record["answers"]
    if isinstance(answers, dict):
        answers = answers.get("text")
    if isinstance(answers, list):
        texts = [a.get("text") if isinstance(a, dict) else a for a in answers]
        if all(isinstance(t, str) for t in texts):
            return _golds(texts, where, "answers")
    raise LlamitaError(f"{where}: field 'answers' must be a list of strings or of {{\"text\": ...}} objects")


def _golds(texts: list[str], where: str, key: str) -> list[str]:
    if not texts:
        raise LlamitaError(f"{where}: field {key!r} is empty: a question needs a gold answer "
                           "(unanswerable questions, as in SQuAD 2.0, are not scored)")
    if not all(t.strip() for t in texts):
        raise LlamitaError(f"{where}: field {key!r} holds an empty answer")
    return texts


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise LlamitaError(f"{where}: expected a JSON object, not {type(value).__name__}")
    return value


def _list(record: Any, key: str, where: str) -> list:
    value = _object(record, where).get(key)
    if key not in record:
        raise LlamitaError(f"{where}: missing field {key!r}")
    if not isinstance(value, list):
        raise LlamitaError(f"{where}: field {key!r} must be a list, not {type(value).__name__}")
    return value


# --- the task -------------------------------------------------------------------------------------------


def run(llm: Any, data: str | Path, **options: Any) -> Result:
    """Answer every question greedily, ``batch_size`` at a time, and score the answers."""
    opts = Options(**options)
    _check_lang(opts.lang)
    questions = first(read_questions(data), opts.limit)
    llm = loaded(llm)
    timer = Timer()
    asked = [q.messages or prompt(q.question, q.context) for q in questions]
    texts = replies(llm, asked, [q.where for q in questions],
                    opts.batch_size, "qa", max_new_tokens=opts.max_new_tokens, temperature=0.0, seed=opts.seed)
    timing = timer.details(generated_tokens(llm, texts))
    predictions = [answer_of(t) for t in texts]
    ems = [exact_match(p, q.answers, opts.lang) for p, q in zip(predictions, questions)]
    f1s = [f1(p, q.answers, opts.lang) for p, q in zip(predictions, questions)]
    metrics = {"exact_match": 100 * sum(ems) / len(ems), "f1": 100 * sum(f1s) / len(f1s), "n": len(questions)}
    return Result("qa", metrics, settings(opts, llm, data),
                  {**timing, "examples": _worst(questions, predictions, f1s)})


def _worst(questions: list[Question], predictions: list[str], f1s: list[float]) -> list[dict[str, Any]]:
    """The few answers with the lowest F1 (in file order among equals): where to look first."""
    order = sorted(range(len(questions)), key=lambda i: f1s[i])[:N_EXAMPLES]
    return [{"where": questions[i].where, "question": questions[i].question, "prediction": predictions[i],
             "gold": questions[i].answers, "f1": round(100 * f1s[i], 1)} for i in order]

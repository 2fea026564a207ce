"""``eval qa``: SQuAD v1.1's exact match and F1 (expected values worked out by hand from the official
formulas), its Spanish variant, the three data shapes, bad input, and a run with the default model."""

from __future__ import annotations

import json
import re

import pytest

from helpers import ScriptedLLM
from llamita import cli
from llamita.errors import LlamitaError
from llamita.eval.qa import answer_of, exact_match, f1, normalize_answer, read_questions, run

# --- normalisation ------------------------------------------------------------------------------------


def test_english_normalisation_is_squad_v1_1():
    # lower -> "the cat, a dog!" -> no punctuation "the cat a dog" -> no articles -> "cat dog"
    assert normalize_answer("The Cat, a  dog!") == "cat dog"
    # "an" only as a whole word: "answer" and "theme" keep their letters
    assert normalize_answer("An answer, the theme.") == "answer theme"


def test_spanish_normalisation_drops_articles_and_inverted_marks_and_keeps_accents():
    assert normalize_answer("¿Qué es «La Canción»?", "es") == "qué es canción"
    assert normalize_answer("Los Unos y unas", "es") == "y"  # "Unos" is an article too
    assert normalize_answer("Él la vio", "es") == "él vio"  # "él" (he) is not "el" (the)


def test_accents_are_kept():
    assert exact_match("canción", ["cancion"], "es") == 0.0
    assert f1("canción", ["cancion"], "es") == 0.0
    assert exact_match("Canción", ["canción"], "es") == 1.0


def test_inverted_marks_are_punctuation_in_spanish_only():
    assert exact_match("¡Oro!", ["oro"], "es") == 1.0
    # string.punctuation (SQuAD's English rule) is ASCII: "¡oro" stays, so no match
    assert exact_match("¡Oro!", ["oro"], "en") == 0.0


def test_spanish_articles_only_with_lang_es():
    assert exact_match("Los Broncos de Denver", ["broncos de denver"], "es") == 1.0
    assert exact_match("Los Broncos de Denver", ["broncos de denver"], "en") == 0.0
    # en: pred [los broncos de denver], gold [broncos de denver]: 3 common; P = 3/4, R = 3/3
    # F1 = 2 * 3/4 * 1 / (3/4 + 1) = 1.5 / 1.75 = 6/7
    assert f1("Los Broncos de Denver", ["broncos de denver"], "en") == pytest.approx(6 / 7)


# --- exact match and F1 -----------------------------------------------------------------------------------


def test_f1_is_the_best_over_gold_answers():
    # vs "broncos": 1 common; P = 1/2, R = 1/1 -> 2 * 1/2 * 1 / (3/2) = 2/3
    # vs "the Denver Broncos team" -> [denver broncos team]: 2 common; P = 2/2, R = 2/3 -> 2 * 2/3 / (5/3) = 4/5
    assert f1("Denver Broncos", ["Broncos", "the Denver Broncos team"]) == pytest.approx(0.8)
    assert exact_match("Denver Broncos", ["Broncos", "the Denver Broncos team"]) == 0.0
    assert exact_match("the denver broncos.", ["Broncos", "Denver Broncos"]) == 1.0


def test_f1_counts_repeated_tokens_once_per_gold_occurrence():
    # pred [oro oro plata], gold [oro]: common min(2, 1) = 1; P = 1/3, R = 1/1 -> 2 * 1/3 / (4/3) = 1/2
    assert f1("oro oro plata", ["oro"]) == pytest.approx(0.5)


def test_empty_prediction_scores_zero():
    assert f1("", ["oro"]) == 0.0
    assert exact_match("", ["oro"]) == 0.0
    assert f1("The.", ["oro"]) == 0.0  # normalises to nothing


def test_answer_is_the_first_line_stripped():
    assert answer_of("\n  Denver Broncos \nThey won 24-10.") == "Denver Broncos"
    assert answer_of("") == ""


# --- data ------------------------------------------------------------------------------------------------

QUESTIONS = [
    {"question": "¿Quién ganó?", "context": "Los Broncos de Denver ganaron.", "answers": ["Broncos de Denver"]},
    {"question": "¿Cuándo?", "context": "El 7 de febrero.", "answers": ["7 de febrero", "el 7 de febrero"]},
    {"question": "¿Dónde?", "context": "En Santa Clara.", "answers": ["Santa Clara"]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def squad_file(path, questions=QUESTIONS):
    """SQuAD's official layout, pretty-printed (so not one record a line)."""
    paragraphs = [{"context": q["context"], "qas": [{"id": str(i), "question": q["question"],
                   "answers": [{"text": a, "answer_start": 0} for a in q["answers"]]}]}
                  for i, q in enumerate(questions)]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}, indent=2))
    return path


def test_the_three_data_shapes_read_alike(tmp_path):
    squad = read_questions(squad_file(tmp_path / "squad.json"))
    records = read_questions(write_jsonl(tmp_path / "records.jsonl", QUESTIONS))
    hf = read_questions(write_jsonl(tmp_path / "hf.jsonl", [
        {**q, "answers": {"text": q["answers"], "answer_start": [0] * len(q["answers"])}} for q in QUESTIONS]))
    flat = read_questions(write_jsonl(tmp_path / "flat.jsonl", [
        {"instruction": q["question"], "input": q["context"], "output": q["answers"][0]} for q in QUESTIONS]))
    expected = [(q["question"], q["context"], q["answers"]) for q in QUESTIONS]
    for questions in (squad, records, hf):
        assert [(q.question, q.context, q.answers) for q in questions] == expected
    assert [(q.question, q.context, q.answers) for q in flat] == [(a, b, c[:1]) for a, b, c in expected]
    assert squad[2].where == f"{tmp_path / 'squad.json'}: data[0].paragraphs[2].qas[0]"
    assert records[1].where == f"{tmp_path / 'records.jsonl'}:2"


@pytest.mark.parametrize("record, message", [
    ({"question": "q", "answers": ["a"]}, ":2: missing field 'context'"),
    ({"question": "q", "context": "c", "answers": []}, ":2: field 'answers' is empty"),
    ({"question": "q", "context": "c"}, ":2: missing field 'answers'"),
    ({"question": "q", "context": "c", "answers": [{"answer_start": 3}]}, ":2: field 'answers' must be a list"),
    ({"instruction": "q", "input": "c"}, ":2: missing field 'output'"),
    ({"instruction": "q", "output": "a"}, ":2: missing field 'input'"),
    ({"pregunta": "q"}, ":2: missing field 'question'"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [QUESTIONS[0], record])
    with pytest.raises(LlamitaError) as e:
        read_questions(path)
    assert str(e.value).startswith(f"{path}{message}") and "\n" not in str(e.value)


def test_bad_squad_file_names_the_question(tmp_path):
    path = squad_file(tmp_path / "squad.json", [QUESTIONS[0], {**QUESTIONS[1], "answers": []}])
    with pytest.raises(LlamitaError, match=r"data\[0\]\.paragraphs\[1\]\.qas\[0\]: field 'answers' is empty"):
        read_questions(path)


def test_empty_files_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LlamitaError, match="empty.jsonl: no records"):
        read_questions(tmp_path / "empty.jsonl")
    (tmp_path / "squad.json").write_text('{"version": "1.1", "data": []}')
    with pytest.raises(LlamitaError, match="squad.json: no questions"):
        read_questions(tmp_path / "squad.json")


# --- the task with a scripted model ----------------------------------------------------------------------

REPLIES = {"¿Quién ganó?": "Broncos de Denver\nGanaron 24-10.", "¿Cuándo?": "\n  el 7 de febrero de 2016",
           "¿Dónde?": ""}


def test_run_averages_percentages_and_lists_the_worst(tmp_path):
    llm = ScriptedLLM(lambda prompt: REPLIES[prompt.rsplit("Question: ", 1)[1]])
    result = run(llm, write_jsonl(tmp_path / "d.jsonl", QUESTIONS), lang="es", batch_size=2, max_new_tokens=7)
    # EM: 1 (exact), 0, 0 (empty) -> 100 * 1/3
    # F1: 1; [7 de febrero de 2016] vs [7 de febrero] (best gold; "el" is dropped): 3 common,
    #     P = 3/5, R = 3/3 -> 2 * 3/5 / (8/5) = 3/4; empty: 0 -> 100 * (1 + 3/4 + 0) / 3 = 175/3
    assert result.metrics == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(175 / 3), "n": 3}
    assert [e["question"] for e in result.details["examples"]] == ["¿Dónde?", "¿Cuándo?", "¿Quién ganó?"]
    assert [e["f1"] for e in result.details["examples"]] == [0.0, 75.0, 100.0]
    assert [n for n, _ in llm.calls] == [2, 1]
    assert llm.calls[0][1] == {"max_new_tokens": 7, "temperature": 0.0, "seed": 1234}
    assert result.settings == {"data": str(tmp_path / "d.jsonl"), "limit": None, "batch_size": 2, "seed": 1234,
                               "lang": "es", "max_new_tokens": 7, "template": "chatml"}
    assert result.details["seconds"] >= 0 and "tokens_per_second" in result.details


def test_limit_takes_the_first_questions(tmp_path):
    llm = ScriptedLLM(lambda prompt: "Broncos de Denver")
    result = run(llm, write_jsonl(tmp_path / "d.jsonl", QUESTIONS), lang="es", limit=1)
    assert result.metrics == {"exact_match": 100.0, "f1": 100.0, "n": 1}
    with pytest.raises(LlamitaError, match="--limit must be at least 1"):
        run(llm, tmp_path / "d.jsonl", limit=0)


# --- the default model ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_scores_the_default_model(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", QUESTIONS[:2])
    out = tmp_path / "qa.json"
    # in process: the CLI's own load of the default model (`python -m llamita eval` is
    # test_eval_perplexity.py's test_cli_writes_json)
    assert cli.main(["eval", "qa", str(data), "--lang", "es", "--max-new-tokens", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["exact_match"] <= 100 and 0 <= result["f1"] <= 100 and result["n"] == 2
    assert result["exact_match"] <= result["f1"]  # an exact match has F1 1
    assert result["settings"]["lang"] == "es" and result["settings"]["template"]
    assert len(result["examples"]) == 2 and "| exact_match |" in capsys.readouterr().out


def test_cli_bad_record_is_one_line_naming_file_line_and_field(tmp_path, capsys):
    """The CLI in process: the data is read and refused before any model loads."""
    data = write_jsonl(tmp_path / "d.jsonl", [QUESTIONS[0], {"question": "q", "answers": ["a"]}])
    assert cli.main(["eval", "qa", str(data)]) == 2
    assert capsys.readouterr().err == f"llamita: error: {data}:2: missing field 'context'\n"


@pytest.mark.slow
def test_a_prompt_over_the_context_names_its_record(tmp_path, default_llm):
    long = {"question": "¿Qué?", "context": "palabra " * 9000, "answers": ["palabra"]}
    data = write_jsonl(tmp_path / "d.jsonl", [QUESTIONS[0], long])
    with pytest.raises(LlamitaError, match=rf"^{re.escape(str(data))}:2: prompt has \d+ tokens"):
        run(default_llm, data, max_new_tokens=1)

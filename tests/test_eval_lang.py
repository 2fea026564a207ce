"""``eval lang``: language identification of hand-written sentences, loop coverage worked out by hand,
the prompt shapes, bad input, and a run with the default model."""

from __future__ import annotations

import json

import pytest

from helpers import ScriptedLLM
from llamita import cli
from llamita.errors import LlamitaError
from llamita.eval.lang import conversation, detect_language, loop_coverage, loops, read_prompts, run

SPANISH = ["El gato duerme en la casa porque hace mucho frío.",
           "Para mejorar la gestión del tiempo, es importante establecer prioridades claras cada día.",
           "¿Cuáles son las principales diferencias entre los dos lenguajes de programación?"]
ENGLISH = ["The cat sleeps in the house because it is very cold.",
           "To improve your time management, set clear priorities every day.",
           "What are the main differences between these two programming languages?"]


@pytest.mark.parametrize("text, lang", [(t, "es") for t in SPANISH] + [(t, "en") for t in ENGLISH])
def test_detects_spanish_and_english(text, lang):
    assert detect_language(text) == lang


def test_blank_text_is_undetermined():
    assert detect_language("") == "und"
    assert detect_language("  \n") == "und"


# --- loops -------------------------------------------------------------------------------------------------


def test_a_repeated_phrase_covers_the_reply():
    # 12 words; "uno dos tres cuatro" starts at words 0, 4 and 8 (3 times): words 0-11 covered -> 12/12
    assert loop_coverage("uno dos tres cuatro " * 3) == 1.0


def test_a_long_sentence_repeated_loops_too():
    # 12 distinct words x 3 = 36 words: each copy's 9 inner 4-grams occur 3 times and cover its 12 words -> 36/36
    # (the single most frequent 4-gram would cover 3 x 4 = 12 words: 1/3)
    sentence = "el modelo repite esta frase larga una y otra vez sin parar "
    assert loop_coverage(sentence * 3) == 1.0
    assert loops(loop_coverage(sentence * 3))


def test_ordinary_prose_does_not_loop():
    text = " ".join(SPANISH)
    # words repeat ("la" twice), but no 4-gram does -> nothing covered
    assert loop_coverage(text) == 0.0
    assert not loops(loop_coverage(text))


def test_coverage_counts_only_ngrams_seen_three_times():
    ten = "uno dos tres cuatro cinco seis siete ocho nueve diez "
    # + "la" x 6: "la la la la" starts at words 10, 11, 12 (3 times), covering words 10-15 -> 6/16 = 0.375
    assert loop_coverage(ten + "la " * 6) == pytest.approx(6 / 16)
    # + "la" x 5: "la la la la" starts at 10 and 11 only (2 times) -> nothing covered
    assert loop_coverage(ten + "la " * 5) == 0.0


def test_words_ignore_case_and_punctuation():
    # "sí" x 6 once lowercased and without punctuation: "sí sí sí sí" at 0, 1, 2 -> 6/6
    assert loop_coverage("Sí, sí. SÍ sí sí ¡sí!") == 1.0
    assert loop_coverage("sí sí sí") == 0.0  # fewer than 4 words


def test_the_threshold_is_strictly_above_0_3():
    assert not loops(0.3) and loops(0.31)


# --- prompts -----------------------------------------------------------------------------------------------


def test_prompt_shapes():
    assert conversation({"instruction": "Traduce", "input": "cat"}, "f:1") == \
        [{"role": "user", "content": "Traduce\n\ncat"}]
    assert conversation({"instruction": "Hola", "output": "¡Hola!"}, "f:1") == [{"role": "user", "content": "Hola"}]
    assert conversation({"prompt": "Hola"}, "f:1") == [{"role": "user", "content": "Hola"}]
    chat = [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "Hola"},
            {"role": "assistant", "content": "¡Hola!"}]
    assert conversation({"messages": chat}, "f:1") == chat[:2]  # cut after the last user turn
    assert conversation({"conversations": [{"from": "human", "value": "Hola"}]}, "f:1") == \
        [{"role": "user", "content": "Hola"}]


@pytest.mark.parametrize("record, message", [
    ({"question": "¿Qué?"}, "missing field 'instruction' (or 'prompt', 'messages', 'conversations')"),
    ({"prompt": 3}, "field 'prompt' must be a string, not int"),
    ({"messages": [{"role": "user"}]}, "messages[0]: missing field 'content'"),
    ({"messages": [{"role": "system", "content": "Sé breve."}]}, "field 'messages' has no user turn"),
    ({"messages": []}, "field 'messages' must be a non-empty list"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hola"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(LlamitaError) as e:
        read_prompts(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value) and "\n" not in str(e.value)


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "p.jsonl").write_text("")
    with pytest.raises(LlamitaError, match="p.jsonl: no records"):
        read_prompts(tmp_path / "p.jsonl")


# --- the task with a scripted model ------------------------------------------------------------------------

LOOPING = "la respuesta es la misma " * 8


def prompts_file(tmp_path):
    records = [{"instruction": "uno"}, {"instruction": "dos"}, {"prompt": "tres"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_run_shares_counts_and_worst_replies(tmp_path):
    replies = {"uno": SPANISH[0], "dos": ENGLISH[0], "tres": LOOPING}
    llm = ScriptedLLM(replies.get)
    result = run(llm, prompts_file(tmp_path), lang="es", batch_size=2, temperature=0.7, seed=5)
    # Spanish, English, looping Spanish: 2/3 in Spanish, 1/3 looping
    assert result.metrics == {"lang_share": pytest.approx(2 / 3), "loop_rate": pytest.approx(1 / 3), "n": 3}
    assert result.details["lang_counts"] == {"es": 2, "en": 1}
    # worst first: both bad once; the looping one has the higher coverage; the good one last
    examples = result.details["examples"]
    assert [(e["prompt"], e["language"], e["loop_coverage"]) for e in examples] == \
        [("tres", "es", 1.0), ("dos", "en", 0.0), ("uno", "es", 0.0)]
    assert examples[0]["reply"] == LOOPING and examples[1]["where"] == f"{tmp_path / 'p.jsonl'}:2"
    assert [n for n, _ in llm.calls] == [2, 1]
    assert llm.calls[0][1] == {"max_new_tokens": 256, "temperature": 0.7, "seed": 5}
    assert result.settings["temperature"] == 0.7 and result.settings["template"] == "chatml"
    assert result.settings["limit"] is None and result.settings["lang"] == "es"


def test_limit_and_unknown_language(tmp_path):
    llm = ScriptedLLM(lambda prompt: ENGLISH[1])
    result = run(llm, prompts_file(tmp_path), lang="en", limit=2)
    assert result.metrics == {"lang_share": 1.0, "loop_rate": 0.0, "n": 2}
    with pytest.raises(LlamitaError, match="--lang 'spanish': not a language py3langid knows"):
        run(llm, prompts_file(tmp_path), lang="spanish")


# --- the default model --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_measures_the_default_model(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"instruction": "¿Cuál es la capital de España?"}) + "\n"
                    + json.dumps({"prompt": "Nombra un color."}) + "\n")
    out = tmp_path / "lang.json"
    # in process: the CLI's own load of the default model (`python -m llamita eval` is
    # test_eval_perplexity.py's test_cli_writes_json)
    assert cli.main(["eval", "lang", str(data), "--lang", "es", "--max-new-tokens", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["lang_share"] <= 1 and 0 <= result["loop_rate"] <= 1 and result["n"] == 2
    assert sum(result["lang_counts"].values()) == 2 and len(result["examples"]) == 2
    assert result["settings"]["temperature"] == 0 and result["settings"]["max_new_tokens"] == 8


def test_cli_bad_record_is_one_line_naming_file_line_and_field(tmp_path, capsys):
    """The CLI in process: the data is read and refused before any model loads."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Hola"}) + "\n" + json.dumps({"question": "¿Qué?"}) + "\n")
    assert cli.main(["eval", "lang", str(data)]) == 2
    assert capsys.readouterr().err == \
        f"llamita: error: {data}:2: missing field 'instruction' (or 'prompt', 'messages', 'conversations')\n"

"""The README's sequence: fine-tune (Alpaca's template by default), then chat with the adapter,
merge it, serve it: every step after training talks to the model in the format it learned."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import llamita
from helpers import tiny_base, write_data
from llamita import cli
from llamita.data import IGNORE, encode_record
from llamita.formats.export import merge
from llamita.llm import LLM


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    base, data = tiny_base(root / "base"), write_data(root / "data.jsonl", n=4)
    adapter = llamita.finetune(base, data, root / "run", steps=1, batch_size=4, progress=False)
    return base, data, adapter


def test_chat_with_the_adapter_uses_its_training_template(trained, tmp_path):
    base, data, adapter = trained
    llm = LLM.load(base, adapter=adapter)
    assert llm.template == "alpaca" and LLM.load(base).template == "auto"  # the base alone: its own (chatml)
    record = json.loads(data.read_text().splitlines()[0])
    example = encode_record(llm.tokenizer, record, "data.jsonl:1")  # what training fed the model
    prompt = example.ids[: next(i for i, label in enumerate(example.labels) if label != IGNORE)]
    assert llm.encode_chat([{"role": "user", "content": record["instruction"]}]) == prompt
    assert LLM.load(base, adapter=adapter, template="chatml").template == "chatml"  # told otherwise
    merge(base, adapter, tmp_path / "merged")  # the merged checkpoint keeps the record
    assert LLM.load(tmp_path / "merged").template == "alpaca"


@pytest.mark.slow
def test_cli_chat_with_the_adapter_answers_each_line(trained, capsys):
    """Alpaca is single-turn: piped lines are answered one by one (``python -m llamita chat``), and a
    system prompt is refused (in process: refused once the model loads, before stdin is read)."""
    base, _, adapter = trained
    out = subprocess.run([sys.executable, "-m", "llamita", "chat", "--model", str(base), "--adapter", str(adapter),
                          "--temperature", "0", "--max-new-tokens", "4"], input="repite gato\nrepite casa\n",
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2
    assert cli.main(["chat", "--model", str(base), "--adapter", str(adapter), "--system", "Be brief."]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("llamita: error:") and "no system prompt" in err \
        and "Traceback" not in err

"""Bad input: one LlamitaError whose message names the file and the problem; the CLI exits 2."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llamita
from helpers import run_guarded, tiny_base, write_meta_checkpoint, write_tiny_gguf
from llamita import LlamitaError


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def load_error(source) -> str:
    with pytest.raises(LlamitaError) as e:
        llamita.load_model(source)
    message = str(e.value)
    assert "\n" not in message
    return message


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_missing_file(tmp_path):
    msg = load_error(tmp_path / "nope.gguf")
    assert "nope.gguf" in msg and "no such file" in msg


def test_directory_of_no_known_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    msg = load_error(tmp_path)
    assert str(tmp_path) in msg and "config.json" in msg and "params.json" in msg


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not gguf at all")
    msg = load_error(tmp_path / "x.gguf")
    assert "x.gguf" in msg and "GGUF" in msg


def test_truncated_safetensors(hf_dir):
    truncate(hf_dir / "model.safetensors")
    msg = load_error(hf_dir)
    assert "model.safetensors" in msg and "safetensors" in msg


def test_corrupt_safetensors_header(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage!!!!!!!}")
    assert "model.safetensors" in load_error(hf_dir)


def test_truncated_gguf(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf", types={"blk.0.ffn_down.weight": "Q4_K"}, valid_blocks=True)
    truncate(path, keep=0.8)
    msg = load_error(path)
    assert "t.gguf" in msg and "tensor " in msg and "truncated" in msg and "file ends" in msg


def test_gguf_tensor_smaller_than_its_shape_and_type(tmp_path):
    """A Q4_0 tensor declared [256, 256] whose data holds half the rows: the next tensor starts
    before its bytes would end."""
    import gguf
    import numpy as np

    path = tmp_path / "s.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    half = np.zeros((128, 256 // 32 * 18), dtype=np.uint8)
    w.add_tensor("blk.0.ffn_up.weight", half, raw_shape=(256, 256 // 32 * 18), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((256, 256), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = load_error(path)
    assert "s.gguf" in msg and "blk.0.ffn_up.weight" in msg and "Q4_0" in msg and "(256, 256)" in msg
    assert "needs 36864 bytes" in msg and "next tensor" in msg


def test_truncated_pth(tmp_path):
    write_meta_checkpoint(tmp_path, {"dim": 32, "n_layers": 1, "n_heads": 4, "multiple_of": 16, "vocab_size": -1},
                          vocab=40, n_shards=2)
    truncate(tmp_path / "consolidated.01.pth")
    msg = load_error(tmp_path)
    assert "consolidated.01.pth" in msg


def test_shapes_disagree_with_config(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    msg = load_error(hf_dir)
    assert "model.safetensors" in msg and "mlp." in msg and "has shape" in msg and "40" in msg and "48" in msg


def test_missing_field(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    msg = load_error(hf_dir)
    assert "config.json" in msg and "num_hidden_layers" in msg


def test_unsupported_architecture_hf(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    msg = load_error(hf_dir)
    assert "config.json" in msg and "gpt2" in msg


def test_unsupported_architecture_gguf(tmp_path):
    msg = load_error(write_tiny_gguf(tmp_path / "g.gguf", arch="gpt2"))
    assert "g.gguf" in msg and "gpt2" in msg


@pytest.mark.parametrize("quantize", ["none", "auto"])
def test_unsupported_quantization_type(tmp_path, quantize):
    path = write_tiny_gguf(tmp_path / "q.gguf", types={"blk.0.ffn_up.weight": "Q8_K"})
    with pytest.raises(LlamitaError) as e:
        llamita.load_model(path, quantize=quantize)
    msg = str(e.value)
    assert "\n" not in msg and "q.gguf" in msg and "Q8_K" in msg and "ffn_up" in msg


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_2(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"junk")
    out = subprocess.run([sys.executable, "-m", "llamita", "info", str(tmp_path / "x.gguf")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "x.gguf" in out.stderr


# --- sizes a file states, checked before anything is allocated for them ---------------------------------------


def one_line_exit_2(run, *names: str) -> None:
    """A guarded CLI run that ended in llamita's one-line error, naming ``names``."""
    assert run.returncode == 2, f"exit {run.returncode} after {run.seconds:.0f} s, {run.peak_rss_mb:.0f} MB:\n" \
                                f"{run.output[-2000:]}"
    assert "Traceback" not in run.output and run.output.strip().count("\n") == 0
    assert run.last_line.startswith("llamita: error: ") and all(n in run.last_line for n in names)


@pytest.mark.slow
def test_gguf_array_longer_than_the_file(tmp_path):
    """126 bytes declaring a metadata array of 2^62 items: the gguf reader read it item by item, past the
    end of the file, growing past 4 GB in 35 s."""
    key = b"tokenizer.ggml.scores"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    data += struct.pack("<IIQ", 9, 0, 2**62)  # ARRAY of UINT8, 2^62 items
    path = tmp_path / "huge.gguf"
    path.write_bytes(data + bytes(126 - len(data)))
    run = run_guarded("-m", "llamita", "info", str(path), memory_mb=2048, timeout=60)
    one_line_exit_2(run, "huge.gguf", "array", str(2**62))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["info", "generate"])
def test_gguf_billion_layers(tmp_path, command):
    """block_count = 10^9 hung ``info`` and ``generate`` (a model of 10^9 layers built on the meta device)."""
    path = write_tiny_gguf(tmp_path / "deep.gguf", metadata={"block_count": 10**9})
    args = [str(path)] if command == "info" else ["--model", str(path), "hi"]
    run = run_guarded("-m", "llamita", command, *args, memory_mb=3072, timeout=90)
    one_line_exit_2(run, "deep.gguf", "llama.block_count", "1000000000")


@pytest.mark.slow
def test_context_of_a_billion_positions(tmp_path):
    """max_position_embeddings = 10^9 ran out of memory building the rotary table for the whole context."""
    path = tiny_base(tmp_path / "long")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 10**9}))
    run = run_guarded("-m", "llamita", "generate", "--model", str(path), "--temperature", "0", "--max-new-tokens", "4",
                      "gato", memory_mb=3072, timeout=120)
    assert run.returncode == 0, run.output[-2000:]
    assert run.peak_rss_mb < 1500


# --- malformed config values: one line naming the file and the field ---------------------------------------


def rewrite_json(path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("key, value, shown", [
    ("num_attention_heads", 0, "num_attention_heads"),
    ("num_attention_heads", "4", "num_attention_heads"),
    ("intermediate_size", -48, "intermediate_size"),
    ("num_hidden_layers", -2, "num_hidden_layers"),
    ("num_hidden_layers", 2.5, "num_hidden_layers"),
    ("intermediate_size", [48], "intermediate_size"),
    ("vocab_size", 0, "vocab_size"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps"),
    ("rope_theta", -1, "rope_theta"),
    ("max_position_embeddings", 0, "max_position_embeddings"),
    ("num_key_value_heads", 3, "n_kv_heads 3"),
    ("tie_word_embeddings", "no", "tie_word_embeddings"),
    ("rope_scaling", "linear", "rope_scaling"),
    ("rope_parameters", {"rope_theta": "big"}, "rope_theta"),
])
def test_malformed_hf_config(hf_dir, key, value, shown):
    """Values that fail fast without the checks too (huge sizes are tested under a cap, in subprocesses)."""
    rewrite_json(hf_dir / "config.json", **{key: value})
    msg = load_error(hf_dir)
    assert "config.json" in msg and shown in msg


def test_deeply_nested_json(hf_dir):
    (hf_dir / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    msg = load_error(hf_dir)
    assert "config.json" in msg and "nested" in msg


@pytest.mark.parametrize("key, value", [("n_heads", 0), ("dim", "32"), ("multiple_of", 0), ("n_layers", -1),
                                        ("ffn_dim_multiplier", "1.3"), ("norm_eps", -1), ("vocab_size", "x"),
                                        ("max_seq_len", "4096"), ("rope_theta", float("nan"))])
def test_malformed_params_json(tmp_path, key, value):
    write_meta_checkpoint(tmp_path, {"dim": 32, "n_layers": 1, "n_heads": 4, "multiple_of": 16, "vocab_size": -1},
                          vocab=40, n_shards=1)
    rewrite_json(tmp_path / "params.json", **{key: value})
    msg = load_error(tmp_path)
    assert "params.json" in msg and key in msg


@pytest.mark.parametrize("key, value", [("attention.head_count", 0), ("embedding_length", "256"),
                                        ("feed_forward_length", [512]), ("attention.layer_norm_rms_epsilon", "x"),
                                        ("block_count", 0), ("context_length", -1), ("rope.freq_base", "a")])
def test_malformed_gguf_metadata(tmp_path, key, value):
    msg = load_error(write_tiny_gguf(tmp_path / "m.gguf", metadata={key: value}))
    assert "m.gguf" in msg and f"llama.{key}" in msg


@pytest.mark.slow
def test_malformed_config_cli_exits_2(hf_dir):
    rewrite_json(hf_dir / "config.json", num_attention_heads="4")
    one_line_exit_2(run_guarded("-m", "llamita", "info", str(hf_dir), timeout=90), "config.json", "num_attention_heads")


# --- CLI flags: checked before the model loads, failing in one line ---------------------------------------


@pytest.mark.parametrize("argv, shown", [
    (["generate", "--device", "tpu"], "--device"),
    (["generate", "--device", "cuda:7"], "--device"),  # none on a CPU-only torch, fewer than 8 elsewhere
    (["generate", "--temperature", "-1"], "temperature"),
    (["generate", "--temperature", "nan"], "--temperature"),
    (["generate", "--seed", str(2**64)], "--seed"),
    (["generate", "--top-p", "0"], "top_p"),
    (["chat", "--repetition-penalty", "inf"], "--repetition-penalty"),
    (["finetune", "--data", "d.jsonl", "--out", "o", "--lr", "nan"], "--lr"),
])
def test_bad_flags_fail_before_loading(tmp_path, capsys, argv, shown):
    """The model named does not exist: a flag checked first is the error reported, not the missing model."""
    from llamita.cli import main

    model = ["--model", str(tmp_path / "absent-model")] if argv[0] != "finetune" else [str(tmp_path / "absent-model")]
    try:
        code = main([*argv, *model])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and shown in last and "absent-model" not in last


@pytest.mark.slow
def test_closed_stdout(tmp_path):
    """``llamita generate ... | head -c 10``: the reader gone, generation stops without a traceback."""
    path = tiny_base(tmp_path / "m")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([sys.executable, "-m", "llamita", "generate", "--model", str(path), "gato"],
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert out.returncode == 141 and "Traceback" not in out.stderr, out.stderr[-2000:]

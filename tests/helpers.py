"""Builders shared by the test modules: tiny checkpoints in each format, training data, the CLI, the server.

Test modules import these (``from helpers import ...``); conftest.py holds only fixtures, and no
test module imports another. Every builder is seeded: the same call writes the same bytes.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import torch

from llamita import assets

LLAMA_CPP = assets.Artifact(
    requirement="llama-cpp-python==0.3.36",
    sdist=True,
    members=(
        "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf",
        "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.inp",
        "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.out",
        "vendor/llama.cpp/examples/convert_legacy_llama.py",
        "vendor/llama.cpp/gguf-py/",
    ),
    strip="vendor/llama.cpp/",
)


def llama_cpp_path(relative: str):
    """A file from llama.cpp's sources (vocab test vectors, the legacy converter), fetched with the
    package's own artifact cache on first use."""
    return assets.fetch(LLAMA_CPP) / relative


# --- GGUF --------------------------------------------------------------------------------------------

# Types gguf.quants.quantize can write from real floats; the rest are filled with random block bytes.
QUANTIZABLE = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def write_tiny_gguf(path, types: dict[str, str] | None = None, arch: str = "llama", seed: int = 0,
                    valid_blocks: bool = False, layers: int = 1, dim: int = 256, hidden: int = 512,
                    metadata: dict[str, Any] | None = None):
    """A small llama GGUF written with the gguf package's own writer; ``types`` maps tensor names
    to a GGML type whose block bytes are filled at random (so every type can be stored).

    ``valid_blocks``: write blocks a real quantizer could have written, so every dequantized value
    is finite and of the float weights' size: the types in ``QUANTIZABLE`` quantize Gaussian floats
    with ``gguf.quants.quantize``; the k-quants (which it cannot write) get random codes under small
    finite float16 scales. The file then also records ``{arch}.vocab_size``, which transformers'
    GGUF loader needs when the file has no tokenizer. ``types`` names block 0's tensors ("blk.0.");
    with ``layers`` > 1 every block gets block 0's types. ``metadata`` replaces ``{arch}.*`` values (a
    key's own name after ``{arch}.``; None leaves the key out), of any GGUF type: a malformed file."""
    import gguf
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES

    rng = np.random.default_rng(seed)
    vocab, heads, kv = 64, 4, 2
    w = gguf.GGUFWriter(str(path), arch)
    fields: dict[str, Any] = {
        "block_count": layers, "context_length": 128, "embedding_length": dim, "feed_forward_length": hidden,
        "attention.head_count": heads, "attention.head_count_kv": kv, "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 10000.0, "vocab_size": vocab if valid_blocks else None, **(metadata or {}),
    }
    for key, value in fields.items():
        if value is not None:
            w.add_key_value(f"{arch}.{key}", value, *_gguf_type(value))
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (dim,), f"blk.{i}.ffn_norm.weight": (dim,),
            f"blk.{i}.attn_q.weight": (dim, dim), f"blk.{i}.attn_k.weight": (dim // heads * kv, dim),
            f"blk.{i}.attn_v.weight": (dim // heads * kv, dim), f"blk.{i}.attn_output.weight": (dim, dim),
            f"blk.{i}.ffn_gate.weight": (hidden, dim), f"blk.{i}.ffn_up.weight": (hidden, dim),
            f"blk.{i}.ffn_down.weight": (dim, hidden),
        })
    for name, shape in shapes.items():
        kind = (types or {}).get(re.sub(r"^blk\.\d+\.", "blk.0.", name), "F32")
        if kind == "F32":
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
            continue
        qtype = gguf.GGMLQuantizationType[kind]
        block, nbytes = GGML_QUANT_SIZES[qtype]
        if valid_blocks:
            raw = _valid_blocks(rng, qtype, shape)
        else:
            raw = rng.integers(0, 256, (shape[0], shape[-1] // block * nbytes), dtype=np.uint8)
            if kind in ("F16", "BF16"):  # plain floats: keep them finite
                raw = rng.standard_normal(shape).astype(np.float16).view(np.uint8) if kind == "F16" else \
                    (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(
                        np.uint8)
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_type(value: Any) -> tuple:
    """The GGUF value type (and an array's item type) ``write_tiny_gguf`` stores ``value`` as: uint32 and
    float32 as llama.cpp writes sizes and epsilons, int64 for what uint32 cannot hold."""
    from gguf import GGUFValueType as T

    if isinstance(value, list):
        return T.ARRAY, _gguf_type(value[0])[0]
    if isinstance(value, bool):
        return (T.BOOL,)
    if isinstance(value, int):
        return (T.UINT32,) if 0 <= value < 2**32 else (T.INT64,)
    return (T.FLOAT32,) if isinstance(value, float) else (T.STRING,)


def _valid_blocks(rng, qtype, shape):
    """Block bytes of ``qtype`` for a [rows, cols] tensor whose dequantized values are finite."""
    import gguf
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES

    if qtype.name in QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[-1] // block, nbytes), dtype=np.uint8)
    # Each k-quant block holds its float16 super-block scale d (and, for Q2_K, Q4_K and Q5_K, dmin
    # after it); random bytes there can be inf, NaN or huge: write small positive float16 values,
    # sized so the dequantized weights have a standard deviation near 1, like the float ones.
    n_scales = 2 if qtype.name in ("Q2_K", "Q4_K", "Q5_K") else 1
    size = {"Q2_K": 0.06, "Q3_K": 0.02, "Q4_K": 0.004, "Q5_K": 0.002, "Q6_K": 0.0006}[qtype.name]
    scales = rng.uniform(0.2 * size, 2 * size, (shape[0], shape[-1] // block, n_scales)).astype(np.float16)
    offset = {"Q2_K": nbytes - 4, "Q3_K": nbytes - 2, "Q4_K": 0, "Q5_K": 0, "Q6_K": nbytes - 2}[qtype.name]
    raw[..., offset:offset + 2 * n_scales] = scales.view(np.uint8)
    return raw.reshape(shape[0], -1)


# --- Hugging Face checkpoints --------------------------------------------------------------------------

CONFIGS = {
    "multi-head-untied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "rope-theta-1e5": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4, rope_theta=100000.0),
    "9q-3kv": dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                   rms_norm_eps=1e-5),
}


def tiny_hf(seed: int, **overrides):
    """A random transformers LlamaForCausalLM (3 layers, vocabulary 211 unless overridden)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=211, intermediate_size=88, num_hidden_layers=3, max_position_embeddings=64)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # HF's init leaves norms at 1: randomise them so a wrong norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def random_tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(seed))


# --- Meta's original checkpoints -----------------------------------------------------------------------

# Meta's model-parallel split rules: which dim each weight is cut along (None: replicated).
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "attention_norm": None, "ffn_norm": None}


def write_meta_checkpoint(directory, params: dict, vocab: int, n_shards: int, seed: int = 0) -> None:
    """A random checkpoint with Meta's tensor names, cut into ``n_shards`` as Meta's code cuts it."""
    import llamita

    g = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    kv_dim = dim // n_heads * params.get("n_kv_heads", n_heads)
    hidden = llamita.Config(dim=dim, n_heads=n_heads, multiple_of=params["multiple_of"],
                            ffn_dim_multiplier=params.get("ffn_dim_multiplier")).hidden_dim
    full = {"tok_embeddings.weight": (torch.randn(vocab, dim, generator=g), 1),
            "norm.weight": (torch.rand(dim, generator=g) + 0.5, None),
            "output.weight": (torch.randn(vocab, dim, generator=g) * 0.05, 0),
            "rope.freqs": (torch.rand(dim // n_heads // 2, generator=g), None)}
    shapes = {"wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim), "wo": (dim, dim),
              "w1": (hidden, dim), "w3": (hidden, dim), "w2": (dim, hidden)}
    for i in range(params["n_layers"]):
        for name, shape in shapes.items():
            part = "attention" if name.startswith("w") and name[1] in "qkvo" else "feed_forward"
            full[f"layers.{i}.{part}.{name}.weight"] = (torch.randn(*shape, generator=g) * 0.1, SPLIT[name])
        for name in ("attention_norm", "ffn_norm"):
            full[f"layers.{i}.{name}.weight"] = (torch.rand(dim, generator=g) + 0.5, None)
    for rank in range(n_shards):
        shard = {k: (t if d is None else t.chunk(n_shards, dim=d)[rank]).clone()
                 for k, (t, d) in full.items()}
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params))


# --- training --------------------------------------------------------------------------------------------

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ["gato", "casa", "pescado", "grande", "perro", "libro", "agua", "verde", "cat", "house", "fish", "big"]
FAST = dict(lr=1e-2, warmup=2, batch_size=4, lora_targets="all", progress=False)


def tiny_base(path: Path, seed: int = 0, **config) -> Path:
    """A random tiny Llama in HF's layout with a small byte-level BPE tokenizer and a chatml template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [" ".join(WORDS), "repite la palabra: below is an instruction response"] * 10
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    cfg = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, initializer_range=0.1)
    tiny_hf(seed, **{**cfg, **config}).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": CHATML}))
    return path


def alpaca_records(n: int = 12) -> list[dict]:
    return [{"instruction": f"repite {w}", "input": "", "output": f"{w} {w} {w}"} for w in (WORDS * 3)[:n]]


def write_data(path: Path, n: int = 12) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records(n)))
    return path


def run_in_process_like(args: list[str], out: Path) -> None:
    """``args`` (``python -m llamita ...``, as the subprocesses run under OMP_NUM_THREADS=1) run in this
    process on one thread, so that its numbers are the subprocesses' bit for bit, without a start."""
    from llamita import cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([*args[3:], "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)


def kill_at_first_checkpoint(args: list[str], out: Path, env: dict, step: int = 5) -> None:
    """Start a training run (``args`` + ``--out out``) and SIGKILL it once its step-``step`` checkpoint is
    on disk, before it ends."""
    proc = subprocess.Popen(args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = out / "checkpoints" / f"step-{step}"
        deadline = time.monotonic() + 120
        while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)  # polling a file the other process writes; nothing waits on time itself
        assert first.is_dir() and proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def two_processes_and_one(common: list[str], out: Path, env: dict) -> tuple[list[float], list[float]]:
    """The same run (``common``: a llamita command and its options) by 2 processes under torchrun with
    --batch-size 2 each (into out/ddp), and by one with --batch-size 4 (out/one): their losses."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "llamita", *common, "--batch-size", "2", "--out", str(out / "ddp")],
                   env=env, check=True, capture_output=True)
    from llamita import cli

    assert cli.main([*common, "--batch-size", "4", "--out", str(out / "one")]) == 0
    return losses(out / "ddp"), losses(out / "one")


def losses(out: Path) -> list[float]:
    """The train loss of each step, from a run's metrics.jsonl."""
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# --- the CLI ---------------------------------------------------------------------------------------------


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamita", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


@dataclass
class Guarded:
    """How a guarded run ended: ``returncode`` None when it was killed at its time limit."""

    returncode: int | None
    peak_rss_mb: float
    seconds: float
    output: str  # stdout and stderr together, as written

    @property
    def last_line(self) -> str:
        lines = self.output.strip().splitlines()
        return lines[-1] if lines else ""


def run_guarded(*args: str, memory_mb: int = 3072, timeout: float = 120, stdin: str | None = None) -> Guarded:
    """``python *args`` (``-m llamita ...``) with its address space capped at ``memory_mb`` and its wall time
    at ``timeout``: a regression that loops or allocates without bound then fails its test, rather than
    growing until it takes the machine."""
    cap = memory_mb * 2**20

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            proc.stdin.write((stdin or "").encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        code, peak = _wait_until(proc, start + timeout)
        out.seek(0)
        output = out.read().decode("utf-8", "replace")
    return Guarded(code, peak / 1024, time.monotonic() - start, output)


def _wait_until(proc: subprocess.Popen, deadline: float) -> tuple[int | None, int]:
    """The process's exit code (None: killed at ``deadline``) and its peak resident memory in KiB,
    read from its VmHWM while it runs. (Its rusage would not do: the kernel keeps the memory of
    the forking process, here all of pytest's, as the child's peak across exec.)"""
    peak = 0
    while True:
        peak = max(peak, _high_water_kib(proc.pid))
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = code = os.waitstatus_to_exitcode(status)
            return code, peak
        if time.monotonic() > deadline:
            proc.kill()
            _, status, _ = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return None, peak
        time.sleep(0.02)


def _high_water_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


# --- generative evaluations ------------------------------------------------------------------------------


class ScriptedLLM:
    """Stands in for ``LLM`` in ``eval qa`` / ``eval lang``: each reply is ``reply(last user message)``,
    and every ``chat_batch`` call's size and sampling options are recorded; a token is a word."""

    template = "chatml"

    def __init__(self, reply):
        from types import SimpleNamespace

        self.reply, self.calls = reply, []
        self.tokenizer = SimpleNamespace(encode=lambda text, **_: text.split())

    def chat_batch(self, conversations, **sampling):
        self.calls.append((len(conversations), sampling))
        return [self.reply(c[-1]["content"]) for c in conversations]


# --- the server ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(condition: Callable[[], bool], what: str, tries: int = 600, every: float = 0.1) -> None:
    """Bounded polling (at most tries * every seconds), failing with ``what``."""
    for _ in range(tries):
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def running_server(*options: str, tp: int = 1) -> Iterator[str]:
    """``llamita serve`` on a free loopback port (under torchrun with ``--tp`` when ``tp`` > 1); its base
    URL once /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    launch = [sys.executable, "-m"]
    if tp > 1:
        launch += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(tp), "-m"]
        options += ("--tp", str(tp))
    with tempfile.TemporaryFile("w+") as log:
        # float32 weights (--quantize none), as the in-process default_llm the replies are compared with
        proc = subprocess.Popen([*launch, "llamita", "serve", "--port", str(port), "--quantize", "none", *options],
                                stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{_read(log)}"
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        try:
            poll(ready, "the server's /health", tries=1200)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _read(log) -> str:
    log.seek(0)
    return log.read()[-4000:]


def chat_reference(hf_tok, messages: list[dict], content: str, add_generation_prompt: bool = True) -> list[int]:
    """transformers' ids for ``messages`` with ``content`` (text that occurs once in the rendered prompt)
    tokenized as plain text: apply_chat_template's text cut around ``content``, the rest tokenized as
    transformers tokenizes it, ``content`` with ``split_special_tokens``. Right wherever the cuts fall
    on token boundaries (e.g. after a newline and before a special token, for byte-level BPE)."""
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text.count(content) == 1, text
    head, tail = text.split(content)
    return (hf_tok.encode(head, add_special_tokens=False)
            + hf_tok.encode(content, add_special_tokens=False, split_special_tokens=True)
            + hf_tok.encode(tail, add_special_tokens=False))


# --- text ---------------------------------------------------------------------------------------------

_WORDS = ("el la los las de del que y en un una por con para como más pero sus le ya o este sí porque esta "
          "entre cuando muy sin sobre también me hasta hay donde quien desde todo nos durante todos uno les "
          "caballero hidalgo señora escudero molino camino aldea lanza rocín galgo año mañana corazón niño "
          "ñandú pequeño compañía razón jardín canción montaña árbol pájaro música último después según aquí "
          "allí así había tenía decía respondió preguntó vuestra merced Sancho Quijote Dulcinea Toboso Mancha")
_SYLLABLES = ("ba be bi bo bu ca co cu da de di do du fa fe fi fo ga go gu la le li lo lu ma me mi mo mu na ne ni "
              "no nu pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va ve vi vo za zo "
              "ción sión ñá ñe ño llá lle llo rrá rre rro chá che cho güe qui que gué tá té tí tó tú")


def spanish_text(n_bytes: int, seed: int = 0) -> str:
    """Spanish-looking prose of about ``n_bytes`` UTF-8 bytes (real words and made-up ones from Spanish
    syllables, accents and ñ, years, ¿?¡!«» and line ends), the same for the same seed: a corpus for
    training tokenizers and models in tests without shipping data."""
    rng = random.Random(seed)
    words, syllables = _WORDS.split(), _SYLLABLES.split()
    lines: list[str] = []
    size = 0
    while size < n_bytes:
        sentence = []
        for _ in range(rng.randint(4, 16)):
            if rng.random() < 0.6:
                sentence.append(rng.choice(words))
            else:
                sentence.append("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
        if rng.random() < 0.1:
            sentence.insert(rng.randrange(len(sentence)), str(rng.randint(1500, 1700)))
        text = " ".join(sentence)
        text = text[0].upper() + text[1:]
        opener, closer = rng.choice([("", "."), ("", "."), ("¿", "?"), ("¡", "!"), ("«", "»."), ("", ", dijo.")])
        line = opener + text + closer
        lines.append(line)
        size += len(line.encode()) + 1
    return "\n".join(lines) + "\n"

"""Check and benchmark llamita on a lent GPU in one run of under ten minutes (docs/gpu.md).

    python scripts/gpu_check.py --prepare                    # here (the registry reachable): the wheels
                                                             # the GPU machine's image lacks -> .gpu/wheels
    python scripts/gpu_check.py --dry-run --out out/gpu      # here, on CPU: every step on a tiny model
    python3 scripts/gpu_check.py --out "$OUT"                # there: the device tool with carry [".gpu"]

The lent machine reaches no package index and its image has torch 2.11, transformers and peft but not
gguf, fastapi, uvicorn or llguidance: ``--prepare`` downloads those (the versions installed here, for
CPython 3.12 on manylinux x86-64) into ``.gpu/wheels``, an ignored folder that travels with the run,
and the ``install`` step installs them from there without an index. Then each step runs in a child
process under its own time limit (``STEPS``; a step that hangs or dies costs only itself) and writes
``STEP.json`` as it goes, so a step cut short keeps what it measured; ``results.json`` and
``summary.md`` gather them:

- ``tests``: ``pytest -m cuda`` (tests/test_cuda.py and the other CUDA-marked tests);
- ``decode``: a Llama-2-7B-shaped model with random weights made on the GPU (no download), bfloat16:
  decode tokens/s at batch 1 (eager), a 2,048-token prefill, int4 (tinygemm) decode, and the
  bandwidth limit they imply (weight bytes read per token against the measured device-to-device
  copy rate);
- ``compile``: the same model's decoding compiled, replayed as CUDA graphs (a step of its own: a
  cold compilation of 7B takes a minute or two);
- ``train``: LoRA (all projections, r 16) on the same shape, batch 4 x 1,024 tokens, bfloat16,
  activations recomputed: tokens/s and peak memory; then QLoRA (NF4 base) likewise;
- ``serve``: the server's engine (continuous batching) on the same shape, 1, 16 and 64 concurrent
  requests: generated tokens/s.

``--dry-run`` runs the same steps on a tiny model on the CPU (CI runs it: tests/test_gpu_check.py),
so the script cannot rot while no GPU is lent.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu" / "wheels"
# Packages llamita needs that the image lacks (device/KINDS.md); pip adds what they need in turn.
MISSING_THERE = ("gguf", "fastapi", "uvicorn", "py3langid", "llguidance")
STEPS = {"install": 30, "tests": 120, "decode": 75, "compile": 120, "train": 75, "serve": 60}  # seconds: 480 in all
# (dim, layers, heads, vocab, ffn) of the full run and of the dry run.
SHAPES = {"7b": (4096, 32, 32, 32000, 11008), "tiny": (128, 2, 4, 512, 256)}


# --- preparation (here) -----------------------------------------------------------------------------------

def prepare() -> None:
    """Download the wheels the GPU image lacks, pinned to the versions installed here."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in MISSING_THERE]
    WHEELS.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform=manylinux_2_{minor}_x86_64" for minor in (35, 34, 31, 28, 17)]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--implementation=cp",
                           "--python-version=3.12", *platforms, "--platform=any", "-d", str(WHEELS), *pins])
    if done.returncode:
        raise SystemExit(f"gpu_check --prepare: pip download failed (exit {done.returncode}; the registry "
                         "unreachable?): see pip's message above")
    for wheel in WHEELS.glob("numpy-*.whl"):  # the image has numpy 2.5 (16 MB less to carry)
        wheel.unlink()
    size = sum(f.stat().st_size for f in WHEELS.iterdir()) / 2**20
    print(f"{len(list(WHEELS.iterdir()))} wheels, {size:.1f} MiB in {WHEELS}; carry \".gpu\" with the run")


# --- the steps (each in a child process) ------------------------------------------------------------------

class Record:
    """A step's results, written to ``OUT/STEP.json`` after every measurement."""

    def __init__(self, out: Path, step: str):
        self.file, self.data = out / f"{step}.json", {"step": step, "status": "running"}
        self.save()

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        from llamita.files import atomic_write

        text = json.dumps(self.data, indent=2) + "\n"
        atomic_write(self.file, lambda tmp: tmp.write_text(text))


def device_and_dtype(dry: bool):
    import torch

    return (torch.device("cpu"), torch.float32) if dry else (torch.device("cuda"), torch.bfloat16)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def random_model(dry: bool, max_seq_len: int = 4096):
    """A Llama-2-7B-shaped model (tiny for a dry run) with random weights, made where it runs."""
    import torch

    from llamita.config import Config
    from llamita.model import Llama
    from llamita.pretraining import init_weights

    dim, layers, heads, vocab, ffn = SHAPES["tiny" if dry else "7b"]
    device, dtype = device_and_dtype(dry)
    with torch.device("meta"):
        model = Llama(Config(dim=dim, n_layers=layers, n_heads=heads, vocab_size=vocab, hidden_dim=ffn,
                             max_seq_len=max_seq_len)).to(dtype)
    model.to_empty(device=device)  # made in its dtype where it runs: no float32 copy first
    init_weights(model)
    return model.eval().requires_grad_(False)


def weight_bytes(model) -> int:
    """Bytes a decoding step reads: every layer's weights (on CUDA, an int4 layer's tinygemm packing,
    which is all it reads; an int4 output layer's screen and shortlisted rows), but the embedding's (one
    row is looked up)."""
    from llamita.quantize import QuantLinear, ScreenedLMHead

    total = 0
    for name, module in model.named_modules():
        if name.startswith("embed_tokens"):
            continue
        if isinstance(module, QuantLinear) and module.tinygemm:
            tensors = [module.weight, module.scales_and_zeros]
        elif isinstance(module, ScreenedLMHead):  # its screen counts as a layer; of the 16-bit rows, the shortlist
            tensors = [module.weight[: module.shortlist]]
        else:
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def copy_bandwidth(device) -> float:
    """Bytes read and written per second by a device-to-device copy of 2 GiB (1 MiB on CPU)."""
    import torch

    n = 2**20 if device.type == "cpu" else 2**31
    a, b = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    for _ in range(3):
        b.copy_(a)
    seconds = min(timed(lambda: b.copy_(a), device) for _ in range(10))
    return 2 * n / seconds


def decode_rate(model, forward, device, prompt: int, new: int) -> float:
    """Greedy tokens/s at batch 1 after a ``prompt``-token prefill, as ``generate`` decodes."""
    import torch

    from llamita.cache import KVCache
    from llamita.generate import cache_size_for, decode_step

    vocab, max_seq_len = model.config.vocab_size, model.config.max_seq_len
    cache = KVCache(model, 1, cache_size_for(prompt + new + 8, max_seq_len, compiled=forward is not None))
    with torch.inference_mode():
        positions = torch.arange(prompt, device=device)
        ids = torch.randint(0, vocab, (1, prompt), device=device)
        token = int(model(ids, positions, kv=cache.sequence_step(positions, prompt))[0, -1].argmax())
        position = prompt

        def run(steps: int) -> None:
            nonlocal token, position
            for _ in range(steps):
                token = int(decode_step(model, cache, [token], [position], forward)[0].argmax())
                position += 1

        run(8)  # warm-up (and, compiled, the capture of the graph)
        return new / timed(lambda: run(new), device)


def model_and_limit(dry: bool, r: Record):
    """The bfloat16 model, the copy rate, and the decode rate that rate allows it (recorded in ``r``)."""
    model = random_model(dry)
    bandwidth, r["weight_bytes"] = copy_bandwidth(model.norm.weight.device), weight_bytes(model)
    r["bandwidth_GBps"] = round(bandwidth / 1e9, 1)
    limit = bandwidth / r.data["weight_bytes"]
    r["bf16_limit_tok_s"] = round(limit, 1)
    return model, bandwidth, limit


def step_decode(out: Path, dry: bool) -> None:
    import torch

    from llamita.quantize import quantize

    r = Record(out, "decode")
    device, _ = device_and_dtype(dry)
    prompt, new, long_prompt = (16, 8, 64) if dry else (128, 128, 2048)
    model, bandwidth, limit = model_and_limit(dry, r)
    r["parameters"] = sum(p.numel() for p in model.parameters())
    rate = decode_rate(model, None, device, prompt, new)
    r["bf16_eager_tok_s"] = round(rate, 1)
    r["bf16_eager_share_of_limit"] = round(rate / limit, 3)
    with torch.inference_mode():
        ids = torch.randint(0, model.config.vocab_size, (1, long_prompt), device=device)
        model(ids)  # warm-up
        r["prefill_tokens"] = long_prompt
        last = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        last[0, -1] = True  # as a prompt runs: logits at its end only
        r["prefill_tok_s"] = round(long_prompt / timed(lambda: model(ids, logits_at=last), device), 1)
    quantize(model, "int4")
    gc.collect()
    r["int4_weight_bytes"] = weight_bytes(model)
    int4_limit = bandwidth / r.data["int4_weight_bytes"]
    r["int4_limit_tok_s"] = round(int4_limit, 1)
    rate = decode_rate(model, None, device, prompt, new)
    r["int4_eager_tok_s"] = round(rate, 1)
    r["int4_eager_share_of_limit"] = round(rate / int4_limit, 3)
    r["status"] = "ok"


def step_compile(out: Path, dry: bool) -> None:
    from llamita.generate import compile_decoding

    r = Record(out, "compile")
    device, _ = device_and_dtype(dry)
    prompt, new = (16, 8) if dry else (128, 128)
    model, _, limit = model_and_limit(dry, r)
    start = time.perf_counter()
    rate = decode_rate(model, compile_decoding(model), device, prompt, new)
    r["compile_s"] = round(time.perf_counter() - start - new / rate, 1)
    r["bf16_compiled_tok_s"] = round(rate, 1)
    r["bf16_compiled_share_of_limit"] = round(rate / limit, 3)
    r["status"] = "ok"


def train_rate(model, dry: bool, record: Record, name: str) -> None:
    """LoRA on every projection (r 16, no dropout), activations recomputed, bfloat16 autocast on CUDA:
    tokens/s over the timed steps and peak memory."""
    import torch

    from llamita.lora import LoRAConfig, apply_lora
    from llamita.train import checkpoint_blocks, loss_sum

    device, dtype = device_and_dtype(dry)
    batch, seq, warm, steps = (2, 32, 1, 2) if dry else (4, 1024, 2, 4)
    apply_lora(model, LoRAConfig(r=16, alpha=16, dropout=0.0, targets="all"))
    checkpoint_blocks(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    data = {"ids": ids, "labels": ids}
    amp = dtype if device.type == "cuda" else None

    def step() -> None:
        loss = loss_sum(model, data, device, amp) / (batch * (seq - 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record[f"{name}_loss"] = round(loss.item(), 4)

    if device.type == "cuda":  # the peak of training, not of building the model
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warm):
        step()
    seconds = timed(lambda: [step() for _ in range(steps)], device)
    record[f"{name}_tok_s"] = round(batch * seq * steps / seconds, 1)
    if device.type == "cuda":
        record[f"{name}_peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)


def step_train(out: Path, dry: bool) -> None:
    import torch

    from llamita.nf4 import quantize_nf4

    def free_memory() -> None:  # the last model's, and the float weights NF4 replaced
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    r = Record(out, "train")
    r["batch"] = "2 x 32" if dry else "4 x 1024"
    train_rate(random_model(dry), dry, r, "lora")
    free_memory()
    model = quantize_nf4(random_model(dry))
    free_memory()
    train_rate(model, dry, r, "qlora")
    r["status"] = "ok"


def synthetic_tokenizer(vocab: int, folder: Path):
    """A word-level tokenizer of ``vocab`` pieces ("t0 t1 ..."): the engine decodes what it generates."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llamita.tokenizer import load_tokenizer

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t1", "eos_token": "t2"}))
    return load_tokenizer(folder)


async def serve_rate(engine, tokenizer, clients: int, prompt: int, new: int) -> tuple[float, float]:
    """Generated tokens/s and median time to first token with ``clients`` requests at once."""
    import random

    from llamita.generate import Request
    from llamita.sampling import SamplingParams

    rng = random.Random(clients)
    requests = [Request([rng.randrange(3, tokenizer.vocab_size) for _ in range(prompt)],
                        SamplingParams(max_new_tokens=new, temperature=0), frozenset(), tokenizer)
                for _ in range(clients)]
    start = time.perf_counter()
    firsts: list[float] = []

    async def consume(stream) -> None:
        first = None
        async for _ in stream.events():
            first = first or time.perf_counter() - start
        firsts.append(first)

    await asyncio.gather(*(consume(engine.submit([r])) for r in requests))
    seconds = time.perf_counter() - start
    return sum(len(r.output_ids) for r in requests) / seconds, sorted(firsts)[len(firsts) // 2]


def step_serve(out: Path, dry: bool) -> None:
    from llamita.serve.engine import Engine, EngineConfig

    r = Record(out, "serve")
    model = random_model(dry, max_seq_len=1024)
    tokenizer = synthetic_tokenizer(model.config.vocab_size, out / "tokenizer")
    levels, prompt, new = ((1, 4, 8), 16, 8) if dry else ((1, 16, 64), 128, 128)
    engine = Engine(model, EngineConfig(max_batch=max(levels), max_queue=2 * max(levels), max_seq_len=prompt + new + 8,
                                        max_prefill_tokens=4096))
    engine.start()
    try:
        asyncio.run(serve_rate(engine, tokenizer, 1, prompt, 4))  # warm-up
        for clients in levels:
            rate, ttft = asyncio.run(serve_rate(engine, tokenizer, clients, prompt, new))
            r[f"clients_{clients}"] = {"tok_s": round(rate, 1), "median_ttft_s": round(ttft, 3)}
    finally:
        engine.stop()
    r["prompt_tokens"], r["new_tokens"] = prompt, new
    r["status"] = "ok"


def cuda_test_files() -> list[str]:
    """The test modules with CUDA-marked tests: the others import packages the GPU image lacks (trl,
    lm_eval, openai, selenium), and pytest imports every module it is given before selecting."""
    return [str(f) for f in sorted((ROOT / "tests").glob("test_*.py")) if "pytest.mark.cuda" in f.read_text()]


def step_tests(out: Path, dry: bool) -> None:
    import importlib.util
    import re
    import signal

    r = Record(out, "tests")
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               "-rfEs", *cuda_test_files()]
    if importlib.util.find_spec("pytest_timeout"):  # the image has it: a hung test fails alone
        command.append("--timeout=60")
    # A session of its own: on timeout the whole group (a test's server too) is killed, not just pytest.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=STEPS["tests"] - 10)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, code = proc.communicate()[0], None
    (out / "tests.log").write_text(log)
    last = log.strip().splitlines()[-1] if log.strip() else ""
    r["counts"] = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", last)}
    r["failures"] = [line for line in log.splitlines() if line.startswith(("FAILED", "ERROR"))]
    r["status"] = "ok" if code == 0 else "pytest cut at its limit" if code is None else f"pytest exited with {code}"


def step_install(out: Path, dry: bool) -> None:
    r = Record(out, "install")
    if dry:
        r["status"] = "ok"
        r["note"] = "dry run: nothing installed"
        return
    if not WHEELS.is_dir():
        raise SystemExit(f"{WHEELS} is missing: run `python scripts/gpu_check.py --prepare` here and carry .gpu")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS),
                           *MISSING_THERE], capture_output=True, text=True)
    r["pip"] = (done.stdout + done.stderr)[-2000:]
    r["status"] = "ok" if done.returncode == 0 else f"pip exited with {done.returncode}"


STEP_FUNCTIONS = {"install": step_install, "tests": step_tests, "decode": step_decode, "compile": step_compile,
                  "train": step_train, "serve": step_serve}


# --- the run ------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def machine() -> dict:
    import torch

    facts = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts |= {"gpu": props.name, "gpu_memory_GB": round(props.total_memory / 1e9, 1), "cuda": torch.version.cuda}
    return facts


def summary(results: dict) -> str:
    where = ("dry run, " if results["dry_run"] else "") + results["machine"].get("gpu", "CPU")
    lines = [f"# llamita GPU check ({where})", "", "```", json.dumps(results["machine"]), "```", "",
             "| step | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {name} | {s['status']} | {s['seconds']} |" for name, s in results["steps"].items()]
    for name, s in results["steps"].items():
        shown = {k: v for k, v in s.items() if k not in ("step", "status", "seconds", "pip")}
        if shown:
            lines += ["", f"## {name}", "", "```", json.dumps(shown, indent=1), "```"]
    return "\n".join(lines) + "\n"


def run_all(out: Path, dry: bool, steps: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    results = {"dry_run": dry, "steps": {}}
    for name in steps:
        start = time.perf_counter()
        command = [sys.executable, __file__, "--step", name, "--out", str(out)] + (["--dry-run"] if dry else [])
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=STEPS[name])
            ended = None if done.returncode == 0 else f"exited with {done.returncode}: {done.stderr.strip()[-800:]}"
            (out / f"{name}.log").write_text(done.stdout + done.stderr)
        except subprocess.TimeoutExpired:
            ended = f"cut at its limit of {STEPS[name]} s"
        file = out / f"{name}.json"
        step = json.loads(file.read_text()) if file.exists() else {"step": name}
        if ended:
            step["status"] = ended
        step["seconds"] = round(time.perf_counter() - start, 1)
        results["steps"][name] = step
        print(f"{name}: {step['status']} ({step['seconds']} s)", flush=True)
    results["machine"] = machine()
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(summary(results))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu")))
    p.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU: checks the script itself")
    p.add_argument("--prepare", action="store_true", help="download the wheels the GPU image lacks (here)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"a comma-separated subset of {', '.join(STEPS)}")
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one step, in the child process
    args = p.parse_args()
    if args.prepare:
        return prepare()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step:  # llamita importable through run_all's PYTHONPATH
        return STEP_FUNCTIONS[args.step](args.out, args.dry_run)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := [s for s in steps if s not in STEPS]:
        p.error(f"--steps: unknown {unknown[0]!r} (known: {', '.join(STEPS)})")
    results = run_all(args.out, args.dry_run, steps)
    sys.exit(0 if all(s["status"] == "ok" for s in results["steps"].values()) else 1)


if __name__ == "__main__":
    main()

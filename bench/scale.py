"""Llama 2 7B at full size on this machine: llamita against llama.cpp on one Q4_K_M-shaped GGUF file.

    python bench/scale.py                             # 7B (written once, about 4 GB), both engines, 2 threads
    python bench/scale.py --size 13b
    python bench/scale.py --size tiny                 # dim 512, 2 layers: checks the script in a minute
    python bench/scale.py --layers 4 --engines llamita

The file has Llama 2's shapes, its tokenizer (llama.cpp's Llama 2 vocabulary file, fetched with
llamita's artifact cache like the tests' own) and llama.cpp's Q4_K_M tensor types, with random
block bytes under small scales (weights of standard deviation about 0.02): the gguf package cannot
quantize to k-quants, and speed and memory do not depend on the values. It is written once into
``--cache-dir`` and reused.

Each engine runs in a child process of its own, so that its peak resident memory (VmHWM: every
page it touched, the memory-mapped file's included) is its own: load, then an untimed warm-up
(a short prompt and a few steps), then a ``--prompt-tokens`` prompt of random token ids in one
forward pass (prefill), then ``--new-tokens`` greedy decoding steps, one token each. llama.cpp
runs through llama-cpp-python, when this Python (or ``--llama-cpp-python``) has it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # layers, dim, ffn, heads (as many kv heads)
    "7b": (32, 4096, 11008, 32),
    "13b": (40, 5120, 13824, 40),
    "tiny": (2, 512, 1536, 8),
}
VOCAB = 32000
FILE_VERSION = 1  # bump when the written file changes, so an old cached one is not reused
# Per block: float16 scales drawn from [low, high] (normal float16 numbers, no subnormals), with the
# random 6-bit (Q4_K) or int8 (Q6_K) sub-scales, give weights of standard deviation near 0.02.
Q4_K_D = (6.5e-5, 1.0e-4)  # d; dmin = 7.5 d centres the 4-bit codes (0..15) on zero
Q6_K_D = (6.5e-5, 1.0e-4)  # d; the 16 int8 sub-scales drawn from 4..24
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15


# --- the file ------------------------------------------------------------------------------------------

def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v and ffn_down get Q6_K in Q4_K_M (llama-quant.cpp)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_plan(layers: int, dim: int, ffn: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, [rows, cols] as torch orders them, GGML type) of every tensor, in file order."""
    plan = [("token_embd.weight", (VOCAB, dim), "Q4_K")]
    for i in range(layers):
        more = "Q6_K" if use_more_bits(i, layers) else "Q4_K"
        plan += [(f"blk.{i}.attn_norm.weight", (dim,), "F32"),
                 (f"blk.{i}.attn_q.weight", (dim, dim), "Q4_K"),
                 (f"blk.{i}.attn_k.weight", (dim, dim), "Q4_K"),
                 (f"blk.{i}.attn_v.weight", (dim, dim), more),
                 (f"blk.{i}.attn_output.weight", (dim, dim), "Q4_K"),
                 (f"blk.{i}.ffn_norm.weight", (dim,), "F32"),
                 (f"blk.{i}.ffn_gate.weight", (ffn, dim), "Q4_K"),
                 (f"blk.{i}.ffn_up.weight", (ffn, dim), "Q4_K"),
                 (f"blk.{i}.ffn_down.weight", (dim, ffn), more)]
    return plan + [("output_norm.weight", (dim,), "F32"), ("output.weight", (VOCAB, dim), "Q6_K")]


def random_blocks(rng, kind: str, rows: int, cols: int):
    """[rows, bytes per row] of ``kind`` blocks: random codes under small, sane float16 scales."""
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    n = cols // block
    raw = np.frombuffer(rng.bytes(rows * n * size), dtype=np.uint8).reshape(rows, n, size).copy()
    if kind == "Q4_K":  # f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        d = rng.uniform(*Q4_K_D, (rows, n, 1))
        raw[..., 0:2] = d.astype(np.float16).view(np.uint8)
        raw[..., 2:4] = (7.5 * d).astype(np.float16).view(np.uint8)
    else:  # Q6_K: 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, f16 d
        raw[..., 192:208] = rng.integers(4, 25, (rows, n, 16), dtype=np.int8).view(np.uint8)
        raw[..., 208:210] = rng.uniform(*Q6_K_D, (rows, n, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, n * size)


def vocab_fields() -> tuple[dict, str]:
    """The Llama 2 tokenizer's GGUF fields ({key: (value, type, sub type)}) from llama.cpp's vocab
    file, fetched once with the tests' artifact (llamita.assets); failing that, a synthetic
    sentencepiece-style vocabulary of the same size. And where they came from."""
    import gguf

    try:
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from helpers import llama_cpp_path

        reader = gguf.GGUFReader(llama_cpp_path("models/ggml-vocab-llama-spm.gguf"))
        fields = {k: (f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
                  for k, f in reader.fields.items() if k.startswith("tokenizer.")}
        if len(fields["tokenizer.ggml.tokens"][0]) == VOCAB:
            return fields, "llama.cpp's ggml-vocab-llama-spm.gguf"
    except Exception as e:  # no index to fetch from, a changed file: the tokens' text does not matter here
        print(f"llama.cpp's vocab file unavailable ({type(e).__name__}: {e}); synthesizing one", file=sys.stderr)
    T = gguf.GGUFValueType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581tok{i}" for i in range(VOCAB - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259)  # unknown, control, byte, normal
    scores = [0.0] * 259 + [-float(i) for i in range(VOCAB - 259)]
    return {"tokenizer.ggml.model": ("llama", T.STRING, None),
            "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
            "tokenizer.ggml.scores": (scores, T.ARRAY, T.FLOAT32),
            "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
            "tokenizer.ggml.bos_token_id": (1, T.UINT32, None),
            "tokenizer.ggml.eos_token_id": (2, T.UINT32, None),
            "tokenizer.ggml.unknown_token_id": (0, T.UINT32, None),
            "tokenizer.ggml.add_bos_token": (True, T.BOOL, None),
            "tokenizer.ggml.add_eos_token": (False, T.BOOL, None)}, "synthetic (llama.cpp's vocab file unavailable)"


def write_model(path: Path, layers: int, dim: int, ffn: int, heads: int, seed: int = 0) -> str:
    """Write the file tensor by tensor (never more than one tensor in memory) under a temporary
    name, renamed into place at the end; returns where the vocabulary came from."""
    import gguf
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES

    Q = gguf.GGMLQuantizationType
    plan = tensor_plan(layers, dim, ffn)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(path.stem)
    w.add_uint32("llama.context_length", 4096)
    w.add_uint32("llama.embedding_length", dim)
    w.add_uint32("llama.block_count", layers)
    w.add_uint32("llama.feed_forward_length", ffn)
    w.add_uint32("llama.rope.dimension_count", dim // heads)
    w.add_uint32("llama.attention.head_count", heads)
    w.add_uint32("llama.attention.head_count_kv", heads)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_uint32("llama.vocab_size", VOCAB)
    w.add_uint32("general.file_type", LLAMA_FTYPE_MOSTLY_Q4_K_M)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    fields, vocab_source = vocab_fields()
    for key, (value, vtype, sub_type) in fields.items():
        w.add_key_value(key, value, vtype, sub_type)
    for name, shape, kind in plan:
        if kind == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            block, size = GGML_QUANT_SIZES[Q[kind]]
            w.add_tensor_info(name, (shape[0], shape[1] // block * size), np.dtype(np.uint8),
                              shape[0] * shape[1] // block * size, raw_dtype=Q[kind])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for i, (_, shape, kind) in enumerate(plan):
            print(f"\rwriting {path.name}: tensor {i + 1}/{len(plan)}", end="", file=sys.stderr, flush=True)
            w.write_tensor_data(np.ones(shape, np.float32) if kind == "F32" else random_blocks(rng, kind, *shape))
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    print(file=sys.stderr)
    return vocab_source


# --- the measures, one child process per engine ----------------------------------------------------------

def rss(key: str = "VmHWM") -> int:
    """This process's peak (VmHWM) or current (VmRSS) resident memory, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    import random

    rng = random.Random(seed)
    return [1] + [rng.randrange(259, VOCAB) for _ in range(n - 1)]  # <s>, then ordinary pieces


def child_llamita(path: str, threads: int, prompt_tokens: int, new_tokens: int) -> dict:
    import torch

    from llamita.cache import KVCache
    from llamita.generate import decode_step, prefill
    from llamita.llm import LLM

    torch.set_num_threads(threads)
    before = rss("VmRSS")
    t = time.perf_counter()
    llm = LLM.load(path)  # quantize="auto": the file's Q4_K / Q6_K tensors stay quantized
    load_s, load_peak = time.perf_counter() - t, rss()
    model = llm.model

    def run(prompt: list[int], steps: int) -> tuple[float, float, bool]:
        cache = KVCache(model, 1, len(prompt) + steps)
        t = time.perf_counter()
        logits = prefill(model, cache, [llm.request(prompt, temperature=0)])[0]
        t1 = time.perf_counter()
        for i in range(steps):
            logits = decode_step(model, cache, [int(logits.argmax())], [len(prompt) + i])[0]
        return t1 - t, time.perf_counter() - t1, bool(torch.isfinite(logits).all())

    with torch.inference_mode():
        run(prompt_ids(16), 4)  # warm-up: kernels loaded, allocator primed
        prefill_s, decode_s, finite = run(prompt_ids(prompt_tokens), new_tokens)
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    note = f"{', '.join(kinds)}; activations {model.norm.weight.dtype}".replace("torch.", "")
    return {"version": f"llamita, torch {torch.__version__}", "load_s": load_s, "rss_before": before,
            "load_peak": load_peak, "peak": rss(), "prefill_s": prefill_s, "decode_s": decode_s,
            "note": note + ("" if finite else "; NON-FINITE LOGITS")}


def child_llama_cpp(path: str, threads: int, prompt_tokens: int, new_tokens: int) -> dict:
    import llama_cpp
    import numpy as np

    before = rss("VmRSS")
    t = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=max(1024, prompt_tokens + new_tokens), n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)
    load_s, load_peak = time.perf_counter() - t, rss()
    n_vocab = llm.n_vocab()

    def logits():  # the last evaluated token's (llama_get_logits: one row unless logits_all)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def run(prompt: list[int], steps: int) -> tuple[float, float, bool]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        token = int(logits().argmax())
        t1 = time.perf_counter()
        for _ in range(steps):
            llm.eval([token])
            token = int(logits().argmax())
        return t1 - t, time.perf_counter() - t1, bool(np.isfinite(logits()).all())

    run(prompt_ids(16), 4)  # warm-up
    prefill_s, decode_s, finite = run(prompt_ids(prompt_tokens), new_tokens)
    return {"version": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "load_s": load_s,
            "rss_before": before, "load_peak": load_peak, "peak": rss(), "prefill_s": prefill_s,
            "decode_s": decode_s,
            "note": "its own Q4_K / Q6_K kernels; file memory-mapped" + ("" if finite else "; NON-FINITE LOGITS")}


CHILDREN = {"llamita": child_llamita, "llama.cpp": child_llama_cpp}


def measure(engine: str, python: str, path: Path, args: argparse.Namespace) -> dict:
    """Run one engine's child; its result, or {"error": the child's last words}."""
    cmd = [python, __file__, "--child", engine, "--file", str(path), "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    busy0, own0, t0 = machine_busy(), children_cpu(), time.monotonic()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    others = others_share(busy0, own0, time.monotonic() - t0)
    if done.returncode != 0 or not done.stdout.strip():
        tail = done.stderr.strip().splitlines()[-12:]
        print(f"{engine} failed (exit {done.returncode}):\n" + "\n".join(tail), file=sys.stderr)
        return {"error": (tail or [f"exit {done.returncode}"])[-1]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "others": others}


def machine_busy() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def children_cpu() -> int:
    t = os.times()
    return round((t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


def others_share(busy0: int, own0: int, seconds: float) -> float:
    """Share of the machine's CPU that processes other than the child used while it ran."""
    capacity = seconds * os.sysconf("SC_CLK_TCK") * os.cpu_count()
    return max(0.0, (machine_busy() - busy0) - (children_cpu() - own0)) / capacity


# --- the table ---------------------------------------------------------------------------------------------

def has_llama_cpp(python: str) -> bool:
    return subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0


def report(args, path: Path, vocab_source: str, shape: tuple[int, int, int, int], results: dict) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from generate import machine  # the sibling bench's machine description (not at the top: it imports torch,
    # which the llama.cpp child, run from this file too, must not pay for)

    GB = 1e9
    size = path.stat().st_size
    layers, dim, ffn, heads = shape
    print(f"- machine: {machine()}")
    print(f"- date: {datetime.date.today()}; torch {torch.__version__}; Python {platform.python_version()}")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- model: {path} ({size / GB:.2f} GB): Llama 2 {args.size} shapes ({layers} layers, dim {dim}, "
          f"ffn {ffn}, {heads} heads, vocabulary {VOCAB}), llama.cpp's Q4_K_M tensor types, random weights; "
          f"vocabulary: {vocab_source}")
    print(f"- {args.threads} threads; prefill: one pass over a {args.prompt_tokens}-token prompt; decode: "
          f"{args.new_tokens} greedy steps after it, one token each; after an untimed warm-up; one child "
          "process per engine; peak RSS: the child's VmHWM (memory-mapped file pages it touched included)")
    shares = ", ".join(f"{r['others']:.0%} ({engine})" for engine, r in results.items() if "others" in r)
    print(f"- other processes used {shares or '-'} of the CPU during each engine's run\n")
    print("| engine | file GB | load s | peak RSS after load GB (x file) | peak RSS whole run GB (x file) "
          "| prefill tokens/s | decode tokens/s | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for engine, r in results.items():
        if "error" in r or "skipped" in r:
            print(f"| {engine} | {size / GB:.2f} | - | - | - | - | - | {r.get('skipped') or 'failed: ' + r['error']} |")
            continue
        load_peak, peak = (f"{r[k] / GB:.2f} ({r[k] / size:.2f}x)" for k in ("load_peak", "peak"))
        print(f"| {r['version']} | {size / GB:.2f} | {r['load_s']:.1f} | {load_peak} | {peak} "
              f"| {args.prompt_tokens / r['prefill_s']:.1f} | {args.new_tokens / r['decode_s']:.2f} "
              f"| {r['note']}; {r['rss_before'] / GB:.2f} GB resident before loading |")
    ours, theirs = results.get("llamita", {}), results.get("llama.cpp", {})
    if "peak" not in ours:
        return
    print("\nTargets:")
    print(f"- peak RSS <= 1.3x file size: {ours['peak'] / size:.2f}x "
          f"({'met' if ours['peak'] <= 1.3 * size else 'NOT met'})")
    for label, key, count in (("decode", "decode_s", args.new_tokens), ("prefill", "prefill_s", args.prompt_tokens)):
        if key not in theirs:
            print(f"- {label} >= llama.cpp's: n/a (no llama.cpp row)")
            continue
        a, b = count / ours[key], count / theirs[key]
        print(f"- {label} >= llama.cpp's: {a:.2f} vs {b:.2f} tokens/s, {a / b:.2f}x ({'met' if a >= b else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="7b")
    parser.add_argument("--layers", type=int, help="override the size's layer count (quick runs)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "llamita" / "bench"),
                        help="where the model file is written once (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--engines", default="llamita,llama.cpp", help="comma-separated: llamita,llama.cpp")
    parser.add_argument("--llama-cpp-python", help="a Python that has llama_cpp (default: this one, when it has)")
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](args.file, args.threads, args.prompt_tokens, args.new_tokens)
        print(json.dumps(result))
        return
    engines = args.engines.split(",")
    if unknown := set(engines) - set(CHILDREN):
        parser.error(f"unknown engines {sorted(unknown)}; choose from {list(CHILDREN)}")

    import torch

    torch.set_num_threads(args.threads)  # for machine()'s description
    layers, dim, ffn, heads = SIZES[args.size]
    layers = args.layers or layers
    path = Path(args.cache_dir).expanduser() / f"llama-2-{args.size}-L{layers}-q4_k_m-random-v{FILE_VERSION}.gguf"
    sources = path.with_name(path.name + ".vocab")  # where the vocabulary came from, for the report
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        sources.write_text(write_model(path, layers, dim, ffn, heads))
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
    vocab_source = sources.read_text() if sources.exists() else "unknown"

    results = {}
    for engine in engines:
        python = (args.llama_cpp_python if engine == "llama.cpp" else None) or sys.executable
        if engine == "llama.cpp" and not has_llama_cpp(python):
            results[engine] = {"skipped": f"skipped: llama_cpp is not importable in {python} (see --llama-cpp-python)"}
            continue
        print(f"measuring {engine}", file=sys.stderr, flush=True)
        results[engine] = measure(engine, python, path, args)
    report(args, path, vocab_source, (layers, dim, ffn, heads), results)


if __name__ == "__main__":
    main()

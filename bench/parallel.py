"""Tensor parallel (llamita.parallel) on CPU processes against one process, on the same random model:
decoding tokens/s at batch 1, load time and peak resident memory per rank, and whether the greedy
tokens are the same.

    python bench/parallel.py                     # dim 1024, 4 layers, vocab 8192: 254 MB of float32
    python bench/parallel.py --dim 2048 --layers 8 --tokens 64

One process runs with all the threads (``--threads``, default 2) and with threads / N; under
``--tp N`` each of the N ranks (torchrun, gloo) gets threads / N, so that it uses the same cores.
Each token adds two all-reduces per layer and two all-gathers through loopback TCP, for no more
memory bandwidth: on CPU the point is that each rank holds 1/N of the weights, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from generate import cpu_model  # noqa: E402  (the sibling bench's CPU description)

ROOT = Path(__file__).resolve().parent.parent


def write_model(directory: Path, dim: int, layers: int, vocab: int) -> None:
    """A random HF checkpoint (float32) of a Llama 2-like shape with GQA (kv heads = heads / 2)."""
    import torch

    import llamita
    from llamita.config import Config

    heads = dim // 128
    config = Config(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads // 2, vocab_size=vocab, max_seq_len=1024)
    torch.manual_seed(0)
    llamita.save_model(llamita.Llama(config).eval(), directory)


def status(field: str) -> int:
    """A /proc/self/status field in bytes (VmHWM: the peak resident size so far)."""
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) * 1024


def worker(source: str, tp: int, tokens: int) -> None:
    """Load (as one of ``tp`` ranks when tp > 1), prefill 16 tokens, decode ``tokens`` greedily; rank 0
    prints one JSON line."""
    import torch
    import torch.distributed as dist

    from llamita import parallel
    from llamita.cache import KVCache
    from llamita.formats import load_model, read_checkpoint
    from llamita.generate import decode_step

    start = time.perf_counter()
    shard = parallel.start(tp, "cpu", read_checkpoint(source).config) if tp > 1 else None
    model = load_model(source, shard=shard)
    load_s = time.perf_counter() - start
    cache = KVCache(model, 1, 16 + tokens + 1)
    out = []
    with torch.inference_mode():
        prompt = torch.arange(1, 17)[None]
        logits = model(prompt, kv=cache.sequence_step(torch.arange(16), 16))[:, -1]
        out.append(int(logits.argmax()))
        start = time.perf_counter()
        for i in range(tokens):
            logits = decode_step(model, cache, [out[-1]], [16 + i])
            out.append(int(logits.argmax()))
        decode_s = time.perf_counter() - start
    peaks = [status("VmHWM")]
    if shard:
        peaks = [None] * tp
        dist.all_gather_object(peaks, status("VmHWM"))
    if not shard or shard.rank == 0:
        print(json.dumps({"load_s": load_s, "tokens_per_s": tokens / decode_s, "peak_rss": peaks, "tokens": out,
                          "weights": sum(p.numel() * p.element_size() for p in model.parameters()) * tp}))


def run(source: Path, tp: int, tokens: int, threads: int) -> dict:
    """One run of ``worker`` (under torchrun when tp > 1) with ``threads`` threads per process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    launch = [sys.executable] if tp == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node", str(tp)]
    cmd = [*launch, __file__, "--worker", str(source), "--tp", str(tp), "--tokens", str(tokens)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=32, help="tokens to decode")
    p.add_argument("--tp", type=int, default=2, help="ranks of the tensor-parallel run")
    p.add_argument("--threads", type=int, default=2, help="threads in all (one process; split among the ranks)")
    p.add_argument("--dir", default="/tmp/llamita-bench-parallel")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.tp, args.tokens)
    source = Path(args.dir) / f"d{args.dim}-l{args.layers}-v{args.vocab}"
    if not (source / "config.json").exists():
        write_model(source, args.dim, args.layers, args.vocab)
    each, load = max(1, args.threads // args.tp), os.getloadavg()[0]
    one = run(source, 1, args.tokens, args.threads)
    runs = [("one process", one, args.threads), ("one process", run(source, 1, args.tokens, each), each),
            (f"`--tp {args.tp}` (torchrun, gloo)", run(source, args.tp, args.tokens, each), each)]
    import torch

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"CPU: {cpu_model()}, load average {load:.1f} before the runs; {when}; "
          f"torch {torch.__version__}; model: dim {args.dim}, {args.layers} layers, vocab {args.vocab}, "
          f"{one['weights'] / 1e6:.0f} MB float32")
    print(f"Command: `{' '.join(['python bench/parallel.py', *sys.argv[1:]])}`")
    print()
    print("| run | threads per process | load s | decode tokens/s | weights per process (MB) "
          "| peak RSS per process (MB) | greedy tokens as one process |")
    print("|---|---|---|---|---|---|---|")
    for name, r, threads in runs:
        peaks = ", ".join(f"{b / 1e6:.0f}" for b in r["peak_rss"])
        same = "yes" if r["tokens"] == one["tokens"] else "NO"
        held = r["weights"] / len(r["peak_rss"]) / 1e6
        print(f"| {name} | {threads} | {r['load_s']:.1f} | {r['tokens_per_s']:.1f} | {held:.0f} | {peaks} | {same} |")


if __name__ == "__main__":
    main()

"""Peak memory of loading a checkpoint: is it close to the weights' own size?

    python bench/load_memory.py                       # the embedded default model (GGUF)
    python bench/load_memory.py --preset llama-2-7b --dir /tmp/l7b   # writes a random bf16 HF checkpoint first

The load runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own; every
weight is then read once, since safetensors weights stay memory-mapped until touched.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def write_random_hf(preset: str, directory: Path, shard_bytes: int = 2 * 1024**3) -> None:
    """An HF checkpoint of the preset's shapes in bfloat16 (uninitialised values: only sizes matter)."""
    import torch
    from safetensors.torch import save_file

    from llamita import layout
    from llamita.config import Config, config_to_hf
    from llamita.formats.hf import hf_name
    from llamita.model import Llama

    config = Config.from_name(preset)
    with torch.device("meta"):  # the checkpoint's names and shapes (q/k/v and gate/up apart)
        shapes = {name: t.shape for name, t in layout.split(Llama(config).state_dict(), config).items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**config_to_hf(config), "torch_dtype": "bfloat16"}))
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({hf_name(n): torch.empty(shapes[n], dtype=torch.bfloat16) for n in names}, directory / file)
        weight_map.update({hf_name(n): file for n in names})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def measure(source: str | None, dtype: str | None) -> dict:
    code = (
        "import resource, sys, time, torch, llamita\n"
        "t = time.time()\n"
        f"m = llamita.load_model({source!r}, dtype={'torch.' + dtype if dtype else None})\n"
        "n = sum(p.numel() * p.element_size() for p in m.parameters())\n"
        "for p in m.parameters(): p.data.view(-1)[:: 1024].sum()  # fault every page in (mmap-backed weights)\n"
        "print(time.time() - t, n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    seconds, weights, peak = float(out[0]), int(out[1]), int(out[2])
    return {"seconds": seconds, "weights_GiB": weights / 1024**3, "peak_rss_GiB": peak / 1024**3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default=None, help="write and load a random checkpoint of this preset")
    parser.add_argument("--dir", default="/tmp/llamita-load-bench")
    parser.add_argument("--dtype", default=None, help="dtype to load in (default: the checkpoint's)")
    args = parser.parse_args()
    source = None
    if args.preset:
        source = str(Path(args.dir) / args.preset)
        if not (Path(source) / "config.json").exists():
            write_random_hf(args.preset, Path(source))
    r = measure(source, args.dtype)
    print(f"{time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()} "
          f"source={args.preset or 'smollm2-135m-instruct'} dtype={args.dtype or 'default'}: "
          f"weights {r['weights_GiB']:.2f} GiB, peak RSS {r['peak_rss_GiB']:.2f} GiB, {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()

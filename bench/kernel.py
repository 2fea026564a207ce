"""The CPU kernel for quantized layers on one 7B-sized matrix: bytes of weights read per second at one
row (decoding) and multiply-adds per second at many rows (a prompt), against the float32 GEMM over
the same weights dequantized (the layers' path from ``DEQUANTIZE_FROM_ROWS`` rows on).

    python bench/kernel.py                  # 11008x4096 (Llama 2 7B's up projection), 2 threads
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from llamita import kernels
from llamita.quantize import BLOCKS, QuantizedWeight, QuantLinear, group_quantize


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-features", type=int, default=11008)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--rows", default="1,8,64,512")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    assert kernels.available(), "the kernel did not build"
    N, K = args.out_features, args.in_features
    w = torch.randn(N, K) * 0.02
    layers = {"int4 (Q4_0/Q4_1 layout)": group_quantize(w, 32, 4), "int8 (Q8_0 layout)": group_quantize(w, 32, 8)}
    for name, (size, _) in BLOCKS.items():  # random blocks with a small float16 super-block scale
        raw = torch.randint(0, 256, (N, K // 256, size), dtype=torch.uint8)
        raw[..., (0 if name == "Q4_K" else size - 2):][..., :2] = torch.tensor([0x00, 0x10], dtype=torch.uint8)
        layers[f"{name} blocks"] = QuantizedWeight(raw.view(N, -1), None, None, 4, 256, blocks=name)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    print(f"- machine: {cpu}, {args.threads} threads; torch {torch.__version__}; "
          f"date: {datetime.datetime.now():%Y-%m-%d %H:%M}; matrix {N}x{K}")
    print("| layout | rows | kernel ms | kernel GB/s of weights | kernel GMAC/s | dequantize+GEMM ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, q in layers.items():
        layer = QuantLinear(q)
        nbytes = sum(t.numel() * t.element_size() for t in layer.buffers())
        if q.blocks:
            kernel = lambda x, L=layer: kernels.kquant_matmul(x, L.codes, L.blocks)  # noqa: E731
        else:
            kernel = lambda x, L=layer: kernels.quant_matmul(x, L.codes, L.scales, L.offsets, L.bits, L.group_size)  # noqa: E731
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, K)
            fast = best(lambda x=x, kernel=kernel: kernel(x), args.repeats)
            dequantized = lambda x=x, L=layer: torch.mm(x, L.dequantize().T)  # noqa: E731
            gemm = "" if q.blocks else f"{best(dequantized, args.repeats) * 1e3:.1f}"
            print(f"| {name} | {rows} | {fast * 1e3:.2f} | {nbytes / fast / 1e9:.1f} | {rows * N * K / fast / 1e9:.1f} "
                  f"| {gemm} |", flush=True)

if __name__ == "__main__":
    main()

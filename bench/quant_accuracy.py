"""What each GGUF quantization type costs in llamita: the same file run as stored (``quantize="auto"``)
against the same file dequantized to float32 (``quantize="none"``), on the same text.

    python bench/quant_accuracy.py                       # the default model, every type below
    python bench/quant_accuracy.py --types Q4_K_M,Q8_0 --tokens 4096

The files are made from one F16 GGUF of the model (``llamita.convert``) by llama.cpp's own quantizer
(llama-cpp-python's ``llama_model_quantize``), which needs llama-cpp-python installed; llama.cpp
chooses each tensor's type as for its own files (and a fallback type where a row is not whole
k-quant blocks of 256), and the table lists what it wrote. For each file: the stored bytes per
weight of the matrices, what llamita's layers hold per weight, and, over ``--tokens`` tokens of text
in windows of ``--ctx``, the perplexity and the mean KL divergence of the next-token distribution
from the float32 model's, both for a prompt's path (the stored codes dequantized, float32
activations) and for decoding's (the CPU kernel, int8 activations as llama.cpp's).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

TYPES = ["Q4_0", "Q4_1", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_M", "Q6_K", "Q8_0"]
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "bench" / "wikitext2_test.raw"


def quantized_file(f16: Path, ftype: str, cache: Path) -> Path:
    import llama_cpp

    out = cache / f"{f16.stem}.{ftype}.gguf"
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = torch.get_num_threads()
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params) != 0:
            raise SystemExit(f"llama.cpp could not quantize {f16} to {ftype}")
        tmp.rename(out)
    return out


def scores(model, windows: list[torch.Tensor], reference: list[torch.Tensor] | None):
    """Perplexity over the windows, the logits, and the mean KL from ``reference``'s distributions."""
    nll, count, kl, logits_all = 0.0, 0, 0.0, []
    with torch.inference_mode():
        for i, ids in enumerate(windows):
            logits = model(ids[None])[0, :-1].float()
            nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += len(ids) - 1
            if reference is not None:
                kl += F.kl_div(logits.log_softmax(-1), reference[i].log_softmax(-1), log_target=True,
                               reduction="sum").item()
            logits_all.append(logits)
    return math.exp(nll / count), logits_all, kl / count


def held_bytes_per_weight(model) -> float:
    from llamita.quantize import QuantLinear

    layers = {id(m): m for m in model.modules() if isinstance(m, QuantLinear)}.values()
    held = sum(t.numel() * t.element_size() for m in layers for t in m.buffers())
    return held / sum(m.in_features * m.out_features for m in layers)


def stored_bytes_per_weight(path: Path) -> tuple[float, str]:
    import gguf

    matrices = [t for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2]
    types = Counter(t.tensor_type.name for t in matrices)
    return (sum(int(t.n_bytes) for t in matrices) / sum(int(t.n_elements) for t in matrices),
            ", ".join(f"{k} x{v}" for k, v in types.most_common()))


def main() -> None:
    import llamita
    import llamita.quantize as Q
    from llamita.formats import detect
    from llamita.quantize import QuantLinear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="any checkpoint llamita reads (default: the embedded model)")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--text", default=str(TEXT))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "llamita" / "bench"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    _, source = detect(args.model)
    f16 = cache / f"{source.stem.split('.')[0]}.F16.gguf"
    if not f16.exists():
        llamita.convert(args.model, f16, type="f16")
    tokenizer = llamita.load_tokenizer(args.model)
    ids = tokenizer.encode(Path(args.text).read_text()[: args.tokens * 8])[: args.tokens]
    windows = [torch.tensor(ids[i: i + args.ctx]) for i in range(0, len(ids) - args.ctx + 1, args.ctx)]

    rows = []
    for ftype in args.types.split(","):
        path = quantized_file(f16, ftype, cache)
        float_ppl, reference, _ = scores(llamita.load_model(path, quantize="none"), windows, None)
        model = llamita.load_model(path, quantize="auto")
        prompt_ppl, _, prompt_kl = scores(model, windows, reference)
        Q.DEQUANTIZE_FROM_ROWS = args.ctx + 1  # every window through the kernel, as decoding runs
        kernel_ppl, _, kernel_kl = scores(model, windows, reference)
        Q.DEQUANTIZE_FROM_ROWS = 384
        assert any(isinstance(m, QuantLinear) for m in model.modules())
        stored, types = stored_bytes_per_weight(path)
        rows.append(f"| {ftype} | {types} | {stored:.3f} | {held_bytes_per_weight(model):.3f} | {float_ppl:.3f} | "
                    f"{prompt_ppl:.3f} | {prompt_kl:.5f} | {kernel_ppl:.3f} | {kernel_kl:.5f} |")
        print(rows[-1], flush=True)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    print(f"\n- machine: {cpu or platform.processor()}, {args.threads} threads; torch {torch.__version__}")
    print(f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; model: {source.name}; text: "
          f"{Path(args.text).name}, {len(windows)} windows of {args.ctx} tokens")
    print("- command: python bench/quant_accuracy.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                            vars(args).items() if p.get_default(k) != v))
    print("\n| llama.cpp type | matrices stored as | stored bytes/weight | llamita bytes/weight | perplexity, "
          "float32 | perplexity, prompt path | KL, prompt path | perplexity, kernel | KL, kernel |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

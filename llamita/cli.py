"""The ``llamita`` command: argparse subcommands, each a few lines over the Python API."""

from __future__ import annotations

import argparse
import sys

from llamita.errors import LlamitaError


def cmd_info(args: argparse.Namespace) -> None:
    from llamita.info import describe

    print(describe(args.source))


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory, .gguf file, or smollm2-135m-instruct (the default)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights' dtype (default: the checkpoint's; float32 for quantized GGUF)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--quantize", choices=["int4", "float16"], default=None,
                   help="int4: 4-bit weight-only layers (the fastest single stream on CPU); float16: float16 "
                        "weights computed in float32 (CPU, the fastest for batches and `serve`)")
    p.add_argument("--template", default="auto", help="chat format: auto (the checkpoint's), llama-2, chatml, alpaca")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT's format) to apply to the model")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: about a minute to start the first time, ~8 s more than eager once "
                        "torch's compile cache holds it, then faster (docs/speed.md)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt longer than the context")


def sampling_options(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
                truncate=args.truncate)


def load_llm(args: argparse.Namespace):
    import torch

    from llamita.llm import LLM

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if getattr(args, "compile", False):
        print("llamita: --compile: the first reply waits while torch.compile builds the decoding step "
              "(about a minute on 2 CPU cores)", file=sys.stderr)
    return LLM.load(args.model, dtype=dtype, device=args.device, quantize=args.quantize, template=args.template,
                    adapter=args.adapter, compile=getattr(args, "compile", False))


def cmd_generate(args: argparse.Namespace) -> None:
    llm = load_llm(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    for text in llm.stream(prompt, **sampling_options(args)):
        print(text, end="", flush=True)
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    llm = load_llm(args)
    options = sampling_options(args)
    system = args.system
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("llamita chat: /reset clears the history, /system TEXT sets the system prompt, /exit quits.")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = []
            continue
        if line.startswith("/system"):
            system, history = line.removeprefix("/system").strip() or None, []
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        if interactive:
            print("assistant> ", end="", flush=True)
        reply = ""
        for text in llm.stream_chat(messages, **options):
            reply += text
            print(text, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": reply})


def cmd_finetune(args: argparse.Namespace) -> None:
    from llamita.train import TrainConfig, finetune

    options = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    print(f"llamita: wrote {finetune(args.model, args.data, args.out, **options)}", file=sys.stderr)


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="base checkpoint (default: smollm2-135m-instruct)")
    p.add_argument("--data", required=True, help="JSON / JSON Lines records, a text file, or a Hub dataset name")
    p.add_argument("--out", required=True, help="output folder: adapter/ or model/, metrics.jsonl, loss.png, checkpoints/")
    p.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    p.add_argument("--format", choices=["auto", "alpaca", "chat", "sharegpt", "text"], default="auto")
    p.add_argument("--template", default="alpaca", help="prompt format: alpaca, or a chat format: auto, llama-2, chatml")
    p.add_argument("--max-length", type=int, default=512, help="tokens per record (longer ones are truncated)")
    p.add_argument("--train-on-prompt", action="store_true", help="put loss on prompt tokens too")
    p.add_argument("--pack", action="store_true", help="pack short records into full sequences")
    p.add_argument("--val-split", type=float, default=0.0, help="fraction of records held out for eval loss")
    p.add_argument("--eval-data", default=None, help="a separate evaluation data file")
    p.add_argument("--eval-every", type=int, default=0, help="steps between eval losses (0: at the end)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q,v", help="comma-separated: q,k,v,o,gate,up,down or all")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4; 2e-5 for full)")
    p.add_argument("--batch-size", type=int, default=4, help="records per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None, help="default 1 when --steps is not given")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: none)")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard --method full with FSDP2 (the default on CUDA; DDP otherwise)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def cmd_merge(args: argparse.Namespace) -> None:
    import torch

    from llamita.formats.export import merge

    merge(args.base, args.adapter, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamita", description="Run, chat with and fine-tune Llama 2 models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture, size and storage of a checkpoint or preset")
    p.add_argument("source", nargs="?", default=None,
                   help="checkpoint directory, .gguf file, preset (llama-2-7b...) or smollm2-135m-instruct (default)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="stream the continuation of a prompt")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read from stdin)")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal (one reply per line when stdin is piped)")
    p.add_argument("--system", default=None, help="system prompt")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("finetune", help="train a LoRA / QLoRA adapter or every weight on instruction data")
    add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base: a Hugging Face checkpoint")
    p.add_argument("base", help="the base checkpoint (or smollm2-135m-instruct)")
    p.add_argument("adapter", help="the adapter directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server that batches concurrent requests")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (KV-cache rows)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context per row: prompt plus new tokens")
    p.add_argument("--max-prefill-tokens", type=int, default=256,
                   help="prompt tokens (padded) prefilled in one pass: a burst of prompts is spread over passes this size, so the first start sooner")
    p.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args: argparse.Namespace) -> None:
    from llamita.serve import serve

    serve(load_llm(args), source=args.model, host=args.host, port=args.port, max_batch=args.max_batch,
          max_queue=args.max_queue, max_seq_len=args.max_seq_len,
          max_prefill_tokens=args.max_prefill_tokens)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LlamitaError as e:
        print(f"llamita: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    p.add_argument("--quantize", choices=["int4"], default=None,
                   help="int4: 4-bit weight-only layers with bfloat16 activations (fastest on CPU)")
    p.add_argument("--template", default="auto", help="chat format: auto (the checkpoint's), llama-2, chatml, alpaca")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
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

    from llamita.generate import LLM

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return LLM.load(args.model, dtype=dtype, device=args.device, quantize=args.quantize, template=args.template)


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
    return parser


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

"""The ``llamita`` command: argparse subcommands, each a few lines over the Python API."""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import io
import math
import os
import sys
import typing
from pathlib import Path
from typing import Callable

from llamita.errors import LlamitaError
from llamita.generate import Speculation
from llamita.sampling import SamplingParams
from llamita.serve.engine import Connections, EngineConfig
from llamita.train import TrainConfig


def cmd_info(args: argparse.Namespace) -> None:
    from llamita.info import describe

    print(describe(args.source))


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory, .gguf file, or smollm2-135m-instruct (the default)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="float weights' dtype (default: the checkpoint's; float32 for dequantized GGUF)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--quantize", choices=["auto", "none", "int4", "int8", "float16"], default="auto",
                   help="auto: a quantized GGUF stays as stored (4-bit stays 4-bit), other checkpoints load as they "
                        "are; none: dequantized; int4/int8: weight-only layers quantized while loading (the fastest "
                        "single stream on CPU); float16: float16 weights computed in float32 (CPU, the fastest for "
                        "batches and `serve`)")
    p.add_argument("--template", default=None,
                   help="chat format: auto (the checkpoint's), llama-2, chatml, alpaca (default: the one the "
                        "adapter or fine-tuned checkpoint was trained with, else auto)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT's format) to apply to the model")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: about a minute to start the first time, ~8 s more than "
                        "eager once torch's compile cache holds it, then faster (docs/speed.md)")
    add_options(p, SamplingParams)
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt longer than the context")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help='reply with JSON that this schema (a JSON file) accepts; {"type": "object"}: any object')
    add_options(p, Speculation)
    p.add_argument("--verbose", action="store_true",
                   help="after each reply, print speculation's acceptance and tokens per pass on stderr")


def sampling_options(args: argparse.Namespace) -> dict:
    """The sampling flags, checked here, before a model takes seconds to load, rather than at the first request."""
    from llamita.constrain import json_grammar
    from llamita.files import read_json

    options = options_of(args, SamplingParams)
    SamplingParams(**options)  # its checks (temperatures below GREEDY_BELOW sample greedily)
    schema = None
    if args.json_schema is not None:
        schema = read_json(Path(args.json_schema))
        json_grammar(schema, what=f"--json-schema {args.json_schema}")  # unsupported keywords named now
    return {**options, "truncate": args.truncate, "json_schema": schema}


def finite_float(text: str) -> float:
    """A float flag's value: nan and inf parse as floats, then break sampling or training in a traceback."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def seed_int(text: str) -> int:
    """A seed flag's value, in the range torch.manual_seed takes (below 2^63, so that seed + rank fits too)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 2^63)")
    return value


def check_device(name: str) -> None:
    """A --device this torch can use, checked before anything loads (torch fails in tracebacks)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise LlamitaError(f"--device {name!r}: not a device (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", lambda: False)()
    count = getattr(backend, "device_count", lambda: 1)() if available else 0
    if (device.index or 0) >= count:
        raise LlamitaError(f"--device {name}: this torch ({torch.__version__}) sees {count} {device.type} device(s)")


def add_options(p: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass ``cls`` (``--max-new-tokens``), typed, defaulted and
    explained by the field itself; a bool that defaults to true becomes ``--no-NAME``."""
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, kind = "--" + f.name.replace("_", "-"), types[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        extra = {"help": f.metadata.get("help"), "dest": f.name}
        if kind is bool:
            p.add_argument(f"--no-{flag[2:]}" if default else flag, action="store_false" if default else "store_true",
                           **extra)
        elif isinstance(default, list):
            p.add_argument(flag, action="append", default=default, **extra)
        else:
            scalar = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            parse = seed_int if f.name == "seed" else finite_float if scalar is float else scalar
            p.add_argument(flag, type=parse, default=default, choices=f.metadata.get("choices"), **extra)


def options_of(args: argparse.Namespace, cls: type) -> dict:
    """The parsed values of ``cls``'s fields."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel over N processes, each holding 1/N of every layer: launch with "
                        "`torchrun --nproc-per-node N -m llamita ... --tp N` (docs/scale.md)")


def start_parallel(args: argparse.Namespace) -> None:
    """Under --tp, join the other ranks before stdin is read (rank 0 reads it for all, ``from_stdin``);
    only rank 0 prints."""
    if getattr(args, "tp", 1) == 1:
        return
    from llamita import parallel
    from llamita.formats import read_checkpoint

    if parallel.start(args.tp, args.device, read_checkpoint(args.model).config).rank:
        sys.stdout = open(os.devnull, "w")


def load_llm(args: argparse.Namespace):
    import torch

    from llamita.llm import LLM

    dtype = getattr(torch, args.dtype) if args.dtype else None
    speculation = options_of(args, Speculation)
    Speculation(**speculation)  # its checks, before the model loads
    if getattr(args, "compile", False):
        print("llamita: --compile: the first reply waits while torch.compile builds the decoding step "
              "(about a minute on 2 CPU cores)", file=sys.stderr)
    return LLM.load(args.model, dtype=dtype, device=args.device, quantize=args.quantize, template=args.template,
                    adapter=args.adapter, compile=getattr(args, "compile", False), tp=getattr(args, "tp", 1),
                    **speculation)


def report(llm, args: argparse.Namespace) -> None:
    """--verbose: the last reply's speculation statistics, on stderr."""
    if getattr(args, "verbose", False) and llm.last_stats is not None:
        print(f"llamita: {llm.last_stats.line()}", file=sys.stderr)


STRICT_UTF8 = ("utf-8", "strict")


def from_stdin(read: Callable[[], str]) -> str:
    """``read()`` from stdin, decoded as UTF-8 whatever the locale: bytes that are not UTF-8 end in
    a one-line error here, not in a traceback (or as surrogates the tokenizer refuses later). Under --tp,
    rank 0 reads and every rank gets what it read."""
    from llamita import parallel

    if (tp := parallel.active()) is not None:
        return tp.shared(lambda: _from_stdin(read))
    return _from_stdin(read)


def _from_stdin(read: Callable[[], str]) -> str:
    stdin = sys.stdin
    if isinstance(stdin, io.TextIOWrapper) and (codecs.lookup(stdin.encoding).name, stdin.errors) != STRICT_UTF8:
        stdin.reconfigure(encoding="utf-8", errors="strict")  # before its first read: the next calls find it so
    try:
        return read()
    except UnicodeDecodeError as e:
        raise LlamitaError(f"stdin is not UTF-8 text: byte {e.object[e.start:e.start + 1]!r} ({e.reason})") from None


def cmd_generate(args: argparse.Namespace) -> None:
    options = sampling_options(args)
    start_parallel(args)
    prompt = args.prompt if args.prompt is not None else from_stdin(sys.stdin.read)
    llm = load_llm(args)
    for text in llm.stream(prompt, **options):
        print(text, end="", flush=True)
    print()
    report(llm, args)


def cmd_chat(args: argparse.Namespace) -> None:
    options = sampling_options(args)
    start_parallel(args)
    llm = load_llm(args)
    system = args.system
    history: list[dict[str, str]] = []
    interactive, single_turn = sys.stdin.isatty(), llm.single_turn
    if single_turn and system:
        raise LlamitaError(f"the {llm.template} template has no system prompt: drop --system, or give --template")
    if interactive:
        one = f" The {llm.template} template is single-turn: each message is answered alone." if single_turn else ""
        print("llamita chat: /reset clears the history, /system TEXT sets the system prompt, /exit quits." + one)
    while True:
        try:
            line = from_stdin(lambda: input("you> " if interactive else ""))
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
            if single_turn:
                print(f"llamita: the {llm.template} template has no system prompt", file=sys.stderr)
            else:
                system, history = line.removeprefix("/system").strip() or None, []
            continue
        history = [] if single_turn else history
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        if interactive:
            print("assistant> ", end="", flush=True)
        reply = ""
        for text in llm.stream_chat(messages, **options):
            reply += text
            print(text, end="", flush=True)
        print(flush=True)
        report(llm, args)
        history.append({"role": "assistant", "content": reply})


def cmd_finetune(args: argparse.Namespace) -> None:
    from llamita.train import finetune

    result = finetune(args.model, args.data, args.out, **options_of(args, TrainConfig))
    print(f"llamita: wrote {result}", file=sys.stderr)


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="base checkpoint (default: smollm2-135m-instruct)")
    p.add_argument("--data", required=True, help="JSON / JSON Lines records, a text file, or a Hub dataset name")
    p.add_argument("--out", required=True,
                   help="output folder: adapter/ or model/, metrics.jsonl, loss.png, checkpoints/")
    add_options(p, TrainConfig)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from llamita.pretraining import PretrainConfig, pretrain

    result = pretrain(args.config, args.data, args.tokenizer, args.out, **options_of(args, PretrainConfig))
    print(f"llamita: wrote {result}", file=sys.stderr)


def add_pretrain_parser(sub: argparse._SubParsersAction) -> None:
    from llamita.pretraining import PretrainConfig

    p = sub.add_parser("pretrain", help="train a Llama from random weights on text, with Llama 2's recipe")
    p.add_argument("--config", required=True,
                   help="the architecture: a preset (llama2c-15m, llama2c-42m, llama2c-110m, llama2c-260k, "
                        "llama-2-7b ...) or a Hugging Face config.json (or a folder holding one)")
    p.add_argument("--data", required=True, nargs="+",
                   help="text: .txt files (a document each), .jsonl files (a \"text\" per line), folders of "
                        "them; or a folder of token shards made earlier (OUT/tokens of another run)")
    p.add_argument("--tokenizer", required=True, help="a folder of tokenizer files (llamita tokenizer train's)")
    p.add_argument("--out", required=True,
                   help="output folder: model/ (HF checkpoint), tokens/, metrics.jsonl, loss.png, checkpoints/")
    add_options(p, PretrainConfig, skip=("grad_accum",))
    p.set_defaults(func=cmd_pretrain)


def cmd_pair(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from llamita.data import pair_files
    from llamita.files import atomic_write

    records = pair_files(args.chosen, args.rejected)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(Path(args.out), lambda p: p.write_text(text, encoding="utf-8"))
    print(f"llamita: wrote {len(records)} preference pairs to {args.out}", file=sys.stderr)


def add_pair_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pair", help="preference pairs for finetune --objective dpo from two files of records "
                                    "answering the same prompts")
    p.add_argument("chosen", help="JSON / JSON Lines records (Alpaca, chat, ShareGPT) with the preferred answers")
    p.add_argument("rejected", help="records with the other answers to the same prompts")
    p.add_argument("out", help="the pairs, JSON Lines of {\"chosen\": [messages], \"rejected\": [messages]}")
    p.set_defaults(func=cmd_pair)


def add_tokenizer_parser(sub: argparse._SubParsersAction) -> None:
    def cmd_tokenizer_train(args: argparse.Namespace) -> None:
        from llamita.tokenizer_train import train_tokenizer

        print(train_tokenizer(args.files, args.out, args.vocab_size, sample_sentences=args.sample_sentences,
                              max_sentence_length=args.max_sentence_length, verbose=args.verbose))

    p = sub.add_parser("tokenizer", help="train a tokenizer; tokenize a corpus for pretraining")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser(
        "train", help="a SentencePiece BPE tokenizer trained on text files with Llama 2's own trainer settings")
    t.add_argument("files", nargs="+", metavar="FILES", help="UTF-8 text files, one sentence or paragraph a line")
    t.add_argument("--vocab-size", type=int, default=32000, help="pieces in the vocabulary (default: 32000, Llama 2's)")
    t.add_argument("--out", required=True,
                   help="output directory: tokenizer.model, tokenizer_config.json, special_tokens_map.json")
    t.add_argument("--sample-sentences", type=int, default=10_000_000,
                   help="lines sampled from the corpus, so it need not fit in memory (default: 10000000; 0: all)")
    t.add_argument("--max-sentence-length", type=int, default=4192,
                   help="lines longer than this many bytes are skipped (default: 4192, as Meta's)")
    t.add_argument("--verbose", action="store_true", help="show sentencepiece's training log on stderr")
    t.set_defaults(func=cmd_tokenizer_train)

    def cmd_tokenizer_encode(args: argparse.Namespace) -> None:
        from llamita.shards import tokenize_corpus

        print(tokenize_corpus(args.files, args.tokenizer, args.out))

    e = actions.add_parser("encode", help="token shards for llamita pretrain --data: a corpus tokenized once")
    e.add_argument("files", nargs="+", metavar="FILES",
                   help=".txt files (a document each), .jsonl files (a \"text\" per line), or folders of them")
    e.add_argument("--tokenizer", required=True, help="a folder of tokenizer files (llamita tokenizer train's)")
    e.add_argument("--out", required=True, help="output folder: shard-NNNNN.bin and manifest.json")
    e.set_defaults(func=cmd_tokenizer_encode)


def cmd_merge(args: argparse.Namespace) -> None:
    import torch

    from llamita.formats.export import merge

    merge(args.base, args.adapter, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None)


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from llamita.formats.export import convert

    out = convert(args.source, args.out, type=args.type, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"llamita: wrote {out}", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> None:
    import importlib

    from llamita.eval import evaluate

    module = importlib.import_module(f"llamita.eval.{args.task}")
    result = evaluate(args.task, args.data, lambda: load_llm(args), **options_of(args, module.Options))
    print(result.markdown())
    if args.json:
        result.save(args.json)
        print(f"llamita: wrote {args.json}", file=sys.stderr)


def add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    import importlib

    from llamita.eval import TASKS

    p = sub.add_parser("eval", help="perplexity, multiple-choice benchmarks, QA and language adherence")
    tasks = p.add_subparsers(dest="task", required=True)
    for task in TASKS:
        module = importlib.import_module(f"llamita.eval.{task}")
        t = tasks.add_parser(task, help=module.__doc__.splitlines()[0])
        t.add_argument("data", nargs="+" if task == "perplexity" else None, help=module.DATA_HELP)
        add_model_args(t)
        add_options(t, module.Options)
        t.add_argument("--json", default=None, metavar="OUT", help="write every number and its settings to OUT")
        t.set_defaults(func=cmd_eval)


def add_export_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base: a Hugging Face checkpoint")
    p.add_argument("base", help="the base checkpoint (or smollm2-135m-instruct)")
    p.add_argument("adapter", help="the adapter directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("convert", help="write a checkpoint as GGUF (llama.cpp, Ollama) or in Hugging Face's layout")
    p.add_argument("source", help="checkpoint directory, .gguf file, or smollm2-135m-instruct")
    p.add_argument("out", help="a .gguf file (replaced if it exists), or a directory for the Hugging Face layout")
    p.add_argument("--type", default=None,
                   help="f16 (default for .gguf), q8_0 or q4_0 for a .gguf OUT; hf (the default) for a directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="the dtype the weights load in, and a Hugging Face OUT stores (default: the source's)")
    p.set_defaults(func=cmd_convert)


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
    add_parallel_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal (one reply per line when stdin is piped)")
    p.add_argument("--system", default=None, help="system prompt")
    add_model_args(p)
    add_sampling_args(p)
    add_parallel_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("finetune", help="train a LoRA / QLoRA adapter or every weight on instruction data")
    add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    add_pretrain_parser(sub)
    add_pair_parser(sub)
    add_tokenizer_parser(sub)
    add_export_parsers(sub)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server that batches concurrent requests")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health and the chat page "
                        "(repeatable; also $LLAMITA_API_KEY, comma-separated)")
    p.add_argument("--parse-special", action="store_true",
                   help="control tokens written in a text prompt (/v1/completions, /predict), like <s> or "
                        "<|im_end|>, become their ids (default: plain text; chat messages: always plain text)")
    add_options(p, EngineConfig)
    add_options(p, Connections)
    add_options(p, Speculation)  # for a request that runs alone
    add_parallel_args(p)
    p.set_defaults(func=cmd_serve)

    add_eval_parsers(sub)
    return parser


def cmd_serve(args: argparse.Namespace) -> None:
    from llamita import parallel
    from llamita.serve.app import api_keys, serve
    from llamita.serve.engine import follow

    config = EngineConfig(**options_of(args, EngineConfig))  # checked before the model loads
    limits = Connections(**options_of(args, Connections))
    api_keys(args.api_key)  # checked before the model loads too
    start_parallel(args)
    llm = load_llm(args)
    if tp := parallel.active():
        if tp.rank:  # under --tp, rank 0 answers HTTP; the others follow its passes
            follow(llm.model, config, tp)
            return
        llm.shard = None  # rank 0 samples alone: its requests draw no seeds to share with the other ranks
    serve(llm, source=args.model, host=args.host, port=args.port, config=config, limits=limits,
          api_key=args.api_key, parse_special=args.parse_special)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "device"):
            check_device(args.device)  # before stdin is read or anything loads
        args.func(args)
    except LlamitaError as e:
        print(f"llamita: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or Python's flush at exit fails again
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())

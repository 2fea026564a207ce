"""``LLM``: a model with its tokenizer and chat format, the Python face of ``llamita generate/chat``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from llamita import parallel
from llamita.cache import KVCache
from llamita.chat import Message, encode_chat, resolve_template, stop_token_ids
from llamita.constrain import json_constraint
from llamita.errors import LlamitaError
from llamita.formats import detect, hf, load_model, model_from_checkpoint, read_checkpoint
from llamita.formats.gguf import stored_kind
from llamita.generate import Request, cache_size_for, compile_decoding, complete, generate
from llamita.logprobs import Logprobs
from llamita.model import Llama
from llamita.peft import adapter_template, load_adapter
from llamita.quantize import check_kind
from llamita.quantize import quantize as quantize_model
from llamita.sampling import SamplingParams
from llamita.tokenizer import Tokenizer, load_tokenizer


def trained_template_of(source: str | Path | None, adapter: str | Path | None) -> str | None:
    """The prompt template recorded by fine-tuning: the adapter's, else the checkpoint's (a
    ``finetune --method full`` or ``merge`` output)."""
    if adapter is not None:
        return adapter_template(adapter)
    fmt, path = detect(source)
    return hf.trained_template(path) if fmt == "hf" else None


class LLM:
    """A model with its tokenizer and chat format: the Python face of ``llamita generate/chat``."""

    shard: parallel.TensorParallel | None = None  # this process's tensor-parallel rank (``load(tp=...)``)

    def __init__(self, model: Llama, tokenizer: Tokenizer, template: str = "auto", compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.stop_ids = frozenset(stop_token_ids(tokenizer, template))
        self.forward = compile_decoding(model) if compile else None
        self.cache: KVCache | None = None  # _run_one's, kept from call to call

    @classmethod
    def load(cls, source: str | Path | None = None, *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu", quantize: str = "auto", template: str | None = None,
             adapter: str | Path | None = None, compile: bool = False, tp: int = 1) -> "LLM":
        """``quantize``: "auto" (the default) keeps a quantized GGUF file's weights quantized as
        stored (4-bit stays 4-bit) and loads other checkpoints as they are; "none" dequantizes;
        "int4" / "int8": weight-only quantized layers, the fast path for decoding on CPU, quantized
        layer by layer while loading; "float16": float16 weights computed in float32 (CPU), the
        fast path for batches and for serving. ``compile``: decoding steps through torch.compile
        (``compile_decoding``): a minute's wait on first use (docs/speed.md). ``template``: the
        chat format; by default the one the adapter (or the fine-tuned checkpoint) was trained
        with, else the checkpoint's own ("auto"). An adapter is folded into float weights, which
        are then quantized as asked ("auto": as they were stored). ``tp``: this process is one of
        ``tp`` tensor-parallel ranks started by torchrun, holding its slice of each layer (``llamita.parallel``)."""
        check_kind(quantize, device)
        shard = None
        if tp != 1:
            if adapter is not None or compile:
                raise LlamitaError(f"--tp {tp} takes neither --adapter (fold it in first: llamita merge) nor --compile")
            shard = parallel.start(tp, device, read_checkpoint(source).config)
            device = shard.device
        if compile and quantize == "float16":
            raise LlamitaError("--compile cannot trace float16 layers (fbgemm's packed weights): drop --compile, "
                               "or use --quantize int4")
        if adapter is None:
            model = load_model(source, dtype=dtype, device=device, quantize=quantize, shard=shard)
        else:  # folded into float weights, then quantized: decoding runs at the base model's speed
            ckpt = read_checkpoint(source)
            model = model_from_checkpoint(ckpt, dtype=dtype, device=device)
            load_adapter(model, adapter, merge=True)
            quantize_model(model, stored_kind(ckpt) if quantize == "auto" else quantize)
        template = template or trained_template_of(source, adapter) or "auto"
        llm = cls(model, load_tokenizer(source), template, compile)
        llm.shard = shard
        return llm

    # -- requests ------------------------------------------------------------------------------
    def request(self, prompt_ids: list[int], *, truncate: bool = False, logprobs: Logprobs | None = None,
                prompt_only: bool = False, json_schema: dict | None = None, **options) -> Request:
        """A Request for ``prompt_ids``; options are SamplingParams fields. ``logprobs``: what to
        collect of its tokens' log-probabilities; ``prompt_only``: generate nothing (to score the prompt);
        ``json_schema``: the output is JSON that this schema accepts (``{"type": "object"}``: any
        object), and ends as soon as it is complete (a SchemaError if llguidance cannot compile it)."""
        params = SamplingParams(**options)
        if self.shard is not None and params.seed is None:  # every rank must sample the same tokens
            params.seed = self.shard.common_seed()
        limit = self.model.config.max_seq_len - 1  # room for at least one new token
        if len(prompt_ids) > limit:
            if not truncate:
                raise LlamitaError(
                    f"prompt has {len(prompt_ids)} tokens; the context window is {self.model.config.max_seq_len} "
                    "(pass truncate=True / --truncate to keep its end)")
            prompt_ids = prompt_ids[-limit:]
        if not prompt_ids:
            raise LlamitaError("empty prompt: give some text (or a model that adds BOS)")
        constraint = None if json_schema is None else json_constraint(self.tokenizer, json_schema, self.stop_ids)
        return Request(prompt_ids, params, self.stop_ids, self.tokenizer, logprobs=logprobs, prompt_only=prompt_only,
                       constraint=constraint)

    def encode(self, prompt: str, special: bool = False) -> list[int]:
        """A plain prompt's ids (BOS first where the checkpoint adds one). Its text stays text:
        ``"<s>"`` or ``"<|im_end|>"`` in it are characters unless ``special=True`` parses them."""
        return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, special=special)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        return encode_chat(self.tokenizer, messages, self.template)

    @property
    def single_turn(self) -> bool:
        """Whether the chat format takes one instruction only (Alpaca's)."""
        return resolve_template(self.tokenizer, self.template) == "alpaca"

    # -- text in, text out -----------------------------------------------------------------------
    def stream(self, prompt: str, **options) -> Iterator[str]:
        """The continuation of ``prompt``, chunk by chunk as it is generated."""
        yield from self._run_one(self.request(self.encode(prompt), **options))

    def generate(self, prompt: str, **options) -> str:
        return "".join(self.stream(prompt, **options))

    def stream_chat(self, messages: list[Message], **options) -> Iterator[str]:
        """The assistant's reply to ``messages`` ({"role", "content"} dicts), chunk by chunk."""
        yield from self._run_one(self.request(self.encode_chat(messages), **options))

    def chat(self, messages: list[Message], **options) -> str:
        return "".join(self.stream_chat(messages, **options))

    def generate_batch(self, prompts: list[str], **options) -> list[str]:
        """Continuations of several prompts of any lengths, decoded together in one batch."""
        return self._run_batch([self.request(self.encode(p), **options) for p in prompts])

    def chat_batch(self, conversations: list[list[Message]], **options) -> list[str]:
        return self._run_batch([self.request(self.encode_chat(m), **options) for m in conversations])

    def _run_one(self, request: Request) -> Iterator[str]:
        """One request in a KV cache that this LLM keeps from call to call: a prompt that starts
        like the last one's prompt and reply, a chat's next turn, runs only its new tokens. The
        cache is sized in powers of two (``cache_size_for``), so it is rarely outgrown."""
        need = len(request.prompt_ids) + request.params.max_new_tokens
        size = cache_size_for(need, self.model.config.max_seq_len, compiled=True)
        if self.cache is None or self.cache.slots < size:
            self.cache = KVCache(self.model, 1, size)
        _, cached, _ = self.cache.reuse(request.prompt_ids, [0])
        self.cache.held[0] = []  # unknown until this request is done
        yield from (text for _, text in complete(self.model, self.cache, [request], self.forward, cached=[cached]))
        self.cache.held[0] = request.fed_ids

    def _run_batch(self, requests: list[Request]) -> list[str]:
        if not requests:
            return []
        texts = [""] * len(requests)
        for i, text in generate(self.model, requests, self.forward):
            texts[i] += text
        return texts

"""Training records -> token ids and labels: Alpaca, chat, ShareGPT, plain-text and preference data.

Prompts are rendered with the same code generation uses (``chat.alpaca_prompt``, ``chat.encode_chat``),
so a model tuned with a format is asked in exactly that format later. ``labels`` are the ids where
a token carries loss and ``IGNORE`` elsewhere: by default only the responses (and the tokens that
end them, EOS or ``<|im_end|>``), so the model learns to answer, not to write prompts.

A preference pair (DPO) is two such records that share their prompt, rendered by the same code:
its chosen and its rejected completion, labels on the completion only (TRL's convention).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llamita.chat import Message, alpaca_prompt, encode_chat, resolve_template
from llamita.errors import LlamitaError
from llamita.tokenizer import Tokenizer, surrogate_error, unpaired_surrogate

IGNORE = -100  # cross_entropy's ignore_index
PREFERENCE = ("preference", "preference_chat")  # {"prompt", "chosen", "rejected"} strings; message lists
FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text", *PREFERENCE)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # ids[t] where token t carries loss, else IGNORE
    positions: list[int] | None = None  # per-record positions when several records are packed
    segments: list[int] = field(default_factory=list)  # which packed record each token belongs to


@dataclass
class Pair:
    """A preference pair: one prompt with its chosen and its rejected completion (labels on those only)."""

    chosen: Example
    rejected: Example
    ref: tuple[float, float] | None = None  # the reference model's summed log-probs, where cached (full DPO)


@dataclass
class Dataset:
    examples: list  # Example (SFT, text), or Pair (preference data)
    truncated: int = 0  # records cut at max_length
    source: str = ""
    dropped: int = 0  # preference pairs whose prompt alone fills max_length (no completion token left)

    def __len__(self) -> int:
        return len(self.examples)


# --- reading ------------------------------------------------------------------------------------


def read_records(source: str | Path) -> list[tuple[str, Any]]:
    """(where, record) pairs from a JSON array, a JSON Lines file or a Hugging Face Hub dataset name;
    ``where`` names the file and line (or record index) for error messages."""
    path = Path(source).expanduser()
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
            return _hub_records(str(source))
        raise LlamitaError(f"{path}: no such file (nor a Hub dataset name like owner/name)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise LlamitaError(f"{path}: cannot be read as UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlamitaError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        records = [(f"{path}: record {i}", r) for i, r in enumerate(data)]
    else:
        records = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
            if line.strip():
                try:
                    records.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise LlamitaError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not records:
        raise LlamitaError(f"{path}: no records (the dataset is empty)")
    return records


def _hub_records(name: str) -> list[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise LlamitaError(f"{name}: not a file; to use a Hugging Face Hub dataset, install the "
                           "'datasets' extra (pip install 'llamita[datasets]')") from None
    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline: ConnectionError, or datasets' own errors
        raise LlamitaError(f"{name}: cannot load this Hub dataset ({type(e).__name__}: {e})".splitlines()[0]) from None
    return [(f"{name}: record {i}", dict(r)) for i, r in enumerate(rows)]


def _string(record: dict, key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if key not in record:
        raise LlamitaError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise LlamitaError(f"{where}: field {key!r} must be a string, not {type(value).__name__}")
    if (at := unpaired_surrogate(value)) is not None:
        raise LlamitaError(f"{where}: field {key!r}: {surrogate_error(value, at)}")
    return value


def record_kind(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise LlamitaError(f"{where}: expected a JSON object, not {type(record).__name__}")
    if "chosen" in record or "rejected" in record:
        return "preference_chat" if isinstance(record.get("chosen", record.get("rejected")), list) else "preference"
    for key, kind in (("messages", "chat"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
        if key in record:
            return kind
    raise LlamitaError(f"{where}: a record needs 'instruction' and 'output' (Alpaca), 'messages' (chat), "
                       "'conversations' (ShareGPT) or 'chosen' and 'rejected' (preference pairs)")


def to_messages(record: dict, where: str) -> list[Message]:
    """Any record as chat messages; Alpaca's input follows the instruction after a blank line."""
    kind = record_kind(record, where)
    if kind == "alpaca":
        instruction, inp = _string(record, "instruction", where), _string(record, "input", where, optional=True)
        user = f"{instruction}\n\n{inp}" if inp else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _string(record, "output", where)}]
    if kind in PREFERENCE:
        raise LlamitaError(f"{where}: a preference record (chosen / rejected): train on it with --objective dpo")
    key = "messages" if kind == "chat" else "conversations"
    messages = _turns(record, key, where, sharegpt=kind == "sharegpt")
    if not any(m["role"] == "assistant" for m in messages):
        raise LlamitaError(f"{where}: field {key!r} has no assistant turn to learn from")
    return messages


def _turns(record: dict, key: str, where: str, sharegpt: bool = False) -> list[Message]:
    """The non-empty list of chat turns in ``record[key]``, checked turn by turn."""
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    if key not in record:
        raise LlamitaError(f"{where}: missing field {key!r}")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise LlamitaError(f"{where}: field {key!r} must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise LlamitaError(f"{at}: expected an object with {role_key!r} and {text_key!r}")
        role = _string(turn, role_key, at)
        if sharegpt:
            if role not in _SHAREGPT_ROLES:
                raise LlamitaError(f"{at}: field 'from' is {role!r} (known: {', '.join(_SHAREGPT_ROLES)})")
            role = _SHAREGPT_ROLES[role]
        elif role not in ("system", "user", "assistant"):
            raise LlamitaError(f"{at}: field 'role' is {role!r} (known: system, user, assistant)")
        messages.append({"role": role, "content": _string(turn, text_key, at)})
    return messages


# --- rendering ------------------------------------------------------------------------------------


def encode_record(tokenizer: Tokenizer, record: Any, where: str, template: str = "alpaca",
                  train_on_prompt: bool = False, first_turn: int = 0) -> Example:
    """One record -> ids and labels in ``template`` ("alpaca", or a chat format: "auto", "llama-2", "chatml").
    Assistant turns before ``first_turn`` carry no loss (a preference pair's shared turns are its prompt)."""
    if template == "alpaca":
        ids, spans = _encode_alpaca(tokenizer, record, where)
    else:
        name = resolve_template(tokenizer, template)
        if name == "alpaca":
            ids, spans = _encode_alpaca(tokenizer, record, where)
        else:
            ids, spans = _encode_chat(tokenizer, to_messages(record, where), template, name, where)
    labels = list(ids) if train_on_prompt else [IGNORE] * len(ids)
    for start, end in spans[first_turn:]:
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _encode_alpaca(tokenizer: Tokenizer, record: Any, where: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Stanford Alpaca's prompt, then the response and EOS; the response is encoded on its own so the
    prompt's ids are exactly those ``llamita chat --template alpaca`` feeds the model."""
    messages = to_messages(record, where)
    if [m["role"] for m in messages] != ["user", "assistant"]:
        raise LlamitaError(f"{where}: the alpaca template takes one user turn and one assistant turn")
    if record_kind(record, where) == "alpaca":
        prompt = alpaca_prompt(record["instruction"], record.get("input") or "")
    else:
        prompt = alpaca_prompt(messages[0]["content"])
    ids = tokenizer.encode(prompt, bos=tokenizer.add_bos, special=False)
    answer = tokenizer.encode(messages[1]["content"], eos=True, special=False)
    return ids + answer, [(len(ids), len(ids) + len(answer))]


def _encode_chat(tokenizer: Tokenizer, messages: list[Message], template: str, name: str,
                 where: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The whole conversation, and the span of each assistant turn: from the end of the prompt that
    asks for it (what generation feeds the model) to the end of the rendered turn."""

    def render(msgs: list[Message], open_turn: bool) -> list[int]:
        try:
            if not open_turn and name == "llama-2":
                # Meta's format ends every finished exchange with EOS; render one more (open) user
                # turn and cut it off where its BOS starts.
                ids = encode_chat(tokenizer, msgs + [{"role": "user", "content": "."}], template)
                return ids[: len(ids) - ids[::-1].index(tokenizer.bos_id) - 1]
            return encode_chat(tokenizer, msgs, template, add_generation_prompt=open_turn)
        except LlamitaError as e:
            raise LlamitaError(f"{where}: {e}") from None

    full = render(messages, open_turn=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], open_turn=True), render(messages[: i + 1], open_turn=False)
        if full[: len(prompt)] != prompt or full[: len(upto)] != upto:
            raise LlamitaError(f"{where}: messages[{i}]: the {name} template renders this turn differently "
                               "inside the conversation, so its tokens cannot be told apart")
        spans.append((len(prompt), len(upto)))
    return full, spans


def encode_text(tokenizer: Tokenizer, text: str, max_length: int) -> list[Example]:
    """Continued pretraining: the text's ids cut into windows of ``max_length``, every token learned.
    Raw text is text: ``<s>`` or ``<|im_end|>`` written in it are characters (``special=False``)."""
    ids = tokenizer.encode(text, bos=tokenizer.add_bos, eos=tokenizer.eos_id is not None, special=False)
    return [Example(ids[i: i + max_length], ids[i: i + max_length]) for i in range(0, len(ids), max_length)
            if len(ids[i: i + max_length]) > 1]


def load_dataset(source: str | Path, tokenizer: Tokenizer, *, format: str = "auto", template: str = "alpaca",
                 max_length: int = 1024, train_on_prompt: bool = False) -> Dataset:
    """Read, render and truncate a data file; ``format="text"`` reads plain text."""
    if format not in FORMATS:
        raise LlamitaError(f"unknown data format {format!r} (known: {', '.join(FORMATS)})")
    if format == "text":
        path = Path(source).expanduser()
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise LlamitaError(f"{path}: cannot be read as UTF-8 text ({e})") from None
        examples = encode_text(tokenizer, text, max_length) if text.strip() else []
        if not examples:
            raise LlamitaError(f"{path}: no text (the dataset is empty or only whitespace)")
        return Dataset(examples, source=str(source))
    examples, truncated = [], 0
    for where, record in read_records(source):
        _kind(record, where, format)
        if not any(m["content"].strip() for m in to_messages(record, where) if m["role"] == "assistant"):
            raise LlamitaError(f"{where}: the response is blank (empty or only whitespace): nothing to learn")
        ex = encode_record(tokenizer, record, where, template, train_on_prompt)
        if len(ex.ids) > max_length:
            ex, truncated = Example(ex.ids[:max_length], ex.labels[:max_length]), truncated + 1
        examples.append(ex)
    return Dataset(examples, truncated, str(source))


def _kind(record: Any, where: str, format: str) -> str:
    kind = record_kind(record, where)
    if format != "auto" and kind != format:
        raise LlamitaError(f"{where}: a {kind} record in data read as --format {format}")
    return kind


# --- preference pairs (DPO) -------------------------------------------------------------------------


def pair_messages(record: dict, where: str) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen, rejected) turns of a preference record: ``{"prompt", "chosen", "rejected"}``
    strings, or ``{"chosen": [messages], "rejected": [messages]}`` (with an optional ``"prompt": [messages]``
    before both) whose shared leading turns are the prompt, as TRL's ``extract_prompt`` takes it."""
    if record_kind(record, where) == "preference":
        prompt = [{"role": "user", "content": _string(record, "prompt", where)}]
        chosen, rejected = ([{"role": "assistant", "content": _string(record, key, where)}]
                            for key in ("chosen", "rejected"))
    else:
        head = _turns(record, "prompt", where) if "prompt" in record else []
        chosen, rejected = (head + _turns(record, key, where) for key in ("chosen", "rejected"))
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise LlamitaError(f"{where}: fields 'chosen' and 'rejected' share no prompt turn: both must start "
                               "with the same prompt messages")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if chosen == rejected:
        raise LlamitaError(f"{where}: fields 'chosen' and 'rejected' are the same answer: nothing to prefer")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns and turns[0]["role"] != "assistant":
            raise LlamitaError(f"{where}: field {key!r}: the completion (after the shared prompt turns) must "
                               f"start with an assistant turn, not {turns[0]['role']!r}")
        if not any(m["content"].strip() for m in turns if m["role"] == "assistant"):
            raise LlamitaError(f"{where}: field {key!r}: the completion is blank (empty or only whitespace)")
    return prompt, chosen, rejected


def encode_pair(tokenizer: Tokenizer, record: dict, where: str, template: str = "alpaca") -> Pair:
    """A preference record -> two SFT examples rendered by ``encode_record`` (the same template code),
    each labelled on its completion only."""
    prompt, chosen, rejected = pair_messages(record, where)
    shared = sum(m["role"] == "assistant" for m in prompt)  # earlier assistant turns belong to the prompt
    return Pair(*(encode_record(tokenizer, {"messages": prompt + turns}, where, template, first_turn=shared)
                  for turns in (chosen, rejected)))


def prompt_length(example: Example) -> int:
    """Tokens before the first labelled one (the prompt, as TRL's tokenizer split finds it)."""
    return next((i for i, label in enumerate(example.labels) if label != IGNORE), len(example.ids))


def load_pairs(source: str | Path, tokenizer: Tokenizer, *, format: str = "auto", template: str = "alpaca",
               max_length: int = 1024) -> Dataset:
    """Read and render preference pairs. TRL's truncation rule: a pair whose prompt alone takes
    ``max_length`` tokens keeps no completion token and is dropped (counted in ``dropped``); the
    others keep the first ``max_length`` tokens of prompt + completion (counted in ``truncated``)."""
    if format not in ("auto", *PREFERENCE):
        raise LlamitaError(f"--format {format}: --objective dpo reads preference data (auto, {', '.join(PREFERENCE)})")
    pairs, truncated, dropped = [], 0, 0
    for where, record in read_records(source):
        if (kind := _kind(record, where, format)) not in PREFERENCE:
            raise LlamitaError(f"{where}: --objective dpo takes preference records ({{'prompt', 'chosen', 'rejected'}}"
                               f" or {{'chosen': [messages], 'rejected': [messages]}}), not a {kind} record")
        pair = encode_pair(tokenizer, record, where, template)
        if min(prompt_length(pair.chosen), prompt_length(pair.rejected)) >= max_length:
            dropped += 1
            continue
        if max(len(pair.chosen.ids), len(pair.rejected.ids)) > max_length:
            truncated += 1
            pair = Pair(*(Example(e.ids[:max_length], e.labels[:max_length]) for e in (pair.chosen, pair.rejected)))
        pairs.append(pair)
    return Dataset(pairs, truncated, str(source), dropped)


def collate_pairs(pairs: list[Pair], pad_id: int = 0) -> dict[str, Tensor]:
    """One batch of every chosen row, then every rejected row (TRL's concatenated forward), right-padded;
    ``ref_logps`` [2B] where the pairs carry cached reference log-probs."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    if all(p.ref is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs])
    return batch


def pair_files(chosen: str | Path, rejected: str | Path) -> list[dict]:
    """Preference records from two files of SFT records (Alpaca, chat or ShareGPT) answering the same
    prompts: each record of ``chosen`` paired with the record of ``rejected`` that has its prompt
    (the turns before the last assistant turn), as ``{"chosen": [messages], "rejected": [messages]}``."""
    answers: dict[str, list[Message]] = {}
    for where, record in read_records(rejected):
        messages = _sft_messages(record, where)
        answers.setdefault(json.dumps(messages[:-1]), messages)
    out = []
    for where, record in read_records(chosen):
        messages = _sft_messages(record, where)
        other = answers.get(json.dumps(messages[:-1]))
        if other is None:
            raise LlamitaError(f"{where}: no record of {rejected} answers this prompt")
        pair = {"chosen": messages, "rejected": other}
        pair_messages(pair, where)  # the same checks as training: an identical answer is refused here
        out.append(pair)
    return out


def _sft_messages(record: Any, where: str) -> list[Message]:
    messages = to_messages(record, where)
    if messages[-1]["role"] != "assistant":
        raise LlamitaError(f"{where}: the last turn must be the assistant's answer")
    return messages


def fingerprint(source: str | Path) -> str:
    """sha256 of the data file's bytes (a Hub dataset's: of its records as JSON): a resumed run
    checks that it trains on the data its checkpoint was trained on."""
    digest = hashlib.sha256()
    path = Path(source).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    else:
        digest.update(json.dumps([r for _, r in read_records(source)], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation): a seeded random ``fraction`` of the records (at least one) held out."""
    n = len(dataset)
    n_val = max(1, math.ceil(n * fraction))
    if n_val >= n:
        raise LlamitaError(f"--val-split {fraction}: the dataset has only {n} records, too few to split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val = set(order[:n_val])
    return (Dataset([e for i, e in enumerate(dataset.examples) if i not in val], dataset.truncated, dataset.source),
            Dataset([e for i, e in enumerate(dataset.examples) if i in val], 0, dataset.source))


# --- packing and batches ------------------------------------------------------------------------------


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate records, in order, into sequences of at most ``max_length`` tokens. Each keeps its
    own positions (from 0) and segment number so attention can stay within it."""
    packed: list[Example] = []
    current = Example([], [], [], [])
    for ex in examples:
        if current.ids and len(current.ids) + len(ex.ids) > max_length:
            packed.append(current)
            current = Example([], [], [], [])
        segment = current.segments[-1] + 1 if current.segments else 0
        current.ids += ex.ids
        current.labels += ex.labels
        current.positions += list(range(len(ex.ids)))
        current.segments += [segment] * len(ex.ids)
    if current.ids:
        packed.append(current)
    return packed


def order(n: int, start: int, count: int, seed: int) -> list[int]:
    """Indices ``start`` .. ``start + count`` of an endless stream of epochs, each a fresh seeded
    permutation of the n records: the data position is then just a number, saved in checkpoints."""
    out, perms = [], {}
    for j in range(start, start + count):
        epoch = j // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.append(perms[epoch][j % n])
    return out


def collate(examples: list[Example], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-padded ``ids`` and ``labels`` [B, T]; for packed examples also ``positions`` and the
    block-diagonal causal ``mask`` [B, 1, T, T] that keeps attention inside each record."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    batch = {"ids": ids, "labels": labels}
    if any(e.positions is not None for e in examples):
        positions = torch.zeros_like(ids)
        segments = torch.full_like(ids, -1)
        for i, e in enumerate(examples):
            positions[i, : len(e.ids)] = torch.tensor(e.positions or range(len(e.ids)))
            segments[i, : len(e.ids)] = torch.tensor(e.segments or [0] * len(e.ids))
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = segments[:, :, None] == segments[:, None, :]
        batch["positions"] = positions
        batch["mask"] = (same & causal)[:, None]  # padding rows see themselves: no all-false row (NaN)
    return batch

"""Tensor-parallel inference over torch.distributed: one process per rank (torchrun), each holding a
slice of every layer, as gpt-fast's tp.py and Megatron-LM split them.

q/k/v and gate/up are split by output features (each rank computes its own heads, its kv heads
and its part of the feed-forward width), o and down by input features, so that attention and the
MLP each end in one all-reduce; the embedding is split by its dim and the output layer by the
vocabulary, each followed by an all-gather. This is how Meta cut its ``consolidated.NN.pth``
files, so with as many shards as ranks each rank reads only its own file; from safetensors each
reads its rows or columns (``layout.shard_dim``). The model's forward is unchanged: its layers are
swapped for narrower ones, and forward hooks do the communication. The KV cache follows from the
narrower attention layers (their kv heads). gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import atexit
import datetime
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llamita.config import Config
from llamita.errors import LlamitaError
from llamita.formats.checkpoint import Checkpoint
from llamita.model import Llama


def check_divides(config: Config, tp: int) -> None:
    """Every rank must get whole heads, whole kv heads and an equal share of the feed-forward width."""
    if config.n_heads % tp or config.n_kv_heads % tp:
        raise LlamitaError(f"--tp {tp} must divide the model's {config.n_heads} attention heads and "
                           f"{config.n_kv_heads} kv heads")
    if config.hidden_dim % tp:
        raise LlamitaError(f"--tp {tp} must divide the model's feed-forward width {config.hidden_dim}")


def launch_hint(tp: int) -> str:
    return f"torchrun --nproc-per-node {tp} -m llamita generate|chat|serve ... --tp {tp}"


@dataclass
class TensorParallel:
    """This process's rank among ``world`` and its device; what loading and decoding ask of it."""

    rank: int
    world: int
    device: torch.device

    # -- loading (llamita.formats.load.Shard) ------------------------------------------------------
    def split_model(self, model: Llama) -> None:
        """Swap ``model``'s layers (on the meta device) for this rank's narrower ones and hook in
        the collectives; its config stays the whole model's, but for an output layer of its own."""
        c, w = model.config, self.world
        check_divides(c, w)
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            attn.n_heads, attn.n_kv_heads = c.n_heads // w, c.n_kv_heads // w
            attn.qkv_proj = nn.Linear(c.dim, (attn.n_heads + 2 * attn.n_kv_heads) * c.head_dim, bias=False)
            attn.o_proj = nn.Linear(attn.n_heads * c.head_dim, c.dim, bias=False)
            mlp.gate_up_proj = nn.Linear(c.dim, 2 * c.hidden_dim // w, bias=False)
            mlp.down_proj = nn.Linear(c.hidden_dim // w, c.dim, bias=False)
            for module in (attn, mlp):  # partial sums of the whole output: one all-reduce each
                module.register_forward_hook(lambda _m, _i, out: self._all_reduce(out))
        model.embed_tokens = nn.Embedding(c.vocab_size, c.dim // w)
        model.embed_tokens.register_forward_hook(lambda _m, _i, out: self._gather(out, c.dim))
        # The vocabulary in torch.chunk's pieces, the last padded with zero rows so that all are equal.
        model.lm_head = nn.Linear(c.dim, -(-c.vocab_size // w), bias=False)
        # Gathered at the model's output, so that a quantized output layer swapped in later keeps it.
        model.register_forward_hook(lambda _m, _i, out: self._gather(out, c.vocab_size))
        # A tied output layer is the embedding's rows here, the embedding its columns: two tensors.
        model.config = replace(c, tie_embeddings=False)

    def tensors(self, ckpt: Checkpoint) -> Iterator[tuple[str, Tensor, Path]]:
        """This rank's slices of ``ckpt``'s tensors, the output layer's padded to its equal share."""
        if ckpt.shard is None:
            raise LlamitaError(f"{ckpt.path}: --tp reads Hugging Face and Meta checkpoints, not {ckpt.format}: "
                               "convert it first (llamita convert SOURCE DIR)")
        rows = -(-ckpt.config.vocab_size // self.world)
        for name, tensor, file in ckpt.shard(self.rank, self.world):
            if name == "lm_head.weight" and tensor.shape[0] < rows:
                tensor = torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])
            yield name, tensor, file

    # -- decoding ----------------------------------------------------------------------------------
    def _all_reduce(self, out: Tensor) -> Tensor:
        dist.all_reduce(out)
        return out

    def _gather(self, out: Tensor, size: int) -> Tensor:
        """Every rank's piece of the last dim, joined in rank order and cut to ``size``."""
        pieces = [torch.empty_like(out) for _ in range(self.world)]
        dist.all_gather(pieces, out.contiguous())
        return torch.cat(pieces, dim=-1)[..., :size]

    def shared(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0 (reading stdin, drawing a seed), its value (or its exception) on
        every rank: the others would read different lines of the one stdin, or draw other seeds."""
        if self.rank == 0:
            try:
                message = (True, compute())
            except Exception as e:  # EOFError at the end of stdin, an undecodable line...
                message = (False, e)
            self.send(message)
        else:
            message = self.receive()
        ok, value = message
        if not ok:
            raise value
        return value

    def send(self, message: Any) -> None:
        """Rank 0: a picklable ``message`` to every other rank (which ``receive`` it)."""
        dist.broadcast_object_list([message], src=0, device=self.device if self.device.type == "cuda" else None)

    def receive(self) -> Any:
        """A rank but 0: the next message rank 0 ``send``s (waiting for it as long as it takes)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def common_seed(self) -> int:
        """A seed that every rank shares, for a request that gave none: all ranks sample the same token."""
        return self.shared(lambda: random.randrange(2**63))


_ACTIVE: TensorParallel | None = None


def start(tp: int, device: str | torch.device, config: Config) -> TensorParallel:
    """This process's rank, the process group started once (gloo on CPU, NCCL on CUDA): checks that
    ``tp`` divides the model and that torchrun started ``tp`` processes."""
    global _ACTIVE
    check_divides(config, tp)
    if "WORLD_SIZE" not in os.environ:
        raise LlamitaError(f"--tp {tp} runs one process per rank: launch it with `{launch_hint(tp)}`")
    world = int(os.environ["WORLD_SIZE"])
    if world != tp:
        raise LlamitaError(f"--tp {tp}, but torchrun started {world} processes: give --nproc-per-node {tp}")
    if _ACTIVE is not None:
        return _ACTIVE
    cuda = torch.device(device).type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if cuda else torch.device(device)
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # Ranks may wait long for rank 0: a chat waits for its user, a server for requests.
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None,
                                timeout=datetime.timedelta(days=365))
        atexit.register(dist.destroy_process_group)
    _ACTIVE = TensorParallel(dist.get_rank(), dist.get_world_size(), dev)
    return _ACTIVE


def active() -> TensorParallel | None:
    """The rank this process runs as, once ``start`` has run; None in a single process."""
    return _ACTIVE

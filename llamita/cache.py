"""The KV cache: keys and values kept between forward passes, owned by whoever decodes.

``LLM`` keeps one (a row) from call to call, the server's engine one (a row per request slot) for
its lifetime, ``generate`` one per batch. The model never holds it: for each forward pass the
owner hands it a ``step`` saying where this pass's tokens go, and the model calls that step once
per layer (``Llama.forward(kv=...)``).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from llamita.model import KVUpdate, Llama


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share from the start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class KVCache:
    """Keys and values of every layer, [rows, kv heads, slots, head dim] each, and the tokens each
    row holds from position 0 (``held``), so that a prompt that starts the same way reuses them."""

    def __init__(self, model: Llama, rows: int, slots: int):
        w = model.norm.weight  # the body's dtype, which may differ from the embedding's (quantization)
        # The attention layers' own head counts: a tensor-parallel rank's share of the kv heads.
        attn = model.layers[0].self_attn
        shape = (rows, attn.n_kv_heads, slots, attn.head_dim)
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in model.layers]
        if w.is_cuda:  # compiled decoding's CUDA graphs write these in place (``compile_decoding``)
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t, guard=False)  # a new cache: no recompile
        self.row_ids = torch.arange(rows, device=w.device)
        self.held: list[list[int]] = [[] for _ in range(rows)]

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    @property
    def device(self) -> torch.device:
        return self.row_ids.device

    def reuse(self, prompt: list[int], rows: list[int], share: bool = True,
              sources: list[int] = ()) -> tuple[int, int, int | None]:
        """Where to run ``prompt``: a row among ``rows``, how many of its first tokens that row will
        hold (all but the last at most: that one must run to give logits), and the row to copy them
        from (``copy_prefix``), or None when the chosen row holds them already.

        The row among ``rows`` whose cache holds the longest start of ``prompt`` is used in place;
        when a row among ``sources`` (others, e.g. busy decoding) holds a longer start, it is copied
        into an empty row of ``rows`` (or the lowest), keeping what the other free rows hold. With
        ``share`` False (a prompt that must run whole), no reuse at all. Lower rows win ties, so
        that a decoded slice of rows stays short."""
        spare = min(rows, key=lambda row: (bool(self.held[row]), row))
        n, source = 0, None
        for row in (*rows, *sources) if share else ():
            shared = common_prefix(prompt, self.held[row])
            if shared > n:
                n, source = shared, row
        n = min(n, len(prompt) - 1)
        if source is not None and source in rows:
            return source, n, None
        return (spare, n, source) if n else (spare, 0, None)

    def copy_prefix(self, source: int, row: int, n: int) -> None:
        """Row ``source``'s first ``n`` positions into ``row`` (a shared prompt's start, computed once)."""
        for k, v in zip(self.k, self.v):
            k[row, :, :n] = k[source, :, :n]
            v[row, :, :n] = v[source, :, :n]
        self.held[row] = self.held[source][:n]

    def step(self, positions: Tensor, length: int, rows: Tensor | slice | None = None) -> KVUpdate:
        """For one forward pass of B rows: each token's keys and values go to its position
        (``positions`` [B, T]) in cache ``rows`` (default: the first B, read back as a slice, not a
        copy); attention reads those rows' first ``length`` slots."""
        if rows is None:  # a slice of rows: a scatter along the slots, ~50x faster than index_put here
            B, T = positions.shape
            _, heads, _, dim = self.k[0].shape
            index = positions[:, None, :, None].expand(B, heads, T, dim)  # once per pass, not per layer
            return partial(self._scatter_rows, index=index, rows=slice(0, B), length=length)
        index = self.row_ids[rows][:, None]
        return partial(self._write_rows, positions=positions, rows=rows, index=index, length=length)

    def _scatter_rows(self, layer: int, k: Tensor, v: Tensor, *, index: Tensor, rows: slice,
                      length: int) -> tuple[Tensor, Tensor]:
        self.k[layer][rows].scatter_(2, index, k.to(self.k[layer].dtype))
        self.v[layer][rows].scatter_(2, index, v.to(self.v[layer].dtype))
        return self.k[layer][rows, :, :length], self.v[layer][rows, :, :length]

    def sequence_step(self, positions: Tensor, length: int) -> KVUpdate:
        """``step`` for one sequence in row 0 at ``positions`` [T]: a copy along positions, the
        cheapest write (a chat, a single prompt)."""
        return partial(self._write_sequence, positions=positions, length=length)

    def _write_rows(self, layer: int, k: Tensor, v: Tensor, *, positions: Tensor, rows: Tensor | slice,
                    index: Tensor, length: int) -> tuple[Tensor, Tensor]:
        # Advanced indices around a slice put the indexed dims first: [B, T, Hkv, D].
        self.k[layer][index, :, positions] = k.transpose(1, 2)
        self.v[layer][index, :, positions] = v.transpose(1, 2)
        return self.k[layer][rows, :, :length], self.v[layer][rows, :, :length]

    def _write_sequence(self, layer: int, k: Tensor, v: Tensor, *, positions: Tensor,
                        length: int) -> tuple[Tensor, Tensor]:
        self.k[layer][:1].index_copy_(2, positions, k)
        self.v[layer][:1].index_copy_(2, positions, v)
        return self.k[layer][:1, :, :length], self.v[layer][:1, :, :length]


def causal_mask(positions: Tensor, length: int) -> Tensor:
    """Bool [B, 1, T, length]: a key slot is visible to a query when it holds an earlier (or the
    same) position of that query's row; ``positions`` [B, T]."""
    return torch.arange(length, device=positions.device) <= positions[:, None, :, None]

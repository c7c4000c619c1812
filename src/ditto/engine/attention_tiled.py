"""Paged attention for GPUs under `batch_invariant`: one path for every query row, fixed shapes.

`attention.py` relies on CPU kernels whose per-row order does not depend on the batch once the
inner sizes are fixed. On a GPU a batched matmul or a reduction may choose another kernel when the
number of rows changes, and `index_add_` adds with atomics in whatever order threads arrive. So
here:

- every query row, decode or prefill, is one "row" with its own list of cache blocks (a prefill
  token at position p reads blocks 0 .. p // block_size) — a token's bits cannot depend on
  whether it was computed in a prefill chunk of some length or as a decode step;
- scores and partial outputs are computed on chunks of exactly CHUNK (row, block) pairs, so every
  matmul and every reduction has one shape;
- the per-block partial sums of a row are added block after block by a loop of elementwise adds
  (zeros past a row's last block leave it unchanged), never by atomics.

The row max is a max (exact in any order), so it may use scatter_reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditto.engine.attention import DecodeRows, PagedAttention, PrefillChunk, group_queries

CHUNK = 256  # (row, block) pairs per matmul call


@dataclass
class Rows:
    tok_index: torch.Tensor  # (R,) offsets in the step tokens
    positions: torch.Tensor  # (R,)
    blocks: torch.Tensor  # (NB,) block ids, row after row, in block order
    block_row: torch.Tensor  # (NB,) which row each block serves
    block_first_pos: torch.Tensor  # (NB,) position of each block's first slot
    first: torch.Tensor  # (R,) index in `blocks` of each row's first block
    count: torch.Tensor  # (R,) blocks per row


def as_rows(decode: DecodeRows | None, prefills: list[PrefillChunk], block_size: int) -> Rows:
    """Decode rows and every prefill token as rows of one flat (row, block) list."""
    tok, pos, blocks, block_row, first_pos = [], [], [], [], []
    r = 0
    if decode is not None:
        tok.append(decode.tok_index)
        pos.append(decode.positions)
        blocks.append(decode.blocks)
        block_row.append(decode.block_row)
        first_pos.append(decode.block_first_pos)
        r = len(decode.tok_index)
    for chunk in prefills:
        n = chunk.num_tokens
        p = chunk.start_pos + torch.arange(n)  # (n,)
        nb = p // block_size + 1  # blocks each token reads
        row = torch.arange(n).repeat_interleave(nb)  # (sum nb,)
        j = torch.arange(len(row)) - (torch.cumsum(nb, 0) - nb).repeat_interleave(nb)  # block index in its row
        tok.append(chunk.tok_start + torch.arange(n))
        pos.append(p)
        blocks.append(chunk.blocks.to(p.device)[j])
        block_row.append(row + r)
        first_pos.append(j * block_size)
        r += n
    block_row_t = torch.cat(block_row)
    count = torch.bincount(block_row_t, minlength=r)
    first = torch.cumsum(count, 0) - count
    return Rows(torch.cat(tok), torch.cat(pos), torch.cat(blocks), block_row_t, torch.cat(first_pos), first, count)


class TiledPagedAttention(PagedAttention):
    def __init__(self, cache, slots, decode, prefills, scale: float, num_heads: int):
        super().__init__(cache, slots, decode, prefills, scale, num_heads)
        self.rows = as_rows(decode, prefills, cache.block_size)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None):
        self.cache.write(layer, self.slots, k, v)  # write before reading: every row reads the cache
        qf = q.float() * self.scale
        out = torch.empty(q.shape, dtype=torch.float32)
        out[self.rows.tok_index] = self._rows(qf[self.rows.tok_index], layer, window)
        return out.to(q.dtype)

    def _rows(self, q: torch.Tensor, layer: int, window: int | None) -> torch.Tensor:
        """q (R, H, D), one query per row -> (R, H, D)."""
        rows = self.rows
        r, h, d = q.shape
        bs, hkv = self.cache.block_size, self.cache.k[layer].shape[1]
        qg, g, m = group_queries(q, hkv)  # (R, Hkv, M, D)
        nb = len(rows.blocks)
        starts = range(0, nb, CHUNK)

        def chunk(start: int) -> torch.Tensor:
            return torch.arange(start, start + CHUNK).clamp_(max=nb - 1)  # tail repeats the last pair

        scores = torch.empty(len(starts) * CHUNK, hkv, m, bs)  # (NB padded, Hkv, M, bs)
        for s0 in starts:
            idx = chunk(s0)
            kb, _ = self.cache.read(layer, rows.blocks[idx])  # (CHUNK, Hkv, D, bs)
            s = torch.matmul(qg[rows.block_row[idx]], kb)  # (CHUNK, Hkv, M, bs)
            key_pos = rows.block_first_pos[idx][:, None] + torch.arange(bs)  # (CHUNK, bs)
            qpos = rows.positions[rows.block_row[idx]][:, None]  # (CHUNK, 1)
            visible = key_pos <= qpos
            if window is not None:
                visible &= key_pos > qpos - window
            scores[s0 : s0 + CHUNK] = s.masked_fill(~visible[:, None, None, :], float("-inf"))
        scores = scores[:nb]
        index = rows.block_row[:, None, None].expand(nb, hkv, m)
        row_max = torch.full((r, hkv, m), float("-inf")).scatter_reduce_(0, index, scores.amax(-1), "amax")
        parts = torch.empty(len(starts) * CHUNK, hkv, m, d + 1)  # [..., :d] sum p v, [..., d] sum p
        for s0 in starts:
            idx = chunk(s0)
            _, vb = self.cache.read(layer, rows.blocks[idx])  # (CHUNK, Hkv, bs, D)
            p = torch.exp(scores[idx] - row_max[rows.block_row[idx]][..., None])  # (CHUNK, Hkv, M, bs)
            parts[s0 : s0 + CHUNK, ..., :d] = torch.matmul(p, vb)
            parts[s0 : s0 + CHUNK, ..., d] = p.sum(-1)
        acc = torch.zeros(r, hkv, m, d + 1)
        for j in range(int(rows.count.max())):  # a row's blocks added in block order, no atomics
            valid = (rows.count > j)[:, None, None, None]
            acc = acc + torch.where(valid, parts[(rows.first + j).clamp(max=nb - 1)], 0.0)
        o = acc[..., :d] / acc[..., d:]
        return o[:, :, :g].reshape(r, h, d)  # (R, Hkv, G, D) -> (R, H, D)


def tiled_context(cache, slots, decode, prefills, cfg) -> TiledPagedAttention:
    return TiledPagedAttention(cache, slots, decode, prefills, cfg.scale, cfg.num_heads)

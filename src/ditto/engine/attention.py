"""Paged attention over the block KV cache, with a fixed reduction order per query row.

Every query row is computed the same way whatever else is in the batch: its keys are read
block by block (split size = the cache block size), each block's scores and partial output
come from a matmul of fixed inner shape, and the partial outputs are added block after block
in order. Decode rows of all sequences run together; a prefill chunk runs per sequence.
A row's bits therefore do not depend on batch size, batch composition, chunked-prefill split
or prefix-cache state — the `batch_invariant` contract — and there is no padding to the
longest sequence (only the tail of each sequence's last block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_ROWS = 4  # matmuls with fewer rows take a different kernel (another summation order): pad up


class KVCache:
    """Per-layer K and V tensors of shape (num_blocks, block_size, Hkv, D)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.block_size = block_size
        self.dtype = dtype

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies])
        dst = torch.tensor([d for _, d in copies])
        for t in self.k + self.v:
            t[dst] = t[src]

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class PrefillChunk:
    tok_start: int  # offset in the flattened step tokens
    num_tokens: int
    start_pos: int  # position of the first token
    blocks: torch.Tensor  # (nb,) block ids covering positions [0, start_pos + num_tokens)


@dataclass
class DecodeRows:
    tok_index: torch.Tensor  # (R,) offsets in the step tokens
    positions: torch.Tensor  # (R,)
    blocks: torch.Tensor  # (NB,) block ids of all rows, row after row
    block_row: torch.Tensor  # (NB,) which row each block serves
    block_first_pos: torch.Tensor  # (NB,) position of each block's first slot


def _row_partials(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-block softmax partials. s (NB, Hkv, M, bs) masked scores minus the row max,
    v (NB, Hkv, bs, D) -> (NB, Hkv, M, D + 1): sum_j p_j v_j and sum_j p_j in the last column."""
    p = torch.exp(s)
    ones = torch.ones(v.shape[:-1] + (1,), dtype=v.dtype)
    return torch.matmul(p, torch.cat([v, ones], dim=-1))  # (NB, Hkv, M, D+1)


class PagedAttention:
    """The AttentionContext the runner hands the model for one step."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, decode: DecodeRows | None, prefills: list[PrefillChunk],
                 scale: float, num_heads: int):
        self.cache = cache
        self.slots = slots
        self.decode = decode
        self.prefills = prefills
        self.scale = scale
        self.h = num_heads

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None):
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        nb_total, bs, hkv, d = kc.shape
        kc.view(nb_total * bs, hkv, d)[self.slots] = k.to(kc.dtype)  # write before reading
        vc.view(nb_total * bs, hkv, d)[self.slots] = v.to(vc.dtype)
        qf = q.float() * self.scale
        out = torch.empty(q.shape, dtype=torch.float32)
        if self.decode is not None:
            out[self.decode.tok_index] = self._decode(qf[self.decode.tok_index], kc, vc, window)
        for chunk in self.prefills:
            sl = slice(chunk.tok_start, chunk.tok_start + chunk.num_tokens)
            out[sl] = self._prefill(qf[sl], chunk, kc, vc, window)
        return out.to(q.dtype)

    def _decode(self, q: torch.Tensor, kc, vc, window: int | None) -> torch.Tensor:
        """q (R, H, D) one query per row -> (R, H, D)."""
        rows = self.decode
        r, h, d = q.shape
        bs, hkv = kc.shape[1], kc.shape[2]
        g = h // hkv
        m = max(g, MIN_ROWS)
        qg = q.view(r, hkv, g, d)  # (R, Hkv, G, D)
        if m > g:
            qg = torch.cat([qg, qg.new_zeros(r, hkv, m - g, d)], dim=2)  # (R, Hkv, M, D)
        qb = qg[rows.block_row]  # (NB, Hkv, M, D)
        kb = kc[rows.blocks].float().permute(0, 2, 3, 1)  # (NB, bs, Hkv, D) -> (NB, Hkv, D, bs)
        vb = vc[rows.blocks].float().permute(0, 2, 1, 3)  # (NB, Hkv, bs, D)
        s = torch.matmul(qb, kb)  # (NB, Hkv, M, bs)
        key_pos = rows.block_first_pos[:, None] + torch.arange(bs)  # (NB, bs)
        qpos = rows.positions[rows.block_row][:, None]  # (NB, 1)
        visible = key_pos <= qpos
        if window is not None:
            visible &= key_pos > qpos - window
        s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
        row_max = torch.full((r, hkv, m), float("-inf")).index_reduce_(
            0, rows.block_row, s.amax(-1), "amax", include_self=True
        )  # (R, Hkv, M)
        part = _row_partials(s - row_max[rows.block_row][..., None], vb)  # (NB, Hkv, M, D+1)
        acc = torch.zeros(r, hkv, m, d + 1).index_add_(0, rows.block_row, part)  # blocks in order
        o = acc[..., :d] / acc[..., d:]
        return o[:, :, :g].reshape(r, h, d)  # (R, Hkv, G, D) -> (R, H, D)

    def _prefill(self, q: torch.Tensor, chunk: PrefillChunk, kc, vc, window: int | None) -> torch.Tensor:
        """q (n, H, D) of one sequence's consecutive tokens -> (n, H, D)."""
        n, h, d = q.shape
        bs, hkv = kc.shape[1], kc.shape[2]
        g = h // hkv
        rows = n * g
        m = max(rows, MIN_ROWS)
        qg = q.view(n, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, rows, d)  # (Hkv, n*G, D), row = t*G + g
        if m > rows:
            qg = torch.cat([qg, qg.new_zeros(hkv, m - rows, d)], dim=1)
        qpos = chunk.start_pos + torch.arange(n).repeat_interleave(g)  # (n*G,)
        if m > rows:
            qpos = torch.cat([qpos, qpos[-1:].expand(m - rows)])
        blocks = chunk.blocks
        if window is not None:  # blocks wholly before every query's window contribute exact zeros: skip
            first = max(0, (chunk.start_pos - window + 1) // bs)
            block_index = torch.arange(first, len(blocks))
            blocks = blocks[first:]
        else:
            block_index = torch.arange(len(blocks))
        kb = kc[blocks].float().permute(0, 2, 3, 1)  # (nb, Hkv, D, bs)
        vb = vc[blocks].float().permute(0, 2, 1, 3)  # (nb, Hkv, bs, D)
        s = torch.matmul(qg.unsqueeze(0), kb)  # (nb, Hkv, M, bs)
        key_pos = block_index[:, None] * bs + torch.arange(bs)  # (nb, bs)
        visible = key_pos[:, None, :] <= qpos[None, :, None]  # (nb, M, bs)
        if window is not None:
            visible &= key_pos[:, None, :] > qpos[None, :, None] - window
        s = s.masked_fill(~visible[:, None], float("-inf"))
        row_max = s.amax(dim=(0, 3))  # (Hkv, M)
        part = _row_partials(s - row_max[None, :, :, None], vb)  # (nb, Hkv, M, D+1)
        zeros = torch.zeros(len(blocks), dtype=torch.long)
        acc = torch.zeros(1, hkv, m, d + 1).index_add_(0, zeros, part)[0]  # blocks in order
        o = acc[:, :rows, :d] / acc[:, :rows, d:]  # (Hkv, n*G, D)
        return o.reshape(hkv, n, g, d).permute(1, 0, 2, 3).reshape(n, h, d)  # -> (n, H, D)

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

from ditto.engine import attention_c

MIN_ROWS = 4  # matmuls with fewer rows take a different kernel (another summation order): pad up


class KVCache:
    """Per-layer K and V in fp32, bf16, fp16 or int8, laid out for the attention matmuls:
    K as (num_blocks, Hkv, D, block_size) and V as (num_blocks, Hkv, block_size, D), so gathering
    a sequence's blocks yields the matmul operands directly (no transpose copies).

    int8 stores one fp32 scale per (slot, head): x ~= q * scale with scale = max|x| / 127.

    The cache is reserved, not touched: the tensors come from `torch.empty` (on Linux a large CPU
    allocation is committed page by page as it is first written), and a block is zeroed when the
    block manager hands it out (`clear_blocks`, first use or reuse after eviction). The slots of a
    sequence's last block past its position are read and masked; zeros there keep the masked
    products exact (0 * NaN would be NaN), so no read can see garbage or another sequence's data.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype):
        self.k = [torch.empty(num_blocks, kv_heads, head_dim, block_size, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(num_blocks, kv_heads, block_size, head_dim, dtype=dtype) for _ in range(num_layers)]
        self.quantized = dtype == torch.int8
        if self.quantized:
            self.k_scale = [torch.empty(num_blocks, kv_heads, 1, block_size) for _ in range(num_layers)]
            self.v_scale = [torch.empty(num_blocks, kv_heads, block_size, 1) for _ in range(num_layers)]
        self.block_size = block_size
        self.dtype = dtype

    def _all(self) -> list[torch.Tensor]:
        return self.k + self.v + (self.k_scale + self.v_scale if self.quantized else [])

    def clear_blocks(self, blocks: list[int]) -> None:
        """Zero the given blocks (handed out by the block manager since the last step)."""
        clear_blocks(self._all(), blocks)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies])
        dst = torch.tensor([d for _, d in copies])
        for t in self._all():
            t[dst] = t[src]

    @staticmethod
    def _quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.float().abs().amax(-1).clamp_min(1e-8) / 127.0  # (T, Hkv)
        q = torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        return q, scale

    def where(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Where flat slot indices (T,) = block * block_size + offset live: (block, offset), and for a
        float cache the element indices of every (token, head, channel) in one layer's K and V
        tensors taken flat, so that a write is one `put_` per tensor (the same indices in every layer)."""
        block, off = slots // self.block_size, slots % self.block_size
        if self.quantized:
            return block, off
        _, hkv, d, bs = self.k[0].shape
        heads = torch.arange(hkv)[None, :, None]  # (1, Hkv, 1)
        chans = torch.arange(d)[None, None, :]  # (1, 1, D)
        head_block = block[:, None, None] * hkv + heads  # (T, Hkv, 1)
        k_index = (head_block * d + chans) * bs + off[:, None, None]  # (T, Hkv, D) into (NB, Hkv, D, bs)
        v_index = (head_block * bs + off[:, None, None]) * d + chans  # (T, Hkv, D) into (NB, Hkv, bs, D)
        return block, off, k_index.reshape(-1), v_index.reshape(-1)

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        where: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        """Store k, v (T, Hkv, D) at flat slot indices (T,) = block * block_size + offset (`where`:
        `self.where(slots)`, when the caller has it already)."""
        where = self.where(slots) if where is None else where
        if not self.quantized:
            self.k[layer].put_(where[2], k.to(self.dtype).reshape(-1))  # (T, Hkv, D) flat
            self.v[layer].put_(where[3], v.to(self.dtype).reshape(-1))
        else:
            block, off = where[0], where[1]
            (kq, ks), (vq, vs) = self._quant(k), self._quant(v)
            self.k[layer][block, :, :, off] = kq  # advanced indices first: (T, Hkv, D)
            self.v[layer][block, :, off, :] = vq
            self.k_scale[layer][block, :, 0, off] = ks
            self.v_scale[layer][block, :, off, 0] = vs

    def read(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 K^T (nb, Hkv, D, bs) and V (nb, Hkv, bs, D) of the given blocks."""
        k, v = self.k[layer][blocks].float(), self.v[layer][blocks].float()
        if self.quantized:
            k = k * self.k_scale[layer][blocks]
            v = v * self.v_scale[layer][blocks]
        return k, v

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        extra = 4 if dtype == torch.int8 else 0  # per-head scale
        return 2 * num_layers * kv_heads * (head_dim * size + extra)


def clear_blocks(tensors: list[torch.Tensor], blocks: list[int]) -> None:
    """Zero blocks (dim 0) of every tensor: the ids are the ones the block manager handed out."""
    if not blocks:
        return
    index = torch.tensor(sorted(set(blocks)), dtype=torch.long, device=tensors[0].device)
    for t in tensors:
        t.index_fill_(0, index, 0)


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


def group_queries(q: torch.Tensor, hkv: int) -> tuple[torch.Tensor, int, int]:
    """q (R, H, D) -> (R, Hkv, M, D): the G = H / Hkv query heads of each kv head as the rows of one
    matmul, zero-padded to M = max(G, MIN_ROWS) rows (fewer rows would take another kernel)."""
    r, h, d = q.shape
    g = h // hkv
    m = max(g, MIN_ROWS)
    qg = q.view(r, hkv, g, d)  # (R, Hkv, G, D)
    if m > g:
        qg = torch.cat([qg, qg.new_zeros(r, hkv, m - g, d)], dim=2)  # (R, Hkv, M, D)
    return qg, g, m


def kernel_rows(decode: DecodeRows | None, prefills: list[PrefillChunk]) -> tuple[torch.Tensor, ...]:
    """(tokens, positions, table, table_row) of every query row for attention_c: one table row per
    decode row (its blocks) and one per prefill chunk (shared by the chunk's tokens)."""
    tokens, positions, rows = [], [], []
    r = 0
    width = max([len(c.blocks) for c in prefills], default=1)
    if decode is not None:
        r = len(decode.tok_index)
        count = torch.bincount(decode.block_row, minlength=r)
        width = max(width, int(count.max()))
    table = torch.zeros(r + len(prefills), width, dtype=torch.long)
    if decode is not None:
        first = torch.cumsum(count, 0) - count
        table[decode.block_row, torch.arange(len(decode.blocks)) - first[decode.block_row]] = decode.blocks
        tokens.append(decode.tok_index)
        positions.append(decode.positions)
        rows.append(torch.arange(r))
    for i, chunk in enumerate(prefills):
        table[r + i, : len(chunk.blocks)] = chunk.blocks
        tokens.append(chunk.tok_start + torch.arange(chunk.num_tokens))
        positions.append(chunk.start_pos + torch.arange(chunk.num_tokens))
        rows.append(torch.full((chunk.num_tokens,), r + i))
    return torch.cat(tokens), torch.cat(positions), table, torch.cat(rows)


def _row_partials(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block softmax partials. s (NB, Hkv, M, bs) masked scores minus the row max,
    v (NB, Hkv, bs, D) -> (sum_j p_j v_j (NB, Hkv, M, D), sum_j p_j (NB, Hkv, M, 1))."""
    p = torch.exp(s)
    return torch.matmul(p, v), p.sum(-1, keepdim=True)  # fixed inner size bs: same order for every row


class PagedAttention:
    """The AttentionContext the runner hands the model for one step."""

    def __init__(
        self,
        cache: KVCache,
        slots: torch.Tensor,
        decode: DecodeRows | None,
        prefills: list[PrefillChunk],
        scale: float,
        num_heads: int,
    ):
        self.cache = cache
        self.slots = slots
        self.decode = decode
        self.prefills = prefills
        self.scale = scale
        self.h = num_heads
        self._kernel_rows: tuple | None = None
        self._where: tuple[torch.Tensor, ...] | None = None

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None):
        if self._where is None:  # the same slots in every layer: where they live, once per step
            self._where = self.cache.where(self.slots)
        self.cache.write(layer, self.slots, k, v, self._where)  # write before reading: every path reads the cache
        qf = q.float() * self.scale
        out = torch.empty(q.shape, dtype=torch.float32)
        if self._kernel_rows is None:  # decided once per step: the C kernel when it can read this cache
            use = not self.cache.quantized and attention_c.supports(self.cache.k[0])
            rows = kernel_rows(self.decode, self.prefills) if use else ()
            if rows:  # checked once: every layer's call reads the same rows
                rows = attention_c.check_rows(*rows, self.cache.block_size, q.shape[0])
            self._kernel_rows = rows
        if self._kernel_rows:
            attention_c.attend(
                qf.contiguous(), self.cache.k[layer], self.cache.v[layer], *self._kernel_rows, window, out, checked=True
            )
            return out.to(q.dtype)
        if self.decode is not None:
            out[self.decode.tok_index] = self._decode(qf[self.decode.tok_index], layer, window)
        for chunk in self.prefills:
            sl = slice(chunk.tok_start, chunk.tok_start + chunk.num_tokens)
            out[sl] = self._prefill(qf[sl], chunk, layer, window)
        return out.to(q.dtype)

    def _decode(self, q: torch.Tensor, layer: int, window: int | None) -> torch.Tensor:
        """q (R, H, D) one query per row -> (R, H, D)."""
        rows = self.decode
        r, h, d = q.shape
        bs, hkv = self.cache.block_size, self.cache.k[layer].shape[1]
        qg, g, m = group_queries(q, hkv)  # (R, Hkv, M, D)
        qb = qg[rows.block_row]  # (NB, Hkv, M, D)
        kb, vb = self.cache.read(layer, rows.blocks)  # (NB, Hkv, D, bs), (NB, Hkv, bs, D)
        s = torch.matmul(qb, kb)  # (NB, Hkv, M, bs)
        key_pos = rows.block_first_pos[:, None] + torch.arange(bs)  # (NB, bs)
        qpos = rows.positions[rows.block_row][:, None]  # (NB, 1)
        visible = key_pos <= qpos
        if window is not None:
            visible &= key_pos > qpos - window
        s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
        block_max = s.amax(-1)  # (NB, Hkv, M)
        index = rows.block_row[:, None, None].expand_as(block_max)
        row_max = torch.full((r, hkv, m), float("-inf")).scatter_reduce_(0, index, block_max, "amax")  # (R, Hkv, M)
        o_part, l_part = _row_partials(s - row_max[rows.block_row][..., None], vb)
        o = torch.zeros(r, hkv, m, d).index_add_(0, rows.block_row, o_part)  # blocks added in order
        o = o / torch.zeros(r, hkv, m, 1).index_add_(0, rows.block_row, l_part)
        return o[:, :, :g].reshape(r, h, d)  # (R, Hkv, G, D) -> (R, H, D)

    def _prefill(self, q: torch.Tensor, chunk: PrefillChunk, layer: int, window: int | None) -> torch.Tensor:
        """q (n, H, D) of one sequence's consecutive tokens -> (n, H, D)."""
        n, h, d = q.shape
        bs, hkv = self.cache.block_size, self.cache.k[layer].shape[1]
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
        nb = len(blocks)
        kb, vb = self.cache.read(layer, blocks)  # (nb, Hkv, D, bs), (nb, Hkv, bs, D)
        k_all = kb.permute(1, 2, 0, 3).reshape(hkv, d, nb * bs)  # (Hkv, D, L): same scores as per block
        s = torch.matmul(qg, k_all)  # (Hkv, M, L)
        key_pos = (block_index[:, None] * bs + torch.arange(bs)).reshape(-1)  # (L,)
        visible = key_pos[None, :] <= qpos[:, None]  # (M, L)
        if window is not None:
            visible &= key_pos[None, :] > qpos[:, None] - window
        s = s.masked_fill(~visible, float("-inf"))
        p = torch.exp(s - s.amax(-1, keepdim=True))  # (Hkv, M, L)
        p_blocks = p.view(hkv, m, nb, bs)
        # normaliser: per-block sums over bs, then added block after block (cumsum is sequential)
        denom = torch.cumsum(p_blocks.sum(-1), dim=-1)[..., -1:]  # (Hkv, M, 1)
        o = torch.zeros(hkv, m, d)
        for b in range(nb):  # partial outputs added in block order, exactly as the decode path does
            o = o + torch.matmul(p_blocks[:, :, b], vb[b])  # (Hkv, M, bs) @ (Hkv, bs, D)
        o = (o / denom)[:, :rows]  # (Hkv, n*G, D)
        return o.reshape(hkv, n, g, d).permute(1, 0, 2, 3).reshape(n, h, d)  # -> (n, H, D)

"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix cache, copy-on-write forks.

The manager owns no tensors; it hands the runner block ids and (src, dst) block copies to perform.
A full block is registered under a hash of (hash of the previous block, its token ids), so a
prefix that another sequence already computed is reused instead of recomputed.
"""

from __future__ import annotations

from collections import OrderedDict

from ditto.engine.sequence import Sequence


class NoFreeBlocks(RuntimeError):
    pass


def block_hash(prev: int | None, tokens: list[int] | tuple[int, ...]) -> int:
    return hash((prev, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id (full blocks only)
        # free blocks in eviction order (least recently freed first); values unused
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.pending_copies: list[tuple[int, int]] = []
        self.stats = {"prefix_hit_tokens": 0, "cow_copies": 0}

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_new: int) -> int:
        """New blocks `seq` needs to hold `num_new` more computed tokens (incl. a copy-on-write)."""
        total = -(-(seq.num_computed + num_new) // self.block_size)
        need = max(0, total - len(seq.block_table))
        if self._needs_cow(seq, num_new):
            need += 1
        return need

    def _needs_cow(self, seq: Sequence, num_new: int) -> bool:
        if num_new <= 0 or seq.num_computed % self.block_size == 0 or not seq.block_table:
            return False
        last = seq.block_table[seq.num_computed // self.block_size]
        return self.ref[last] > 1

    def can_allocate(self, seq: Sequence, num_new: int) -> bool:
        return self.blocks_needed(seq, num_new) <= self.num_free

    # ---- allocation -------------------------------------------------------------------------
    def _take(self) -> int:
        if not self.free:
            raise NoFreeBlocks("KV cache is full")
        block, _ = self.free.popitem(last=False)
        h = self.hash_of[block]
        if h is not None:  # evict its prefix-cache entry
            if self.cached.get(h) == block:
                del self.cached[h]
            self.hash_of[block] = None
        self.ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        if self.ref[block] <= 0:
            raise AssertionError(f"double free of block {block}")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free[block] = None  # stays findable by hash until reused

    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached full blocks for the start of a new (or recomputed) sequence."""
        assert not seq.block_table and seq.num_computed == 0
        if not self.prefix_caching:
            return
        tokens = seq.tokens
        # always leave >= 1 token to compute (for logits); scoring needs every scored position computed
        last_needed = len(tokens) - 1 if seq.score_from is None else max(0, seq.score_from - 1)
        limit = last_needed // self.block_size
        prev = None
        for i in range(limit):
            h = block_hash(prev, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref[block] == 0:
                del self.free[block]
            self.ref[block] += 1
            seq.block_table.append(block)
            prev = h
        seq.num_computed = seq.num_cached = len(seq.block_table) * self.block_size
        self.stats["prefix_hit_tokens"] += seq.num_cached

    def allocate(self, seq: Sequence, num_new: int) -> None:
        """Make room for `num_new` more tokens of `seq` (caller checked can_allocate)."""
        if self._needs_cow(seq, num_new):
            idx = seq.num_computed // self.block_size
            old = seq.block_table[idx]
            new = self._take()
            self.pending_copies.append((old, new))
            self.stats["cow_copies"] += 1
            self._release(old)
            seq.block_table[idx] = new
        total = -(-(seq.num_computed + num_new) // self.block_size)
        while len(seq.block_table) < total:
            seq.block_table.append(self._take())

    def commit(self, seq: Sequence, new_computed: int) -> None:
        """Record that K/V for tokens up to `new_computed` are written; register newly full blocks."""
        old_full = seq.num_computed // self.block_size
        seq.num_computed = new_computed
        if not self.prefix_caching:
            return
        tokens = seq.tokens
        prev = None
        for i in range(new_computed // self.block_size):
            block = seq.block_table[i]
            h = self.hash_of[block]
            if h is None or i >= old_full:
                h = block_hash(prev, tokens[i * self.block_size : (i + 1) * self.block_size])
                if self.hash_of[block] is None:
                    self.hash_of[block] = h
                    self.cached.setdefault(h, block)
            prev = h

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Child shares every block of the parent (copy-on-write on its next append)."""
        for block in parent.block_table:
            self.ref[block] += 1
        child.block_table = list(parent.block_table)
        child.num_computed = parent.num_computed

    def free_seq(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # tail first: the prefix stays cached longest
            self._release(block)
        seq.block_table = []
        seq.num_computed = 0

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def check(self, live: list[Sequence]) -> None:
        """Invariant check (tests): reference counts equal table usage; free blocks are unreferenced."""
        counts = [0] * self.num_blocks
        for seq in live:
            for b in seq.block_table:
                counts[b] += 1
        assert counts == self.ref, "reference counts disagree with block tables"
        for b in range(self.num_blocks):
            assert (self.ref[b] == 0) == (b in self.free), f"block {b}: ref {self.ref[b]} vs free list"
        for h, b in self.cached.items():
            assert self.hash_of[b] == h

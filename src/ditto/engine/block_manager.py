"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix cache, copy-on-write forks.

The manager owns no tensors; it hands the runner block ids, (src, dst) block copies to perform, and
the blocks it handed out since the last step, which the runner zeroes before anything reads them (the
cache is reserved uninitialised, and a block reused after eviction holds another sequence's data).
A full block is registered under a hash of (hash of the previous block, its token ids), so a
prefix that another sequence already computed is reused instead of recomputed.

Scoring reuses more than K/V: a finished scoring request leaves, beside each full block, the
(logprob, argmax) of the tokens its rows predicted, keyed by the token that follows the block. A
later request that scores the same text plus more (a beam's partial solution one step longer)
takes those rows and computes only the new tokens. Under `batch_invariant` and `exact` a row's bits
do not depend on prefix-cache state, so the reused rows are the ones it would have computed.
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
        # block hash -> {token after the block: per row of the block, (logprob, argmax) of the token it predicts,
        # None for rows that were not scored}; dropped with the block's prefix-cache entry
        self.scored: dict[int, dict[int, tuple[tuple[float, int] | None, ...]]] = {}
        # free blocks in eviction order (least recently freed first); values unused
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.pending_copies: list[tuple[int, int]] = []
        self.pending_clears: list[int] = []  # blocks taken since the last step: zeroed before use
        self.stats = {"prefix_hit_tokens": 0, "cow_copies": 0, "score_hit_tokens": 0}

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
                self.scored.pop(h, None)
            self.hash_of[block] = None
        self.ref[block] = 1
        self.pending_clears.append(block)
        return block

    def _release(self, block: int) -> None:
        if self.ref[block] <= 0:
            raise AssertionError(f"double free of block {block}")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free[block] = None  # stays findable by hash until reused

    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached full blocks for the start of a new (or recomputed) sequence. A scoring sequence
        also takes the remembered rows of those blocks: a block is attached only if every scored row in it
        is known (full logits are never remembered, so a request that keeps them stops before its scored part)."""
        assert not seq.block_table and seq.num_computed == 0 and not seq.score_rows
        if not self.prefix_caching:
            return
        tokens, bs, score_from = seq.tokens, self.block_size, seq.score_from
        # always leave >= 1 token to compute (for logits); kept logits need every scored position computed
        last_needed = max(0, score_from - 1) if seq.keep_score_logits else len(tokens) - 1
        prev = None
        rows: list[tuple[float, int, None, None]] = []
        for i in range(last_needed // bs):
            h = block_hash(prev, tokens[i * bs : (i + 1) * bs])
            block = self.cached.get(h)
            if block is None:
                break
            if score_from is not None and (i + 1) * bs >= score_from:  # its rows predict scored tokens
                known = self.scored.get(h, {}).get(tokens[(i + 1) * bs])
                first = max(0, score_from - 1 - i * bs)  # the first row whose next token is scored
                if known is None or any(r is None for r in known[first:]):
                    break
                rows.extend((lp, top, None, None) for lp, top in known[first:])
            if self.ref[block] == 0:
                del self.free[block]
            self.ref[block] += 1
            seq.block_table.append(block)
            prev = h
        seq.num_computed = seq.num_cached = len(seq.block_table) * bs
        seq.score_rows.extend(rows)
        self.stats["prefix_hit_tokens"] += seq.num_cached
        self.stats["score_hit_tokens"] += len(rows)

    def remember_scores(self, seq: Sequence) -> None:
        """Keep a finished scoring sequence's (logprob, argmax) rows beside its full blocks' cache entries."""
        score_from = seq.score_from
        if not self.prefix_caching or score_from is None or seq.num_computed < len(seq):
            return
        tokens, bs = seq.tokens, self.block_size
        for i in range((len(tokens) - 1) // bs):  # full blocks followed by a token
            if (i + 1) * bs < score_from:
                continue
            h = self.hash_of[seq.block_table[i]]
            if h is None or h not in self.cached:
                continue
            rows = tuple(
                seq.score_rows[t - score_from][:2] if t >= score_from else None
                for t in range(i * bs + 1, (i + 1) * bs + 1)  # the token each row of the block predicts
            )
            entry = self.scored.setdefault(h, {})
            old = entry.get(tokens[(i + 1) * bs])
            if old is not None:  # a request that scored from earlier on knows more rows
                rows = tuple(a if a is not None else b for a, b in zip(rows, old))
            entry[tokens[(i + 1) * bs]] = rows

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

    def take_clears(self) -> list[int]:
        """Blocks handed out since the last call: the runner zeroes them (before the copies into them)."""
        clears, self.pending_clears = self.pending_clears, []
        return clears

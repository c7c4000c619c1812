"""Continuous batching with a token budget, chunked prefill and preemption by recompute.

Each step the scheduler hands the runner a list of (sequence, number of new tokens):
running sequences first (one token each when decoding, a chunk when still prefilling), then
waiting sequences while the token budget, the sequence limit and the free KV blocks allow.
When a running sequence cannot get a block, the most recently arrived running sequence is
preempted (its blocks freed, its tokens kept) and recomputed later: memory pressure slows
work down but never crashes it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ditto.config import EngineConfig
from ditto.engine.block_manager import BlockManager
from ditto.engine.sequence import Sequence, Status


@dataclass
class ScheduledItem:
    seq: Sequence
    start: int  # first token index computed this step
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def completes(self) -> bool:
        """After this step every known token of the sequence has K/V (logits are due)."""
        return self.end == len(self.seq)


@dataclass
class Batch:
    items: list[ScheduledItem]
    copies: list[tuple[int, int]]
    preempted: list[Sequence]
    clears: list[int] = field(default_factory=list)  # blocks handed out this step: zeroed before the copies

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, max_model_len: int):
        self.config = config
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked child that shares its parent's computed prompt joins the running set directly."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_uncomputed, budget)
        if seq.in_prefill:
            n = min(n, self.config.prefill_chunk)
        return n

    def _release(self, seq: Sequence) -> None:
        """Back to no blocks: its cached prefix, and the scoring rows it computed or took from the score
        cache, come again when it is (re)admitted."""
        self.blocks.free_seq(seq)
        seq.num_cached = 0
        seq.score_rows.clear()

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> Batch:
        budget = self.config.max_num_batched_tokens
        items: list[ScheduledItem] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()
        # 1) running sequences, oldest first
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n = self._chunk(seq, budget)
            if n == 0:
                continue
            while not self.blocks.can_allocate(seq, n):
                victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
                victim = max(victims, key=lambda s: s.arrival) if victims else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.allocate(seq, n)
            items.append(ScheduledItem(seq, seq.num_computed, n))
            scheduled.add(seq.seq_id)
            budget -= n
        # 2) waiting sequences, first come first served (no admission after a preemption this step)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if not seq.block_table:
                self.blocks.match_prefix(seq)
            n = self._chunk(seq, budget)
            if not self.blocks.can_allocate(seq, n):
                self._release(seq)  # give back prefix-cache blocks it would have shared
                if not self.running and not items:
                    raise RuntimeError(
                        f"a sequence of {len(seq)} tokens needs more KV blocks than the cache has "
                        f"({self.blocks.num_blocks} blocks of {self.blocks.block_size}); raise kv_cache_gb"
                    )
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            items.append(ScheduledItem(seq, seq.num_computed, n))
            scheduled.add(seq.seq_id)
            budget -= n
        return Batch(items, self.blocks.take_copies(), preempted, self.blocks.take_clears())

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        seq.status = Status.FINISHED
        self.blocks.free_seq(seq)

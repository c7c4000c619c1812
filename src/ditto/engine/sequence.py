"""A sequence: one sample of one request, with its tokens, cache blocks and stopping state."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

from ditto.sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sample_index: int = 0
    fork_n: int = 1  # >1: once the prompt is computed, fork into this many samples sharing its cache
    score_from: int | None = None  # teacher-forced scoring: collect logits for tokens[score_from:]
    keep_score_logits: bool = False  # scoring: keep each position's full logits and hidden state, not only its logprob
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    fingerprints: list[list[float]] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached: int = 0  # of those, how many came from the prefix cache
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    arrival: int = 0  # scheduling order (FCFS)
    score_rows: list = field(default_factory=list)  # per scored position: (logprob, argmax, logits?, hidden?)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

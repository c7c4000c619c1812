"""What generation returns: one RequestOutput per prompt, one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int  # sample index within the request (0..n-1); part of the noise coordinates
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log p(token) under the model's (unprocessed) distribution
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    top_logprobs: list[dict[int, float]] | None = None
    fingerprints: list[list[float]] | None = None  # Activation-DiFR h.P per generated token
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)  # determinism level, numerics, timings, seed...

    @property
    def text(self) -> str:
        """The first sample's text (the common n=1 case)."""
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []


@dataclass
class ScoreOutput:
    """Teacher-forced log-probabilities of a continuation given a prompt."""

    prompt_token_ids: list[int]
    token_ids: list[int]  # continuation ids
    logprobs: list[float]  # log p(token_i | prompt, tokens_<i)
    top_ids: list[int] | None = None  # argmax id at each position (greedy-claim checks)

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        return self.total / max(1, len(self.logprobs))

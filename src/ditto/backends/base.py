"""The Backend protocol: the only door strategies, evaluation and studies use to reach a model.

Any engine that implements it (ditto's own, HF transformers, llama-cpp-python) can run the same
evaluation or strategy unchanged.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ditto.outputs import RequestOutput, ScoreOutput
from ditto.sampling import SamplingParams

Prompt = str | list[int]  # text, or token ids already encoded


@runtime_checkable
class Backend(Protocol):
    name: str

    def generate(
        self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams], *, progress: bool = False
    ) -> list[RequestOutput]:
        """Generate for each prompt; returns outputs in prompt order."""
        ...

    def score(self, prompt: Prompt, continuation: Prompt) -> ScoreOutput:
        """Teacher-forced log-probabilities of `continuation` after `prompt`."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's own template (plain text when it has none)."""
        ...

    def info(self) -> dict:
        """The inference stack, for manifests: backend, versions, model digest, numerics, determinism..."""
        ...


def params_per_prompt(prompts: list, params: SamplingParams | list[SamplingParams]) -> list[SamplingParams]:
    """One SamplingParams per prompt, each with its seed fixed (a fresh one where none was given):
    `params` is a single set for all, or a list as long as `prompts`."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError("one SamplingParams per prompt, or a single one for all")
    return [p.with_seed() for p in plist]

"""ditto: reproducible, verifiable LLM inference for reasoning workloads."""

from ditto.sampling import SamplingParams

__version__ = "0.3.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":  # imported lazily so `import ditto` stays light
        from ditto.llm import LLM

        return LLM
    raise AttributeError(name)

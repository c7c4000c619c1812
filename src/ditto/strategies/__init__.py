"""Inference-time scaling strategies on the Backend protocol, and the code sandbox.

`get_strategy(name, **kwargs).run(problem, backend, Budget(...)) -> Result(answer, trace, cost)`.
"""

from ditto.strategies.base import (
    Budget,
    BudgetExhausted,
    Cost,
    Meter,
    Result,
    Strategy,
    Vote,
    available_strategies,
    extract_answer,
    get_strategy,
    is_equivalent,
    majority_vote,
    register,
    split_steps,
)
from ditto.strategies.early_exit import EarlyExit
from ditto.strategies.guided import ChunkGuided, GlimpRouter, calibrate_glimp_threshold, first_token_entropy
from ditto.strategies.sandbox import SandboxLimits, SandboxResult, run_code
from ditto.strategies.scorers import LikelihoodScorer, PRMScorer, ProcessRewardModel, Scorer
from ditto.strategies.search import AStarDecoding, EarlyRejection, StepBeamSearch
from ditto.strategies.tools import CodeSelfVerification, ProgramOfThought, ToolIntegrated, ToolSession
from ditto.strategies.voting import BestOfN, Greedy, SelfConsistency, WeightedMajority

__all__ = [
    "AStarDecoding",
    "BestOfN",
    "Budget",
    "BudgetExhausted",
    "ChunkGuided",
    "CodeSelfVerification",
    "Cost",
    "EarlyExit",
    "EarlyRejection",
    "GlimpRouter",
    "Greedy",
    "LikelihoodScorer",
    "Meter",
    "PRMScorer",
    "ProcessRewardModel",
    "ProgramOfThought",
    "Result",
    "SandboxLimits",
    "SandboxResult",
    "Scorer",
    "SelfConsistency",
    "StepBeamSearch",
    "Strategy",
    "ToolIntegrated",
    "ToolSession",
    "Vote",
    "WeightedMajority",
    "available_strategies",
    "calibrate_glimp_threshold",
    "extract_answer",
    "first_token_entropy",
    "get_strategy",
    "is_equivalent",
    "majority_vote",
    "register",
    "run_code",
    "split_steps",
]

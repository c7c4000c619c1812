"""Sampling: counter-based noise, one processing order, filters that never leak."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditto.sampling import SamplingParams, gumbel_noise, kept_mask, processed_scores, sample_row


def test_noise_is_a_pure_function_of_its_coordinates():
    a = gumbel_noise(7, 2, 11, 5000)
    assert torch.equal(a, gumbel_noise(7, 2, 11, 5000))
    assert torch.equal(a[:100], gumbel_noise(7, 2, 11, 100))  # vocab id is a coordinate, not an offset
    for other in [(8, 2, 11), (7, 3, 11), (7, 2, 12)]:
        assert not torch.equal(a, gumbel_noise(*other, 5000))
    big = gumbel_noise(1, 0, 0, 200_000)
    assert abs(big.mean().item() - 0.5772) < 0.01 and abs(big.std().item() - 1.2825) < 0.01


def test_noise_same_across_processes():
    code = "from ditto.sampling import gumbel_noise; print(gumbel_noise(123, 4, 56, 64).tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == gumbel_noise(123, 4, 56, 64).tolist()


def test_temperature_zero_is_argmax():
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1000)
        assert sample_row(logits, SamplingParams(temperature=0), [], [], 0, 0) == int(logits.argmax())


def test_seed_changes_samples_and_frequencies_follow_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(4000)]
    draws = torch.tensor([sample_row(logits, p, [], [], 0, 0) for p in params])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.softmax(logits, 0), atol=0.03)
    # the token index is a coordinate too: successive tokens of one sequence are not all the same draw
    p = SamplingParams(temperature=1.0, seed=1)
    assert len({sample_row(logits, p, [], [], 0, t) for t in range(50)}) > 1


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**20),
    st.floats(0.05, 3.0),
    st.integers(0, 20),
    st.floats(0.05, 1.0),
    st.floats(0.0, 0.5),
)
def test_filters_never_emit_a_filtered_token(seed, temperature, top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, generator=gen) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    scaled, keep = processed_scores(logits, params, [], [])
    token = sample_row(logits, params, [], [], 0, 0)
    assert keep[token]
    probs = torch.softmax(scaled, 0)
    if top_k:
        assert (probs[keep] >= torch.topk(probs, top_k).values[-1]).all()
        assert keep.sum() >= 1
    if min_p:
        assert probs[token] >= min_p * probs.max() - 1e-12
    if top_p < 1.0:  # kept mass reaches top_p with as few tokens as possible (up to the top-k cut)
        order = torch.argsort(probs[keep], descending=True)
        mass = probs[keep][order]
        assert mass[:-1].sum() < top_p + 1e-9 or keep.sum() == 1


def test_repetition_penalty_direction():
    logits = torch.tensor([2.0, -2.0, 1.0])
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    scaled, _ = processed_scores(logits, p, [0, 1], [])
    assert scaled.tolist() == [1.0, -4.0, 1.0]
    keep = kept_mask(torch.tensor([0.0, 0.0, 0.0]), SamplingParams(temperature=1, top_k=2, seed=0))
    assert keep.sum() == 3  # ties at the k-th value are kept, never dropped at random


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -5},
        {"min_p": 2.0},
        {"max_tokens": 0},
        {"n": 0},
        {"repetition_penalty": 0.0},
        {"seed": -1},
        {"logprobs": 50},
        {"stop": [""]},
    ],
)
def test_invalid_sampling_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)

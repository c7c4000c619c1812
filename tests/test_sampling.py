"""Sampling: counter-based noise, one processing order, filters that never leak."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditto.numerics.kernels import noise_c
from ditto.sampling import (
    SamplingParams,
    _srl,
    gumbel_argmax,
    gumbel_noise,
    kept_mask,
    noise_bits,
    noise_bits_at,
    processed_scores,
    row_key,
    sample_row,
)


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


def test_noise_kernel_bits_equal_the_torch_definition():
    if noise_c.bits(1, 8) is None:
        pytest.skip(f"noise kernel: {noise_c.kernel_status()}")
    for vocab in (1, 7, 1000, 49152):
        for coords in [(0, 0, 0), (7, 2, 11), (2**62, 1023, 4095)]:
            key = row_key(*coords)
            torch_bits = noise_bits_at(key, torch.arange(vocab))
            assert torch.equal(noise_bits(*coords, vocab), torch_bits)
            assert torch.equal(noise_c.bits(key, vocab), torch_bits)
            for m_min in (0, 2**52, 2**53 - 2**40):
                want = torch.nonzero(_srl(torch_bits, 11) >= m_min).flatten()
                assert torch.equal(noise_c.select(key, vocab, m_min), want)


def _full_gumbel_argmax(scaled, keep, seed, sample_index, token_index) -> int:
    """Step 7 written out over the whole vocab: the definition gumbel_argmax must reproduce."""
    g = gumbel_noise(seed, sample_index, token_index, scaled.numel())
    return int(torch.argmax((scaled + g).masked_fill(~keep, float("-inf"))))


@pytest.mark.parametrize("kernel", [True, False])
def test_pruned_gumbel_argmax_picks_the_full_vocab_token(kernel, monkeypatch):
    """Noise only for tokens that can win, yet the same token as the full computation: peaked and flat
    rows, tiny and real vocabularies, filters, -inf (masked) logits, with and without the C scan."""
    if not kernel:
        monkeypatch.setattr(noise_c, "select", lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for vocab in (3, 64, 65, 1000, 49152):
        for spread in (0.01, 1.0, 4.0, 30.0):
            for temperature in (0.05, 0.7, 1.0, 3.0):
                for filters in ({}, {"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.05}):
                    logits = torch.randn(vocab, generator=gen) * spread
                    if vocab > 64:
                        logits[::7] = float("-inf")  # e.g. stop tokens masked before min_tokens
                    params = SamplingParams(temperature=temperature, seed=cases, **filters)
                    scaled, keep = processed_scores(logits, params, [], [])
                    for token_index in range(2):
                        got = gumbel_argmax(scaled, keep, params.seed, 3, token_index)
                        assert got == _full_gumbel_argmax(scaled, keep, params.seed, 3, token_index)
                        cases += 1
    assert cases == 5 * 4 * 4 * 4 * 2


def test_pruned_gumbel_argmax_ties_go_to_the_lowest_id():
    """Equal logits and equal noise cannot be made, so tie the noisy scores directly: a token whose
    scaled logit is its rival's value minus its own noise difference."""
    key_coords = (5, 0, 0)
    vocab = 300
    g = gumbel_noise(*key_coords, vocab)
    scaled = torch.full((vocab,), -50.0, dtype=torch.float64)
    scaled[10], scaled[250] = 5.0 - g[10], 5.0 - g[250]
    keep = torch.ones(vocab, dtype=torch.bool)
    full = _full_gumbel_argmax(scaled, keep, *key_coords)
    assert gumbel_argmax(scaled, keep, *key_coords) == full
    assert full == 10  # a real tie: both reach exactly 5.0


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


@pytest.mark.parametrize(
    "bad, error, field",
    [
        ({"temperature": "hot"}, TypeError, "temperature must be a number, got str 'hot'"),
        ({"top_p": None}, TypeError, "top_p must be a number"),
        ({"n": True}, TypeError, "n must be an integer, got bool"),
        ({"max_tokens": 8.0}, TypeError, "max_tokens must be an integer, got float"),
        ({"seed": "1"}, TypeError, "seed must be an integer or None"),
        ({"ignore_eos": 1}, TypeError, "ignore_eos must be True or False"),
        ({"stop": 5}, TypeError, "stop must be a string or a list of strings"),
        ({"stop_token_ids": ["a"]}, TypeError, "stop_token_ids must be a list of token ids"),
        ({"stop_token_ids": [-1]}, ValueError, "stop_token_ids must be token ids >= 0"),
        ({"frequency_penalty": 3.0}, ValueError, "frequency_penalty must be in [-2, 2], got 3.0"),
        ({"min_tokens": 9, "max_tokens": 8}, ValueError, "min_tokens must be in [0, max_tokens=8], got 9"),
        ({"fingerprint_k": 12}, ValueError, "fingerprint_k must be 0, 8, 16 or 32, got 12"),
    ],
)
def test_sampling_params_errors_name_the_field(bad, error, field):
    with pytest.raises(error) as info:
        SamplingParams(**bad)
    assert str(info.value).startswith(field)


def test_sampling_params_accept_what_they_should():
    p = SamplingParams(stop="END", stop_token_ids=[3, 4], top_k=-1, temperature=1, seed=2**63 - 1)
    assert p.stop == ("END",) and p.stop_token_ids == (3, 4) and p.top_k == 0
    assert SamplingParams(stop=None).stop == () and SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert p.replace(seed=None).with_seed().seed is not None

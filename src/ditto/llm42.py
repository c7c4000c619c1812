"""LLM-42: `batch_invariant` output from a `fast` engine, by verifying windows and rolling back.

A third way to buy determinism (beside running `batch_invariant` throughout and `exact`): a draft
engine decodes a window of tokens at its own level (`fast` by default, which on a GPU batches
freely), then the reference engine (`batch_invariant`, same model and numerics) scores the window
teacher-forced, in one pass. Each position's token is then chosen from the reference's logits by
the reference engine's own step (`LLMEngine.record_token`: the same sampler, noise coordinates,
penalties, logprobs, fingerprints and stop rules), so the result is what the reference would have
generated, bit for bit: a window is kept up to the first position where the draft's token differs,
that position takes the reference's token, and the rest of the window is dropped (the next window
starts there). The reference's scoring rows equal its decode rows because `batch_invariant`
promises that chunking and the prefix cache change nothing; both engines keep their prefix caches,
so each window recomputes only its own tokens.

It pays when the draft level is much faster than the reference's and they rarely disagree (long
windows survive). On this CPU it never pays: `batch_invariant` runs on the fixed-order C kernels
and is faster than `fast` (README, "cost of determinism"). The GPU is where it is meant to run.

    llm = LLM42("smollm2-135m-instruct", numerics="bf16", window=32)
    outs = llm.generate(prompts, SamplingParams(temperature=0.7, seed=1, max_tokens=256))
    llm.stats  # windows, drafted, accepted, rollbacks
"""

from __future__ import annotations

import itertools
import time

from ditto.engine.llm_engine import Request
from ditto.engine.sequence import Sequence, Status
from ditto.llm import LLM, Prompt, pair_prompts
from ditto.outputs import RequestOutput
from ditto.sampling import SamplingParams


class LLM42:
    """Generate as `batch_invariant` does, with a `fast` draft doing the decoding (see the module doc).

    model, numerics and engine options go to both engines; `window` is the number of draft tokens
    verified per reference pass (LLM-42 uses 64); `draft_determinism` / `draft_numerics` pick the
    draft (any level or numerics: a worse draft only costs more rollbacks, never a different result).
    """

    def __init__(
        self,
        model: str,
        *,
        numerics: str = "fp32",
        window: int = 64,
        draft_determinism: str = "fast",
        draft_numerics: str | None = None,
        **engine_options,
    ):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.reference = LLM(model, numerics=numerics, determinism="batch_invariant", **engine_options)
        self.draft = LLM(model, numerics=draft_numerics or numerics, determinism=draft_determinism, **engine_options)
        if self.draft.loaded.digest != self.reference.loaded.digest:
            raise ValueError("the draft and the reference must load the same model")
        self.stats = {"windows": 0, "drafted": 0, "accepted": 0, "rollbacks": 0}
        self._ids = itertools.count()

    def generate(
        self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """What `LLM(..., determinism="batch_invariant").generate(prompts, params)` returns, token for token."""
        prompts, plist = pair_prompts(prompts, params)
        ref = self.reference
        reqs = []
        for prompt, sp in zip(prompts, plist):
            text, ids = ref._prompt_ids(prompt)
            sp = sp.with_seed()
            req = Request(f"llm42-{next(self._ids)}", text, ids, sp)
            req.seqs = [Sequence(req.request_id, list(ids), sp, i) for i in range(sp.n)]
            reqs.append(req)
        live = [seq for req in reqs for seq in req.seqs]
        while live:
            self._window(live)
            live = [seq for seq in live if not seq.finished]
        for req in reqs:
            req.finished_time = time.perf_counter()
        return [ref._output(req) for req in reqs]

    def _window(self, seqs: list[Sequence]) -> None:
        """One round for every live sample: draft up to `window` tokens, verify them in one reference
        pass, keep the verified prefix plus the reference's token at the first disagreement."""
        drafts = self._draft(seqs)
        pairs = [(seq.prompt_ids + seq.output_ids, draft) for seq, draft in zip(seqs, drafts)]
        scored = self.reference.score_batch(pairs, keep_logits=True)
        engine = self.reference.engine
        self.stats["windows"] += 1
        for seq, draft, rows in zip(seqs, drafts, scored):
            self.stats["drafted"] += len(draft)
            for j, proposed in enumerate(draft):
                token = engine.record_token(seq, rows.logits[j], rows.hidden[j])
                reason = engine.stop_reason(seq, token)
                if reason is not None:
                    seq.finish_reason, seq.status = reason, Status.FINISHED
                if token != proposed:
                    self.stats["rollbacks"] += 1
                    break
                self.stats["accepted"] += 1
                if seq.finished:
                    break

    def _draft(self, seqs: list[Sequence]) -> list[list[int]]:
        """Each sample continued by the draft engine for up to `window` tokens, from its verified
        outputs (the same sample index and token positions, so sampled drafts see the same noise)."""
        draft = self.draft
        reqs = []
        with draft._lock:
            for seq in seqs:
                done = len(seq.output_ids)
                sp = seq.params.replace(n=1, max_tokens=min(seq.params.max_tokens, done + self.window))
                reqs.append(
                    draft.engine.add_request(
                        f"draft-{next(self._ids)}",
                        seq.prompt_ids,
                        sp,
                        output_ids=seq.output_ids,
                        sample_index=seq.sample_index,
                    )
                )
        draft._run_until_done(reqs, False, "drafting")
        return [req.seqs[0].output_ids[len(seq.output_ids) :] for req, seq in zip(reqs, seqs)]

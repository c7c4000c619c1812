"""LLMEngine: requests in, tokens out. One step reads `schedule -> run -> postprocess`."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ditto.config import EngineConfig, ModelConfig
from ditto.engine.block_manager import BlockManager
from ditto.engine.runner import ModelRunner, StepOutput
from ditto.engine.scheduler import Batch, Scheduler
from ditto.engine.sequence import Sequence
from ditto.sampling import SamplingParams, mask_min_tokens


class PromptTooLong(ValueError):
    pass


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finished_time: float | None = None
    score: bool = False

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.finished for s in self.seqs)


class LLMEngine:
    def __init__(self, prepared, cfg: ModelConfig, tokenizer, config: EngineConfig, fingerprint_fn=None):
        """`prepared` (ditto.numerics.Prepared) carries the converted model, its KV cache and sampler."""
        self.cfg = cfg
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = min(config.max_model_len or cfg.max_position, cfg.max_position)
        per_token = prepared.kv_bytes_per_token(cfg)
        num_blocks = config.num_kv_blocks or max(4, int(config.kv_cache_gb * 2**30 / (per_token * config.block_size)))
        self.device = torch.device(config.device)
        with self.device:  # the cache lives where the model runs
            self.cache = prepared.make_cache(cfg, num_blocks, config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks, self.max_model_len)
        self.runner = ModelRunner(prepared.model, cfg, self.cache, prepared.make_context, self.device)
        self.sample = prepared.sample
        self.requests: dict[str, Request] = {}
        self.fingerprint_fn = fingerprint_fn  # (hidden (N, d), k) -> (N, k) float64
        self.stop_ids = frozenset(getattr(tokenizer, "stop_ids", ()) or ()) | frozenset(cfg.eos_token_ids)
        self._arrivals = itertools.count()
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "scoring_preemptions": 0}

    # ---- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        score_from: int | None = None,
        keep_score_logits: bool = False,
        output_ids: list[int] | None = None,
        sample_index: int = 0,
    ) -> Request:
        """output_ids: continue a sample that already has these tokens (computed as part of the prompt;
        sampling noise, penalties, min_tokens and max_tokens count them as outputs), as sample
        `sample_index` of its request (n must be 1). ditto.llm42's draft uses it."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.cfg.vocab_size})")
        limit = self.max_model_len
        if score_from is None and len(prompt_ids) >= limit:
            raise PromptTooLong(
                f"prompt has {len(prompt_ids)} tokens but the context window is {limit}; shorten the prompt"
            )
        if score_from is not None and len(prompt_ids) > limit:
            raise PromptTooLong(f"prompt + continuation have {len(prompt_ids)} tokens; the context window is {limit}")
        params = params.with_seed()
        if (output_ids or sample_index) and (params.n != 1 or score_from is not None):
            raise ValueError("a resumed sample (output_ids / sample_index) takes n=1 and no scoring")
        seq = Sequence(
            request_id,
            list(prompt_ids),
            params,
            sample_index,
            fork_n=params.n,
            score_from=score_from,
            keep_score_logits=keep_score_logits,
            output_ids=list(output_ids or []),
        )
        # one sequence: n > 1 samples fork from it once the prompt is computed (`_fork`)
        req = Request(request_id, prompt, list(prompt_ids), params, seqs=[seq], score=score_from is not None)
        seq.arrival = next(self._arrivals)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        return req

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        # children not yet forked never exist; mark the request complete
        req.params = req.params.replace(n=len(req.seqs))
        req.finished_time = time.perf_counter()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One engine iteration; returns the requests that made progress."""
        batch = self.scheduler.schedule()
        if not batch.items:
            return []
        out = self.runner.run(batch)
        return self.postprocess(batch, out)

    def postprocess(self, batch: Batch, out: StepOutput) -> list[Request]:
        self.stats["steps"] += 1
        self.stats["preemptions"] += len(batch.preempted)
        self.stats["scoring_preemptions"] += sum(seq.score_from is not None for seq in batch.preempted)
        touched: dict[str, Request] = {}
        for item in batch.items:
            prefill = item.seq.in_prefill or item.seq.score_from is not None or item.num_tokens > 1
            self.stats["prefill_tokens" if prefill else "decode_tokens"] += item.num_tokens
            self.blocks.commit(item.seq, item.end)
        for item, first, count, kept in out.score_items:
            seq = item.seq
            picked = out.score_logprobs[first : first + count].tolist()
            top = out.score_top[first : first + count].tolist()
            for j in range(count):
                # kept rows are views of the step's kept block, which holds only rows that requests keep
                row_logits = out.score_logits[kept + j] if kept is not None else None
                row_hidden = out.score_hidden[kept + j] if kept is not None else None
                seq.score_rows.append((picked[j], top[j], row_logits, row_hidden))
            touched[seq.request_id] = self.requests[seq.request_id]
        for item in batch.items:
            seq = item.seq
            if seq.score_from is not None and item.completes:
                self.blocks.remember_scores(seq)
                seq.finish_reason = "score"
                self.scheduler.finish(seq)
                touched[seq.request_id] = self.requests[seq.request_id]
        for row, item in enumerate(out.sample_items):
            seq = item.seq
            req = self.requests[seq.request_id]
            targets = [seq]
            if seq.fork_n > 1:
                targets += self._fork(seq, req)
            for target in targets:
                self._append_token(target, out.sample_logits[row], out.sample_hidden[row])
                if req.first_token_time is None:
                    req.first_token_time = time.perf_counter()
            touched[req.request_id] = req
        for req in touched.values():
            if req.finished and req.finished_time is None:
                req.finished_time = time.perf_counter()
        return list(touched.values())

    def _fork(self, parent: Sequence, req: Request) -> list[Sequence]:
        """The prompt is computed once: n-1 children share its blocks (copy-on-write)."""
        children = []
        for i in range(1, parent.fork_n):
            child = Sequence(parent.request_id, parent.prompt_ids, parent.params, sample_index=i)
            child.arrival = parent.arrival
            self.blocks.fork(parent, child)
            self.scheduler.add_running(child)
            req.seqs.append(child)
            children.append(child)
        parent.fork_n = 1
        return children

    def _append_token(self, seq: Sequence, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        token = self.record_token(seq, logits, hidden)
        reason = self.stop_reason(seq, token)
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    def record_token(self, seq: Sequence, logits: torch.Tensor, hidden: torch.Tensor | None) -> int:
        """Choose `seq`'s next token from its next-token logits (V,) and append it with its logprob, top
        logprobs and fingerprint: the engine's own step, usable on a sequence it does not schedule
        (ditto.llm42 replays a verified window through it). Returns the token."""
        params = seq.params
        token_index = len(seq.output_ids)
        logits = mask_min_tokens(logits[None], params, self.stop_ids, start=token_index)[0]  # (V,)
        token = self.sample(logits, params, seq.prompt_ids, seq.output_ids, seq.sample_index, token_index)
        logp = torch.log_softmax(logits.float(), dim=-1)
        seq.output_ids.append(token)
        seq.logprobs.append(float(logp[token]))
        if params.logprobs:
            top = torch.topk(logp, params.logprobs)
            seq.top_logprobs.append({int(i): float(v) for v, i in zip(top.values, top.indices)})
        if params.fingerprint_k and self.fingerprint_fn is not None:
            seq.fingerprints.append(self.fingerprint_fn(hidden[None], params.fingerprint_k)[0].tolist())
        return token

    def stop_reason(self, seq: Sequence, token: int) -> str | None:
        """Why `seq` ends after appending `token` ("stop" / "length"), or None; sets its stop_reason and
        (for stop strings) its text. Changes no scheduling state."""
        params = seq.params
        n_out = len(seq.output_ids)
        reason = None
        is_stop = token in params.stop_token_ids or (not params.ignore_eos and token in self.stop_ids)
        if n_out >= params.min_tokens and is_stop:
            reason, seq.stop_reason = "stop", token
        if reason is None and params.stop:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=params.skip_special_tokens)
            tail_from = max(0, len(seq.text) - max(len(s) for s in params.stop))
            seq.text = text
            for s in params.stop:
                at = text.find(s, tail_from)
                if at >= 0:
                    reason, seq.stop_reason = "stop", s
                    seq.text = text[: at + (len(s) if params.include_stop_str_in_output else 0)]
                    break
        if reason is None and n_out >= params.max_tokens:
            reason = "length"
        if reason is None and len(seq) >= self.max_model_len:
            reason = "length"
        return reason

"""LLM: the public Python API over the engine, and ditto's own Backend."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import fields

import torch

from ditto.config import EngineConfig, auto_determinism
from ditto.devices import describe as describe_device
from ditto.engine.llm_engine import LLMEngine, Request
from ditto.loader.load import LoadedModel, load
from ditto.outputs import CompletionOutput, RequestOutput, ScoreOutput
from ditto.sampling import SamplingParams

Prompt = str | list[int]


def pair_prompts(
    prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None
) -> tuple[list[Prompt], list[SamplingParams]]:
    """One prompt or a list, with one SamplingParams for all (default: SamplingParams()) or one each:
    (prompts, params) as two lists of the same length."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    params = params or SamplingParams()
    plist = params if isinstance(params, list) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
    return list(prompts), plist


class LLM:
    """Load a model once, then generate, stream or score with it.

    >>> llm = LLM("smollm2-135m-instruct", numerics="fp32", determinism="batch_invariant")
    >>> llm.generate(["What is 2+2?"], chat=True)[0].outputs[0].text  # defaults: greedy, at most 512 tokens
    'The answer to this classic math problem is 4.'
    """

    name = "ditto"

    def __init__(
        self,
        model: str | LoadedModel = "smollm2-135m-instruct",
        numerics: str = "fp32",
        determinism: str = "auto",
        progress: bool = True,
        **engine_options,
    ):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(engine_options) - known
        if unknown:
            raise TypeError(
                f"unknown engine option(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        self.config = EngineConfig(numerics=numerics, determinism=determinism, **engine_options)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        from ditto.devices import resolve_device  # noqa: I001
        from ditto.numerics import prepare

        self.device = resolve_device(self.config.device)
        determinism = self.config.determinism
        if determinism == "auto":  # the level measured free on this device: batch_invariant on CPU
            determinism = auto_determinism(self.config.numerics, self.device.type)
        self.config = dataclasses.replace(self.config, device=str(self.device), determinism=determinism)
        self.progress = progress
        if isinstance(model, LoadedModel):
            # an already loaded model (e.g. one load, several numerics modes): numerics modes swap
            # modules, so this instance works on its own copy and the caller's model stays untouched
            self.loaded = dataclasses.replace(model, model=copy.deepcopy(model.model))
        else:
            from ditto.numerics.base import get_mode

            # a mode that computes on the file's blocks (numerics gguf) skips decoding them at load
            blocks = getattr(get_mode(self.config.numerics), "runs_on_blocks", False)
            self.loaded = load(model, progress=progress, keep_blocks=blocks)
        self.tokenizer = self.loaded.tokenizer
        prepared = prepare(self.loaded, self.config)
        self.numerics = prepared
        self.engine = LLMEngine(prepared, self.loaded.config, self.tokenizer, self.config, _fingerprint_fn())
        self._ids = itertools.count()
        # generate/score may be called from several threads at once (strategy runs, many problems):
        # each caller submits under the lock, then callers take turns stepping the one engine, so
        # every thread's requests share the continuous batch. stream() is single-threaded.
        self._lock = threading.RLock()
        self._threads = torch.get_num_threads()
        self._thread_ready = threading.local()

    thread_safe = True  # Backend capability: generate/score from several threads share one batch

    @property
    def model_digest(self) -> str:
        """sha256 of the weight files (plus calibration data the numerics mode adds, e.g. integer scales)."""
        from ditto.loader.digest import files_digest

        return files_digest(self.loaded.weight_files, self.numerics.digest_extra)

    # ---- Backend protocol -------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def info(self) -> dict:
        return {
            "backend": "ditto",
            "ditto_version": _version(),
            "torch": torch.__version__,
            "model": str(self.loaded.path),
            "model_name": self.loaded.name,
            "model_digest": self.model_digest,
            "tokenizer_digest": getattr(self.tokenizer, "digest", None),
            "family": self.loaded.config.family,
            "numerics": self.config.numerics,
            "determinism": self.config.determinism,
            "kv_dtype": str(self.numerics.kv_dtype).removeprefix("torch."),
            "block_size": self.config.block_size,
            "max_num_seqs": self.config.max_num_seqs,
            "max_num_batched_tokens": self.config.max_num_batched_tokens,
            "prefill_chunk": self.config.prefill_chunk,
            "prefix_caching": self.config.enable_prefix_caching,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "device": describe_device(self.device),
            "attention_kernel": _attention_kernel(self.device),
            "sampler": "ditto counter-based Gumbel-max (splitmix64-gumbel-v1)",
        }

    def engine_stats(self) -> dict:
        """Counters since the engine started: steps, prefill/decode tokens, preemptions (and of those, scoring
        requests), prefix-cache hit tokens, copy-on-write copies. Under `fast`, preemptions and batch mix
        move low bits; eval runs record these beside their results."""
        with self._lock:
            return dict(self.engine.stats) | dict(self.engine.blocks.stats)

    # ---- generation ---------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.encode(prompt)
        return None, [int(t) for t in prompt]

    def _submit(self, prompt: Prompt, params: SamplingParams) -> Request:
        text, ids = self._prompt_ids(prompt)
        return self.engine.add_request(f"req-{next(self._ids)}", ids, params, prompt=text)

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        progress: bool | None = None,
        chat: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        A progress bar (requests done, decode tok/s) shows for 8+ prompts when the LLM was built with
        progress=True, unless `progress` says otherwise.
        """
        prompts, plist = pair_prompts(prompts, params)
        if chat:
            prompts = [self.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
        with self._lock:
            reqs = [self._submit(p, sp) for p, sp in zip(prompts, plist)]
        if progress is None:
            progress = self.progress and len(reqs) >= 8
        self._run_until_done(reqs, progress, "generating")
        return [self._output(r) for r in reqs]

    def _run_until_done(self, reqs: list[Request], progress: bool, label: str) -> None:
        bar = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[tps]}"),
                TimeElapsedColumn(),
                transient=True,
            )
            bar.start()
            task = bar.add_task(label, total=len(reqs), tps="")
        if not getattr(self._thread_ready, "ok", False):  # OpenMP thread counts are per OS thread
            torch.set_num_threads(self._threads)
            self._thread_ready.ok = True
        pending = list(reqs)
        t0, tokens0 = time.perf_counter(), self.engine.stats["decode_tokens"]
        try:
            while pending:
                with self._lock:  # one step for every caller's requests (another thread may step too)
                    if all(not r.finished for r in pending):
                        if not self.engine.has_unfinished():
                            raise RuntimeError(f"engine idle with {len(pending)} unfinished requests")
                        self.engine.step()
                done = [r for r in pending if r.finished]
                pending = [r for r in pending if not r.finished]
                if bar:
                    bar.advance(task, len(done))
                    rate = (self.engine.stats["decode_tokens"] - tokens0) / max(1e-9, time.perf_counter() - t0)
                    bar.update(task, tps=f"{rate:.0f} tok/s")
        finally:
            if bar:
                bar.stop()
            with self._lock:
                for r in pending:  # interrupted: do not leave sequences holding cache blocks
                    self.engine.abort(r.request_id)
                for r in reqs:
                    self.engine.requests.pop(r.request_id, None)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[tuple[int, str, list[int]]]:
        """Yield (sample index, new text, new token ids) as tokens are produced; runs the engine loop."""
        from ditto.loader.tokenizer import IncrementalDecoder

        params = params or SamplingParams()
        req = self._submit(prompt, params)
        seen: dict[int, int] = {}
        decoders: dict[int, IncrementalDecoder] = {}
        try:
            while True:
                self.engine.step()
                for seq in req.seqs:
                    i = seq.sample_index
                    dec = decoders.setdefault(i, IncrementalDecoder(self.tokenizer, params.skip_special_tokens))
                    new = seq.output_ids[seen.get(i, 0) :]
                    if new:
                        seen[i] = len(seq.output_ids)
                        text = "".join(dec.push(t) for t in new)
                        if seq.finished:
                            text += dec.flush()
                        yield i, text, new
                if req.finished:
                    break
                if not self.engine.has_unfinished():
                    raise RuntimeError("engine idle before the request finished")
        finally:
            if not req.finished:
                self.engine.abort(req.request_id)
            self.engine.requests.pop(req.request_id, None)

    def score(self, prompt: Prompt, continuation: Prompt, *, keep_logits: bool = False) -> ScoreOutput:
        """Teacher-forced log-probabilities of `continuation` given `prompt` (one forward pass)."""
        return self.score_batch([(prompt, continuation)], keep_logits=keep_logits)[0]

    def score_batch(self, pairs: list[tuple[Prompt, Prompt]], *, keep_logits: bool = False) -> list[ScoreOutput]:
        reqs = []
        with self._lock:
            self._add_score_requests(pairs, reqs, keep_logits)
        self._run_until_done(reqs, False, "scoring")
        return [self._score_output(req) for req in reqs]

    def _add_score_requests(
        self, pairs: list[tuple[Prompt, Prompt]], reqs: list[Request], keep_logits: bool = False
    ) -> None:
        for prompt, cont in pairs:
            _, p_ids = self._prompt_ids(prompt)
            c_ids = self.encode(cont, add_special_tokens=False) if isinstance(cont, str) else [int(t) for t in cont]
            if not c_ids:
                raise ValueError("empty continuation: nothing to score")
            req = self.engine.add_request(
                f"score-{next(self._ids)}",
                p_ids + c_ids,
                SamplingParams(temperature=0.0),
                score_from=len(p_ids),
                keep_score_logits=keep_logits,
            )
            reqs.append(req)

    @staticmethod
    def _score_output(req: Request) -> ScoreOutput:
        seq = req.seqs[0]
        out = ScoreOutput(
            prompt_token_ids=seq.prompt_ids[: seq.score_from],
            token_ids=seq.prompt_ids[seq.score_from :],
            logprobs=[row[0] for row in seq.score_rows],
            top_ids=[row[1] for row in seq.score_rows],
        )
        if seq.keep_score_logits:  # asked for at submission (score_batch's keep_logits)
            out.logits = torch.stack([row[2] for row in seq.score_rows])  # (C, V)
            out.hidden = torch.stack([row[3] for row in seq.score_rows])  # (C, hidden)
        return out

    # ---- outputs ------------------------------------------------------------------------------
    def _output(self, req: Request) -> RequestOutput:
        completions = []
        for seq in sorted(req.seqs, key=lambda s: s.sample_index):
            if isinstance(seq.stop_reason, str):
                text = seq.text
            else:
                text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=seq.params.skip_special_tokens)
            completions.append(
                CompletionOutput(
                    index=seq.sample_index,
                    text=text,
                    token_ids=list(seq.output_ids),
                    logprobs=list(seq.logprobs),
                    finish_reason=seq.finish_reason,
                    top_logprobs=list(seq.top_logprobs) or None,
                    fingerprints=list(seq.fingerprints) or None,
                    stop_reason=seq.stop_reason,
                )
            )
        first = req.first_token_time or req.finished_time or time.perf_counter()
        metrics = {
            "numerics": self.config.numerics,
            "determinism": self.config.determinism,
            "seed": req.params.seed,
            "sampling": req.params.record(),
            "prompt_tokens": len(req.prompt_ids),
            "cached_prompt_tokens": req.seqs[0].num_cached if req.seqs else 0,
            "ttft_s": first - req.arrival_time,
            "latency_s": (req.finished_time or time.perf_counter()) - req.arrival_time,
        }
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, completions, req.finished, metrics)


def _fingerprint_fn():
    """(hidden, k) -> fingerprints; ditto.verify (numpy and all) is imported on the first fingerprint,
    not on the path of every start."""

    def fingerprint(hidden: torch.Tensor, k: int) -> torch.Tensor:
        from ditto.verify.activation_difr import fingerprints

        return fingerprints(hidden.float(), k)

    return fingerprint


def _version() -> str:
    from ditto import __version__

    return __version__


def _attention_kernel(device: torch.device) -> str:
    """Which float attention runs: the fused C kernel on CPU when it builds, else the torch path."""
    if device.type != "cpu":
        return "torch"
    from ditto.engine import attention_c

    return "c" if attention_c.kernel_available() else f"torch ({attention_c.kernel_status()})"

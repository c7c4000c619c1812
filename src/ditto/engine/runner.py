"""ModelRunner: turns a scheduled batch into one flattened forward pass over the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditto.config import ModelConfig
from ditto.engine.attention import DecodeRows, PrefillChunk
from ditto.engine.scheduler import Batch, ScheduledItem

SCORE_CHUNK = 256  # scoring rows turned into logits at a time: bounds the (rows, vocab) block a step holds


@dataclass
class StepOutput:
    """Logits (float32) of the rows that sample, and each scoring row reduced to (logprob, argmax)."""

    sample_items: list[ScheduledItem]  # items whose last token's logits are due (sampling)
    sample_logits: torch.Tensor  # (len(sample_items), V)
    sample_hidden: torch.Tensor  # (len(sample_items), hidden) final post-norm hidden state
    # (item, first row, number of rows, first row in score_logits or None): rows of teacher-forced scoring
    score_items: list[tuple[ScheduledItem, int, int, int | None]]
    score_logprobs: torch.Tensor | None  # (rows,) log p of the token each row predicts
    score_top: torch.Tensor | None  # (rows,) argmax of each row
    score_logits: torch.Tensor | None  # (kept rows, V) only for sequences that keep full logits
    score_hidden: torch.Tensor | None  # (kept rows, hidden)


class ModelRunner:
    def __init__(self, model, cfg: ModelConfig, cache, make_context, device: torch.device | None = None):
        self.model = model
        self.device = device or torch.device("cpu")  # step tensors are made here; results come back on CPU
        self.cfg = cfg
        self.cache = cache
        self.make_context = make_context  # from the numerics mode: float or integer paged attention

    def _metadata(self, batch: Batch):
        bs = self.cache.block_size
        ids, positions, slots = [], [], []
        dec_idx, dec_pos, dec_blocks, dec_row, dec_first = [], [], [], [], []
        prefills: list[PrefillChunk] = []
        offset = 0
        for item in batch.items:
            seq, start, n = item.seq, item.start, item.num_tokens
            table = seq.block_table
            toks = seq.tokens[start : start + n]
            ids.extend(toks)
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            nb = -(-(start + n) // bs)
            if n == 1:
                row = len(dec_idx)
                dec_idx.append(offset)
                dec_pos.append(start)
                dec_blocks.extend(table[:nb])
                dec_row.extend([row] * nb)
                dec_first.extend(i * bs for i in range(nb))
            else:
                prefills.append(PrefillChunk(offset, n, start, torch.tensor(table[:nb], dtype=torch.long)))
            offset += n
        decode = None
        if dec_idx:
            decode = DecodeRows(
                torch.tensor(dec_idx),
                torch.tensor(dec_pos),
                torch.tensor(dec_blocks),
                torch.tensor(dec_row),
                torch.tensor(dec_first),
            )
        ctx = self.make_context(self.cache, torch.tensor(slots), decode, prefills, self.cfg)
        return torch.tensor(ids), torch.tensor(positions), ctx

    @torch.inference_mode()
    def run(self, batch: Batch) -> StepOutput:
        if self.device.type == "cpu":
            return self._run(batch)  # (no device context: its per-op dispatch hook costs ~15% of a CPU step)
        with self.device:  # every tensor the step creates (metadata, masks, partials) on the model's device
            out = self._run(batch)
        tensors = (
            out.sample_logits,
            out.sample_hidden,
            out.score_logprobs,
            out.score_top,
            out.score_logits,
            out.score_hidden,
        )
        cpu = [None if t is None else t.cpu() for t in tensors]  # scoring rows come back reduced, not (rows, V)
        return StepOutput(out.sample_items, cpu[0], cpu[1], out.score_items, *cpu[2:])

    def _run(self, batch: Batch) -> StepOutput:
        self.cache.clear_blocks(batch.clears)  # first, so a copy-on-write target then gets its copy
        self.cache.copy_blocks(batch.copies)
        ids, positions, ctx = self._metadata(batch)
        hidden = self.model(ids, positions, ctx)  # (T, hidden)
        sample_items, sample_rows = [], []
        score_items, score_rows, score_targets, kept_rows = [], [], [], []
        offset = 0
        for item in batch.items:
            seq = item.seq
            if seq.score_from is not None:
                # rows whose next-token prediction is a scored token: positions score_from-1 .. len-2
                lo = max(item.start, seq.score_from - 1)
                hi = min(item.end, len(seq) - 1)
                if hi > lo:
                    kept = None
                    if seq.keep_score_logits:
                        kept = len(kept_rows)
                        kept_rows.extend(range(len(score_rows), len(score_rows) + hi - lo))
                    score_items.append((item, len(score_rows), hi - lo, kept))
                    score_rows.extend(range(offset + lo - item.start, offset + hi - item.start))
                    score_targets.extend(seq.tokens[lo + 1 : hi + 1])
            elif item.completes:
                sample_items.append(item)
                sample_rows.append(offset + item.num_tokens - 1)
            offset += item.num_tokens
        idx = torch.tensor(sample_rows, dtype=torch.long)
        sample_hidden = hidden[idx]
        sample_logits = self.model.compute_logits(sample_hidden) if sample_rows else torch.empty(0, self.cfg.vocab_size)
        scored = [None] * 4
        if score_rows:
            rows = hidden[torch.tensor(score_rows, dtype=torch.long)]  # (R, hidden)
            scored = self._score(
                rows, torch.tensor(score_targets, dtype=torch.long), torch.tensor(kept_rows, dtype=torch.long)
            )
        return StepOutput(sample_items, sample_logits, sample_hidden, score_items, *scored)

    def _score(self, hidden: torch.Tensor, targets: torch.Tensor, kept: torch.Tensor):
        """Scoring rows (R, hidden) -> logprob of each row's target (R,), argmax (R,), and the full logits and
        hidden states of the `kept` rows; logits are made SCORE_CHUNK rows at a time, so a step never holds
        more than one (SCORE_CHUNK, V) block beside the kept ones."""
        logprobs, top, kept_logits = [], [], []
        for lo in range(0, hidden.shape[0], SCORE_CHUNK):
            logits = self.model.compute_logits(hidden[lo : lo + SCORE_CHUNK])  # (c, V)
            logp = torch.log_softmax(logits, dim=-1)
            logprobs.append(logp.gather(1, targets[lo : lo + SCORE_CHUNK, None])[:, 0])
            top.append(logits.argmax(-1))
            mine = kept[(kept >= lo) & (kept < lo + SCORE_CHUNK)] - lo
            if len(mine):
                kept_logits.append(logits[mine])
        if not len(kept):
            return torch.cat(logprobs), torch.cat(top), None, None
        return torch.cat(logprobs), torch.cat(top), torch.cat(kept_logits), hidden[kept]

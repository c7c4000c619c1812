"""ModelRunner: turns a scheduled batch into one flattened forward pass over the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditto.config import ModelConfig
from ditto.engine.attention import DecodeRows, PrefillChunk
from ditto.engine.scheduler import Batch, ScheduledItem


@dataclass
class StepOutput:
    """Logits (float32) of the rows that need them, keyed back to their scheduled items."""

    sample_items: list[ScheduledItem]  # items whose last token's logits are due (sampling)
    sample_logits: torch.Tensor  # (len(sample_items), V)
    sample_hidden: torch.Tensor  # (len(sample_items), hidden) final post-norm hidden state
    score_items: list[tuple[ScheduledItem, int, int]]  # (item, first row, number of rows)
    score_logits: torch.Tensor | None  # (rows, V) for teacher-forced scoring
    score_hidden: torch.Tensor | None


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
        cpu = [
            None if t is None else t.cpu()
            for t in (out.sample_logits, out.sample_hidden, out.score_logits, out.score_hidden)
        ]
        return StepOutput(out.sample_items, cpu[0], cpu[1], out.score_items, cpu[2], cpu[3])

    def _run(self, batch: Batch) -> StepOutput:
        self.cache.copy_blocks(batch.copies)
        ids, positions, ctx = self._metadata(batch)
        hidden = self.model(ids, positions, ctx)  # (T, hidden)
        sample_items, sample_rows = [], []
        score_items, score_rows = [], []
        offset = 0
        for item in batch.items:
            seq = item.seq
            if seq.score_from is not None:
                # rows whose next-token prediction is a scored token: positions score_from-1 .. len-2
                lo = max(item.start, seq.score_from - 1)
                hi = min(item.end, len(seq) - 1)
                if hi > lo:
                    score_items.append((item, len(score_rows), hi - lo))
                    score_rows.extend(range(offset + lo - item.start, offset + hi - item.start))
            elif item.completes:
                sample_items.append(item)
                sample_rows.append(offset + item.num_tokens - 1)
            offset += item.num_tokens
        idx = torch.tensor(sample_rows, dtype=torch.long)
        sample_hidden = hidden[idx]
        sample_logits = self.model.compute_logits(sample_hidden) if sample_rows else torch.empty(0, self.cfg.vocab_size)
        score_logits = score_hidden = None
        if score_rows:
            score_hidden = hidden[torch.tensor(score_rows, dtype=torch.long)]
            score_logits = self.model.compute_logits(score_hidden)
        return StepOutput(sample_items, sample_logits, sample_hidden, score_items, score_logits, score_hidden)

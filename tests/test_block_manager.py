"""Block manager and scheduler invariants, without a model (property tests)."""

from __future__ import annotations

import random

from block_invariants import check_blocks
from hypothesis import given, settings
from hypothesis import strategies as st

from ditto.config import EngineConfig
from ditto.engine.block_manager import BlockManager
from ditto.engine.scheduler import Scheduler
from ditto.engine.sequence import Sequence, Status
from ditto.sampling import SamplingParams


def _seq(tokens, n=1):
    return Sequence("r", list(tokens), SamplingParams(temperature=0, max_tokens=8), fork_n=n)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(4, 40), st.sampled_from([1, 2, 4, 16]))
def test_random_add_step_finish_preempt_never_leaks(seed, num_blocks, block_size):
    """Random workloads through the real scheduler: refcounts always match block tables, and once
    every sequence is gone every block is free again (no leak, no double free)."""
    rng = random.Random(seed)
    cfg = EngineConfig(block_size=block_size, max_num_seqs=6, max_num_batched_tokens=24, prefill_chunk=7)
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=rng.random() < 0.7)
    sched = Scheduler(cfg, bm, max_model_len=10_000)
    live: list[Sequence] = []
    shared_prefix = [rng.randrange(50) for _ in range(rng.randrange(1, 3 * block_size))]
    for _ in range(120):
        action = rng.random()
        if action < 0.3 and len(live) < 12:
            body = [rng.randrange(50) for _ in range(rng.randrange(1, 2 * block_size))]
            tokens = (shared_prefix if rng.random() < 0.5 else []) + body
            if -(-len(tokens) // block_size) + 1 <= num_blocks:
                s = _seq(tokens)
                sched.add(s)
                live.append(s)
        elif action < 0.4 and live:
            s = rng.choice(live)
            sched.finish(s)
            live.remove(s)
        else:
            try:
                batch = sched.schedule()
            except RuntimeError:
                break  # a single sequence larger than the whole cache: refused loudly
            for item in batch.items:
                bm.commit(item.seq, item.end)
                if item.completes:
                    if rng.random() < 0.2 and item.seq.status is Status.RUNNING:
                        child = _seq(item.seq.prompt_ids)  # fork shares every block
                        bm.fork(item.seq, child)
                        sched.add_running(child)
                        live.append(child)
                    item.seq.output_ids.append(rng.randrange(50))
            for s in list(live):
                if len(s.output_ids) >= 3 and s.status is Status.RUNNING and rng.random() < 0.3:
                    sched.finish(s)
                    live.remove(s)
        check_blocks(bm, [s for s in live if s.status is not Status.FINISHED])
    for s in live:
        sched.finish(s)
    check_blocks(bm, [])
    assert bm.num_free == num_blocks


def test_prefix_cache_hits_reuse_blocks():
    bm = BlockManager(16, 4)
    a = _seq(range(10))
    bm.match_prefix(a)
    bm.allocate(a, 10)
    bm.commit(a, 10)
    b = _seq(list(range(8)) + [99, 98, 97])
    bm.match_prefix(b)
    assert b.num_cached == 8 and b.block_table == a.block_table[:2]  # the two full shared blocks
    c = _seq(list(range(8)))  # whole prompt cached: the last block is recomputed for its logits
    bm.match_prefix(c)
    assert c.num_cached == 4
    bm.free_seq(a)
    d = _seq(range(10))  # freed but not reused yet: still a hit
    bm.match_prefix(d)
    assert d.num_cached == 8


def test_copy_on_write_fork():
    bm = BlockManager(8, 4)
    p = _seq(range(6))
    bm.allocate(p, 6)
    bm.commit(p, 6)
    c = _seq(range(6))
    bm.fork(p, c)
    assert bm.ref[p.block_table[1]] == 2
    c.output_ids.append(7)
    assert bm.blocks_needed(c, 1) == 1  # partial shared block must be copied before writing
    bm.allocate(c, 1)
    assert c.block_table[0] == p.block_table[0] and c.block_table[1] != p.block_table[1]
    assert bm.take_copies() == [(p.block_table[1], c.block_table[1])]
    check_blocks(bm, [p, c])


def test_preemption_instead_of_oom():
    cfg = EngineConfig(block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    bm = BlockManager(6, 4)
    sched = Scheduler(cfg, bm, 1000)
    seqs = [_seq(range(i, i + 7)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    for _ in range(60):
        if not sched.has_work():
            break
        batch = sched.schedule()
        for item in batch.items:
            bm.commit(item.seq, item.end)
            if item.completes:
                item.seq.output_ids.append(1)
                if len(item.seq.output_ids) == 6:
                    sched.finish(item.seq)
        check_blocks(bm, [s for s in seqs if s.status is not Status.FINISHED])
    assert sched.num_preemptions > 0
    assert all(len(s.output_ids) == 6 for s in seqs)  # every sequence still finished
    assert bm.num_free == 6

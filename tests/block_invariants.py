"""Shared by the engine tests: the block manager's invariants, checked after every operation."""

from __future__ import annotations

from ditto.engine.block_manager import BlockManager
from ditto.engine.sequence import Sequence


def check_blocks(bm: BlockManager, live: list[Sequence]) -> None:
    """Reference counts equal table usage; free blocks are unreferenced; the cache maps agree."""
    counts = [0] * bm.num_blocks
    for seq in live:
        for b in seq.block_table:
            counts[b] += 1
    assert counts == bm.ref, "reference counts disagree with block tables"
    for b in range(bm.num_blocks):
        assert (bm.ref[b] == 0) == (b in bm.free), f"block {b}: ref {bm.ref[b]} vs free list"
    for h, b in bm.cached.items():
        assert bm.hash_of[b] == h
    assert bm.scored.keys() <= bm.cached.keys(), "remembered score rows outlived their block"

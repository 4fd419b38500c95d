"""Host-side bookkeeping of the paged KV pool: which physical blocks are free, who holds which.

Plain Python/NumPy, never traced. Block 0 is the padding block and is never handed out. Calls come
in check-then-commit pairs (`can_allocate` / `allocate`), so a failed check changes nothing.
"""

from __future__ import annotations

import collections
import random
from typing import Optional

import numpy as np

from jinfer.kv_cache import PAD_BLOCK
from jinfer.sequence import Sequence


class BlockManager:
    """Free list and refcounts of the pool's blocks; grows and frees sequences' block tables."""

    def __init__(self, num_blocks: int, block_size: int, shuffle_seed: Optional[int] = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        free = [b for b in range(num_blocks) if b != PAD_BLOCK]
        if shuffle_seed is not None:  # paging must be invisible: tests shuffle the free list
            random.Random(shuffle_seed).shuffle(free)
        self.free_blocks: collections.deque[int] = collections.deque(free)
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)  # [num_blocks]

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` lacks to hold its first `num_tokens` tokens."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grows `seq`'s block table to cover `num_tokens` tokens (after `can_allocate`)."""
        for _ in range(self.num_new_blocks(seq, num_tokens)):
            block = self.free_blocks.popleft()
            assert self.ref_counts[block] == 0, f"block {block} on the free list is referenced"
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Drops `seq`'s references; blocks nobody references go back to the free list."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def is_whole(self) -> bool:
        """True when every usable block is free and unreferenced (no leak)."""
        return (self.num_free_blocks == self.num_usable_blocks
                and not self.ref_counts.any())

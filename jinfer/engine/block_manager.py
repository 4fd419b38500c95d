"""Host-side bookkeeping of the paged KV pool: which physical blocks are free, who holds which,
and which hold a prompt prefix worth reusing.

Plain Python/NumPy, never traced. Block 0 is the padding block and is never handed out. Calls come
in check-then-commit pairs (`can_allocate` / `allocate`, `can_allocate_prompt` / `allocate_prompt`,
`can_append_slots` / `append_slots`), so a failed check changes nothing. Admission looks the
prompt's prefix up once (`match_prefix`), and its check and commit both take that `PrefixMatch`.

Prefix caching (vLLM's automatic prefix caching): once a FULL block's tokens are known and its
K/V computed, or being computed by a dispatched device call (the device runs calls in dispatch
order, so any later sharer reads them after), the block is registered (`mark_computed`) under a
hash chain, hash(parent block's hash, the block's token ids), so its hash names every token up
to and including the block. A later sequence whose leading blocks match shares them (refcount +
1) and skips prefilling them. When its last reference goes, a cached block is not freed but
becomes *evictable*: still findable, reclaimed in LRU order only when the pool needs a fresh
block and the plain free list is empty.

Copy-on-write: `fork` shares a parent's whole block table with a child. Full blocks are never
written again, so sharing them costs nothing; a shared block that a sequence is about to write
into (its partly filled last block) is swapped for a fresh one by `append_slots`, which returns the
(src, dst) copies the engine must do on device before the step.

Sliding window (`sliding_window` = W, a model whose EVERY layer attends only to the last W
tokens, the smallest W if they differ: a query at position p reads keys p - W < k <= p): once a
sequence's first `num_computed_tokens` (c) positions are read back, the blocks wholly at or below
position c - 1 - W are read by nothing any more. Not by a call in flight: its queries start at c
(lookahead plans calls past c, never before it). Not by a later call, nor by an n > 1 sibling
forked now, which recomputes position c - 1 (hence the 1 kept past the window).
`release_outside_window` drops the sequence's references to them and puts PAD_BLOCK in their
entries, so tables keep their positions and a sequence holds about W / block_size + 2 blocks
however long it grows. Released blocks are freed as `free` frees them: a block another sequence
or the prefix cache holds stays (shared, or evictable). A model that mixes windowed and global
layers (Gemma 2/3) passes None and keeps every block: each block holds every layer's K/V of its
positions, and the global layers read the whole context, so the pool holds the same as for a
model without windows (freeing the windowed layers' share needs a pool per layer group, as
vLLM's hybrid allocator has).

Prefix caching with a window: a prefix hit still needs the whole hash chain from the first block
in the pool (the simplest correct rule; matching on the last W tokens' blocks alone would hit
more often, not done). The sequence then shares only the hit blocks its first query reads; the
ones before the window stay where they are (cached, refreshed in the LRU when evictable) and its
table has PAD_BLOCK there.

Every usable block is in exactly one state:
  free       refcount 0, not cached, on `free_blocks`
  evictable  refcount 0, cached, in `evictable` (least recently used first)
  used       refcount > 0, cached or not
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import random
from typing import Iterable, Optional

import numpy as np

from jinfer.model.kv_cache import PAD_BLOCK
from jinfer.engine.sequence import Sequence

logger = logging.getLogger(__name__)

BlockHash = bytes  # sha256 digest naming a full block and every token before it


def hash_block_tokens(parent_hash: Optional[BlockHash], token_ids: tuple[int, ...]) -> BlockHash:
    """Chain hash of one full block: sha256 over the parent's digest and the ids as int64 bytes.

    Deterministic across processes (unlike Python's salted hash() of bytes). The first block's
    parent is None, hashed as no bytes; every block has block_size ids, so no two inputs alias.
    """
    data = (parent_hash or b"") + np.asarray(token_ids, dtype=np.int64).tobytes()
    return hashlib.sha256(data).digest()


@dataclasses.dataclass(frozen=True)
class CachedBlock:
    """What a block in the prefix index holds. Kept to verify a hit instead of trusting the hash:
    a hit must match the (parent_hash, token_ids) pair exactly."""
    block_hash: BlockHash
    parent_hash: Optional[BlockHash]  # None for a sequence's first block
    token_ids: tuple[int, ...]        # [block_size]


@dataclasses.dataclass(frozen=True)
class PrefixMatch:
    """A sequence's leading full blocks found in the prefix cache (`match_prefix`): one lookup,
    which admission's check (`can_allocate_prompt`) and commit (`allocate_prompt`) both use."""

    blocks: tuple[int, ...]        # [num_hits] cached blocks, in sequence order
    hashes: tuple[BlockHash, ...]  # [num_hits] their chain hashes
    num_tokens: int                # tokens they hold: num_hits * block_size


class BlockManager:
    """Free list, refcounts, prefix index and copy-on-write of the pool's blocks."""

    def __init__(self, num_blocks: int, block_size: int, shuffle_seed: Optional[int] = None,
                 enable_prefix_caching: bool = True, sliding_window: Optional[int] = None):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"need num_blocks >= 2 (block 0 is padding) and block_size >= 1, got "
                             f"{num_blocks} and {block_size}; raise the KV pool size")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of tokens or None (some "
                             f"layer attends to the whole context), got {sliding_window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.shuffle_seed = shuffle_seed
        self.enable_prefix_caching = enable_prefix_caching
        free = [b for b in range(num_blocks) if b != PAD_BLOCK]
        if shuffle_seed is not None:  # paging must be invisible: tests shuffle the free list
            random.Random(shuffle_seed).shuffle(free)
        self.free_blocks: collections.deque[int] = collections.deque(free)  # free, not cached
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)  # [num_blocks]
        self.prefix_index: dict[BlockHash, int] = {}  # chain hash -> block holding it
        self.cached: dict[int, CachedBlock] = {}  # block -> its entry; inverse of prefix_index
        # Cached blocks nobody references, least recently freed first (evicted first).
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        # seq_id -> chain hashes of the sequence's first full blocks already offered to the index.
        self._seq_hashes: dict[int, list[BlockHash]] = {}
        self.num_queried_blocks = 0  # full prompt blocks looked up at admission (after the cap)
        self.num_hit_blocks = 0  # of those, found in the cache
        self.num_tokens_from_cache = 0  # prompt tokens that admission skipped prefilling

    # -- sizes and statistics --------------------------------------------------------------------
    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be handed out (all but the padding block)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to allocate: free plus evictable."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def num_evictable_blocks(self) -> int:
        return len(self.evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix index, referenced or not."""
        return len(self.prefix_index)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit blocks over queried blocks since construction (0.0 before any query)."""
        return self.num_hit_blocks / self.num_queried_blocks if self.num_queried_blocks else 0.0

    def kv_waste(self, seqs: Iterable[Sequence]) -> float:
        """Fraction of the slots held by `seqs` that hold no token (allocated-but-empty over
        allocated). A shared block counts once, filled as far as its fullest holder; entries
        released by the sliding window count not at all. 0.0 when nothing is held."""
        filled: dict[int, int] = {}  # block -> slots holding a token
        for seq in seqs:
            for i, block in enumerate(seq.block_table):
                if block == PAD_BLOCK:  # released: outside the sliding window
                    continue
                n = min(self.block_size, max(0, seq.num_tokens - i * self.block_size))
                filled[block] = max(filled.get(block, 0), n)
        allocated = len(filled) * self.block_size
        return 1.0 - sum(filled.values()) / allocated if allocated else 0.0

    def stats(self) -> dict:
        return {"num_total_blocks": self.num_usable_blocks,  # the key users read
                "num_free_blocks": self.num_free_blocks, "num_used_blocks": self.num_used_blocks,
                "num_cached_blocks": self.num_cached_blocks,
                "num_evictable_blocks": self.num_evictable_blocks,
                "prefix_cache_queried_blocks": self.num_queried_blocks,
                "prefix_cache_hit_blocks": self.num_hit_blocks,
                "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
                "num_tokens_from_cache": self.num_tokens_from_cache}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` lacks to hold its first `num_tokens` tokens."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    # -- growing a block table with fresh blocks (no sharing) ------------------------------------
    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grows `seq`'s block table to cover `num_tokens` tokens (after `can_allocate`). Never
        shares or copies: use `append_slots` for a sequence that may hold shared blocks."""
        assert not self._shared_in_write_range(seq, num_tokens), "write into a shared block"
        self._grow(seq, num_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.num_new_blocks(seq, num_tokens)):
            seq.block_table.append(self._take_block())

    def _take_block(self) -> int:
        """A fresh block with refcount 1: from the free list, else the LRU evictable block."""
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            self._uncache(block)
        assert self.ref_counts[block] == 0, f"block {block} on the free list is referenced"
        self.ref_counts[block] = 1
        return block

    def _uncache(self, block: int) -> None:
        entry = self.cached.pop(block)
        del self.prefix_index[entry.block_hash]

    # -- admission with prefix caching -----------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """The cached blocks holding `seq`'s leading full blocks, up to the first miss; changes
        nothing. Never covers the last token: the model must compute one to get logits. Hashes
        every full block up to the miss: look up once per admission attempt."""
        if not self.enable_prefix_caching:
            return PrefixMatch((), (), 0)
        token_ids, bs = seq.token_ids(), self.block_size
        blocks: list[int] = []
        hashes: list[BlockHash] = []
        for i in range((len(token_ids) - 1) // bs):
            parent = hashes[-1] if hashes else None
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            block_hash = hash_block_tokens(parent, tokens)
            block = self.prefix_index.get(block_hash)
            if block is None:
                break
            if self.cached[block] != CachedBlock(block_hash, parent, tokens):
                logger.warning("prefix cache hash collision on block %d; not sharing it", block)
                break
            blocks.append(block)
            hashes.append(block_hash)
        return PrefixMatch(tuple(blocks), tuple(hashes), len(blocks) * bs)

    def can_allocate_prompt(self, match: PrefixMatch, num_tokens: int) -> bool:
        """Whether `allocate_prompt` of a sequence with prefix `match` up to `num_tokens` tokens
        would succeed. Cached hits cost nothing, except evictable ones, which leave the pool of
        allocatable blocks; hits before the sliding window are not shared."""
        live = match.blocks[self.num_outside_window(match.num_tokens):]
        revived = sum(1 for block in live if block in self.evictable)
        fresh = max(0, self.blocks_needed(num_tokens) - len(match.blocks))
        return fresh + revived <= self.num_free_blocks

    def allocate_prompt(self, seq: Sequence, match: PrefixMatch, num_tokens: int) -> int:
        """Admits `seq` (empty block table) with `match`, its `match_prefix` taken since the
        last change to the pool: shares the cached blocks, allocates fresh ones up to
        `num_tokens` tokens, sets and returns `seq.num_computed_tokens` (the cached tokens, a
        multiple of block_size, at most num_tokens_of_seq - 1). Hits wholly before the sliding
        window get PAD_BLOCK entries instead (`release_outside_window`)."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        assert all(self.prefix_index.get(h) == b for h, b in zip(match.hashes, match.blocks)), \
            "a stale prefix match: the pool changed since match_prefix"
        outside = self.num_outside_window(match.num_tokens)
        for block in reversed(match.blocks[:outside]):  # not shared but hit: evicted last,
            if block in self.evictable:                   # the head of the chain last of all
                self.evictable.move_to_end(block)
        for block in match.blocks[outside:]:
            self.evictable.pop(block, None)
            self.ref_counts[block] += 1
        seq.block_table = [PAD_BLOCK] * outside + list(match.blocks[outside:])
        self._grow(seq, num_tokens)
        self._seq_hashes[seq.seq_id] = list(match.hashes)
        seq.num_computed_tokens = match.num_tokens
        if self.enable_prefix_caching:
            self.num_queried_blocks += (seq.num_tokens - 1) // self.block_size
            self.num_hit_blocks += len(match.blocks)
            self.num_tokens_from_cache += seq.num_computed_tokens
        return seq.num_computed_tokens

    def mark_computed(self, seq: Sequence, num_computed_tokens: Optional[int] = None) -> None:
        """Registers the full blocks among `seq`'s first `num_computed_tokens` tokens (default:
        `seq.num_computed_tokens`) in the prefix index. Call once the device call that writes
        them is dispatched, and only for tokens known on the host (never a sample still on the
        device)."""
        if not self.enable_prefix_caching:
            return
        n = seq.num_computed_tokens if num_computed_tokens is None else num_computed_tokens
        assert n <= min(seq.num_tokens, len(seq.block_table) * self.block_size)
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        num_full = n // self.block_size
        if len(hashes) >= num_full:
            return
        token_ids, bs = seq.token_ids(), self.block_size
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            hashes.append(hash_block_tokens(parent, tokens))
            self._register(seq.block_table[i], CachedBlock(hashes[-1], parent, tokens))

    def _register(self, block: int, entry: CachedBlock) -> None:
        assert block != PAD_BLOCK, "a block is released before its prefix is registered"
        if block in self.cached:  # shared from the cache or by fork: already registered
            assert self.cached[block] == entry, f"block {block} cached with other contents"
        elif entry.block_hash not in self.prefix_index:  # else: computed twice; keep the first
            self.prefix_index[entry.block_hash] = block
            self.cached[block] = entry

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (new weights, or a cold-cache benchmark). Referenced
        blocks stay with their sequences as plain blocks; evictable ones become free."""
        self.free_blocks.extend(self.evictable)
        self.evictable.clear()
        self.prefix_index.clear()
        self.cached.clear()

    # -- sharing: fork and copy-on-write ---------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Gives `child` (empty block table, same leading tokens) `parent`'s blocks, shared."""
        assert not child.block_table, f"sequence {child.seq_id} already holds blocks"
        n = parent.num_computed_tokens
        assert child.token_ids()[:n] == parent.token_ids()[:n], "fork of different tokens"
        child.block_table = list(parent.block_table)  # with the parent's released entries
        for block in child.block_table:
            if block != PAD_BLOCK:
                self.ref_counts[block] += 1
        child.num_computed_tokens = n
        self._seq_hashes[child.seq_id] = list(self._seq_hashes.get(parent.seq_id, []))

    def _shared_in_write_range(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Logical indices of held blocks that computing tokens [num_computed, num_tokens) would
        write while another sequence also holds them."""
        first = seq.num_computed_tokens // self.block_size
        last = min(self.blocks_needed(num_tokens), len(seq.block_table))
        return [i for i in range(first, last) if self.ref_counts[seq.block_table[i]] > 1]

    def shares_write_range(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether computing tokens [num_computed, num_tokens) would write a shared block."""
        return bool(self._shared_in_write_range(seq, num_tokens))

    def can_append_slots(self, seq: Sequence, num_tokens: Optional[int] = None) -> bool:
        """Whether `append_slots(seq, num_tokens)` would succeed (default: all of seq's tokens)."""
        n = seq.num_tokens if num_tokens is None else num_tokens
        needed = self.num_new_blocks(seq, n) + len(self._shared_in_write_range(seq, n))
        return needed <= self.num_free_blocks

    def append_slots(self, seq: Sequence,
                     num_tokens: Optional[int] = None) -> list[tuple[int, int]]:
        """Makes slots for tokens [num_computed, num_tokens) (default: all of seq's tokens) that
        `seq` alone may write: grows the table, and swaps each shared block in that range for a
        fresh copy. Returns the (src, dst) block copies to do on device before the step."""
        n = seq.num_tokens if num_tokens is None else num_tokens
        copies = []
        for i in self._shared_in_write_range(seq, n):
            src = seq.block_table[i]  # may be a cached full block: a fork recomputes its last token
            dst = self._take_block()
            self.ref_counts[src] -= 1
            seq.block_table[i] = dst
            copies.append((src, dst))
        self._grow(seq, n)
        return copies

    # -- release -----------------------------------------------------------------------------------
    def num_outside_window(self, num_computed_tokens: int) -> int:
        """Leading blocks of a sequence with `num_computed_tokens` computed that nothing reads
        again: those wholly at or below position num_computed_tokens - 1 - sliding_window (see
        the module docstring); 0 without a window."""
        if self.sliding_window is None:
            return 0
        return max(0, num_computed_tokens - self.sliding_window) // self.block_size

    def release_outside_window(self, seq: Sequence) -> None:
        """Drops `seq`'s references to the blocks before its sliding window and puts PAD_BLOCK
        in their entries. Call when `seq.num_computed_tokens` advances (read back): calls in
        flight read from position num_computed_tokens - sliding_window + 1 on."""
        for i in reversed(range(self.num_outside_window(seq.num_computed_tokens))):
            if seq.block_table[i] == PAD_BLOCK:
                break  # released before, as is every entry ahead of it
            self._release(seq.block_table[i])
            seq.block_table[i] = PAD_BLOCK

    def free(self, seq: Sequence) -> None:
        """Drops `seq`'s references. Blocks nobody references go back to the free list, or, if
        cached, become evictable; tail first, so a prefix's tail is evicted before its head."""
        for block in reversed(seq.block_table):
            if block != PAD_BLOCK:  # else released already (sliding window)
                self._release(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._seq_hashes.pop(seq.seq_id, None)

    def _release(self, block: int) -> None:
        """Drops one reference; a block nobody references becomes free, or evictable if cached."""
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0:
            if block in self.cached:
                self.evictable[block] = None
            else:
                self.free_blocks.append(block)

    def is_whole(self) -> bool:
        """True when every usable block is free or evictable and unreferenced (no leak)."""
        return (self.num_free_blocks == self.num_usable_blocks
                and not self.ref_counts.any())

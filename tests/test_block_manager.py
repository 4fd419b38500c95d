"""BlockManager on CPU, no model: prefix-cache hits and misses, the last-token cap, LRU eviction,
copy-on-write, fork/free refcounts, kv_waste, blocks released outside a sliding window, and a
stateful test against a shadow model of what each physical block holds."""

from __future__ import annotations

import collections
import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import jinfer.engine.block_manager as bm_module
from jinfer.engine.block_manager import BlockManager, hash_block_tokens
from jinfer.model.kv_cache import PAD_BLOCK
from jinfer.api.sampling_params import SamplingParams
from jinfer.engine.sequence import Sequence

_ids = itertools.count()


def make_seq(prompt: list[int], outputs: list[int] = ()) -> Sequence:
    seq = Sequence(next(_ids), "r", 0, prompt, SamplingParams(), 0, detokenizer=None)
    seq.output_token_ids = list(outputs)
    return seq


def cached_prefix(bm: BlockManager, seq: Sequence) -> tuple[list[int], int]:
    """(cached blocks, tokens they hold) of `seq`'s prefix."""
    match = bm.match_prefix(seq)
    return list(match.blocks), match.num_tokens


def allocate_prompt(bm: BlockManager, seq: Sequence, num_tokens: int) -> int:
    """Admission of `seq` up to `num_tokens` tokens (one prefix lookup); returns cached tokens."""
    return bm.allocate_prompt(seq, bm.match_prefix(seq), num_tokens)


def admit_and_compute(bm: BlockManager, seq: Sequence) -> int:
    """Engine-like admission of a whole prompt: share the cached prefix, prefill the rest."""
    match = bm.match_prefix(seq)
    assert bm.can_allocate_prompt(match, seq.num_tokens)
    cached = bm.allocate_prompt(seq, match, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.mark_computed(seq)
    return cached


def snapshot(bm: BlockManager):
    return (bm.ref_counts.tolist(), list(bm.free_blocks), list(bm.evictable),
            dict(bm.prefix_index), bm.num_queried_blocks, bm.num_hit_blocks)


# -- old API --------------------------------------------------------------------------------------
@pytest.mark.parametrize("caching", [True, False])
def test_allocate_free_roundtrip_and_shuffle(caching):
    a = BlockManager(9, 4, shuffle_seed=3, enable_prefix_caching=caching)
    b = BlockManager(9, 4, shuffle_seed=3, enable_prefix_caching=caching)
    assert list(a.free_blocks) == list(b.free_blocks) != list(range(1, 9))
    seq = make_seq(list(range(10)))
    assert a.blocks_needed(10) == 3 and a.can_allocate(seq, 10)
    a.allocate(seq, 10)
    assert len(seq.block_table) == 3 and PAD_BLOCK not in seq.block_table
    assert a.num_free_blocks == 5 and all(a.ref_counts[seq.block_table] == 1)
    assert not a.can_allocate(seq, 40) and a.can_allocate(seq, 32)
    a.free(seq)
    assert seq.block_table == [] and a.is_whole() and a.num_cached_blocks == 0


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(1, 4)


# -- prefix caching -------------------------------------------------------------------------------
def test_full_partial_hits_and_misses():
    bm = BlockManager(32, 4)
    a = make_seq(list(range(10)))                       # blocks [0..3] [4..7] [8, 9]
    assert admit_and_compute(bm, a) == 0
    assert bm.num_cached_blocks == 2                    # the partial third block is not cached
    full = make_seq(list(range(8)) + [50, 51, 52])
    assert cached_prefix(bm, full) == (a.block_table[:2], 8)
    assert admit_and_compute(bm, full) == 8 and full.block_table[:2] == a.block_table[:2]
    assert list(bm.ref_counts[a.block_table[:2]]) == [2, 2]
    partial = make_seq(list(range(4)) + [9, 9, 9, 9, 9])
    assert admit_and_compute(bm, partial) == 4 and partial.block_table[0] == a.block_table[0]
    miss = make_seq([7] + list(range(1, 10)))
    assert admit_and_compute(bm, miss) == 0
    assert not set(miss.block_table) & set(a.block_table)
    # queried (n - 1) // 4 blocks per admission: 2 + 2 + 2 + 2; hit 0 + 2 + 1 + 0
    assert (bm.num_queried_blocks, bm.num_hit_blocks, bm.num_tokens_from_cache) == (8, 3, 12)
    assert bm.prefix_cache_hit_rate == pytest.approx(3 / 8)
    for seq in (a, full, partial, miss):
        bm.free(seq)
    assert bm.is_whole() and bm.num_evictable_blocks == bm.num_cached_blocks > 0


def test_last_token_is_never_cached():
    bm = BlockManager(16, 4)
    admit_and_compute(bm, make_seq(list(range(8))))     # two full blocks cached
    assert bm.num_cached_blocks == 2
    same = make_seq(list(range(8)))                     # all 8 cached, but 7 is the cap -> 4
    assert cached_prefix(bm, same)[1] == 4
    assert allocate_prompt(bm, same, 8) == 4 == same.num_computed_tokens
    longer = make_seq(list(range(9)))
    assert cached_prefix(bm, longer)[1] == 8
    assert cached_prefix(bm, make_seq([0]))[1] == 0


def test_generated_tokens_are_cached_too():
    """A preempted sequence's prompt+output blocks come back from the cache on readmission."""
    bm = BlockManager(16, 2)
    seq = make_seq([1, 2, 3])
    admit_and_compute(bm, seq)
    for token in (4, 5, 6):                              # decode: append, compute, register
        seq.output_token_ids.append(token)
        assert bm.append_slots(seq) == []
        seq.num_computed_tokens = seq.num_tokens
        bm.mark_computed(seq)
    bm.free(seq)                                         # preempt (6 tokens = 3 full blocks)
    assert bm.num_evictable_blocks == 3
    assert allocate_prompt(bm, seq, seq.num_tokens) == 4  # cap: (6 - 1) // 2 blocks


def test_disabled_prefix_caching_never_shares():
    bm = BlockManager(16, 2, enable_prefix_caching=False)
    a, b = make_seq([1, 2, 3, 4, 5]), make_seq([1, 2, 3, 4, 5])
    assert admit_and_compute(bm, a) == 0 and admit_and_compute(bm, b) == 0
    assert bm.num_cached_blocks == 0 and not set(a.block_table) & set(b.block_table)
    bm.free(a)
    assert bm.num_evictable_blocks == 0 and bm.prefix_cache_hit_rate == 0.0


def test_duplicate_content_keeps_first_registration():
    bm = BlockManager(16, 2)
    a, b = make_seq([1, 2, 3]), make_seq([1, 2, 3])
    allocate_prompt(bm, a, 3), allocate_prompt(bm, b, 3)  # admitted in one step: no hit yet
    for seq in (a, b):
        seq.num_computed_tokens = 3
        bm.mark_computed(seq)
    assert bm.prefix_index == {hash_block_tokens(None, (1, 2)): a.block_table[0]}
    bm.free(b)
    assert b.block_table == [] and bm.num_evictable_blocks == 0  # b's copy went to free list


def test_hash_collision_does_not_share(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block_tokens", lambda parent, tokens: b"same")
    bm = BlockManager(16, 2)
    a = make_seq([1, 2, 3, 4, 5])
    admit_and_compute(bm, a)
    other = make_seq([9, 9, 3, 4, 5])
    assert cached_prefix(bm, other) == ([], 0)     # same hash, other tokens: a miss
    assert admit_and_compute(bm, other) == 0
    again = make_seq([1, 2, 3, 4, 5])                   # block 1 collides with block 0: stop
    assert cached_prefix(bm, again) == ([a.block_table[0]], 2)


def test_lru_eviction_order_and_refresh_on_hit():
    bm = BlockManager(7, 2)                             # 6 usable blocks
    a, b = make_seq([1, 1, 2, 2, 0]), make_seq([3, 3, 4, 4, 0])
    admit_and_compute(bm, a), admit_and_compute(bm, b)
    a_blocks, b_blocks = a.block_table[:2], b.block_table[:2]
    bm.free(a), bm.free(b)                               # freed tail first: a1 a0 b1 b0
    assert list(bm.evictable) == [a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]
    assert bm.num_free_blocks == 6 and len(bm.free_blocks) == 2
    hit = make_seq([1, 1, 7])                           # reuses a0: it becomes most recent
    assert admit_and_compute(bm, hit) == 2
    bm.free(hit)
    assert list(bm.evictable)[-1] == a_blocks[0]
    fresh = make_seq([8] * 9)                           # 5 blocks: 2 free + evict a1 b1 b0
    assert admit_and_compute(bm, fresh) == 0
    assert set(fresh.block_table) >= {a_blocks[1], b_blocks[1], b_blocks[0]}
    assert a_blocks[0] not in fresh.block_table
    assert cached_prefix(bm, make_seq([1, 1, 2, 2, 0]))[1] == 2   # only a0 survived
    assert cached_prefix(bm, make_seq([3, 3, 4, 4, 0]))[1] == 0


def test_evictable_hits_count_against_free_blocks():
    bm = BlockManager(4, 2)                             # 3 usable
    a = make_seq([1, 2, 3, 4, 5])
    admit_and_compute(bm, a)
    bm.free(a)                                           # 2 evictable + 1 free
    again = make_seq([1, 2, 3, 4, 5, 6, 7])             # hits 2, needs 2 fresh; only 1 left
    before = snapshot(bm)
    match = bm.match_prefix(again)
    assert not bm.can_allocate_prompt(match, 7)
    assert snapshot(bm) == before
    assert bm.can_allocate_prompt(match, 5) and bm.allocate_prompt(again, match, 5) == 4


def test_admission_check_and_commit_reuse_one_lookup(monkeypatch):
    """match_prefix hashes the prompt's full blocks once, up to the first miss;
    can_allocate_prompt and allocate_prompt only read its PrefixMatch."""
    bm = BlockManager(16, 2)
    admit_and_compute(bm, make_seq([1, 2, 3, 4, 5]))
    hashed, real = [], bm_module.hash_block_tokens
    monkeypatch.setattr(bm_module, "hash_block_tokens",
                        lambda parent, tokens: hashed.append(tokens) or real(parent, tokens))
    seq = make_seq([1, 2, 3, 4, 9, 9, 9])
    match = bm.match_prefix(seq)
    assert hashed == [(1, 2), (3, 4), (9, 9)] and match.num_tokens == 4
    assert bm.can_allocate_prompt(match, 7) and bm.allocate_prompt(seq, match, 7) == 4
    assert len(hashed) == 3 and seq.block_table[:2] == list(match.blocks)


def test_reset_prefix_cache():
    bm = BlockManager(8, 2)
    a, b = make_seq([1, 2, 3]), make_seq([5, 6, 7])
    admit_and_compute(bm, a), admit_and_compute(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == bm.num_evictable_blocks == 0
    assert cached_prefix(bm, make_seq([1, 2, 3]))[1] == 0
    bm.free(b)
    assert bm.is_whole() and len(bm.free_blocks) == bm.num_usable_blocks


# -- fork and copy-on-write -----------------------------------------------------------------------
def test_fork_copy_on_write_of_partial_last_block():
    bm = BlockManager(16, 4)
    parent = make_seq([1, 2, 3, 4, 5], outputs=[6])     # 5 computed, token 6 pending
    allocate_prompt(bm, parent, 5)
    parent.num_computed_tokens = 5
    child = make_seq([1, 2, 3, 4, 5], outputs=[6])
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and child.num_computed_tokens == 5
    assert list(bm.ref_counts[parent.block_table]) == [2, 2]
    shared_last = parent.block_table[1]
    assert bm.can_append_slots(parent)
    copies = bm.append_slots(parent)                    # writes position 5 into shared block 1
    assert copies == [(shared_last, parent.block_table[1])] and parent.block_table[1] != shared_last
    assert parent.block_table[0] == child.block_table[0]  # full block stays shared, no copy
    assert bm.ref_counts[shared_last] == 1 and bm.ref_counts[parent.block_table[1]] == 1
    assert bm.append_slots(child) == []                 # the child now owns the old block alone
    bm.free(parent)
    assert bm.ref_counts[child.block_table[0]] == 1
    bm.free(child)
    assert bm.is_whole()


def test_full_shared_block_needs_no_copy():
    bm = BlockManager(16, 4)
    parent = make_seq(list(range(8)), outputs=[8])      # two full computed blocks
    allocate_prompt(bm, parent, 8)
    parent.num_computed_tokens = 8
    child = make_seq(list(range(8)), outputs=[9])
    bm.fork(parent, child)
    assert bm.append_slots(parent) == [] and bm.append_slots(child) == []
    assert parent.block_table[2] != child.block_table[2]
    assert parent.block_table[:2] == child.block_table[:2]


def test_copy_on_write_needs_a_free_block():
    bm = BlockManager(3, 4)                             # 2 usable
    parent = make_seq([1, 2], outputs=[3])
    allocate_prompt(bm, parent, 2)
    parent.num_computed_tokens = 2
    child = make_seq([1, 2], outputs=[3])
    bm.fork(parent, child)
    bm.allocate(make_seq([0]), 1)                       # the last free block is taken
    before = snapshot(bm)
    assert not bm.can_append_slots(parent) and snapshot(bm) == before


# -- kv_waste -------------------------------------------------------------------------------------
def test_kv_waste_arithmetic():
    bm = BlockManager(16, 4)
    assert bm.kv_waste([]) == 0.0
    a = make_seq([1, 2, 3, 4, 5])                       # 2 blocks, 8 slots, 5 tokens
    allocate_prompt(bm, a, 5)
    assert bm.kv_waste([a]) == pytest.approx(3 / 8)
    b = make_seq([1, 2, 3, 4, 5], outputs=[6])
    a.num_computed_tokens = 5
    bm.fork(a, b)                                       # same 2 physical blocks, b fills 6
    assert bm.kv_waste([a, b]) == pytest.approx(2 / 8)
    c = make_seq([1])
    bm.allocate(c, 1)                                   # +4 slots, 1 token
    assert bm.kv_waste([a, b, c]) == pytest.approx(5 / 12)


# -- sliding window -------------------------------------------------------------------------------
def test_blocks_before_the_window_are_released():
    """W = 6, blocks of 4: with 20 positions computed the next query (position 20) reads 15..20,
    and position 19 (a fork recomputes it) reads 14..19; blocks 0-2 (positions 0-11) go: cached
    ones become evictable, and their entries PAD_BLOCK."""
    bm = BlockManager(32, 4, sliding_window=6)
    seq = make_seq(list(range(20)))
    admit_and_compute(bm, seq)
    held = list(seq.block_table)
    assert bm.num_outside_window(20) == 3 and bm.num_outside_window(17) == 2
    bm.release_outside_window(seq)
    assert seq.block_table == [PAD_BLOCK] * 3 + held[3:]
    assert bm.num_used_blocks == 2 and list(bm.evictable) == held[2::-1]  # tail first
    assert bm.kv_waste([seq]) == 0.0                          # 8 slots held, 8 tokens
    seq.output_token_ids.append(20)
    assert bm.append_slots(seq) == [] and len(seq.block_table) == 6
    seq.num_computed_tokens = 21
    bm.release_outside_window(seq)                            # nothing new falls out yet
    assert seq.block_table[:4] == [PAD_BLOCK] * 3 + held[3:4]
    bm.free(seq)
    assert bm.is_whole()


def test_no_window_releases_nothing():
    bm = BlockManager(32, 4)
    seq = make_seq(list(range(20)))
    admit_and_compute(bm, seq)
    table = list(seq.block_table)
    bm.release_outside_window(seq)
    assert seq.block_table == table and bm.num_outside_window(10**6) == 0
    with pytest.raises(ValueError, match="sliding_window"):
        BlockManager(32, 4, sliding_window=0)


def test_a_shared_block_outside_one_window_stays_with_the_other_holder():
    bm = BlockManager(32, 4, sliding_window=6, enable_prefix_caching=False)
    parent = make_seq(list(range(13)))
    admit_and_compute(bm, parent)
    child = make_seq(list(range(13)))
    bm.fork(parent, child)
    shared = parent.block_table[0]
    bm.release_outside_window(parent)                         # (13 - 6) // 4 = 1 block
    assert parent.block_table[0] == PAD_BLOCK and child.block_table[0] == shared
    assert bm.ref_counts[shared] == 1 and shared not in bm.free_blocks
    grandchild = make_seq(list(range(13)))
    bm.fork(parent, grandchild)                               # PAD_BLOCK entries carry over
    assert grandchild.block_table[0] == PAD_BLOCK and bm.ref_counts[PAD_BLOCK] == 0
    bm.release_outside_window(child)
    assert shared in bm.free_blocks                           # not cached: free at once
    for seq in (parent, child, grandchild):
        bm.free(seq)
    assert bm.is_whole()


def test_prefix_hits_share_only_the_window():
    """The whole chain must be cached for a hit; a hit shares only the blocks its first query
    reads, leaves the ones before the window evictable (refreshed in the LRU, head last) and
    costs only the evictable blocks it revives."""
    bm = BlockManager(9, 4, sliding_window=6)                 # 8 usable
    a = make_seq(list(range(20)))
    admit_and_compute(bm, a)
    chain = list(a.block_table)
    bm.release_outside_window(a)
    bm.free(a)                                                # 5 cached blocks, evictable
    bm.allocate(make_seq([0] * 12), 12)                       # the 3 plain-free blocks
    b = make_seq(list(range(20)) + [99])
    match = bm.match_prefix(b)
    assert match.blocks == tuple(chain) and bm.num_outside_window(20) == 3
    assert bm.num_free_blocks == 5 and bm.can_allocate_prompt(match, 21)  # 2 revived + 1 fresh
    assert bm.allocate_prompt(b, match, 21) == 20
    assert b.block_table[:5] == [PAD_BLOCK] * 3 + chain[3:]
    assert list(bm.evictable) == [chain[1], chain[0]]         # chain[2] made the fresh block
    assert b.block_table[5] == chain[2] and bm.num_free_blocks == 2
    assert bm.match_prefix(make_seq(list(range(12)))).num_tokens == 8  # the head still hits


# -- stateful test against a shadow of each block's contents --------------------------------------
TOKENS = st.integers(0, 2)  # a small alphabet, so prefixes collide often


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler/engine would and keeps `phys`, a shadow of what each
    physical block holds, written only when a sequence computes a token into its slot."""

    @initialize(block_size=st.sampled_from([1, 2, 3, 4]), num_blocks=st.integers(2, 16),
                caching=st.sampled_from([True, True, True, False]), seed=st.none() | st.integers(0, 9),
                window=st.none() | st.integers(1, 6))
    def setup(self, block_size, num_blocks, caching, seed, window):
        self.bm = BlockManager(num_blocks, block_size, seed, enable_prefix_caching=caching,
                               sliding_window=window)
        self.phys = collections.defaultdict(lambda: [None] * block_size)  # block -> slot tokens
        self.live: list[Sequence] = []     # hold blocks
        self.waiting: list[Sequence] = []  # preempted, hold nothing

    # -- helpers -----------------------------------------------------------------------------
    def _compute(self, seq: Sequence, end: int) -> None:
        """The device step: write tokens [num_computed, end) into their slots, then register
        them and release what fell out of the window (the engine's read-back)."""
        bs, tokens = self.bm.block_size, seq.token_ids()
        for pos in range(seq.num_computed_tokens, end):
            block = seq.block_table[pos // bs]
            assert self.bm.ref_counts[block] == 1, "a sequence writes a block others hold"
            self.phys[block][pos % bs] = tokens[pos]
        seq.num_computed_tokens = end
        self.bm.mark_computed(seq)
        self.bm.release_outside_window(seq)

    def _admit(self, seq: Sequence, chunk: int) -> bool:
        bm = self.bm
        match = bm.match_prefix(seq)
        blocks, cached = list(match.blocks), match.num_tokens
        assert cached % bm.block_size == 0 and cached <= seq.num_tokens - 1
        end = min(seq.num_tokens, cached + chunk)
        outside = bm.num_outside_window(cached)
        before = snapshot(bm)
        if not bm.can_allocate_prompt(match, end):
            assert snapshot(bm) == before
            revived = sum(b in bm.evictable for b in blocks[outside:])
            assert bm.blocks_needed(end) - len(blocks) + revived > bm.num_free_blocks
            return False
        assert bm.allocate_prompt(seq, match, end) == cached == seq.num_computed_tokens
        assert seq.block_table[:len(blocks)] == [PAD_BLOCK] * outside + blocks[outside:]
        self.live.append(seq)
        self._compute(seq, end)
        return True

    def _pick(self, data, seqs: list[Sequence]) -> Sequence:
        return seqs[data.draw(st.integers(0, len(seqs) - 1))]

    # -- rules -------------------------------------------------------------------------------
    @rule(prompt=st.lists(TOKENS, min_size=1, max_size=14), chunk=st.integers(1, 14))
    def add_sequence(self, prompt, chunk):
        self._admit(make_seq(prompt), chunk)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data(), chunk=st.integers(1, 14))
    def readmit(self, data, chunk):
        seq = self._pick(data, self.waiting)
        if self._admit(seq, chunk):
            self.waiting.remove(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=TOKENS, chunk=st.integers(1, 6))
    def step(self, data, token, chunk):
        """Next prefill chunk, or (prompt done) append a sampled token and decode it."""
        seq = self._pick(data, self.live)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(token)
        end = min(seq.num_tokens, seq.num_computed_tokens + chunk)
        if not self.bm.can_append_slots(seq, end):
            return self.preempt_seq(seq)
        shared_before = {b for b in seq.block_table if self.bm.ref_counts[b] > 1}
        for src, dst in self.bm.append_slots(seq, end):
            assert src in shared_before and dst not in shared_before
            self.phys[dst] = list(self.phys[src])
        self._compute(seq, end)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = self._pick(data, self.live)
        child = make_seq(parent.prompt_token_ids, parent.output_token_ids)
        refs = self.bm.ref_counts.copy()
        self.bm.fork(parent, child)
        assert child.block_table == parent.block_table
        assert all(self.bm.ref_counts[b] == refs[b] + 1 for b in parent.block_table if b)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = self._pick(data, self.live)
        self.bm.free(seq)
        self.live.remove(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == 0

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def preempt(self, data):
        self.preempt_seq(self._pick(data, self.live))

    def preempt_seq(self, seq: Sequence) -> None:
        self.bm.free(seq)
        self.live.remove(seq)
        self.waiting.append(seq)

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def refcounts_match_block_tables(self):
        held = collections.Counter(b for seq in self.live for b in seq.block_table
                                   if b != PAD_BLOCK)
        assert (self.bm.ref_counts >= 0).all() and self.bm.ref_counts[PAD_BLOCK] == 0
        assert {b: int(c) for b, c in enumerate(self.bm.ref_counts) if c} == dict(held)
        assert all(not seq.block_table and seq.num_computed_tokens == 0 for seq in self.waiting)

    @invariant()
    def every_block_in_exactly_one_state(self):
        bm = self.bm
        free, evictable = list(bm.free_blocks), list(bm.evictable)
        used = [b for b in range(bm.num_blocks) if bm.ref_counts[b] > 0]
        assert len(free) + len(evictable) + len(used) == bm.num_usable_blocks
        assert set(free) | set(evictable) | set(used) == set(range(1, bm.num_blocks))
        assert bm.num_free_blocks == len(free) + len(evictable)
        assert set(evictable) <= set(bm.cached) and not set(free) & set(bm.cached)

    @invariant()
    def prefix_index_matches_block_contents(self):
        bm = self.bm
        assert bm.enable_prefix_caching or not bm.prefix_index
        assert len(bm.cached) == len(bm.prefix_index) == bm.num_cached_blocks
        for block_hash, block in bm.prefix_index.items():
            entry = bm.cached[block]
            assert entry.block_hash == block_hash
            assert hash_block_tokens(entry.parent_hash, entry.token_ids) == block_hash
            assert list(entry.token_ids) == self.phys[block]
        assert 0.0 <= bm.prefix_cache_hit_rate <= 1.0

    @invariant()
    def sequences_see_only_their_own_tokens(self):
        bs = self.bm.block_size
        for seq in self.live:
            tokens, n = seq.token_ids(), seq.num_computed_tokens
            assert len(seq.block_table) * bs >= n
            outside = self.bm.num_outside_window(n)  # released; the window's positions are held
            assert seq.block_table.count(PAD_BLOCK) == outside
            assert seq.block_table[:outside] == [PAD_BLOCK] * outside
            seen = [self.phys[seq.block_table[p // bs]][p % bs] for p in range(outside * bs, n)]
            assert seen == tokens[outside * bs:n]
            parent = None
            for i, block in enumerate(seq.block_table[:n // bs]):
                parent = hash_block_tokens(parent, tuple(tokens[i * bs:(i + 1) * bs]))
                if block in self.bm.cached:  # the index names this sequence's whole prefix
                    assert self.bm.cached[block].block_hash == parent

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in list(self.live):
            self.bm.free(seq)
        assert self.bm.is_whole() and not self.bm.ref_counts.any()
        assert self.bm.num_free_blocks == self.bm.num_usable_blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerMachine = BlockManagerMachine.TestCase

"""The on-device sampler against a plain NumPy reference (CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.model.sampler import (SamplerFlags, SamplingRow, append_outputs, apply_penalties,
                                  argmax_and_logsumexp, make_sampling_metadata, sample,
                                  sampler_flags, score)
from jinfer.api.sampling_params import SamplingParams

V = 32
sample_jit = jax.jit(sample, static_argnames="flags")


# ----------------------------------------------------------------------------- NumPy reference


def ref_penalised(logits, p, prompt, output, banned):
    """Banned -> repetition (prompt+output) -> frequency/presence (output), float64 [V]."""
    x = np.asarray(logits, np.float64).copy()
    x[list(banned)] = -np.inf
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(x)).astype(np.float64)
    seen = counts > 0
    seen[list(prompt)] = True
    rep = p.repetition_penalty
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    return x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def ref_distribution(logits, p):
    """Softmax after temperature -> top-k -> top-p -> min-p, float64 [V]."""
    z = np.asarray(logits, np.float64) / p.temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    k = len(z) if p.top_k <= 0 else min(p.top_k, len(z))
    keep[order[:k]] = True
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    if p.top_p < 1:
        mass_before = np.cumsum(probs[order]) - probs[order]
        nucleus = order[(mass_before < p.top_p) & keep[order]]
        keep = np.isin(np.arange(len(z)), nucleus)
    probs = np.where(keep, probs, 0.0)
    probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


def ref_log_softmax(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- helpers


def run(logits, rows, pad_to=None, num_logprobs=0):
    """rows: one SamplingRow per live row."""
    pad_to = pad_to or len(rows)
    meta = make_sampling_metadata(rows, pad_to)
    flags = sampler_flags([row.params for row in rows], num_logprobs)
    logits = np.asarray(logits, np.float32)
    if logits.shape[0] < pad_to:
        logits = np.concatenate([logits, np.zeros((pad_to - len(logits), V), np.float32)])
    return jax.tree_util.tree_map(np.asarray, sample_jit(jnp.asarray(logits), meta, flags))


def draw_many(logits_row, p, num_draws, banned=()):
    """One draw per seed 0..num_draws-1 of the same row; returns the tokens [num_draws]."""
    rows = [SamplingRow(p, seed, 0, banned_ids=list(banned)) for seed in range(num_draws)]
    return run(np.tile(logits_row, (num_draws, 1)), rows).tokens


def chi_square(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the support"
    expected = probs[support] * len(tokens)
    return float(((counts[support] - expected) ** 2 / expected).sum())


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0.0, 2.0, (6, V)).astype(np.float32)


# ----------------------------------------------------------------------------- tests


def test_greedy_is_argmax(logits):
    rows = [SamplingRow(SamplingParams(temperature=t), i, 3) for i, t in
            enumerate([0.0, 1e-6, 0.0, 0.0, 0.0, 0.0])]
    out = run(logits, rows, pad_to=8)
    np.testing.assert_array_equal(out.tokens[:6], logits.argmax(-1))


@pytest.mark.parametrize("one_pass", [True, False])
def test_argmax_and_logsumexp(one_pass):
    """Both implementations (one variadic reduction: the GPU's; plain reductions: the CPU's)
    against NumPy: the first index of the processed row's maximum, the raw row's logsumexp and
    max. Rows: a tie for the first place, half the entries -inf, the top token banned (only
    in processed), everything banned (index 0, as jnp.argmax gives); a 128k vocabulary too."""
    rng = np.random.default_rng(1)
    for vocab in (37, 128256):
        raw = rng.normal(0, 3, (5, vocab)).astype(np.float32)
        raw[0, [3, 9]] = raw[0].max() + 1  # index 3 wins the tie
        raw[1, ::2] = -np.inf
        processed = raw.copy()
        processed[2, raw[2].argmax()] = -np.inf
        processed[3] = -np.inf
        fn = jax.jit(lambda r, p: argmax_and_logsumexp(r, p, one_pass=one_pass))
        tokens, lse, top = map(np.asarray, fn(raw, processed))
        np.testing.assert_array_equal(tokens, processed.argmax(-1))
        assert tokens[0] == 3 and tokens[3] == 0
        x = raw.astype(np.float64)
        want = x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
        # XLA's CPU backend adds a variadic reduction's row up in order, so its float32 error
        # grows with the row (1.5e-5 at 128k); on a GPU, and in the plain reductions, it adds
        # up as a tree (test_gpu_one_pass_logsumexp_is_accurate).
        sequential = one_pass and vocab > 1000 and jax.default_backend() == "cpu"
        np.testing.assert_allclose(lse, want, rtol=1e-4 if sequential else 1e-6)
        np.testing.assert_array_equal(top, raw.max(-1))
    all_inf = np.full((1, 5), -np.inf, np.float32)
    tokens, lse, _ = argmax_and_logsumexp(all_inf, all_inf, one_pass=one_pass)
    assert int(tokens[0]) == 0 and float(lse[0]) == -np.inf


@pytest.mark.gpu
def test_gpu_one_pass_logsumexp_is_accurate():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    raw = np.random.default_rng(2).normal(0, 3, (3, 128256)).astype(np.float32)
    tokens, lse, _ = jax.jit(lambda r: argmax_and_logsumexp(r, r, one_pass=True))(raw)
    x = raw.astype(np.float64)
    want = x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(np.asarray(lse), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(tokens), raw.argmax(-1))


def test_penalties_match_reference(logits):
    rng = np.random.default_rng(1)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, repetition_penalty=0.7),
              SamplingParams(temperature=0.0, presence_penalty=1.5),
              SamplingParams(temperature=0.0, frequency_penalty=0.8),
              SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=-0.5,
                             frequency_penalty=2.0),
              SamplingParams(temperature=0.0)]
    rows = [SamplingRow(p, 0, 0, prompt_ids=rng.integers(0, V, 10).tolist(),
                        output_ids=rng.integers(0, V, 12).tolist(),
                        banned_ids=[int(rng.integers(0, V))]) for p in params]
    meta = make_sampling_metadata(rows, pad_to=8)
    padded = np.concatenate([logits, np.zeros((2, V), np.float32)])
    got = np.asarray(apply_penalties(jnp.asarray(padded), meta))
    for i, row in enumerate(rows):
        want = ref_penalised(logits[i], row.params, row.prompt_ids, row.output_ids, banned=())
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[6:], 0.0)  # padding rows are untouched
    tokens = run(logits, rows).tokens
    want_tokens = [np.argmax(ref_penalised(logits[i], r.params, r.prompt_ids, r.output_ids,
                                           r.banned_ids)) for i, r in enumerate(rows)]
    np.testing.assert_array_equal(tokens, want_tokens)


def test_penalties_flip_greedy_choice():
    # A strong repetition penalty on the argmax token must move the argmax.
    row = np.linspace(-1.0, 3.0, V).astype(np.float32)
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    out = run(row[None], [SamplingRow(p, 0, 0, prompt_ids=[V - 1])])
    assert out.tokens[0] == V - 2


def test_top_k_1_equals_greedy(logits):
    p = SamplingParams(temperature=1.0, top_k=1)
    rows = [SamplingRow(p, seed, seed) for seed in range(6)]
    np.testing.assert_array_equal(run(logits, rows).tokens, logits.argmax(-1))


def test_tiny_top_p_keeps_only_top_token(logits):
    for i in range(3):
        tokens = draw_many(logits[i], SamplingParams(temperature=5.0, top_p=1e-3), 200)
        np.testing.assert_array_equal(tokens, logits[i].argmax())


def test_min_p_masks_unlikely_tokens(logits):
    p = SamplingParams(temperature=1.0, min_p=0.3)
    probs = ref_distribution(logits[0], SamplingParams(temperature=1.0))
    allowed = probs >= 0.3 * probs.max()
    assert 1 < allowed.sum() < V  # the test must actually mask something
    tokens = draw_many(logits[0], p, 2000)
    assert allowed[tokens].all()
    assert len(np.unique(tokens)) == allowed.sum()


def test_banned_tokens_never_sampled(logits):
    row = logits[0]
    banned = np.argsort(-row)[:3].tolist()  # the three most likely tokens
    tokens = draw_many(row, SamplingParams(temperature=1.0), 3000, banned=banned)
    assert not np.isin(tokens, banned).any()
    greedy = run(row[None], [SamplingRow(SamplingParams(temperature=0.0), 0, 0,
                                         banned_ids=banned)]).tokens
    assert greedy[0] == np.argsort(-row)[3]


@pytest.mark.parametrize("p", [SamplingParams(temperature=1.0, top_k=5),
                               SamplingParams(temperature=0.7, top_p=0.8),
                               SamplingParams(temperature=1.3, top_k=12, top_p=0.95, min_p=0.3),
                               SamplingParams(temperature=1.0)])
def test_empirical_distribution_matches_reference(p):
    row = np.random.default_rng(2).normal(0.0, 1.0, V).astype(np.float32)
    probs = ref_distribution(row, p)
    tokens = draw_many(row, p, 20000)
    dof = int((probs > 0).sum()) - 1
    # Deterministic seeds, so this is not flaky; the bound is far above the chi-square mean
    # (= dof) but far below what a wrong distribution gives (hundreds or more at 20000 draws).
    assert chi_square(tokens, probs) < dof + 6 * np.sqrt(2 * dof) + 10


def test_seed_determinism_across_batches(logits):
    target = SamplingRow(SamplingParams(temperature=1.0, top_p=0.95), 1234, 7)
    alone = run(logits[:1], [target]).tokens[0]
    neighbours = [SamplingRow(SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.2),
                              9, 1, [1, 2], [3], [4]),
                  SamplingRow(SamplingParams(temperature=0.0), 0, 0),
                  SamplingRow(SamplingParams(temperature=2.0, min_p=0.1), 5, 2)]
    for batch, pad_to in [([target] + neighbours, 4), (neighbours + [target], 8),
                          (neighbours[:1] + [target], 16)]:
        idx = batch.index(target)
        batch_logits = np.stack([logits[0] if r is target else logits[3] for r in batch])
        assert run(batch_logits, batch, pad_to=pad_to).tokens[idx] == alone
    # And the draw does depend on the seed and the step.
    varied = {run(logits[:1], [SamplingRow(target.params, s, t)]).tokens[0]
              for s in range(5) for t in range(5)}
    assert len(varied) > 3


def test_logprobs_are_raw_log_softmax(logits):
    rows = [SamplingRow(SamplingParams(temperature=t, top_k=3, repetition_penalty=1.5,
                                       logprobs=5), i, 0, [0, 1], [2], [int(logits[i].argmax())])
            for i, t in enumerate([0.0, 1.0, 0.5, 1.0, 0.0, 2.0])]
    out = run(logits, rows, num_logprobs=5)
    ref = ref_log_softmax(logits)
    np.testing.assert_allclose(out.logprobs, ref[np.arange(6), out.tokens], atol=1e-5)
    assert out.top_logprobs.shape == (6, 5) and out.top_ids.shape == (6, 5)
    assert (np.diff(out.top_logprobs, axis=-1) <= 0).all()
    np.testing.assert_array_equal(out.top_ids, np.argsort(-ref, axis=-1)[:, :5])
    np.testing.assert_allclose(out.top_logprobs, np.sort(ref, -1)[:, ::-1][:, :5], atol=1e-5)


def test_score_gives_the_raw_log_softmax_of_given_tokens(logits):
    """Prompt logprobs: given tokens' logprobs, ranks (1 + more likely tokens) and the top-N,
    for any leading shape (a single row too: the step scores its prompt rows one by one)."""
    tokens = np.array([3, 0, 31, 7, 7, 12], np.int32)
    out = jax.tree.map(np.asarray, jax.jit(score, static_argnums=2)(logits, tokens, 4))
    ref = ref_log_softmax(logits)
    chosen = ref[np.arange(6), tokens]
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(out.logprobs, chosen, atol=1e-5)
    np.testing.assert_array_equal(out.ranks, 1 + (ref > chosen[:, None]).sum(-1))
    np.testing.assert_array_equal(out.top_ids, np.argsort(-ref, axis=-1)[:, :4])
    np.testing.assert_allclose(out.top_logprobs, np.sort(ref, -1)[:, ::-1][:, :4], atol=1e-5)
    row = score(jnp.asarray(logits[2]), jnp.int32(31), 4)
    assert row.top_ids.shape == (4,) and int(row.ranks) == out.ranks[2]


def test_no_logprobs_gives_empty_top(logits):
    out = run(logits, [SamplingRow(SamplingParams(), 0, 0)] * 6)
    assert out.top_logprobs.shape == (6, 0) and out.top_ids.shape == (6, 0)


def test_jit_compiles_once_for_different_values(logits):
    traces = []

    def counted(lg, meta, flags):
        traces.append(flags)
        return sample(lg, meta, flags)

    fn = jax.jit(counted, static_argnames="flags")
    flags = SamplerFlags(any_penalties=True, any_top_k_top_p_min_p=True, num_logprobs=2)
    for i in range(4):
        p = SamplingParams(temperature=0.3 + i, top_k=i + 1, top_p=0.5 + 0.1 * i,
                           min_p=0.01 * i, repetition_penalty=1.1 + i,
                           presence_penalty=0.1 * i, frequency_penalty=-0.1 * i)
        rows = [SamplingRow(p, 100 + i, i, [i, i + 1], [i] * (i + 1), [i]) for _ in range(3)]
        meta = make_sampling_metadata(rows, pad_to=8)
        fn(jnp.asarray(np.tile(logits[:1], (8, 1))), meta, flags).tokens.block_until_ready()
    assert len(traces) == 1


def test_metadata_padding_and_buckets():
    rows = [SamplingRow(SamplingParams(temperature=0.8, top_k=-1, presence_penalty=0.5),
                        2**32 + 5, 3, list(range(9)), [1, 2], [7]),
            SamplingRow(SamplingParams(temperature=0.0, top_k=4, top_p=0.5), 1, 0, [5])]
    meta = make_sampling_metadata(rows, pad_to=4)
    assert meta.prompt_tokens.shape == (4, 16) and meta.banned_tokens.shape == (4, 8)
    np.testing.assert_array_equal(meta.prompt_tokens[0, :10], list(range(9)) + [-1])
    assert meta.seeds[0] == 5 and meta.steps[0] == 3 and meta.top_k[0] == 0
    # Greedy and padding rows: temperature 0, truncation off, nothing banned.
    np.testing.assert_array_equal(meta.temperature[1:], 0.0)
    np.testing.assert_array_equal(meta.top_k[1:], 0)
    np.testing.assert_array_equal(meta.top_p[1:], 1.0)
    np.testing.assert_array_equal(meta.banned_tokens[1:], -1)
    plain = make_sampling_metadata([SamplingRow(SamplingParams(), 0, 0, [1, 2, 3], [4])],
                                   pad_to=2)
    assert plain.prompt_tokens.shape == (2, 0) and plain.banned_tokens.shape == (2, 0)
    with pytest.raises(ValueError, match="pad_to"):
        make_sampling_metadata(rows, pad_to=1)


def test_sampler_flags():
    flags = sampler_flags([SamplingParams(temperature=0.0, top_k=3),
                           SamplingParams(temperature=0.0, frequency_penalty=0.1)], 5)
    assert flags == SamplerFlags(any_penalties=True, any_top_k_top_p_min_p=False,
                                 num_logprobs=5, all_greedy=True)
    assert sampler_flags([SamplingParams(min_p=0.1)]).any_top_k_top_p_min_p
    with pytest.raises(ValueError, match="num_logprobs"):
        sampler_flags([SamplingParams()], 21)


def test_append_outputs_extends_penalised_rows_on_device():
    """A multi-step call's next step: each live row's sample after its last output id (in the
    spare columns), padding rows untouched, steps advanced."""
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    rows = [SamplingRow(penalised, 0, 2, [1, 2], [7, 8]), SamplingRow(penalised, 0, 0, [3])]
    meta = make_sampling_metadata(rows, pad_to=4, spare_output_columns=2)
    assert meta.output_tokens.shape[1] >= 4  # two outputs + two spare
    live = jnp.array([True, True, False, False])
    nxt = append_outputs(jax.tree.map(jnp.asarray, meta), jnp.array([5, 6, 9, 9]), live)
    out = np.asarray(nxt.output_tokens)
    assert list(out[0, :3]) == [7, 8, 5] and list(out[1, :2]) == [6, -1]
    assert (out[2:] == -1).all()
    np.testing.assert_array_equal(np.asarray(nxt.steps), np.asarray(meta.steps) + 1)

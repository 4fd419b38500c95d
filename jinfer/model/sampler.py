"""On-device token sampler: logits [B, V] -> next tokens, with vLLM's processing order.

Order (as in vLLM): banned tokens -> repetition/presence/frequency penalties -> greedy rows take
the argmax; the others: temperature -> top-k -> top-p -> min-p -> Gumbel-max draw.

Design:
  * Per-row parameters live in `SamplingMetadata` (arrays, traced), so different values never
    recompile. Which features run at all is chosen by `SamplerFlags` (static, hashable), so a
    batch that uses no penalties or truncation pays nothing for them; jit compiles once per
    flags combination (and per shape bucket).
  * All randomness is per row: the row's key is fold_in(key(seed), step). The same (seed, step)
    gives the same token whatever the batch size, padding or neighbours.
  * Log-probabilities are reported under the model's raw distribution (log_softmax of the
    unprocessed logits), as vLLM does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.runner.buckets import token_list_bucket
from jinfer.api.sampling_params import MAX_LOGPROBS, SAMPLING_EPS, SamplingParams

PAD_TOKEN = -1  # padding in the token-id arrays of `SamplingMetadata`


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "seeds", "steps", "ban_until",
                 "prompt_tokens", "output_tokens", "banned_tokens"],
    meta_fields=[])
@dataclasses.dataclass
class SamplingMetadata:
    """Per-row sampling parameters of one batch; built on the host by `make_sampling_metadata`.

    B is the padded batch size; token-id arrays are padded with PAD_TOKEN (-1) and ids outside
    [0, V) are ignored. prompt_tokens/output_tokens may have 0 columns when no row uses
    penalties; banned_tokens may have 0 columns when nothing is banned.
    """

    temperature: jax.Array         # [B] f32, below 1e-5 -> greedy
    top_k: jax.Array               # [B] i32, 0 -> off
    top_p: jax.Array               # [B] f32, 1 -> off
    min_p: jax.Array               # [B] f32, 0 -> off
    repetition_penalty: jax.Array  # [B] f32, 1 -> off; prompt and output tokens
    presence_penalty: jax.Array    # [B] f32, 0 -> off; output tokens
    frequency_penalty: jax.Array   # [B] f32, 0 -> off; output tokens, times their count
    seeds: jax.Array               # [B] u32
    steps: jax.Array               # [B] i32, tokens generated so far by the row
    ban_until: jax.Array           # [B] i32, banned_tokens apply while steps < ban_until
    prompt_tokens: jax.Array       # [B, P] i32, PAD_TOKEN padded
    output_tokens: jax.Array       # [B, O] i32, PAD_TOKEN padded
    banned_tokens: jax.Array       # [B, M] i32, PAD_TOKEN padded; masked to -inf (ban_until)


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Static switches for `sample` (jit compiles once per distinct value).

    Attributes:
      any_penalties: apply repetition/presence/frequency penalties.
      any_top_k_top_p_min_p: apply top-k, top-p and min-p truncation.
      num_logprobs: number of top log-probabilities to return per row (0 -> none).
      all_greedy: every row is greedy; skips the random draw entirely.
    """

    any_penalties: bool = False
    any_top_k_top_p_min_p: bool = False
    num_logprobs: int = 0
    all_greedy: bool = False


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["tokens", "logprobs", "ranks", "top_logprobs", "top_ids"], meta_fields=[])
@dataclasses.dataclass
class SamplerOutput:
    """What `sample` (and `score`, for given tokens) returns; log-probabilities are under the
    raw (unprocessed) logits."""

    tokens: jax.Array        # [B] i32, the sampled (or scored) tokens
    logprobs: jax.Array      # [B] f32, log-prob of each sampled token
    ranks: jax.Array         # [B] i32, 1 + tokens more likely than it (0 when num_logprobs == 0)
    top_logprobs: jax.Array  # [B, N] f32, sorted descending
    top_ids: jax.Array       # [B, N] i32, token ids of top_logprobs


# ----------------------------------------------------------------------------- device side


def _valid_ids(ids: jax.Array, vocab: int) -> jax.Array:
    """Maps padding (negative) ids past the vocabulary so that scatters with mode="drop" skip
    them (plain negative indices would wrap around to the end of the vocabulary)."""
    return jnp.where(ids < 0, vocab, ids)  # [B, X]


def apply_banned_tokens(logits: jax.Array, banned: jax.Array,
                        active: jax.Array | None = None) -> jax.Array:
    """Sets logits[b, banned[b, j]] to -inf for the rows where active[b] (default: all).
    logits [B, V], banned [B, M], active [B] bool."""
    if banned.shape[1] == 0:
        return logits
    rows = jnp.arange(logits.shape[0])[:, None]  # [B, 1]
    ids = _valid_ids(banned, logits.shape[1])
    if active is not None:
        ids = jnp.where(active[:, None], ids, logits.shape[1])  # inactive rows: dropped
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def apply_penalties(logits: jax.Array, meta: SamplingMetadata) -> jax.Array:
    """Repetition (HF/vLLM: prompt and output tokens; divide positive logits, multiply negative
    ones) then frequency (times output count) and presence (output only) penalties (OpenAI)."""
    batch, vocab = logits.shape
    rows = jnp.arange(batch)[:, None]  # [B, 1]
    counts = jnp.zeros((batch, vocab), jnp.int32).at[
        rows, _valid_ids(meta.output_tokens, vocab)].add(1, mode="drop")  # [B, V]
    in_output = counts > 0
    seen = jnp.zeros((batch, vocab), jnp.bool_).at[
        rows, _valid_ids(meta.prompt_tokens, vocab)].set(True, mode="drop") | in_output
    rep = meta.repetition_penalty[:, None]  # [B, 1]
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalised, logits)
    logits = logits - meta.frequency_penalty[:, None] * counts.astype(logits.dtype)
    return logits - meta.presence_penalty[:, None] * in_output.astype(logits.dtype)


def append_outputs(meta: SamplingMetadata, tokens: jax.Array,
                   live: jax.Array) -> SamplingMetadata:
    """The metadata of the next decode step on the device: each live row's sampled token
    [B] appended to its output_tokens (after its last valid id; the caller left spare columns,
    see `make_sampling_metadata`), steps advanced. Penalties then see exactly what a host-built
    next step would show them."""
    output = meta.output_tokens  # [B, O]
    if output.shape[1]:
        rows = jnp.arange(output.shape[0])
        length = (output >= 0).sum(axis=1)  # [B] valid ids (PAD_TOKEN padding at the end)
        column = jnp.where(live, length, output.shape[1])  # padding rows: dropped
        output = output.at[rows, column].set(tokens[:output.shape[0]], mode="drop")
    return dataclasses.replace(meta, output_tokens=output, steps=meta.steps + 1)


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Masks to -inf every token outside the row's top-k, then outside its top-p nucleus.

    One descending sort per row; the kept set is every token at least as large as a per-row
    threshold, so tokens tied with the last kept one are kept too. logits [B, V] (already
    temperature-scaled), top_k [B] (<= 0 -> off), top_p [B] (>= 1 -> off).
    """
    vocab = logits.shape[1]
    desc = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # [B, V]
    pos = jnp.arange(vocab)[None, :]  # [1, V]
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)[:, None]  # [B, 1]
    desc = jnp.where(pos < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)  # [B, V], renormalised over the top-k
    # Probability mass strictly before each position; keep while it is below top_p. The first
    # token is always kept (0 < top_p).
    mass_before = jnp.concatenate(
        [jnp.zeros_like(probs[:, :1]), jnp.cumsum(probs, axis=-1)[:, :-1]], axis=-1)
    keep = ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)) & (pos < k)
    num_kept = jnp.sum(keep, axis=-1, keepdims=True)  # [B, 1], >= 1
    threshold = jnp.take_along_axis(desc, num_kept - 1, axis=-1)  # [B, 1]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Masks tokens with prob < min_p * max prob, in log space: logit < max + log(min_p).
    logits [B, V] (temperature-scaled), min_p [B] (0 -> off, log 0 = -inf keeps all)."""
    top = jnp.max(logits, axis=-1, keepdims=True)  # [B, 1]
    threshold = top + jnp.log(min_p)[:, None]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _row_gumbel(seed: jax.Array, step: jax.Array, vocab: int) -> jax.Array:
    """Gumbel(0, 1) noise [V] for one row from key fold_in(key(seed), step)."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.gumbel(key, (vocab,), jnp.float32)


def argmax(x: jax.Array) -> jax.Array:
    """First index of each row's maximum, x [B, V] -> [B] i32; equal to `jnp.argmax` for
    non-NaN rows (a row that is all -inf gives 0).

    Two plain reductions (max, then min over matching indices) instead of `jnp.argmax`'s
    (value, index) pair reduction, which XLA CPU does not vectorise: 4-7x faster on a
    [16, 49152] batch of logits there, the same on GPU.
    """
    top = jnp.max(x, axis=-1, keepdims=True)  # [B, 1]
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    first = jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)  # V when the row is NaN
    return jnp.minimum(first, x.shape[-1] - 1).astype(jnp.int32)


def argmax_and_logsumexp(raw: jax.Array, processed: jax.Array,
                         one_pass: Optional[bool] = None) -> tuple[jax.Array, ...]:
    """(first index of each row's maximum of `processed` [B] i32, logsumexp of `raw` [B], max
    of `raw` [B]); raw and processed [B, V] float32 (processed may be raw itself).

    On a GPU (`one_pass` None: the default backend decides) one variadic reduction computes
    both, with a running (max, rescaled sum of exps) for the normaliser and a running (max,
    first index) for the argmax: XLA runs it as one or two kernels, where `argmax` and
    `jax.nn.logsumexp` made seven of ~1.5 us each at batch 1 on a 128k vocabulary (H100).
    XLA's CPU backend does not vectorise such a reduction (see `argmax`), so there the two
    run as plain reductions."""
    if one_pass is None:
        one_pass = jax.default_backend() == "gpu"
    if not one_pass:  # (XLA computes the row maximum once for all three)
        return argmax(processed), jax.nn.logsumexp(raw, axis=-1), jnp.max(raw, axis=-1)

    def rescale(m, top):  # exp(m - top), and 1 where both are -inf
        return jnp.where(m == top, 1.0, jnp.exp(m - top))

    def combine(a, b):
        (m_a, s_a, p_a, i_a), (m_b, s_b, p_b, i_b) = a, b
        top = jnp.maximum(m_a, m_b)
        total = s_a * rescale(m_a, top) + s_b * rescale(m_b, top)
        index = jnp.where(p_a > p_b, i_a, jnp.where(p_b > p_a, i_b, jnp.minimum(i_a, i_b)))
        return top, total, jnp.maximum(p_a, p_b), index

    vocab = raw.shape[-1]
    f32 = jnp.float32
    operands = (raw, jnp.ones_like(raw), processed,
                jax.lax.broadcasted_iota(jnp.int32, raw.shape, raw.ndim - 1))
    inits = (jnp.array(-jnp.inf, f32), jnp.array(0.0, f32), jnp.array(-jnp.inf, f32),
             jnp.array(vocab, jnp.int32))
    top, total, _, index = jax.lax.reduce(operands, inits, combine, (raw.ndim - 1,))
    return index, top + jnp.log(total), top


def random_sample(logits: jax.Array, seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Gumbel-max draw from softmax(logits) per row with the row's own key. Returns [B] i32."""
    noise = jax.vmap(_row_gumbel, in_axes=(0, 0, None))(seeds, steps, logits.shape[1])
    return argmax(logits + noise)


def sample(logits: jax.Array, meta: SamplingMetadata, flags: SamplerFlags) -> SamplerOutput:
    """Samples one token per row. logits [B, V]; `flags` must be static under jit."""
    raw = logits.astype(jnp.float32)
    logits = apply_banned_tokens(raw, meta.banned_tokens, meta.steps < meta.ban_until)
    if flags.any_penalties:
        logits = apply_penalties(logits, meta)
    # [B] greedy tokens; [B] log_softmax = raw - log_normalizer
    tokens, log_normalizer, raw_max = argmax_and_logsumexp(raw, logits)
    if not flags.all_greedy:
        is_greedy = meta.temperature < SAMPLING_EPS  # [B]
        temperature = jnp.where(is_greedy, 1.0, meta.temperature)
        scaled = logits / temperature[:, None]
        if flags.any_top_k_top_p_min_p:
            scaled = apply_top_k_top_p(scaled, meta.top_k, meta.top_p)
            scaled = apply_min_p(scaled, meta.min_p)
        sampled = random_sample(scaled, meta.seeds, meta.steps)
        tokens = jnp.where(is_greedy, tokens, sampled)
    if flags.all_greedy and logits is raw:  # nothing processed: the chosen logit is the max
        chosen = raw_max
    else:
        chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]  # [B] raw logit
    return _output(raw, tokens, chosen, log_normalizer, flags.num_logprobs)


def score(logits: jax.Array, tokens: jax.Array, num_logprobs: int) -> SamplerOutput:
    """Given tokens instead of sampled ones (prompt logprobs): each token's log-probability
    under log_softmax(logits), its rank and the top `num_logprobs`. logits [..., V], tokens
    [...] i32; `num_logprobs` must be static under jit."""
    raw = logits.astype(jnp.float32)
    chosen = jnp.take_along_axis(raw, tokens[..., None], axis=-1)[..., 0]  # [...] raw logit
    return _output(raw, tokens, chosen, jax.nn.logsumexp(raw, axis=-1), num_logprobs)


def _output(raw: jax.Array, tokens: jax.Array, chosen: jax.Array, log_normalizer: jax.Array,
            num_logprobs: int) -> SamplerOutput:
    """The SamplerOutput of `tokens` [...], whose raw logits are `chosen` [...]: raw [..., V],
    log_normalizer [...] its logsumexp."""
    if num_logprobs > 0:  # only then is the whole [..., V] log_softmax needed
        top_logits, top_ids = jax.lax.top_k(raw, num_logprobs)
        top_logprobs = top_logits - log_normalizer[..., None]
        ranks = 1 + jnp.sum(raw > chosen[..., None], axis=-1, dtype=jnp.int32)
    else:
        top_logprobs = jnp.zeros((*chosen.shape, 0), jnp.float32)
        top_ids = jnp.zeros((*chosen.shape, 0), jnp.int32)
        ranks = jnp.zeros(chosen.shape, jnp.int32)
    return SamplerOutput(tokens=tokens, logprobs=chosen - log_normalizer, ranks=ranks,
                         top_logprobs=top_logprobs, top_ids=top_ids.astype(jnp.int32))


# ----------------------------------------------------------------------------- host side


def _pad_length(name: str, needed: int, pad: Optional[int]) -> int:
    if pad is None:
        return token_list_bucket(needed)
    if pad < needed:
        raise ValueError(f"{name}={pad} is smaller than the longest list in the batch "
                         f"({needed}); raise it or pass None to bucket automatically")
    return pad


def _fill(dst: np.ndarray, row: int, ids: Sequence[int]) -> None:
    ids = np.asarray(ids, np.int32).reshape(-1)
    dst[row, :ids.size] = ids


def sampler_flags(params_list: Sequence[SamplingParams], num_logprobs: int = 0) -> SamplerFlags:
    """Chooses the static flags for a batch: only features some row uses are switched on."""
    if isinstance(num_logprobs, bool) or not isinstance(num_logprobs, int) \
            or not 0 <= num_logprobs <= MAX_LOGPROBS:
        raise ValueError(f"num_logprobs must be an integer in [0, {MAX_LOGPROBS}], "
                         f"got {num_logprobs!r}")
    return SamplerFlags(
        any_penalties=any(p.has_penalties for p in params_list),
        any_top_k_top_p_min_p=any(p.has_truncation for p in params_list),
        num_logprobs=num_logprobs,
        all_greedy=all(p.greedy for p in params_list))


@dataclasses.dataclass(frozen=True)
class SamplingRow:
    """One live row of a batch, as `make_sampling_metadata` reads it.

    Attributes:
      params: the request's sampling options.
      seed: the row's seed (reduced modulo 2**32): its draws are keyed by (seed, step).
      step: output tokens the row generated before the one sampled now.
      prompt_ids: the prompt's token ids; read only when `params` has penalties.
      output_ids: the output token ids so far; read only when `params` has penalties.
      banned_ids: ids masked out while step < params.min_tokens (always, without min_tokens).
    """

    params: SamplingParams
    seed: int
    step: int
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    banned_ids: Sequence[int] = ()


def make_sampling_metadata(rows: Sequence[SamplingRow], pad_to: int,
                           pad_tokens_to: Optional[int] = None,
                           pad_banned_to: Optional[int] = None,
                           spare_output_columns: int = 0) -> SamplingMetadata:
    """Builds the batch's `SamplingMetadata` with NumPy.

    Args:
      rows: one `SamplingRow` per live row.
      pad_to: batch bucket B >= len(rows). Padding rows are greedy with nothing banned.
      pad_tokens_to: columns of prompt_tokens/output_tokens; None buckets to a power of two
        (0 when no row has penalties, since then they are not read).
      pad_banned_to: columns of banned_tokens; None buckets likewise (0 when nothing is banned).
      spare_output_columns: output_tokens keeps room for this many more tokens per penalised
        row (a multi-step call appends its samples on the device).
    """
    if pad_to < len(rows):
        raise ValueError(f"pad_to ({pad_to}) must be at least the number of rows ({len(rows)})")
    meta = _scalar_fields(rows, pad_to)
    penalised = [i for i, row in enumerate(rows) if row.params.has_penalties]
    longest = max([max(len(rows[i].prompt_ids), len(rows[i].output_ids) + spare_output_columns)
                   for i in penalised], default=0)
    width = _pad_length("pad_tokens_to", longest, pad_tokens_to) if penalised else 0
    prompt = np.full((pad_to, width), PAD_TOKEN, np.int32)  # [B, P]
    output = np.full((pad_to, width), PAD_TOKEN, np.int32)  # [B, O]
    for i in penalised:
        _fill(prompt, i, rows[i].prompt_ids)
        _fill(output, i, rows[i].output_ids)
    most_banned = max((len(row.banned_ids) for row in rows), default=0)
    banned = np.full((pad_to, _pad_length("pad_banned_to", most_banned, pad_banned_to)),
                     PAD_TOKEN, np.int32)  # [B, M]
    for i, row in enumerate(rows):
        _fill(banned, i, row.banned_ids)
    return SamplingMetadata(**meta, prompt_tokens=prompt, output_tokens=output,
                            banned_tokens=banned)


def _scalar_fields(rows: Sequence[SamplingRow], pad_to: int) -> dict:
    """The [B] per-row arrays; greedy rows get temperature 0 and truncation switched off."""
    f = {name: np.full(pad_to, value, np.float32) for name, value in (
        ("temperature", 0.0), ("top_p", 1.0), ("min_p", 0.0), ("repetition_penalty", 1.0),
        ("presence_penalty", 0.0), ("frequency_penalty", 0.0))}
    f["top_k"] = np.zeros(pad_to, np.int32)
    f["seeds"] = np.zeros(pad_to, np.uint32)
    f["steps"] = np.zeros(pad_to, np.int32)
    # A row's banned ids are min_tokens' bans: they lapse (on the device too, in a multi-step
    # call) once the row has generated min_tokens tokens; without min_tokens they always hold.
    f["ban_until"] = np.full(pad_to, np.iinfo(np.int32).max, np.int32)
    for i, row in enumerate(rows):
        p = row.params
        if p.min_tokens > 0:
            f["ban_until"][i] = p.min_tokens
        f["repetition_penalty"][i] = p.repetition_penalty
        f["presence_penalty"][i] = p.presence_penalty
        f["frequency_penalty"][i] = p.frequency_penalty
        f["seeds"][i] = int(row.seed) & 0xFFFFFFFF
        f["steps"][i] = row.step
        if not p.greedy:
            f["temperature"][i] = p.temperature
            f["top_k"][i] = max(p.top_k, 0)
            f["top_p"][i] = p.top_p
            f["min_p"][i] = p.min_p
    return f

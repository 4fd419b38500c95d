"""The engine loop. Each `step()` is the whole engine:

1. schedule     the Scheduler picks one token for every running sequence (decode) and prompt
                chunks (prefill) under a token budget; the BlockManager grows block tables, and
                preempts by recompute when the pool runs dry. Host state only.
2. batch        the ModelRunner lays the step's tokens out in one packed row (decode rows, then
                prompt chunks) as bucketed NumPy arrays: token ids, positions, slot mapping,
                block tables, context lengths, per-row sampling options.
3. device step  one jitted call for decodes and prompt chunks together: embed -> decoder layers
                over the paged pool (donated, written in place) -> logits at each sequence's
                last token -> sampler. Only the sampled tokens (and logprobs when asked) come
                back to the host.
4. postprocess  append tokens, check eos / stop ids / stop strings / max_tokens, detokenize
                incrementally, free finished sequences' blocks, report RequestOutputs.

Lookahead (on whenever num_scheduler_steps > 1; num_scheduler_steps=1 runs every step
synchronously) keeps the device from waiting on the host between steps. A call is dispatched
and left in flight, and each `step()` first plans and dispatches the NEXT call, then reads back
and postprocesses the one in flight (step k+1 runs while the host detokenizes and checks the
stops of step k); `stats()["num_calls_ahead"]` counts the calls dispatched that way:

  step():  [schedule k+1 -> dispatch k+1]  ->  read back k -> postprocess k -> outputs of k

- Planning past the call in flight: each sequence counts the positions that call computes
  (`Sequence.num_in_flight`) and the tokens it samples (`num_samples_in_flight`); the scheduler
  plans the next chunk or decode after them (`ScheduledSequence.start`). A decode row whose
  input token is such a sample takes it from the call's device output (a gather on the device,
  `_device_tokens`); every other token comes from the host.
- Discarding: a sequence that finishes when step k is read back (eos, stop id or string,
  max_tokens) has its row in step k+1 discarded. Its blocks are freed at once: the KV pool
  threads through every call, so the device runs calls in dispatch order and a freed block is
  rewritten by a later owner only after. Rows whose samples in flight reach max_tokens or
  max_model_len are not planned at all.
- What stays synchronous (step k+1 is planned only after step k is read back, `_can_look_ahead`):
  a row of step k with penalties that samples (the sampler reads every output token, and step
  k's are not on the host yet), and a request with n > 1 whose prompt's last chunk samples in
  step k (its siblings fork from it after that token). A sequence with tokens in flight is
  never preempted (see Scheduler).
- Prefix caching: full blocks whose tokens are on the host are registered when their call is
  dispatched (a later call that shares them runs after it); blocks holding samples, on
  read-back.

Decode-only stretches run several steps per device call (multi-step, `num_scheduler_steps`)
when no waiting sequence could be admitted: the host syncs, schedules and detokenizes once per
call instead of once per token, and those calls are planned past each other the same way.
Tokens computed past a sequence's finish are discarded. Greedy and seeded sampling depend only
on (seed, position), so lookahead gives exactly the tokens of synchronous steps.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from typing import Optional, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.engine.block_manager import BlockManager
from jinfer.config import EngineConfig
from jinfer.text.detokenizer import IncrementalDetokenizer
from jinfer.runner.buckets import decode_steps_bucket, logprobs_bucket
from jinfer.runner.model_runner import ModelRunner
from jinfer.api.outputs import CompletionOutput, Logprob, RequestOutput
from jinfer.api.sampling_params import SamplingParams
from jinfer.engine.scheduler import Schedule, ScheduledSequence, Scheduler
from jinfer.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class Request:
    """A prompt and its n sequences."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 params: SamplingParams, seqs: list[Sequence]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs = seqs

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def output(self) -> RequestOutput:
        completions = [CompletionOutput(
            index=seq.index, text=seq.detokenizer.output_text if seq.detokenizer else "",
            token_ids=list(seq.output_token_ids), cumulative_logprob=seq.cumulative_logprob,
            logprobs=seq.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        ) for seq in self.seqs]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions,
                             self.finished)


@dataclasses.dataclass
class DeviceCall:
    """One jitted call dispatched to the device and not yet read back."""

    items: list[ScheduledSequence]  # its rows in order: decodes, then prompt chunks
    num_decode: int                 # of those, decode rows
    num_steps: int                  # decode steps run back to back (1: one, maybe mixed, step)
    results: object                 # SamplerOutput on the device, fields [S] or [num_steps, S]
    last_tokens: object             # [R >= rows] on the device: each row's last sample


@dataclasses.dataclass
class InFlight:
    """A step's device calls (a prompt call and a decode call without mixed batching, else one),
    dispatched and not yet read back."""

    calls: list[DeviceCall]
    # seq_id -> where `tokens` holds the sequence's last sample, for each row that samples
    sample_index: dict[int, int] = dataclasses.field(init=False)

    def __post_init__(self):
        self.sample_index, offset = {}, 0
        for call in self.calls:
            for row, item in enumerate(call.items):
                if item.samples:
                    self.sample_index[item.seq.seq_id] = offset + row
            offset += call.last_tokens.shape[0]

    @functools.cached_property
    def tokens(self):
        """[sum of R] on the device: every call's last samples, end to end."""
        lasts = [call.last_tokens for call in self.calls]
        return lasts[0] if len(lasts) == 1 else jnp.concatenate(lasts)


@jax.jit
def _take_tokens(host_tokens, tokens, sources):
    """host_tokens [rows] with each row whose source is >= 0 replaced by tokens[source]: input
    tokens gathered on the device from a call not yet read back. tokens [R], sources [rows]."""
    return jnp.where(sources >= 0, tokens[jnp.maximum(sources, 0)], host_tokens)


class LLMEngine:
    """Host loop around the device step: requests in, RequestOutputs out."""

    def __init__(self, runner: ModelRunner, tokenizer, config: EngineConfig,
                 eos_token_ids: Seq[int], num_blocks: int, shuffle_blocks_seed=None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, config.block_size, shuffle_blocks_seed,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self.vocab_size = runner.model_config.vocab_size
        self.num_computed_tokens = 0         # tokens whose K/V a device step computed
        self.num_computed_prompt_tokens = 0  # of those, prompt tokens (prefill work)
        self._in_flight: Optional[InFlight] = None  # the step dispatched and not read back
        self.num_calls_ahead = 0  # device calls dispatched while another was still in flight

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use; pick a unique id")
        self._validate_prompt(prompt_token_ids)
        if self.tokenizer is None and params.stop:
            raise ValueError("stop strings need a tokenizer, and this engine was built without "
                             "one (skip_tokenizer_init); use stop_token_ids instead")
        seqs = []
        for index in range(params.n):
            seed = self._seed_for(params, index)
            detok = None if self.tokenizer is None else IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, stop=params.stop or (),
                skip_special_tokens=params.skip_special_tokens,
                include_stop_str_in_output=params.include_stop_str_in_output)
            seq = Sequence(next(self._seq_ids), request_id, index, prompt_token_ids, params, seed,
                           detok)
            seqs.append(seq)
        self.scheduler.add(seqs[0])  # its n - 1 siblings fork from it once the prompt is in
        self.requests[request_id] = Request(request_id, prompt, list(prompt_token_ids), params,
                                            seqs)

    def _validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty; give at least one token of prompt text")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but max_model_len is "
                f"{self.config.max_model_len}, which leaves no room to generate; shorten the "
                f"prompt or raise max_model_len")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {self.vocab_size}); check the tokenizer matches the model")

    def _seed_for(self, params: SamplingParams, index: int) -> int:
        if params.seed is None:
            return int(self._rng.integers(0, 2**31 - 1))
        return (params.seed + index * 1_000_003) % (2**31 - 1)

    def abort(self, request_id: str) -> None:
        """Stops a request now, wherever it is, and frees its blocks."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Reads back one step's device calls; returns the outputs of the requests it touched.

        With nothing in flight, the step is planned and dispatched first. Then, where it is
        safe (`_can_look_ahead`), the next step is planned past the one in flight and
        dispatched before that one is read back and postprocessed."""
        if self._in_flight is None:
            self._in_flight = self._dispatch(self.scheduler.schedule())
            if self._in_flight is None:  # nothing ran: everything gave way to preemption
                self._check_progress()
                return []
        in_flight = self._in_flight
        if self._can_look_ahead(in_flight):
            self._in_flight = self._dispatch(self.scheduler.schedule(), in_flight)
        else:
            self._in_flight = None
        touched: dict[str, Request] = {}
        self._read_back(in_flight, touched)
        return self._outputs(touched)

    def _check_progress(self) -> None:
        if self.requests and not self.scheduler.has_unfinished():
            raise RuntimeError(f"internal error: requests {sorted(self.requests)[:5]} are "
                               "unfinished but no sequence is running or waiting")

    def _can_look_ahead(self, in_flight: InFlight) -> bool:
        """Whether the next step may be planned before `in_flight` is read back: lookahead is
        on (num_scheduler_steps > 1) and no live row of it that samples needs the host first.
        Those that do: rows with penalties (the sampler reads every output token, and these are
        not on the host yet) and the first token of a request with n > 1 (its siblings fork
        from it on read-back)."""
        if self.config.num_scheduler_steps == 1:
            return False
        for call in in_flight.calls:
            for item in call.items:
                seq, params = item.seq, item.seq.params
                if not item.samples or seq.is_finished:
                    continue
                if params.has_penalties or (params.n > 1 and seq.index == 0
                                            and not seq.num_output_tokens):
                    return False
        return True

    def _dispatch(self, schedule: Schedule,
                  prev: Optional[InFlight] = None) -> Optional[InFlight]:
        """Dispatches a scheduled step without waiting for it (None when it is empty). `prev`:
        the call still in flight, whose samples are the input tokens of some decode rows."""
        if schedule.block_copies:  # runs after `prev`, as every call on the pool does
            self.runner.copy_blocks(schedule.block_copies)
        decode, prefill = schedule.decode.scheduled, schedule.prefill.scheduled
        if not decode and not prefill:
            return None
        num_steps = self._num_decode_steps(decode, prefill)
        if num_steps > 1:
            calls = [self._launch_decode_steps(decode, num_steps, prev)]
        elif decode and prefill and not self.config.mixed_batching:
            # Two calls: fewer distinct shapes to compile, where compiling is slow (CPU).
            calls = [self._launch_step([], prefill, prev), self._launch_step(decode, [], prev)]
        else:
            calls = [self._launch_step(decode, prefill, prev)]
        for call in calls:
            self._mark_in_flight(call)
        if prev is not None:
            self.num_calls_ahead += len(calls)
        return InFlight(calls)

    def _launch_step(self, decode, prefill, prev: Optional[InFlight]) -> DeviceCall:
        """One device call for decode rows and prompt chunks together, left in flight (waited
        for when lookahead is off)."""
        items = decode + prefill  # the call's row order: decodes first, then prompt chunks
        seqs = [item.seq for item in items]
        rows = [self._sampling_row(seq) for seq in seqs]
        step_input, flags = self.runner.prepare(decode, prefill, rows,
                                                self._logprobs_bucket(seqs))
        token_ids = self._device_tokens(decode, step_input, prev)
        if self.config.num_scheduler_steps == 1:
            assert token_ids is None, "nothing is in flight without lookahead"
            results = self.runner.execute(step_input, flags)
        else:
            results = self.runner.launch_step(step_input, flags, token_ids)
        return DeviceCall(items, len(decode), 1, results, results.tokens)

    def _device_tokens(self, decode, step_input, prev: Optional[InFlight]):
        """The decode rows' input tokens [rows] on the device when some of them are samples of
        `prev`, not read back yet (gathered on the device); None when all are on the host."""
        if not decode:
            return None
        host = step_input.token_ids[:step_input.attention.decode.block_tables.shape[0]]
        sources = np.full(host.shape, -1, np.int32)  # [rows]: index into prev.tokens, or -1
        for row, item in enumerate(decode):
            if item.start >= item.seq.num_tokens:  # its input token is still on the device
                assert prev is not None, f"sequence {item.seq.seq_id} has no call in flight"
                sources[row] = prev.sample_index[item.seq.seq_id]
        if (sources < 0).all():
            return None
        return _take_tokens(host, prev.tokens, sources)

    def _mark_in_flight(self, call: DeviceCall) -> None:
        """Counts the call's tokens as in flight, and registers the full blocks it computes
        whose tokens are on the host in the prefix cache (calls that share them run after)."""
        for item in call.items:
            seq = item.seq
            if call.num_steps == 1:
                seq.num_in_flight += item.num_new_tokens
                seq.num_samples_in_flight += int(item.samples)
            else:
                seq.num_in_flight += call.num_steps
                seq.num_samples_in_flight += call.num_steps
            known = min(seq.num_computed_tokens + seq.num_in_flight, seq.num_tokens)
            self.block_manager.mark_computed(seq, known)

    def _read_back(self, in_flight: InFlight, touched: dict) -> None:
        """Waits for the calls of `in_flight` and postprocesses their rows, prompt chunks first
        (n > 1 siblings fork from them and join the running set in order)."""
        for call in in_flight.calls:
            results = jax.device_get(call.results)  # waits for the call
            rows = [*range(call.num_decode, len(call.items)), *range(call.num_decode)]
            for step in range(call.num_steps):
                result = results
                if call.num_steps > 1:  # fields [num_steps, S]
                    result = jax.tree.map(lambda a: a[step], results)  # noqa: B023
                for row in rows:
                    self._read_back_row(call, row, result, touched)

    def _read_back_row(self, call: DeviceCall, row: int, result, touched: dict) -> None:
        """One row of one step of `call`: its tokens are computed, its sample appended.
        Discarded when the sequence finished (or was aborted) after the call was dispatched."""
        item = call.items[row]
        seq = item.seq
        if seq.is_finished:
            return
        self._advance(seq, item.num_new_tokens if call.num_steps == 1 else 1)
        if item.samples:
            seq.num_samples_in_flight -= 1
            self._fork_siblings(seq)
            self._append_token(seq, result, row)
        touched[seq.request_id] = self.requests[seq.request_id]

    def _num_decode_steps(self, decode, prefill) -> int:
        """How many decode steps the next device call may run back to back (multi-step
        scheduling): only decodes run, no waiting sequence could be admitted (see
        `_admission_possible`), every row has sampled before (a prompt's last token is not a
        decode: n > 1 siblings fork after it); penalties and min_tokens bans need no host
        between tokens (the call appends each step's samples to the rows' output tokens and
        lifts the bans at min_tokens, on the device). Then num_scheduler_steps, or a power of
        two below it that the longest row still wants past its samples in flight
        (`decode_steps_bucket`), halved until every row fits in max_model_len and the pool has
        the slots (with no shared block in the write range). Else 1."""
        limit = self.config.num_scheduler_steps
        if limit == 1 or prefill or not decode or self._admission_possible():
            return 1
        wanted = 1
        for item in decode:
            seq = item.seq
            generated = seq.num_output_tokens + seq.num_samples_in_flight
            if not generated:  # a prompt's last token: forks n > 1 siblings after it
                return 1
            wanted = max(wanted, seq.params.max_tokens - generated)
        num_steps = decode_steps_bucket(wanted, limit)
        while num_steps > 1 and not self._decode_steps_fit(decode, num_steps):
            num_steps = decode_steps_bucket(num_steps - 1, limit)
        return num_steps

    def _admission_possible(self) -> bool:
        """A waiting sequence could join the batch now (a free seat under max_num_seqs): then
        the next step should schedule rather than run decodes ahead. With every seat taken,
        waiting sequences wait for a finish either way (at most one more call)."""
        return bool(self.scheduler.waiting) and (
            len(self.scheduler.running) < self.config.max_num_seqs)

    def _decode_steps_fit(self, decode, num_steps: int) -> bool:
        """Every row can take num_steps more tokens: within max_model_len, with free blocks for
        them and no shared block to copy on write."""
        ends = [item.start + num_steps for item in decode]
        if max(ends) > self.config.max_model_len:
            return False
        manager = self.block_manager
        if any(manager.shares_write_range(item.seq, end) for item, end in zip(decode, ends)):
            return False
        new_blocks = sum(manager.num_new_blocks(item.seq, end) for item, end in zip(decode, ends))
        return new_blocks <= manager.num_free_blocks

    def _launch_decode_steps(self, decode, num_steps: int,
                             prev: Optional[InFlight]) -> DeviceCall:
        """Reserves the slots of `num_steps` tokens per row and dispatches the multi-step call
        without waiting for it."""
        for item in decode:
            copies = self.block_manager.append_slots(item.seq, item.start + num_steps)
            assert not copies, "shared blocks in the write range are excluded beforehand"
        seqs = [item.seq for item in decode]
        rows = [self._sampling_row(seq) for seq in seqs]
        step_input, flags = self.runner.prepare(decode, [], rows, self._logprobs_bucket(seqs),
                                                num_steps=num_steps)
        token_ids = self._device_tokens(decode, step_input, prev)
        results, last_tokens = self.runner.launch_decode_steps(step_input, flags, num_steps,
                                                               token_ids)
        return DeviceCall(decode, len(decode), num_steps, results, last_tokens)

    def _outputs(self, touched: dict) -> list[RequestOutput]:
        """RequestOutputs of the touched requests; finished ones leave the engine."""
        outputs = [request.output() for request in touched.values()]
        for request in touched.values():
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    def _advance(self, seq: Sequence, num_new: int) -> None:
        """Counts `num_new` freshly computed tokens of `seq` (no longer in flight) and
        registers its full blocks."""
        self._count_computed(seq, num_new)
        seq.num_computed_tokens += num_new
        seq.num_in_flight -= num_new
        self.block_manager.mark_computed(seq)

    def _count_computed(self, seq: Sequence, num_new: int) -> None:
        start = seq.num_computed_tokens
        self.num_computed_tokens += num_new
        self.num_computed_prompt_tokens += max(0, min(start + num_new, seq.num_prompt_tokens)
                                               - start)

    def _fork_siblings(self, seq: Sequence) -> None:
        """Parallel sampling (n > 1): once sequence 0 has prefilled the prompt, its siblings
        share every prompt block. Each recomputes only the last prompt token (for logits of its
        own), which copy-on-write lands in a private copy of the last block."""
        request = self.requests[seq.request_id]
        if seq.index != 0 or seq.num_output_tokens or len(request.seqs) == 1:
            return
        for sibling in request.seqs[1:]:
            self.block_manager.fork(seq, sibling)
            sibling.num_computed_tokens = sibling.num_prompt_tokens - 1
            self.scheduler.add_running(sibling)

    def _sampling_row(self, seq: Sequence):
        """The sampler row of `seq`'s next token (past its samples still in flight)."""
        params = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < params.min_tokens:
            banned = list(params.stop_token_ids or ())
            if not params.ignore_eos:
                banned += sorted(self.eos_token_ids)
        return (params, seq.seed, seq.num_output_tokens + seq.num_samples_in_flight,
                seq.prompt_token_ids, seq.output_token_ids, banned)

    @staticmethod
    def _logprobs_bucket(seqs: list[Sequence]) -> int:
        return logprobs_bucket([seq.params.logprobs for seq in seqs
                                if seq.params.logprobs is not None])

    def _append_token(self, seq: Sequence, result, row: int) -> None:
        token = int(result.tokens[row])
        seq.output_token_ids.append(token)
        seq.cumulative_logprob += float(result.logprobs[row])
        if seq.logprobs is not None:
            seq.logprobs.append(self._token_logprobs(seq, result, row, token))
        reason = self._stop_by_token(seq, token)
        detok = seq.detokenizer  # None without a tokenizer: token ids only
        if reason is None:
            if detok is not None:
                detok.append(token)
            if detok is not None and detok.stopped:
                seq.finish_reason, seq.stop_reason = "stop", detok.stop_reason
            elif (seq.num_output_tokens >= seq.params.max_tokens
                  or seq.num_tokens >= self.config.max_model_len):
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if detok is not None and not detok.stopped:
                detok.flush()
            self.scheduler.finish(seq)

    def _stop_by_token(self, seq: Sequence, token: int):
        """Finishes `seq` on an eos or stop token id (their text is never emitted)."""
        params = seq.params
        if seq.num_output_tokens <= params.min_tokens:
            return None
        if params.stop_token_ids and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        return seq.finish_reason

    def _token_logprobs(self, seq: Sequence, result, row: int, token: int) -> dict[int, Logprob]:
        """The sampled token's logprob and the top-N (N = the request's `logprobs`)."""
        top_n = seq.params.logprobs or 0
        ids, values = result.top_ids[row][:top_n], result.top_logprobs[row][:top_n]
        entry = {int(t): Logprob(float(v), rank + 1) for rank, (t, v) in enumerate(zip(ids, values))}
        entry.setdefault(token, Logprob(float(result.logprobs[row]), int(result.ranks[row])))
        for token_id, logprob in entry.items():
            if self.tokenizer is not None:
                logprob.decoded_token = self.tokenizer.decode([token_id],
                                                              skip_special_tokens=False)
        return entry

    def prompt_logits(self, token_ids: list[int]) -> np.ndarray:
        """[len, vocab] logits of one prompt through the pool; its blocks are freed again."""
        seq = Sequence(next(self._seq_ids), "prompt_logits", 0, token_ids, SamplingParams(), 0,
                       detokenizer=None)
        if not self.block_manager.can_allocate(seq, len(token_ids)):
            raise RuntimeError("the KV pool is busy; call prompt_logits between generate calls")
        self.block_manager.allocate(seq, len(token_ids))
        try:
            return self.runner.prompt_logits(seq)
        finally:
            self.block_manager.free(seq)

    def stats(self) -> dict:
        """Pool and scheduler statistics: blocks total / free / used / cached, KV waste over the
        running sequences, prefix-cache hit rate, preemptions, device calls dispatched ahead
        (lookahead), queue lengths."""
        return {**self.block_manager.stats(),
                "kv_waste": self.block_manager.kv_waste(self.scheduler.running),
                "num_preemptions": self.scheduler.num_preemptions,
                "num_computed_tokens": self.num_computed_tokens,
                "num_computed_prompt_tokens": self.num_computed_prompt_tokens,
                "num_calls_ahead": self.num_calls_ahead,
                "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting)}

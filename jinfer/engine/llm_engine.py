"""The engine loop. Each `step()` is the whole engine:

1. schedule     the Scheduler decides everything about blocks and rows (jinfer.engine.scheduler):
                one token for every running sequence (decode) and prompt chunks (prefill) under
                a token budget, admission with one prefix-cache lookup, copy-on-write copies,
                preemption by recompute when the pool runs dry, and how many decode steps the
                call runs (multi-step) with their slots reserved. It returns a plain `Schedule`.
2. dispatch     the engine makes the copies, has the ModelRunner lay the rows out as bucketed
                arrays (decode rows, then prompt chunks, with each row's `SamplingRow`) and
                launches one jitted call: embed -> decoder layers over the paged pool (donated,
                written in place) -> logits at each row's last token -> sampler. Only the
                sampled tokens (and logprobs when asked) come back to the host; a call whose
                prompt chunks ask for prompt logprobs also scores every prompt token on the
                device (a program variant of its own), and [tokens, top-N] of them come back.
3. read back    waits for the call; the prompt logprobs are appended to their sequences, each
                row's positions are computed now (their full blocks join the prefix cache),
                and each sample is appended to its sequence.
4. postprocess  the StopChecker decides whether the sequence finishes and why (eos, stop id,
                stop string found by the detokenizer, max_tokens, max_model_len;
                jinfer.engine.stopping); finished sequences free their blocks; n > 1 siblings
                fork after the prompt's first sample; the RequestOutputs of the requests that
                sampled are returned (the first one has the whole prompt's logprobs).

Lookahead (on whenever num_scheduler_steps > 1; num_scheduler_steps=1 runs every step
synchronously) keeps the device from waiting on the host between steps. A call is dispatched
and left in flight, and each `step()` first schedules and dispatches the NEXT call, then reads
back and postprocesses the one in flight (step k+1 runs while the host detokenizes and checks
the stops of step k); `stats()["num_calls_ahead"]` counts the calls dispatched that way:

  step():  [schedule k+1 -> dispatch k+1]  ->  read back k -> postprocess k -> outputs of k

- Planning past the call in flight: a schedule's tokens count as in flight from the moment it
  is made (`Sequence.num_in_flight`, `num_samples_in_flight`), and the next schedule plans each
  sequence after them (`ScheduledSequence.start`). A decode row whose input token is such a
  sample takes it from the call's device output (a gather on the device,
  jinfer.engine.lookahead); every other token comes from the host.
- Discarding: a sequence that finishes when step k is read back has its row in step k+1
  discarded. Its blocks are freed at once: the KV pool threads through every call, so the
  device runs calls in dispatch order and a freed block is rewritten by a later owner only
  after. Rows whose samples in flight finish them by length are not scheduled at all.
- Sliding windows: a sequence releases the blocks that fell out of its window when its
  positions are read back (`Scheduler.mark_computed`), not when a call is planned: a call in
  flight reads from its first position less the window on, and none starts before
  `num_computed_tokens`, so no dispatched call reads a released block.
- What stays synchronous (step k+1 is scheduled only after step k is read back,
  `InFlight.must_read_back_first`): a row of step k with penalties that samples (the sampler
  reads every output token, and step k's are not on the host yet), and a request with n > 1
  whose prompt's last chunk samples in step k (its siblings fork from it after that token). A
  sequence with tokens in flight is never preempted (see Scheduler).

Decode-only stretches run several steps per device call (multi-step, `num_scheduler_steps`)
when no waiting sequence could be admitted: the host syncs, schedules and detokenizes once per
call instead of once per token, and those calls are planned past each other the same way.
Tokens computed past a sequence's finish are discarded. Greedy and seeded sampling depend only
on (seed, position), so lookahead gives exactly the tokens of synchronous steps.
"""

from __future__ import annotations

import itertools
import logging
from typing import Optional, Sequence as Seq

import jax
import numpy as np

from jinfer.api.outputs import Logprob, RequestOutput
from jinfer.api.sampling_params import SamplingParams
from jinfer.config import EngineConfig
from jinfer.engine.block_manager import BlockManager
from jinfer.engine.lookahead import DeviceCall, InFlight, device_tokens
from jinfer.engine.request import Request
from jinfer.engine.scheduler import Schedule, ScheduledSequence, Scheduler
from jinfer.engine.sequence import Sequence
from jinfer.engine.stopping import StopChecker
from jinfer.model.sampler import SamplingRow
from jinfer.runner.buckets import logprobs_bucket
from jinfer.text.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """Host loop around the device calls: requests in, RequestOutputs out.

    `runner` is the device side (jinfer.runner.model_runner.ModelRunner, or a fake in tests):
    `prepare`, `launch_step`, `execute`, `launch_decode_steps`, `takes_any_step_count`,
    `copy_blocks`, `prompt_logits` and `model_config.vocab_size`. `sliding_window`: the
    model's window in tokens when every layer has one (the smallest), else None; sequences
    then release the blocks that fall out of it (jinfer.engine.block_manager).
    """

    def __init__(self, runner, tokenizer, config: EngineConfig, eos_token_ids: Seq[int],
                 num_blocks: int, shuffle_blocks_seed=None, sliding_window: Optional[int] = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, config.block_size, shuffle_blocks_seed,
                                          config.enable_prefix_caching, sliding_window)
        self.stop_checker = StopChecker(self.eos_token_ids, config.max_model_len)
        self.scheduler = Scheduler(config, self.block_manager, self.stop_checker,
                                   runner.takes_any_step_count)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self.vocab_size = runner.model_config.vocab_size
        self.num_computed_tokens = 0         # tokens whose K/V a device call computed
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
            detok = None if self.tokenizer is None else IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, stop=params.stop or (),
                skip_special_tokens=params.skip_special_tokens,
                include_stop_str_in_output=params.include_stop_str_in_output)
            seqs.append(Sequence(next(self._seq_ids), request_id, index, prompt_token_ids,
                                 params, self._seed_for(params, index), detok))
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

        With nothing in flight, the step is scheduled and dispatched first. Then, with
        lookahead on and where it is safe, the next step is scheduled past the one in flight
        and dispatched before that one is read back and postprocessed."""
        if self._in_flight is None:
            self._in_flight = self._dispatch(self.scheduler.schedule())
            if self._in_flight is None:  # nothing ran: everything gave way to preemption
                self._check_progress()
                return []
        in_flight = self._in_flight
        if self.config.num_scheduler_steps > 1 and not in_flight.must_read_back_first():
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

    def _dispatch(self, schedule: Schedule,
                  prev: Optional[InFlight] = None) -> Optional[InFlight]:
        """Dispatches a scheduled step without waiting for it (None when it is empty). `prev`:
        the step still in flight, whose samples are the input tokens of some decode rows."""
        if schedule.block_copies:  # runs after `prev`, as every call on the pool does
            self.runner.copy_blocks(schedule.block_copies)
        decode, prefill = schedule.decode, schedule.prefill
        if not decode and not prefill:
            return None
        if not prefill:  # decode-only: the decode-steps program, one step or several
            calls = [self._launch_decode_steps(decode, schedule.num_decode_steps, prev)]
        elif decode and not self.config.mixed_batching:
            # Two calls: fewer distinct shapes to compile, where compiling is slow (CPU).
            calls = [self._launch_step([], prefill, prev),
                     self._launch_decode_steps(decode, 1, prev)]
        else:
            calls = [self._launch_step(decode, prefill, prev)]
        if prev is not None:
            self.num_calls_ahead += len(calls)
        return InFlight(calls)

    def _launch_step(self, decode: list[ScheduledSequence], prefill: list[ScheduledSequence],
                     prev: Optional[InFlight]) -> DeviceCall:
        """One device call for decode rows and prompt chunks together, left in flight (waited
        for when lookahead is off)."""
        items = decode + prefill  # the call's row order: decodes first, then prompt chunks
        step_input, flags = self.runner.prepare(decode, prefill, self._sampling_rows(items),
                                                self._logprobs_bucket(items),
                                                self._prompt_logprobs_bucket(prefill))
        token_ids = device_tokens(decode, step_input, prev)
        if self.config.num_scheduler_steps == 1:
            assert token_ids is None, "nothing is in flight without lookahead"
            results, scores = self.runner.execute(step_input, flags)
        else:
            results, scores = self.runner.launch_step(step_input, flags, token_ids)
        return DeviceCall(items, len(decode), 1, results, results.tokens, prompt_scores=scores)

    def _launch_decode_steps(self, decode: list[ScheduledSequence], num_steps: int,
                             prev: Optional[InFlight]) -> DeviceCall:
        """Dispatches `num_steps` decode steps of `decode` in one call (the scheduler reserved
        their slots) without waiting for it."""
        step_input, flags = self.runner.prepare(decode, [], self._sampling_rows(decode),
                                                self._logprobs_bucket(decode),
                                                num_steps=num_steps)
        token_ids = device_tokens(decode, step_input, prev)
        results, last_tokens = self.runner.launch_decode_steps(step_input, flags, num_steps,
                                                               token_ids)
        return DeviceCall(decode, len(decode), num_steps, results, last_tokens, stacked=True)

    def _sampling_rows(self, items: list[ScheduledSequence]) -> list[SamplingRow]:
        """The sampler rows of `items`' next tokens (past their samples still in flight)."""
        return [SamplingRow(item.seq.params, item.seq.seed, item.sample_step,
                            item.seq.prompt_token_ids, item.seq.output_token_ids,
                            self.stop_checker.banned_ids(item.seq)) for item in items]

    @staticmethod
    def _logprobs_bucket(items: list[ScheduledSequence]) -> int:
        return logprobs_bucket([item.seq.params.logprobs for item in items
                                if item.seq.params.logprobs is not None])

    @staticmethod
    def _prompt_logprobs_bucket(prefill: list[ScheduledSequence]) -> int:
        """The prompt logprobs' top-N the call computes; 0 (none) unless a chunk needs them."""
        return logprobs_bucket([item.seq.params.prompt_logprobs for item in prefill
                                if item.seq.needs_prompt_logprobs])

    # -- read back and postprocess -------------------------------------------------------------
    def _read_back(self, in_flight: InFlight, touched: dict) -> None:
        """Waits for the calls of `in_flight` and postprocesses their rows, prompt chunks first
        (n > 1 siblings fork from them and join the running set in order)."""
        for call in in_flight.calls:
            results, scores = jax.device_get((call.results, call.prompt_scores))  # waits
            if scores is not None:
                self._read_prompt_logprobs(call, scores)
            rows = [*range(call.num_decode, len(call.items)), *range(call.num_decode)]
            for step in range(call.num_steps):
                result = results
                if call.stacked:  # fields [steps >= num_steps, S]
                    result = jax.tree.map(lambda a: a[step], results)  # noqa: B023
                for row in rows:
                    self._read_back_row(call, row, result, touched)

    def _read_prompt_logprobs(self, call: DeviceCall, scores) -> None:
        """Appends the prompt logprobs of `call`'s prompt chunks to the sequences that still
        need them. Position p's logits score prompt token p + 1; a chunk recomputed after a
        preemption skips the positions read back before."""
        offset = 0  # of the chunk among the scored tokens (the chunks back to back)
        for item in call.items[call.num_decode:]:
            seq = item.seq
            if seq.needs_prompt_logprobs and not seq.is_finished:
                entries = seq.prompt_logprobs
                assert item.start < len(entries), "prompt positions computed out of order"
                end = min(item.start + item.num_new_tokens, seq.num_prompt_tokens - 1)
                for position in range(len(entries) - 1, end):
                    entries.append(self._token_logprobs(
                        scores, offset + position - item.start,
                        seq.prompt_token_ids[position + 1], seq.params.prompt_logprobs))
            offset += item.num_new_tokens

    def _read_back_row(self, call: DeviceCall, row: int, result, touched: dict) -> None:
        """One row of one step of `call`: its tokens are computed, its sample appended (and its
        request touched). Discarded when the sequence finished (or was aborted) after the call
        was dispatched."""
        item = call.items[row]
        seq = item.seq
        if seq.is_finished:
            return
        num_new = item.num_new_tokens if call.num_steps == 1 else 1
        self._count_computed(seq, num_new)
        self.scheduler.mark_computed(seq, num_new)
        if item.samples:
            seq.num_samples_in_flight -= 1
            self._fork_siblings(seq)
            self._append_token(seq, result, row)
            touched[seq.request_id] = self.requests[seq.request_id]

    def _count_computed(self, seq: Sequence, num_new: int) -> None:
        start = seq.num_computed_tokens
        self.num_computed_tokens += num_new
        self.num_computed_prompt_tokens += max(0, min(start + num_new, seq.num_prompt_tokens)
                                               - start)

    def _fork_siblings(self, seq: Sequence) -> None:
        """Parallel sampling (n > 1): once sequence 0 has prefilled the prompt (its first
        sample is being read back), its siblings fork from it."""
        request = self.requests[seq.request_id]
        if seq.index == 0 and not seq.num_output_tokens and len(request.seqs) > 1:
            self.scheduler.fork(seq, request.seqs[1:])

    def _append_token(self, seq: Sequence, result, row: int) -> None:
        """Appends the sample of `row` to `seq` with its logprobs; finishes `seq` if the
        StopChecker says so."""
        token = int(result.tokens[row])
        seq.output_token_ids.append(token)
        seq.cumulative_logprob += float(result.logprobs[row])
        if seq.logprobs is not None:
            seq.logprobs.append(self._token_logprobs(result, row, token, seq.params.logprobs))
        finish = self.stop_checker.check(seq)
        if finish is None:
            return
        seq.finish_reason, seq.stop_reason = finish.reason, finish.stop_reason
        if seq.detokenizer is not None:
            seq.detokenizer.flush()  # text held back as a possible stop string's start
        self.scheduler.finish(seq)

    def _token_logprobs(self, result, row: int, token: int, top_n: int) -> dict[int, Logprob]:
        """The logprob of `token`, sampled (or scored) in `row` of `result`, and the top-N."""
        ids, values = result.top_ids[row][:top_n], result.top_logprobs[row][:top_n]
        entry = {int(t): Logprob(float(v), rank + 1)
                 for rank, (t, v) in enumerate(zip(ids, values))}
        entry.setdefault(token, Logprob(float(result.logprobs[row]), int(result.ranks[row])))
        for token_id, logprob in entry.items():
            if self.tokenizer is not None:
                logprob.decoded_token = self.tokenizer.decode([token_id],
                                                              skip_special_tokens=False)
        return entry

    def _outputs(self, touched: dict) -> list[RequestOutput]:
        """RequestOutputs of the touched requests; finished ones leave the engine."""
        outputs = [request.output() for request in touched.values()]
        for request in touched.values():
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    # -- outside the loop ------------------------------------------------------------------------
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

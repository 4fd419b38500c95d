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

Decode-only stretches run several steps per device call (multi-step, `num_scheduler_steps`), and
those calls overlap the host: a multi-step call is dispatched and left in flight; the next
`step()` dispatches the call that continues the same rows (its input tokens are the in-flight
call's last samples, still on the device) before it reads back and postprocesses the call in
flight. The device always has the next call queued while the host detokenizes and checks stops.
Tokens computed past a sequence's finish are discarded; the KV pool threads through every call,
so the device runs them in dispatch order and a freed block is rewritten only after.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Optional, Sequence as Seq

import jax
import numpy as np

from jinfer.block_manager import BlockManager
from jinfer.cache_ops import copy_blocks
from jinfer.config import EngineConfig
from jinfer.detokenizer import IncrementalDetokenizer
from jinfer.model_runner import ModelRunner, decode_steps_bucket
from jinfer.outputs import CompletionOutput, Logprob, RequestOutput
from jinfer.sampling_params import SamplingParams
from jinfer.scheduler import ScheduledSequence, Scheduler
from jinfer.sequence import Sequence

logger = logging.getLogger(__name__)

LOGPROB_BUCKETS = (1, 5, 20)  # top-N logprobs compiled per bucket, sliced per request


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
class InFlight:
    """A multi-step decode call dispatched to the device and not yet read back."""

    items: list[ScheduledSequence]  # its rows, in order
    num_steps: int
    results: object                 # SamplerOutput on the device, fields [num_steps, S]
    last_tokens: object             # [rows] on the device: the continuing call's input


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
        self._in_flight: Optional[InFlight] = None

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
        """One schedule -> batch -> device -> postprocess round; outputs of touched requests.

        With a multi-step call in flight: dispatch its continuation (when nothing else needs
        the device), then read the call back and postprocess it."""
        if self._in_flight is not None:
            return self._step_in_flight()
        schedule = self.scheduler.schedule()
        if schedule.block_copies:
            self.runner.kv_cache = copy_blocks(self.runner.kv_cache, schedule.block_copies)
        touched: dict[str, Request] = {}
        decode, prefill = schedule.decode.scheduled, schedule.prefill.scheduled
        num_steps = self._num_decode_steps(decode, prefill)
        if num_steps > 1:
            self._in_flight = self._launch_decode_steps(decode, num_steps)
        elif decode and prefill and not self.config.mixed_batching:
            # Two calls: fewer distinct shapes to compile, where compiling is slow (CPU).
            self._run_step([], prefill, touched)
            self._run_step(decode, [], touched)
        elif decode or prefill:  # (neither: everything gave way to preemption this step)
            self._run_step(decode, prefill, touched)
        elif self.requests and not self.scheduler.has_unfinished():
            raise RuntimeError(f"internal error: requests {sorted(self.requests)[:5]} are "
                               "unfinished but no sequence is running or waiting")
        return self._outputs(touched)

    def _run_step(self, decode, prefill, touched: dict) -> None:
        """One device call for the step's decode rows and prompt chunks together."""
        items = decode + prefill  # the step's row order: decodes first, then prompt chunks
        seqs = [item.seq for item in items]
        rows = [self._sampling_row(seq) for seq in seqs]
        step_input, flags = self.runner.prepare(decode, prefill, rows,
                                                self._logprobs_bucket(seqs))
        result = self.runner.execute(step_input, flags)
        row_of = {id(item): i for i, item in enumerate(items)}
        for item in prefill + decode:  # prompts first: forks join the running set in order
            seq, samples = item.seq, item.samples
            self._advance(seq, item.num_new_tokens)
            if samples:
                self._fork_siblings(seq)
                self._append_token(seq, result, row_of[id(item)])
            touched[seq.request_id] = self.requests[seq.request_id]

    def _num_decode_steps(self, decode, prefill) -> int:
        """How many decode steps the next device call may run back to back (multi-step
        scheduling): only decodes run, no waiting sequence could be admitted (see
        `_admission_possible`), every row has sampled before (a prompt's last token is not a
        decode: n > 1 siblings fork after it); penalties and min_tokens bans need no host
        between tokens (the call appends each step's samples to the rows' output tokens and
        lifts the bans at min_tokens, on the device). Then
        num_scheduler_steps, or a power of two below it that the longest row still wants
        (`decode_steps_bucket`), halved until every row fits in max_model_len and the pool has
        the slots (with no shared block in the write range). Else 1."""
        limit = self.config.num_scheduler_steps
        if limit == 1 or prefill or not decode or self._admission_possible():
            return 1
        wanted = 1
        for item in decode:
            seq, params = item.seq, item.seq.params
            if not seq.num_output_tokens:  # a prompt's last token: forks n > 1 siblings after it
                return 1
            wanted = max(wanted, params.max_tokens - seq.num_output_tokens)
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

    def _decode_steps_fit(self, decode, num_steps: int, ahead: int = 0) -> bool:
        """Every row can take num_steps more tokens (after `ahead` in flight): within
        max_model_len, with free blocks for them and no shared block to copy on write."""
        ends = [item.seq.num_computed_tokens + ahead + num_steps for item in decode]
        if max(ends) > self.config.max_model_len:
            return False
        manager = self.block_manager
        if any(manager.shares_write_range(item.seq, end) for item, end in zip(decode, ends)):
            return False
        new_blocks = sum(manager.num_new_blocks(item.seq, end) for item, end in zip(decode, ends))
        return new_blocks <= manager.num_free_blocks

    def _launch_decode_steps(self, decode, num_steps: int, ahead: int = 0,
                             token_ids=None) -> InFlight:
        """Reserves the slots of `num_steps` tokens per row (after `ahead` still in flight) and
        dispatches the multi-step call without waiting for it."""
        for item in decode:
            seq = item.seq
            copies = self.block_manager.append_slots(
                seq, seq.num_computed_tokens + ahead + num_steps)
            assert not copies, "shared blocks in the write range are excluded beforehand"
        seqs = [item.seq for item in decode]
        rows = [self._sampling_row(seq, ahead) for seq in seqs]
        step_input, flags = self.runner.prepare(decode, [], rows, self._logprobs_bucket(seqs),
                                                ahead=ahead, num_steps=num_steps)
        results, last_tokens = self.runner.launch_decode_steps(step_input, flags, num_steps,
                                                               token_ids)
        return InFlight(decode, num_steps, results, last_tokens)

    def _continuation(self, prev: InFlight) -> Optional[InFlight]:
        """The call that continues `prev`'s unfinished rows, dispatched before `prev` is read
        back: when no waiting sequence could be admitted, every running sequence is one of them,
        no row has penalties (they read the output tokens, and `prev`'s are not on the host
        yet), and some row wants at least two tokens past `prev`. Rows that finished before
        `prev` was dispatched drop out (their input tokens are gathered on the device); rows
        that finish on eos or a stop string inside `prev` waste their share of the call
        (discarded)."""
        live = [row for row, item in enumerate(prev.items) if not item.seq.is_finished]
        seqs = [prev.items[row].seq for row in live]
        if (not seqs or self._admission_possible() or len(self.scheduler.running) != len(seqs)
                or any(seq.params.has_penalties for seq in seqs)):
            return None
        items = [prev.items[row] for row in live]
        ahead = prev.num_steps
        wanted = max(min(seq.params.max_tokens - seq.num_output_tokens,
                         self.config.max_model_len - seq.num_tokens) - ahead for seq in seqs)
        num_steps = decode_steps_bucket(wanted, self.config.num_scheduler_steps)
        while num_steps > 1 and not self._decode_steps_fit(items, num_steps, ahead):
            num_steps = decode_steps_bucket(num_steps - 1, self.config.num_scheduler_steps)
        if num_steps < 2:
            return None
        tokens = prev.last_tokens
        if len(items) < len(prev.items):  # a device-side gather: no wait for `prev`
            rows = self.runner.decode_rows_bucket(len(items))
            tokens = tokens[np.pad(np.array(live), (0, rows - len(live)))]
        return self._launch_decode_steps(items, num_steps, ahead, tokens)

    def _step_in_flight(self) -> list[RequestOutput]:
        in_flight = self._in_flight
        self._in_flight = self._continuation(in_flight)
        touched: dict[str, Request] = {}
        results = jax.device_get(in_flight.results)  # waits for the call
        seqs = [item.seq for item in in_flight.items]
        for step in range(in_flight.num_steps):
            result = jax.tree.map(lambda a: a[step], results)  # noqa: B023
            for row, seq in enumerate(seqs):
                if seq.is_finished:  # finished earlier in the call (or aborted): discarded
                    continue
                self._advance(seq, 1)
                self._append_token(seq, result, row)
                touched[seq.request_id] = self.requests[seq.request_id]
        return self._outputs(touched)

    def _outputs(self, touched: dict) -> list[RequestOutput]:
        """RequestOutputs of the touched requests; finished ones leave the engine."""
        outputs = [request.output() for request in touched.values()]
        for request in touched.values():
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    def _advance(self, seq: Sequence, num_new: int) -> None:
        """Counts `num_new` freshly computed tokens of `seq` and registers its full blocks."""
        self._count_computed(seq, num_new)
        seq.num_computed_tokens += num_new
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

    def _sampling_row(self, seq: Sequence, ahead: int = 0):
        """The sampler row of `seq`'s next token (`ahead` tokens past its last known one)."""
        params = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < params.min_tokens:
            banned = list(params.stop_token_ids or ())
            if not params.ignore_eos:
                banned += sorted(self.eos_token_ids)
        return (params, seq.seed, seq.num_output_tokens + ahead, seq.prompt_token_ids,
                seq.output_token_ids, banned)

    @staticmethod
    def _logprobs_bucket(seqs: list[Sequence]) -> int:
        """0 when no row wants logprobs, else the smallest bucket covering every request."""
        wanted = [seq.params.logprobs for seq in seqs if seq.params.logprobs is not None]
        if not wanted:
            return 0
        return next(b for b in LOGPROB_BUCKETS if b >= max(wanted))

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
        running sequences, prefix-cache hit rate, preemptions, queue lengths."""
        return {**self.block_manager.stats(),
                "kv_waste": self.block_manager.kv_waste(self.scheduler.running),
                "num_preemptions": self.scheduler.num_preemptions,
                "num_computed_tokens": self.num_computed_tokens,
                "num_computed_prompt_tokens": self.num_computed_prompt_tokens,
                "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting)}

"""`AsyncLLM`: the engine driven by one background thread, for asyncio code and the server.

    async for output in async_llm.generate("Hello", SamplingParams(max_tokens=32)):
        print(output.outputs[0].text)   # cumulative; `finished` on the last one

One thread owns the `LLMEngine` and runs `step()` after `step()` while any request is
unfinished. Everything else talks to it through a command queue (add, abort, stats), so the
engine is never touched from two threads. Each request streams its cumulative `RequestOutput`s
through an asyncio queue of the caller's event loop; a slow reader skips to the newest (each
output holds everything before it). Tokenization runs in a worker thread of the event loop,
off both the loop and the engine thread.

Cancelling the iteration (a client disconnecting) aborts the request at once: its blocks are
freed before the engine's next step. An exception inside `step()` fails the requests in the
engine with `EngineError`, and the engine serves new requests after it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
import uuid
from typing import AsyncIterator, Callable, Iterable, Iterator, Optional, Sequence, Union

from jinfer.api.llm import LLM
from jinfer.api.outputs import RequestOutput
from jinfer.api.sampling_params import SamplingParams
from jinfer.engine.metrics import EngineMetrics
from jinfer.engine.sequence import SequenceStatus

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running this request (the server answers 500)."""


class EngineDeadError(RuntimeError):
    """The engine has shut down and takes no more requests."""


class EngineOverloadedError(RuntimeError):
    """More requests are pending than `max_pending_requests` allows (the server answers 503)."""


@dataclasses.dataclass
class _Stream:
    """A request's outbox on the caller's event loop, and the timings for its metrics."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    num_prompt_tokens: int
    first_token_time: Optional[float] = None
    last_token_time: float = 0.0
    num_output_tokens: int = 0

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop has closed: nobody is reading any more
            pass


class AsyncLLM:
    """Serves an `LLM` to asyncio callers from one engine thread.

    Args:
      llm: a built LLM. From now on its engine belongs to the engine thread: do not call the
        LLM's own generate methods while the AsyncLLM runs.
      model_name: the `model_name` label of the metrics.
      max_pending_requests: most unfinished requests at once; `generate` refuses more with
        ValueError (the server answers 503). None: no limit.
      idle_work: callables the engine thread runs one at a time while it has no request (the
        server's background warm-up); a request that arrives meanwhile waits for at most the
        one running. One that raises is logged and ends the idle work; serving goes on.
    """

    def __init__(self, llm: LLM, model_name: str = "jinfer",
                 max_pending_requests: Optional[int] = None,
                 idle_work: Iterable[Callable[[], object]] = ()):
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.config.max_model_len
        self.max_pending_requests = max_pending_requests
        self.metrics = EngineMetrics(model_name)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._unscheduled: dict[str, _Stream] = {}  # of those, not yet scheduled (queue time)
        self._num_pending = 0  # requests added and not yet finished (event-loop side count)
        self._accepting = True
        self._stop = threading.Event()
        self._idle_work: Optional[Iterator[Callable[[], object]]] = iter(idle_work)
        self._thread = threading.Thread(target=self._run, name="jinfer-engine", daemon=True)
        self._thread.start()

    # -- the caller's side ----------------------------------------------------------------------
    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenizes off the event loop and off the engine thread."""
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer: send token ids")
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    async def generate(self, prompt: Union[str, Sequence[int]],
                       sampling_params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None, *, prompt_text: Optional[str] = None,
                       ) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative RequestOutput after each step that touched it; the
        last one has `finished` set. `prompt`: text (tokenized here) or token ids
        (`prompt_text`, if given, is reported as RequestOutput.prompt). Raises ValueError for
        a request the engine refuses, EngineError if the engine failed while running it."""
        if not self._accepting or not self._thread.is_alive():
            raise EngineDeadError("the engine is shutting down and takes no new requests")
        if (self.max_pending_requests is not None
                and self._num_pending >= self.max_pending_requests):
            raise EngineOverloadedError(f"the server has {self._num_pending} requests pending, its "
                                f"limit (max_pending_requests); retry later")
        if isinstance(prompt, str):
            prompt_text, ids = prompt, await self.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        params = sampling_params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic(), len(ids))
        self._num_pending += 1
        finished = False
        try:
            self._commands.put(("add", request_id, prompt_text, ids, params, stream))
            while not finished:
                output = await stream.queue.get()
                while not stream.queue.empty():  # outputs are cumulative: skip to the newest
                    if isinstance(output, BaseException):
                        break
                    output = stream.queue.get_nowait()
                if isinstance(output, BaseException):
                    finished = True
                    raise output
                finished = output.finished
                yield output
        finally:
            self._num_pending -= 1
            if not finished:  # cancelled or closed early: free its blocks now
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Aborts a request (thread-safe; unknown or finished ids are ignored)."""
        self._commands.put(("abort", request_id))

    async def get_stats(self) -> dict:
        """The engine's stats, read on the engine thread between steps; also refreshes the
        metrics' gauges."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("stats", future))
        return await asyncio.wrap_future(future)

    def num_unfinished_requests(self) -> int:
        return self._num_pending

    def is_running(self) -> bool:
        """True while the engine thread runs and takes requests."""
        return self._accepting and self._thread.is_alive()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stops taking requests, lets the running ones finish for up to `timeout` seconds,
        aborts the rest and stops the engine thread."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._commands.put(("abort_all", "the server is shutting down"))
        self._stop.set()
        self._commands.put(("wake",))
        await asyncio.to_thread(self._thread.join, max(0.1, deadline - time.monotonic() + 2))

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not (self._stop.is_set() and not self.engine.has_unfinished_requests()):
            try:
                idle = self._idle_work is not None
                self._apply_commands(block=not (idle or self.engine.has_unfinished_requests()))
                if self.engine.has_unfinished_requests():
                    self._step()
                elif idle:
                    self._run_idle_work()
            except Exception as exc:  # the device call or the host loop failed
                logger.exception("engine step failed; failing the requests it held")
                self._fail_all(EngineError(f"the engine failed while running this request: "
                                           f"{type(exc).__name__}: {exc}"))

    def _run_idle_work(self) -> None:
        """Runs the next idle-work item; past the last (or a failed one), idles no more."""
        try:
            work = next(self._idle_work)
        except StopIteration:
            self._idle_work = None
            return
        try:
            work()
        except Exception:  # noqa: BLE001 (the work is optional: serving goes on)
            logger.exception("idle work failed; no more of it runs")
            self._idle_work = None

    def _step(self) -> None:
        started = time.monotonic()
        outputs = self.engine.step()
        now = time.monotonic()
        with self.metrics.lock:
            self._mark_scheduled(started)
            for output in outputs:
                self._deliver(output, now)

    def _apply_commands(self, block: bool) -> None:
        """Applies every queued command; with `block`, first waits for one."""
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_text, ids, params, stream = command
            try:
                self.engine.add_request(request_id, prompt_text, ids, params)
            except Exception as exc:  # bad input: this request only
                stream.put(exc)
                return
            self._streams[request_id] = stream
            self._unscheduled[request_id] = stream
        elif kind == "abort":
            if command[1] in self._streams:
                self.engine.abort(command[1])
                self._finish(command[1], "abort", time.monotonic())
        elif kind == "abort_all":
            self._fail_all(EngineDeadError(command[1]), reason="abort")
        elif kind == "stats":
            future = command[1]
            try:
                stats = self._stats()
            except Exception as exc:  # pragma: no cover - reported to the caller
                future.set_exception(exc)
            else:
                future.set_result(stats)

    def _stats(self) -> dict:
        stats = self.engine.stats()
        waiting = sum(all(s.status is SequenceStatus.WAITING for s in r.seqs)
                      for r in self.engine.requests.values())
        stats.update(num_requests_running=len(self.engine.requests) - waiting,
                     num_requests_waiting=waiting)
        with self.metrics.lock:
            self.metrics.update_engine_state(stats, self.engine.config.block_size)
        return stats

    def _mark_scheduled(self, step_started: float) -> None:
        """Observes the queue time of requests whose first sequence left WAITING this step."""
        for request_id, stream in list(self._unscheduled.items()):
            request = self.engine.requests.get(request_id)
            if request is None or request.seqs[0].status is not SequenceStatus.WAITING:
                del self._unscheduled[request_id]
                self.metrics.request_queue_time.observe(step_started - stream.arrival)
                self.metrics.prompt_tokens.inc(stream.num_prompt_tokens)

    def _deliver(self, output: RequestOutput, now: float) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        num_tokens = sum(len(o.token_ids) for o in output.outputs)
        new_tokens = num_tokens - stream.num_output_tokens
        if new_tokens > 0:
            if stream.first_token_time is None:
                stream.first_token_time = now
                self.metrics.time_to_first_token.observe(now - stream.arrival)
            else:
                self.metrics.inter_token_latency.observe((now - stream.last_token_time)
                                                         / new_tokens)
            stream.last_token_time = now
            stream.num_output_tokens = num_tokens
            self.metrics.generation_tokens.inc(new_tokens)
        stream.put(output)
        if output.finished:
            reasons = {o.finish_reason for o in output.outputs}
            self._finish(output.request_id, "abort" if "abort" in reasons else
                         "length" if reasons == {"length"} else "stop", now)

    def _finish(self, request_id: str, reason: str, now: float) -> None:
        stream = self._streams.pop(request_id, None)
        self._unscheduled.pop(request_id, None)
        if stream is not None:
            self.metrics.request_success.inc(label=reason)
            self.metrics.e2e_request_latency.observe(now - stream.arrival)

    def _fail_all(self, error: BaseException, reason: str = "error") -> None:
        """Aborts every request in the engine and raises `error` in their streams."""
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        now = time.monotonic()
        for request_id, stream in list(self._streams.items()):
            stream.put(error)
            self._finish(request_id, reason, now)


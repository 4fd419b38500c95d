"""The completions and chat endpoints: requests -> AsyncLLM streams -> OpenAI responses.

Each prompt of a request is one engine request (its `n` completions inside it); choice i of
prompt p is choice `p * n + i`. Outputs from the engine are cumulative, so a stream sends each
choice's text and tokens past what it sent before, with `finish_reason` on the choice's last
chunk only. Token ids, not text, are counted for `usage`.

Errors a client caused raise `APIError` (a 4xx in OpenAI's format) before any byte of the
response is sent: a stream's first engine output is awaited before its headers go out, so that
a request the engine refuses still gets a 400. An engine failure mid-stream is sent as an error
event before `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import AsyncIterator, Optional, Union

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jinfer.api.async_llm import (AsyncLLM, EngineDeadError, EngineError,
                                  EngineOverloadedError)
from jinfer.api.outputs import RequestOutput
from jinfer.server import protocol as p

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered in OpenAI's format with `status_code`."""

    def __init__(self, message: str, status_code: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.status_code, self.param = status_code, param

    def response(self) -> JSONResponse:
        return JSONResponse(p.error_body(str(self), self.status_code, self.param),
                            status_code=self.status_code)


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for (more gets a 4xx)."""

    max_n: int = 64
    max_request_bytes: int = 16 * 1024 * 1024


@dataclasses.dataclass
class _Choice:
    """What a stream has sent of one choice."""

    started: bool = False
    num_chars: int = 0
    num_tokens: int = 0
    finished: bool = False


def _sse(payload: Union[dict, str]) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class OpenAIServing:
    """Turns validated protocol requests into engine requests and their outputs into responses."""

    def __init__(self, engine: AsyncLLM, model_name: str, limits: ServerLimits):
        self.engine = engine
        self.model_name = model_name
        self.limits = limits
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer

    # -- shared checks --------------------------------------------------------------------------
    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise APIError(f"The model `{model}` does not exist; this server serves "
                           f"`{self.model_name}` (GET /v1/models)", 404, "model")

    def _check(self, request: p.ChatCompletionRequest | p.CompletionRequest) -> None:
        self.check_model(request.model)
        if request.n > self.limits.max_n:
            raise APIError(f"n must be at most {self.limits.max_n} on this server, got "
                           f"{request.n}", 400, "n")
        if self.tokenizer is None and (request.stop or isinstance(request,
                                                                   p.ChatCompletionRequest)):
            raise APIError("this model was loaded without a tokenizer: send token-id prompts "
                           "to /v1/completions, without stop strings", 400)

    def _params(self, request, num_prompt_tokens: int):
        if num_prompt_tokens >= self.max_model_len:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has {num_prompt_tokens} tokens, which leaves no room for the "
                f"completion. Please shorten the prompt.", 400, "messages" if isinstance(
                    request, p.ChatCompletionRequest) else "prompt")
        try:
            return request.to_sampling_params(self.max_model_len - num_prompt_tokens)
        except ValidationError as exc:
            message, param = p.validation_error_message(exc.errors())
            raise APIError(message, 400, param) from None

    def _decode_one(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    async def _start(self, prompt_ids: list[list[int]], texts: list[Optional[str]],
                     params: list, request_id: str) -> list[tuple[RequestOutput, AsyncIterator]]:
        """Adds one engine request per prompt; returns each one's first output and its stream.
        Refusals become APIErrors (nothing has been sent yet)."""
        streams = [self.engine.generate(ids, sp, f"{request_id}-{i}", prompt_text=text)
                   for i, (ids, text, sp) in enumerate(zip(prompt_ids, texts, params))]
        try:
            firsts = await asyncio.gather(*(anext(s) for s in streams))
        except BaseException as exc:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
            raise _api_error(exc) from exc
        return list(zip(firsts, streams))

    # -- /v1/completions --------------------------------------------------------------------------
    async def completions(self, request: p.CompletionRequest, raw: Request) -> Response:
        self._check(request)
        prompts = request.prompts()
        if any(isinstance(x, str) for x in prompts) and self.tokenizer is None:
            raise APIError("this model was loaded without a tokenizer: send token ids as the "
                           "prompt", 400, "prompt")
        ids = [await self.engine.encode(x) if isinstance(x, str) else list(x) for x in prompts]
        texts = [x if isinstance(x, str) else None for x in prompts]
        params = [self._params(request, len(i)) for i in ids]
        if request.echo:
            texts = [t if t is not None else await asyncio.to_thread(self._decode_text, i)
                     for t, i in zip(texts, ids)]
        request_id = p.random_id("cmpl")
        started = await self._start(ids, texts, params, request_id)
        if request.stream:
            return _streaming(self._completion_chunks(request, request_id, started), raw)
        outputs = await _until_done(started, raw)
        return JSONResponse(self._completion_response(request, request_id, outputs).model_dump())

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer else ""

    def _completion_choice(self, request: p.CompletionRequest, output: RequestOutput, index: int,
                           completion, state: _Choice) -> Optional[p.CompletionChoice]:
        """The choice's part not sent yet (all of it when `state` is fresh), or None if there is
        nothing to send. An echo puts the prompt (and its logprobs) first."""
        if state.finished:
            return None
        first = not state.started
        echo = request.echo and first
        tokens = [] if request.echo_only else completion.token_ids[state.num_tokens:]
        text = "" if request.echo_only else completion.text[state.num_chars:]
        finished = completion.finished()
        logprobs = None
        if request.logprobs is not None:
            logprobs = self._completion_logprobs(request, output, completion, state, tokens, echo)
        if not (text or tokens or echo or finished):
            return None
        state.started, state.finished = True, finished
        state.num_chars += len(text)
        state.num_tokens += len(tokens)
        prompt_logprobs = None
        if first and request.prompt_logprobs is not None and output.prompt_logprobs:
            prompt_logprobs = p.vllm_prompt_logprobs(output.prompt_logprobs)
        return p.CompletionChoice(
            index=index, text=(output.prompt or "") + text if echo else text, logprobs=logprobs,
            finish_reason=completion.finish_reason if finished else None,
            stop_reason=completion.stop_reason if finished else None,
            prompt_logprobs=prompt_logprobs)

    def _completion_logprobs(self, request, output: RequestOutput, completion, state: _Choice,
                             tokens: list[int], echo: bool) -> p.CompletionLogprobs:
        """Logprobs of this part: the prompt's first if echoed, then the new tokens'; offsets
        count from the start of the choice's text (which an echo starts with the prompt)."""
        steps = (completion.logprobs or [])[state.num_tokens:state.num_tokens + len(tokens)]
        if echo:
            prompt = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
            return p.completion_logprobs(output.prompt_token_ids + tokens, prompt + steps,
                                         request.logprobs, self._decode_one)
        offset = state.num_chars + (len(output.prompt or "") if request.echo else 0)
        return p.completion_logprobs(tokens, steps, request.logprobs, self._decode_one, offset)

    async def _completion_chunks(self, request: p.CompletionRequest, request_id: str,
                                 started) -> AsyncIterator[str]:
        created = int(time.time())  # one id and time for every chunk
        n = request.n
        choices: dict[int, _Choice] = {}
        num_prompt = num_generated = 0
        async for prompt_index, output in _merge(started):
            for completion in output.outputs:
                index = prompt_index * n + completion.index
                state = choices.setdefault(index, _Choice())
                choice = self._completion_choice(request, output, index, completion, state)
                if choice is not None:
                    chunk = p.CompletionStreamResponse(id=request_id, created=created,
                                                       model=self.model_name, choices=[choice])
                    yield _sse(chunk.model_dump_json(exclude={"usage"} if not
                                                     request.include_usage else None))
            if output.finished:
                num_prompt += len(output.prompt_token_ids)
                num_generated += _num_generated(request, output)
        if request.include_usage:
            usage = p.UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated)
            yield _sse(p.CompletionStreamResponse(id=request_id, created=created,
                                                  model=self.model_name, choices=[],
                                                  usage=usage).model_dump_json())

    def _completion_response(self, request: p.CompletionRequest, request_id: str,
                             outputs: list[RequestOutput]) -> p.CompletionResponse:
        choices = [self._completion_choice(request, output, i * request.n + c.index, c,
                                           _Choice())
                   for i, output in enumerate(outputs) for c in output.outputs]
        usage = p.UsageInfo(prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
                            completion_tokens=sum(_num_generated(request, o) for o in outputs))
        return p.CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                    usage=usage)

    # -- /v1/chat/completions -------------------------------------------------------------------
    async def chat(self, request: p.ChatCompletionRequest, raw: Request) -> Response:
        self._check(request)  # (a chat needs the tokenizer: checked there)
        if self.tokenizer.chat_template is None:
            raise APIError("this model has no chat template; use /v1/completions", 400,
                           "messages")
        text, ids = await asyncio.to_thread(self._apply_template, request)
        params = self._params(request, len(ids))
        request_id = p.random_id("chatcmpl")
        started = await self._start([ids], [text], [params], request_id)
        if request.stream:
            return _streaming(self._chat_chunks(request, request_id, started), raw)
        (output,) = await _until_done(started, raw)
        return JSONResponse(self._chat_response(request, request_id, output).model_dump())

    def _apply_template(self, request: p.ChatCompletionRequest) -> tuple[str, list[int]]:
        try:
            text = self.tokenizer.apply_chat_template(
                request.template_messages(), add_generation_prompt=request.add_generation_prompt,
                tokenize=False)
        except Exception as exc:  # the template's own complaint (e.g. roles must alternate)
            raise APIError(f"the chat template failed on these messages: {exc}", 400,
                           "messages") from None
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def _chat_logprobs(self, request, completion, start: int, tokens: list[int]):
        if not request.logprobs:
            return None
        steps = (completion.logprobs or [])[start:start + len(tokens)]
        return p.chat_logprobs(tokens, steps, request.top_logprobs or 0, self._decode_one)

    async def _chat_chunks(self, request: p.ChatCompletionRequest, request_id: str,
                           started) -> AsyncIterator[str]:
        created = int(time.time())  # one id and time for every chunk
        choices: dict[int, _Choice] = {}
        usage = None
        exclude = None if request.include_usage else {"usage"}

        def chunk(*stream_choices) -> str:
            return _sse(p.ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.model_name,
                choices=list(stream_choices),
            ).model_dump_json(exclude=exclude))

        async for _, output in _merge(started):
            for completion in output.outputs:
                if completion.index not in choices:
                    choices[completion.index] = _Choice()
                    yield chunk(p.ChatCompletionStreamChoice(
                        index=completion.index, delta=p.DeltaMessage(role="assistant",
                                                                     content="")))
                state = choices[completion.index]
                if state.finished:
                    continue
                text = completion.text[state.num_chars:]
                tokens = completion.token_ids[state.num_tokens:]
                finished = completion.finished()
                if not (text or tokens or finished):
                    continue
                logprobs = self._chat_logprobs(request, completion, state.num_tokens, tokens)
                state.num_chars += len(text)
                state.num_tokens += len(tokens)
                state.finished = finished
                yield chunk(p.ChatCompletionStreamChoice(
                    index=completion.index, delta=p.DeltaMessage(content=text),
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason if finished else None,
                    stop_reason=completion.stop_reason if finished else None))
            if output.finished:
                usage = p.UsageInfo(prompt_tokens=len(output.prompt_token_ids),
                                    completion_tokens=_num_generated(request, output))
        if request.include_usage and usage is not None:
            yield _sse(p.ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.model_name, choices=[],
                usage=usage).model_dump_json())

    def _chat_response(self, request: p.ChatCompletionRequest, request_id: str,
                       output: RequestOutput) -> p.ChatCompletionResponse:
        choices = [p.ChatCompletionChoice(
            index=c.index, message=p.ChatResponseMessage(content=c.text),
            logprobs=self._chat_logprobs(request, c, 0, c.token_ids),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for c in output.outputs]
        return p.ChatCompletionResponse(
            id=request_id, model=self.model_name, choices=choices,
            usage=p.UsageInfo(prompt_tokens=len(output.prompt_token_ids),
                              completion_tokens=_num_generated(request, output)),
            prompt_logprobs=(p.vllm_prompt_logprobs(output.prompt_logprobs)
                             if request.prompt_logprobs is not None and output.prompt_logprobs
                             else None))


def _num_generated(request, output: RequestOutput) -> int:
    if getattr(request, "echo_only", False):
        return 0
    return sum(len(c.token_ids) for c in output.outputs)


def _api_error(exc: BaseException) -> BaseException:
    """The engine's refusal of a request as the error the client gets."""
    if isinstance(exc, ValueError):
        return APIError(str(exc), 400)
    if isinstance(exc, (EngineOverloadedError, EngineDeadError)):
        return APIError(str(exc), 503)
    if isinstance(exc, EngineError):
        return APIError(str(exc), 500)
    return exc


async def _merge(started) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every stream as they come, the first outputs first. Every
    stream is run to its end (or closed, aborting its request, when the merge is closed)."""
    for i, (first, _) in enumerate(started):
        yield i, first
    if len(started) == 1:
        stream = started[0][1]
        try:
            async for output in stream:
                yield 0, output
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((i, output))
        except BaseException as exc:
            queue.put_nowait((i, exc))
            raise
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, (_, s) in enumerate(started)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_done(started, raw: Request) -> list[RequestOutput]:
    """Each stream's final output; a client that disconnects first aborts them all."""
    async def last(first: RequestOutput, stream) -> RequestOutput:
        output = first
        async for output in stream:
            pass
        return output

    work = asyncio.ensure_future(asyncio.gather(*(last(f, s) for f, s in started)))
    watch = asyncio.ensure_future(_disconnected(raw))
    try:
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise asyncio.CancelledError("the client disconnected")
        try:
            return work.result()
        except (EngineError, EngineDeadError) as exc:
            raise _api_error(exc) from exc
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _streaming(chunks: AsyncIterator[str], raw: Request) -> StreamingResponse:
    """Server-sent events ending with `data: [DONE]`; an engine failure mid-stream is sent as
    an error event first. Starlette cancels the stream when the client disconnects, which
    aborts its requests."""
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except (EngineError, EngineDeadError) as exc:
            status = 500 if isinstance(exc, EngineError) else 503
            yield _sse(p.error_body(str(exc), status))
        finally:
            await chunks.aclose()
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

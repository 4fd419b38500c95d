"""The server's wire format: request parsing and validation, SamplingParams mapping, response
shapes (checked against the official openai client's types and parser), logprobs formats."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from jinfer.api.outputs import Logprob
from jinfer.server.protocol import (
    MIN_LOGPROB, ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse,
    ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChatResponseMessage,
    CompletionChoice, CompletionRequest, CompletionResponse, CompletionStreamResponse,
    DeltaMessage, ErrorResponse, ModelCard, ModelList, UsageInfo, chat_logprobs,
    completion_logprobs, error_body, validation_error_message, vllm_prompt_logprobs)

CHAT = [{"role": "user", "content": "Hi"}]


def _error(model, body) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        request = model.model_validate(body)
        request.to_sampling_params(default_max_tokens=100)
    return validation_error_message(info.value.errors())


# ---- Requests ----

@pytest.mark.parametrize("prompt, prompts", [
    ("Once", ["Once"]),
    ("", [""]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_forms(prompt, prompts):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts() == prompts


def test_chat_messages_take_strings_and_text_parts():
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "one"},
                                                    {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "t1"},
    ]})
    assert request.template_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one\ntwo", "name": "ann"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42"},
    ]
    assert request.add_generation_prompt is True


def test_unknown_fields_are_ignored_and_null_means_default():
    request = CompletionRequest.model_validate(
        {"prompt": "x", "logit_bias": {"5": 1}, "suffix": "s", "best_of": 2,
         "temperature": None, "stop": None, "max_tokens": None})
    assert (request.temperature, request.stop, request.max_tokens) == (1.0, None, 16)
    chat = ChatCompletionRequest.model_validate(
        {"messages": CHAT, "tools": [], "response_format": {"type": "text"}, "n": None})
    assert chat.n == 1 and not hasattr(chat, "tools")


@pytest.mark.parametrize("model, body, field, text", [
    (CompletionRequest, {"prompt": "x", "temperature": -1}, "temperature",
     "greater than or equal to 0"),
    (CompletionRequest, {"prompt": "x", "temperature": "hot"}, "temperature", "valid number"),
    (CompletionRequest, {"prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
    (CompletionRequest, {"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
    (CompletionRequest, {"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    (CompletionRequest, {"prompt": "x", "max_tokens": 0}, "max_tokens", "only with echo"),
    (CompletionRequest, {"prompt": "x", "max_tokens": "ten"}, "max_tokens", "valid integer"),
    (CompletionRequest, {"prompt": "x", "presence_penalty": 3}, "presence_penalty", "2"),
    (CompletionRequest, {"prompt": "x", "min_p": 1.5}, "min_p", "less than or equal to 1"),
    (CompletionRequest, {"prompt": "x", "top_k": -2}, "top_k", "-1"),
    (CompletionRequest, {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "0"),
    (CompletionRequest, {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids", "0"),
    (CompletionRequest, {"prompt": "x", "stop": 7}, "stop", "a string or a list of strings"),
    (CompletionRequest, {"prompt": "x", "stream": True, "prompt_logprobs": 1},
     "prompt_logprobs", "stream"),
    (CompletionRequest, {"prompt": 7}, "prompt", "a list of token ids"),
    (CompletionRequest, {"prompt": [[1], []]}, "prompt", "empty"),
    (CompletionRequest, {}, "prompt", "Field required"),
    (ChatCompletionRequest, {"messages": CHAT, "top_logprobs": 5}, "top_logprobs",
     "requires logprobs=true"),
    (ChatCompletionRequest, {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
     "top_logprobs", "less than or equal to 20"),
    (ChatCompletionRequest, {"messages": CHAT, "max_tokens": 0}, "max_tokens", "1"),
    (ChatCompletionRequest, {"messages": CHAT, "max_completion_tokens": 0},
     "max_completion_tokens", "1"),
    (ChatCompletionRequest, {"messages": []}, "messages", "at least 1"),
    (ChatCompletionRequest, {"messages": [{"role": "bot", "content": "x"}]}, "messages",
     "messages.0.role"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages", "messages.0.content: must be a string or a list of"),
])
def test_bad_field_fails_naming_it(model, body, field, text):
    message, param = _error(model, body)
    assert param == field
    assert message.startswith(field) and text in message, message


@pytest.mark.parametrize("model, body, field", [
    (CompletionRequest, {"prompt": "x", "min_tokens": 30}, "min_tokens"),
    (CompletionRequest, {"prompt": "x", "stop": ["a", ""]}, "stop"),
])
def test_sampling_params_complaint_becomes_validation_error(model, body, field):
    message, param = _error(model, body)
    assert param == field and message.startswith(field), message


def test_completion_maps_every_field():
    request = CompletionRequest.model_validate({
        "prompt": "x", "n": 2, "max_tokens": 20, "temperature": 0.5, "top_p": 0.9, "stop": "\n",
        "seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": 3,
        "user": "u", "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
        "ignore_eos": True, "skip_special_tokens": False, "include_stop_str_in_output": True,
        "stop_token_ids": [5, 6], "prompt_logprobs": 1})
    p = request.to_sampling_params(default_max_tokens=100)
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == (
        2, 20, 0.5, 0.9, ("\n",), 7)
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs) == (0.5, -0.5, 3)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens) == (40, 0.05, 1.1, 2)
    assert p.ignore_eos and not p.skip_special_tokens and p.include_stop_str_in_output
    assert p.stop_token_ids == (5, 6) and p.prompt_logprobs == 1


def test_completion_defaults_and_max_tokens_cap():
    p = CompletionRequest.model_validate({"prompt": "x"}).to_sampling_params(100)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.logprobs, p.prompt_logprobs) == (
        16, 1.0, 1.0, 0, None, None)
    capped = CompletionRequest.model_validate({"prompt": "x", "max_tokens": 500})
    assert capped.to_sampling_params(default_max_tokens=100).max_tokens == 100
    for off in (-1, 0, None):
        assert CompletionRequest.model_validate(
            {"prompt": "x", "top_k": off}).to_sampling_params(100).top_k in (-1, 0)


def test_echo_asks_for_prompt_logprobs_and_max_tokens_0_scores_only():
    scoring = CompletionRequest.model_validate(
        {"prompt": "x", "echo": True, "max_tokens": 0, "logprobs": 2})
    p = scoring.to_sampling_params(100)
    assert scoring.echo_only and (p.max_tokens, p.logprobs, p.prompt_logprobs) == (1, 2, 2)
    echo = CompletionRequest.model_validate({"prompt": "x", "echo": True, "max_tokens": 5})
    assert not echo.echo_only and echo.to_sampling_params(100).prompt_logprobs is None
    explicit = CompletionRequest.model_validate(
        {"prompt": "x", "echo": True, "logprobs": 2, "prompt_logprobs": 0})
    assert explicit.to_sampling_params(100).prompt_logprobs == 0
    no_echo = CompletionRequest.model_validate({"prompt": "x", "logprobs": 2})
    assert not no_echo.echo_only and no_echo.to_sampling_params(100).prompt_logprobs is None


def test_chat_maps_max_completion_tokens_and_logprobs():
    def params(**body):
        return ChatCompletionRequest.model_validate({"messages": CHAT, **body}) \
            .to_sampling_params(default_max_tokens=100)
    assert params().max_tokens == 100
    assert params(max_tokens=10).max_tokens == 10
    assert params(max_tokens=10, max_completion_tokens=20).max_tokens == 20
    assert params(max_completion_tokens=500).max_tokens == 100
    assert params().logprobs is None
    assert params(logprobs=True).logprobs == 0
    assert params(logprobs=True, top_logprobs=5).logprobs == 5
    assert params(logprobs=False, top_logprobs=0).logprobs is None
    p = params(top_k=8, min_p=0.1, seed=3, stop=["x", "y"], prompt_logprobs=2, ignore_eos=True)
    assert (p.top_k, p.min_p, p.seed, p.stop, p.prompt_logprobs, p.ignore_eos) == (
        8, 0.1, 3, ("x", "y"), 2, True)


def test_include_usage_only_when_streaming():
    def usage(**body):
        return CompletionRequest.model_validate({"prompt": "x", **body}).include_usage
    assert usage(stream=True, stream_options={"include_usage": True})
    assert not usage(stream=True, stream_options={"include_usage": False})
    assert not usage(stream=True) and not usage(stream_options={"include_usage": True})


# ---- Responses ----

def test_completion_response_parses_as_openai():
    response = CompletionResponse(model="m", choices=[
        CompletionChoice(index=0, text="Hello", finish_reason="length")],
        usage=UsageInfo(prompt_tokens=3, completion_tokens=2))
    body = json.loads(response.model_dump_json())
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    parsed = Completion.model_validate(body)
    assert parsed.choices[0].text == "Hello" and parsed.usage.total_tokens == 5


def test_chat_response_parses_as_openai():
    response = ChatCompletionResponse(model="m", choices=[ChatCompletionChoice(
        index=0, message=ChatResponseMessage(content="Hi!"), finish_reason="stop",
        stop_reason=2)], usage=UsageInfo(prompt_tokens=4, completion_tokens=1))
    body = json.loads(response.model_dump_json())
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content == "Hi!" and parsed.choices[0].finish_reason == "stop"


def test_chat_chunks_keep_null_finish_reason_and_drop_unset_delta():
    def chunk(delta, finish=None):
        return json.loads(ChatCompletionStreamResponse(id="chatcmpl-1", model="m", choices=[
            ChatCompletionStreamChoice(index=0, delta=delta, finish_reason=finish)])
            .model_dump_json())
    first = chunk(DeltaMessage(role="assistant", content=""))
    middle, last = chunk(DeltaMessage(content="Hi")), chunk(DeltaMessage(), "stop")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert middle["choices"][0]["delta"] == {"content": "Hi"}
    assert middle["choices"][0]["finish_reason"] is None and "finish_reason" in middle["choices"][0]
    assert last["choices"][0]["delta"] == {} and last["object"] == "chat.completion.chunk"
    for body in (first, middle, last):
        ChatCompletionChunk.model_validate(body)
    usage = ChatCompletionStreamResponse(model="m", choices=[],
                                         usage=UsageInfo(prompt_tokens=1, completion_tokens=2))
    assert ChatCompletionChunk.model_validate(usage.model_dump()).usage.total_tokens == 3


def test_model_list_parses_as_openai():
    body = ModelList(data=[ModelCard(id="smollm2", max_model_len=2048)]).model_dump()
    assert body["object"] == "list" and body["data"][0]["owned_by"] == "jinfer"
    model = Model.model_validate(body["data"][0])
    assert (model.id, model.object, model.model_extra["max_model_len"]) == (
        "smollm2", "model", 2048)


@pytest.mark.parametrize("status, kind", [
    (400, "BadRequestError"), (401, "AuthenticationError"), (404, "NotFoundError"),
    (500, "InternalServerError"), (503, "InternalServerError")])
def test_error_body(status, kind):
    body = error_body("no such model", status, param="model")
    assert body == {"error": {"message": "no such model", "type": kind, "param": "model",
                              "code": status}}
    ErrorResponse.model_validate(body)


def _mock_client(handler) -> openai.OpenAI:
    """The official client, its HTTP answered in process by `handler(request) -> Response`."""
    return openai.OpenAI(base_url="http://test/v1", api_key="x",
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def _sse(chunks) -> httpx.Response:
    events = "".join(f"data: {c.model_dump_json()}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=events, headers={"content-type": "text/event-stream"})


def test_openai_client_round_trip_completions_stream():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["request"] = CompletionRequest.model_validate_json(request.content)
        chunks = [CompletionStreamResponse(id="cmpl-1", created=1, model="m", choices=[
            CompletionChoice(index=0, text=t, finish_reason=f)]) for t, f in
            (("Hel", None), ("lo", "stop"))]
        chunks.append(CompletionStreamResponse(id="cmpl-1", created=1, model="m", choices=[],
                                               usage=UsageInfo(prompt_tokens=1,
                                                               completion_tokens=2)))
        return _sse(chunks)

    stream = _mock_client(handler).completions.create(
        model="m", prompt=[1, 2], max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_body={"top_k": 5, "min_tokens": 1})
    chunks = list(stream)
    request = seen["request"]
    assert (request.prompts(), request.max_tokens, request.top_k, request.min_tokens) == (
        [[1, 2]], 5, 5, 1)
    assert request.include_usage
    assert [c.choices[0].text for c in chunks[:2]] == ["Hel", "lo"]
    assert [c.choices[0].finish_reason for c in chunks[:2]] == [None, "stop"]
    assert chunks[2].choices == [] and chunks[2].usage.total_tokens == 3


def test_openai_client_round_trip_chat_and_error():
    def handler(request: httpx.Request) -> httpx.Response:
        try:
            chat = ChatCompletionRequest.model_validate_json(request.content)
        except ValidationError as exc:
            message, param = validation_error_message(exc.errors())
            return httpx.Response(400, json=error_body(message, 400, param))
        response = ChatCompletionResponse(model="m", usage=UsageInfo(), choices=[
            ChatCompletionChoice(index=0, finish_reason="stop",
                                 message=ChatResponseMessage(content=chat.messages[0].text()))])
        return httpx.Response(200, json=response.model_dump())

    client = _mock_client(handler)
    reply = client.chat.completions.create(model="m", messages=CHAT, max_completion_tokens=4)
    assert reply.choices[0].message.content == "Hi"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=CHAT, temperature=-1)
    assert info.value.param == "temperature" and "temperature" in info.value.message


# ---- Logprobs ----

def _decode(token_id: int) -> str:
    return f"<{token_id}>"


def test_completion_logprobs_with_echoed_prompt():
    # Prompt [10, 11] (no logprob for its first token), then generated [12] whose entry lacks
    # decoded_token for one alternative and has a -inf one.
    token_ids = [10, 11, 12]
    logprobs = [
        None,
        {11: Logprob(-0.5, 1, "ab"), 13: Logprob(-1.5, 2, "c")},
        {12: Logprob(-2.0, 3, "xyz"), 11: Logprob(-0.1, 1, "ab"), 14: Logprob(-1.0, 2, None),
         15: Logprob(-math.inf, 4, "q")},
    ]
    out = completion_logprobs(token_ids, logprobs, num_top=1, decode=_decode,
                              initial_text_offset=5)
    assert out.tokens == ["<10>", "ab", "xyz"]
    assert out.token_logprobs == [None, -0.5, -2.0]
    assert out.top_logprobs == [None, {"ab": -0.5}, {"ab": -0.1, "xyz": -2.0}]
    assert out.text_offset == [5, 9, 11]
    wide = completion_logprobs(token_ids[2:], logprobs[2:], num_top=4, decode=_decode)
    assert wide.top_logprobs == [{"ab": -0.1, "<14>": -1.0, "xyz": -2.0, "q": MIN_LOGPROB}]
    assert list(wide.top_logprobs[0]) == ["ab", "<14>", "xyz", "q"]  # by rank
    zero = completion_logprobs([12], [{12: Logprob(-math.inf, 9, "z")}], 0, _decode)
    assert zero.token_logprobs == [MIN_LOGPROB] and zero.top_logprobs == [{"z": MIN_LOGPROB}]
    body = json.loads(CompletionResponse(model="m", usage=UsageInfo(), choices=[CompletionChoice(
        index=0, text="", logprobs=wide, finish_reason="stop")]).model_dump_json())
    assert Completion.model_validate(body).choices[0].logprobs.top_logprobs[0]["q"] == -9999.0


def test_chat_logprobs():
    logprobs = [{7: Logprob(-0.25, 1, "é")},
                {8: Logprob(-math.inf, 3, None), 7: Logprob(-0.5, 1, "é"),
                 9: Logprob(-1.0, 2, "b")}]
    out = chat_logprobs([7, 8], logprobs, num_top=2, decode=_decode)
    first, second = out.content
    assert (first.token, first.logprob, first.bytes) == ("é", -0.25, [0xC3, 0xA9])
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [("é", -0.25)]
    assert (second.token, second.logprob, second.bytes) == ("<8>", MIN_LOGPROB, list(b"<8>"))
    assert [(t.token, t.logprob) for t in second.top_logprobs] == [("é", -0.5), ("b", -1.0)]
    assert chat_logprobs([8], logprobs[1:], 0, _decode).content[0].top_logprobs == []
    body = ChatCompletionResponse(model="m", usage=UsageInfo(), choices=[ChatCompletionChoice(
        index=0, message=ChatResponseMessage(content="é"), logprobs=out,
        finish_reason="length")]).model_dump_json()
    parsed = ChatCompletion.model_validate_json(body).choices[0].logprobs.content
    assert parsed[1].logprob == -9999.0 and parsed[1].top_logprobs[1].token == "b"


def test_vllm_prompt_logprobs_clamps_and_keys_by_token_id():
    out = vllm_prompt_logprobs([None, {3: Logprob(-math.inf, 2, "a")}])
    body = json.loads(CompletionChoice(index=0, text="", prompt_logprobs=out).model_dump_json())
    assert body["prompt_logprobs"] == [
        None, {"3": {"logprob": MIN_LOGPROB, "rank": 2, "decoded_token": "a"}}]

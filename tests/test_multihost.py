"""Several hosts on one machine (jinfer.runner.multihost): two local processes of one CPU device
each, joined by jax.distributed (gloo collectives, the coordinator on loopback), run a tiny
random Llama (8 query and 2 KV heads) at tensor_parallel_size=2 over both, process 0 driving the
engine and process 1 following its device calls. Their greedy tokens, logprobs and prompt
logits over one workload (chunked prefill, prefix caching, n > 1 with copy-on-write, multi-step
decode with lookahead, preemption; then warm-up's synchronous calls) equal one process's at
TP=1, as do get_params (gathered from both) and update_weights (process 0's weights to both),
and process 1 exits cleanly when process 0 is done. A process count that differs from the
coordinator's is refused on both sides with both values; a follower killed mid-run makes
process 0 fail within the heartbeat timeout; bad arguments are refused before joining.

This file is also the processes' program: `python tests/test_multihost.py PORT NUM ID MODE OUT`.
Every subprocess has a timeout: a hang fails the test.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from jinfer import LLM, SamplingParams
from jinfer.model.config import ModelConfig
from jinfer.runner.warmup import greedy_rows, pad_block_items
from jinfer.testing import spread_params

CONFIG = ModelConfig(vocab_size=250, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=8, num_kv_heads=2, head_dim=8, max_position_embeddings=128)
# Six usable blocks of 8 tokens for two running sequences of up to 40 tokens: preemption.
ENGINE = dict(block_size=8, num_kv_blocks=7, max_model_len=40, max_num_seqs=2,
              max_num_batched_tokens=16, num_scheduler_steps=4, enable_compilation_cache=False)
PREFIX = [int(t) for t in np.random.default_rng(1).integers(3, 250, 16)]
PROMPTS = [PREFIX + [int(t) for t in np.random.default_rng(2 + i).integers(3, 250, 1 + 2 * i)]
           for i in range(4)]  # 17-23 tokens: two 16-token prefill chunks
GREEDY = dict(temperature=0, ignore_eos=True)
HEARTBEAT_S = 5       # the kill test: process 0 must fail within this (plus slack)
RUN_TIMEOUT_S = 240   # any subprocess: past this the test fails instead of hanging
SCRIPT = pathlib.Path(__file__).resolve()


def workload(llm: LLM) -> dict:
    """Tokens and logprobs of the workload, then one prompt's logits, then a synchronous step
    and decode steps on the pad block (warm-up's calls: `execute`, `execute_decode_steps`) in
    shapes the workload built."""
    params = [SamplingParams(max_tokens=10, **GREEDY),
              SamplingParams(max_tokens=8, n=2, **GREEDY),          # shared blocks, COW
              SamplingParams(max_tokens=9, **GREEDY),
              SamplingParams(max_tokens=12, **GREEDY)]
    outputs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    stats = llm.stats()
    logits = llm.prompt_logits(PROMPTS[3] + PROMPTS[0][:16])
    runner, compiles = llm.engine.runner, stats["num_compiles"]
    items = pad_block_items(1, 16, 16, ENGINE["block_size"])
    step = runner.execute(*runner.prepare([], items, greedy_rows(items), 0))[0].tokens
    items = pad_block_items(1, 17, 1, ENGINE["block_size"])
    steps = runner.execute_decode_steps(*runner.prepare(items, [], greedy_rows(items), 0), 3)
    new_programs = llm.stats()["num_compiles"] - compiles - 1  # 1: prompt logits
    weights = weights_round_trip(llm)
    return {**weights, "tokens": [[list(c.token_ids) for c in o.outputs] for o in outputs],
            "logprobs": [[c.cumulative_logprob for c in o.outputs] for o in outputs],
            "logits": logits.tolist(), "preemptions": stats["num_preemptions"],
            "pad_block": [step.tolist(), steps.tokens.tolist()],
            "new_programs": new_programs,
            "prefix_hit_rate": stats["prefix_cache_hit_rate"],
            "calls_ahead": stats["num_calls_ahead"], "whole": llm.engine.block_manager.is_whole()}


def weights_round_trip(llm: LLM) -> dict:
    """get_params, then update_weights with 1.5x the weights: a greedy completion with them,
    one after restoring the originals (the prefix cache dropped each time), and a checksum of
    what get_params gave (host arrays under several processes)."""
    import jax
    original = llm.get_params()
    checksum = float(sum(np.abs(np.asarray(w, np.float64)).sum()
                         for w in jax.tree.leaves(original)))
    greedy = SamplingParams(max_tokens=6, **GREEDY)
    completions = []
    for params in (jax.tree.map(lambda w: np.asarray(w) * 1.5, original), original):
        llm.update_weights(params)
        out = llm.generate(prompt_token_ids=PROMPTS[3:4], sampling_params=greedy,
                           use_tqdm=False)
        completions.append(list(out[0].outputs[0].token_ids))
    return {"params_checksum": checksum, "updated_tokens": completions}


# -- the processes' program --------------------------------------------------------------------

def worker(port: int, num_processes: int, process_id: int, mode: str, out: str) -> int:
    import jax
    from jinfer.runner import multihost

    jax.config.update("jax_default_matmul_precision", "highest")
    multihost.initialize(f"127.0.0.1:{port}", num_processes, process_id,
                         heartbeat_timeout_s=HEARTBEAT_S if mode == "kill" else 30,
                         init_timeout_s=60)
    llm = LLM.from_params(CONFIG, spread_params(CONFIG), tensor_parallel_size=jax.device_count(),
                          **ENGINE)
    if not multihost.is_leader():
        multihost.run_follower(llm)
        pathlib.Path(out).write_text("stopped")
        return 0
    if mode == "kill":  # keeps generating (one program) until the test kills process 1
        greedy = SamplingParams(max_tokens=1, **GREEDY)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=greedy, use_tqdm=False)
            pathlib.Path(out).touch()
        return 0
    result = workload(llm)
    multihost.stop_followers(llm)
    pathlib.Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                    sys.argv[5]))


# -- the tests ---------------------------------------------------------------------------------

import pytest  # noqa: E402  (the processes above do not need it)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Processes of one run of `worker`, their output in files (no pipe to fill up)."""

    def __init__(self, tmp: pathlib.Path, counts: list[int], mode: str):
        port = free_port()
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
               "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
               "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}"}  # loopback only
        self.tmp, self.procs, self.logs = tmp, [], []
        for pid, count in enumerate(counts):
            log = open(tmp / f"{mode}{pid}.log", "w")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, str(SCRIPT), str(port), str(count), str(pid), mode,
                 str(self.out(pid))], env=env, stdout=log, stderr=subprocess.STDOUT))

    def out(self, pid: int) -> pathlib.Path:
        return self.tmp / f"out{pid}"

    def wait(self, pid: int, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.procs[pid].wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"process {pid} did not finish within {timeout} s:\n{self.log(pid)}")

    def log(self, pid: int) -> str:
        self.logs[pid].flush()
        return (self.tmp / pathlib.Path(self.logs[pid].name).name).read_text()[-6000:]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """(process 0's results of the workload on two processes, TP=2 over both; one process's
    at TP=1, computed here while they run). Both processes must exit 0."""
    tmp = tmp_path_factory.mktemp("multihost")
    with Processes(tmp, [2, 2], "workload") as run:
        want = workload(LLM.from_params(CONFIG, spread_params(CONFIG), **ENGINE))
        for pid in (0, 1):
            assert run.wait(pid) == 0, f"process {pid} failed:\n{run.log(pid)}"
        assert run.out(1).read_text() == "stopped"
        return json.loads(run.out(0).read_text()), want


def test_two_processes_give_one_process_tokens_logprobs_and_logits(two_process_run):
    got, want = two_process_run
    assert got["tokens"] == want["tokens"]
    assert got["pad_block"] == want["pad_block"] and got["new_programs"] == 0
    np.testing.assert_allclose(sum(got["logprobs"], []), sum(want["logprobs"], []), atol=1e-4)
    logits, ref = np.array(got["logits"]), np.array(want["logits"])
    assert np.abs(logits - ref).max() / np.abs(ref).max() < 1e-5
    # the workload took the engine's paths: preemption, prefix cache, lookahead
    assert got["whole"] and got["preemptions"] > 0 and got["prefix_hit_rate"] > 0
    assert got["calls_ahead"] > 0
    # get_params gathers every process's shards; update_weights reaches every process
    assert got["params_checksum"] == pytest.approx(want["params_checksum"], rel=1e-6)
    assert got["updated_tokens"] == want["updated_tokens"]
    assert got["updated_tokens"][0] != got["updated_tokens"][1]
    assert got["updated_tokens"][1] == got["tokens"][3][0][:6]  # the originals restored


def test_a_process_count_unlike_the_coordinators_is_refused(tmp_path):
    with Processes(tmp_path, [2, 3], "mismatch") as run:
        for pid in (0, 1):
            assert run.wait(pid, 120) != 0
            log = run.log(pid)
            assert "num_processes=2" in log and "num_processes=3" in log, log
            assert "start every process with the same --num-processes" in log, log


def test_a_killed_follower_fails_process_0_within_the_heartbeat_timeout(tmp_path):
    with Processes(tmp_path, [2, 2], "kill") as run:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not run.out(0).exists():  # process 0 has generated once: both are running
            assert run.procs[0].poll() is None, run.log(0)
            assert time.monotonic() < deadline, run.log(0)
            time.sleep(0.2)
        run.procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        status = run.wait(0, HEARTBEAT_S + 60)
        elapsed = time.monotonic() - killed
        log = run.log(0)
        assert status != 0, log
        assert elapsed < HEARTBEAT_S + 30, (elapsed, log)
        assert ("stopped sending heartbeats" in log  # jax.distributed's heartbeat
                or "a device call across the 2 processes failed" in log), log  # a collective


def test_bad_arguments_are_refused_before_joining():
    import pickle

    from jinfer.runner import multihost
    from jinfer.server import cli

    with pytest.raises(ValueError, match=r"process_id must be an integer from 0 to "
                                         r"num_processes - 1 = 1, got 2"):
        multihost.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="coordinator_address must be HOST:PORT"):
        multihost.initialize("127.0.0.1", 2, 0)
    assert cli.main(["serve", "--num-processes", "2", "--process-id", "1"]) == 2  # no address
    # a call's pickle may carry NumPy arrays and step inputs only
    assert multihost._loads(multihost._dumps(("copy_blocks", [(1, 2)]))) == ("copy_blocks",
                                                                              [(1, 2)])
    with pytest.raises(pickle.UnpicklingError, match="may not carry"):
        multihost._loads(pickle.dumps(os.system))

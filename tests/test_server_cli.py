"""`jinfer serve`'s command line and its warm-up."""

from __future__ import annotations

import pytest

from jinfer import LLM
from jinfer.server import cli


def test_serve_flags_follow_vllm_and_map_to_engine_options():
    parser = cli.add_server_args(cli.argparse.ArgumentParser())
    args = parser.parse_args(["m", "--max-model-len", "4096", "--max-num-seqs", "8",
                              "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.8",
                              "--block-size", "32", "--load-format", "dummy"])
    assert args.host == "127.0.0.1" and args.port == 8000  # loopback by default
    assert cli.engine_kwargs(args) == {
        "dtype": "auto", "load_format": "dummy", "max_num_seqs": 8,
        "max_num_batched_tokens": 512, "gpu_memory_utilization": 0.8, "block_size": 32,
        "enable_prefix_caching": False, "num_scheduler_steps": 8, "seed": 0,
        "max_model_len": 4096}


def test_the_console_script_takes_serve():
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    with pytest.raises(SystemExit):
        cli.main(["generate"])  # not a command


def test_the_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("JINFER_API_KEY", "from-env")
    args = cli.add_server_args(cli.argparse.ArgumentParser()).parse_args([])
    assert args.api_key == "from-env" and args.model is None


def test_warm_up_readies_batch_one_and_leaves_the_rest_for_idle_time(tiny_model_dir):
    """Before ready: the prefills and the one-sequence decodes; the other batches (and, with
    no program cap, as on a GPU, a burst of mixed requests) come back as idle work, which
    compiles them when run; the pool stays whole."""
    from jinfer.runner.warmup import warmup_shapes
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=128, max_num_seqs=2,
              max_num_batched_tokens=16, enable_compilation_cache=False)
    runner = llm.engine.runner
    shapes = warmup_shapes(runner, 64)
    first = sum(s.num_programs for s in shapes if s.rows <= 1)
    later = cli.warm_up(llm, max_context=64)  # capped (the CPU's budget): no burst
    assert runner.num_compiles == first
    assert len(later) == sum(s.rows > 1 for s in shapes) + 1  # + the closing log line
    for work in later:
        work()
    assert runner.num_compiles == sum(s.num_programs for s in shapes)
    runner.programs.max_programs = None  # as on a GPU
    later = cli.warm_up(llm, max_context=64)
    before = runner.num_compiles
    for work in later:
        work()
    assert runner.num_compiles > before  # the burst's mixed steps
    assert llm.engine.block_manager.is_whole()


def test_server_claims_the_gpu_unless_told_otherwise():
    """`jinfer serve` lets JAX take 95% of each GPU (not JAX's default 75%), so
    --gpu-memory-utilization is nearly a fraction of the device as in vLLM; a fraction the
    user set is kept."""
    environ = {}
    cli.claim_device_memory(environ)
    assert environ == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}
    for name in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION"):
        environ = {name: "0.5"}
        cli.claim_device_memory(environ)
        assert environ == {name: "0.5"}

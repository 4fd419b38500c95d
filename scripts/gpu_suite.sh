#!/usr/bin/env bash
# The GPU half of CI in one command: the kernel tests (Triton lowering), the engine tests on the
# Pallas backend, then the benchmarks, each writing its log / JSON under OUT_DIR.
#
#   bash scripts/gpu_suite.sh OUT_DIR [tests|tests-kernels|tests-engine|bench|all]
#
# tests-kernels / tests-engine: one half of the tests each (the kernels against their
# references; the engine, models and kernels in the step), for runs of limited length. Never
# wrap a `pytest -n` in `timeout`: it kills the controller and leaves the workers on the GPU.
# Needs a GPU build of JAX; pytest-xdist speeds the tests up when installed. The Triton-language
# backend runs where jax-triton imports (pip install "jinfer[triton]"), and is skipped otherwise.
set -u
out=${1:?usage: gpu_suite.sh OUT_DIR [tests|tests-kernels|tests-engine|bench|all]}
what=${2:-all}
mkdir -p "$out"
status=0
workers=()
python -c "import xdist" 2>/dev/null && workers=(-n 6)

kernel_files=(tests/test_paged_decode.py tests/test_fused_decode.py tests/test_paged_prefill.py
              tests/test_paged_prefill_mgpu.py tests/test_kv_write.py tests/test_triton_decode.py
              tests/test_decode_layer_mgpu.py tests/test_grouped_matmul.py
              tests/test_grouped_matmul_mgpu.py)
engine_files=(tests/test_attention.py tests/test_engine.py tests/test_lookahead.py
              tests/test_llm_engine.py tests/test_scheduler.py tests/test_batch_invariance.py
              tests/test_beam_search.py tests/test_host_transfer.py tests/test_layer_kernel.py
              tests/test_families.py tests/test_moe.py tests/test_decoder.py
              tests/test_tensor_parallel.py tests/test_sampler.py)
case $what in
  tests|all) parts=(kernels engine) ;;
  tests-kernels) parts=(kernels) ;;
  tests-engine) parts=(engine) ;;
  *) parts=() ;;
esac
for part in "${parts[@]}"; do
  if [[ $part == kernels ]]; then files=("${kernel_files[@]}"); else files=("${engine_files[@]}"); fi
  python -m pytest -q "${workers[@]}" -rfEs -m "not big_memory" "${files[@]}" \
      > "$out/pytest_gpu_$part.log" 2>&1 || status=1
  tail -n 25 "$out/pytest_gpu_$part.log"
  # Tests that need several GiB (big_memory) or size the KV pool from free device memory
  # (test_memory) run alone: beside other workers they would take the memory those need.
  python -m pytest -q -rfEs -m big_memory "${files[@]}" \
      > "$out/pytest_gpu_alone_$part.log" 2>&1
  rc=$?
  [[ $rc == 0 || $rc == 5 ]] || status=1  # 5: no big_memory test among these files
  if [[ $part == engine ]]; then
    python -m pytest -q -rfEs tests/test_memory.py >> "$out/pytest_gpu_alone_$part.log" 2>&1 \
        || status=1
  fi
  tail -n 10 "$out/pytest_gpu_alone_$part.log"
done

if [[ $what == bench || $what == all ]]; then
  python scripts/bench_attention.py --out "$out/bench_attention.json" \
      > "$out/bench_attention.md" 2>&1 || status=1
  python scripts/bench_prefill.py --out "$out/bench_prefill.json" \
      > "$out/bench_prefill.md" 2>&1 || status=1
  python scripts/bench_kv_write.py --out "$out/bench_kv_write.json" \
      > "$out/bench_kv_write.md" 2>&1 || status=1
  python scripts/bench_latency.py --out "$out/bench_latency.json" \
      > "$out/bench_latency.md" 2>&1 || status=1
  python scripts/bench_latency.py --skip-hf --no-layer-kernel \
      --out "$out/bench_latency_xla_layers.json" > "$out/bench_latency_xla_layers.md" 2>&1 \
      || status=1
  python scripts/bench_decode_steps.py --out "$out/bench_decode_steps.json" \
      > "$out/bench_decode_steps.md" 2>&1 || status=1
  python scripts/bench_throughput.py --quick --out "$out/bench_throughput.json" \
      > "$out/bench_throughput.md" 2>&1 || status=1
  python scripts/bench_startup.py --model-shape smollm2-135m --out "$out/bench_startup.json" \
      > "$out/bench_startup.md" 2>&1 || status=1
  python scripts/bench_startup.py --serve --model-shape llama3-1b --dtype bfloat16 \
      --out "$out/bench_startup_serve.json" > "$out/bench_startup_serve.md" 2>&1 || status=1
  python scripts/bench_moe.py --out "$out/bench_moe.json" > "$out/bench_moe.md" 2>&1 || status=1
  python scripts/bench_moe.py --routing --tokens 1 2 8 --out "$out/bench_moe_routing.json" \
      > "$out/bench_moe_routing.md" 2>&1 || status=1
  python scripts/bench_layer_mgpu.py --out "$out/bench_layer_mgpu.json" \
      > "$out/bench_layer_mgpu.md" 2>&1 || status=1
  python scripts/profile_decode.py --model-shape llama3-1b --batch 1 \
      --out "$out/profile_b1.json" > "$out/profile_b1.md" 2>&1 || status=1
  for backend in pallas reference; do
    python scripts/bench_step.py --dtype bfloat16 --batch 1 16 64 --context 512 \
        --attention-backend "$backend" --out "$out/bench_step_$backend.json" \
        > "$out/bench_step_$backend.log" 2>&1 || status=1
  done
  tail -n 40 "$out"/bench_*.md "$out"/profile_b1.md
fi
exit $status

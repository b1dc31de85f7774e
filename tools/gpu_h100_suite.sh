#!/usr/bin/env bash
# The H100 measurements owed to docs/benchmarks.md (see its "Not measured" section), in one or two device sessions (each piece time-capped so
# one overrun cannot lose the rest). Usage on the GPU machine, from the repo root: bash tools/gpu_h100_suite.sh OUTDIR
set -u
out="${1:-/tmp/effdist-gpu}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
log="$out/suite.log"
run() { local cap=$1; shift; echo "=== $* (cap ${cap}s)" | tee -a "$log"; timeout "$cap" "$@" 2>&1 | grep -v -i warn | tee -a "$log" | tail -12; }

# Issue #9: dense step before/after the fused kernels (all three presets), then one lever at a time on llama-1b.
run 200 python3 tools/bench_train.py --steps 5 --warmup 2 --json "$out/bench_train.json" \
  --variant "unfused=train.fused_kernels=false" --variant "fused=" \
  --variant "rmsnorm=train.fused_kernels=[rmsnorm]" --variant "rope=train.fused_kernels=[rope]" \
  --variant "swiglu=train.fused_kernels=[swiglu]" --variant "loss=train.fused_kernels=[loss]" --variant-models llama-1b
# Issues #5/#6: loss parity on real English text, llama-125m, same data, seed and tokens.
run 230 python3 tools/loss_parity.py --config configs/llama-125m.yaml --steps 80 --window 10 \
  --set train.global_batch=16 --set train.micro_batch=16 --set optim.warmup_steps=10 --set logging.tensorboard=false \
  --set checkpoint.interval=0 --set data.cache_dir=/tmp/effdist-data \
  --variant dense= \
  --variant "epas=epas.enabled=true,epas.start_step=10,epas.interval=6,epas.group_size=1,epas.final_region=9" \
  --variant "moc=ffn.kind=moc" --variant "topk=ffn.kind=topk" --variant "relu2=ffn.kind=relu2" \
  --variant "elas=ffn.kind=elas,ffn.elas_warmup_steps=20" --baseline elas=relu2 \
  --out-dir /tmp/effdist-parity --png "$out/loss_parity_125m.png" --json "$out/loss_parity_125m.json"
# Issue #8: training-step stall of a checkpoint save, sync vs async, llama-1b.
run 120 python3 tools/bench_checkpoint.py --model llama-1b --json "$out/bench_checkpoint.json"
# Issue #9 detail: each kernel against the torch code it replaces.
run 90 python3 tools/bench_kernels.py --json "$out/bench_kernels.json"
# Issue #7: decode throughput and KV-cache bytes vs region 0 (LLaMA-1B shape, batch 1/8/32, context 512/2048).
run 240 python3 tools/bench_decode.py --json "$out/bench_decode.json"
# GPU-only correctness tests (kernels, FFNs, generation).
run 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_dense.py tests/test_ffn_gpu.py tests/test_generate.py
exit 0

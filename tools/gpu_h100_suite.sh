#!/usr/bin/env bash
# The 1xH100 measurements behind docs/benchmarks.md, in three parts that each fit one 10-minute device call
# (every piece is time-capped so one overrun cannot lose the rest). On the GPU machine, from the repo root:
#
#   bash tools/gpu_h100_suite.sh train  OUTDIR   # dense step before/after each lever, EPAS throughput, checkpoint stall
#   bash tools/gpu_h100_suite.sh parity OUTDIR   # 125M loss parity on real English text (EPAS and every FFN)
#   bash tools/gpu_h100_suite.sh rest   OUTDIR   # decode, 350M end-to-end per FFN, DeepSpeed, kernels, GPU tests
#   bash tools/gpu_h100_suite.sh fp8    OUTDIR   # FP8 linears: GPU numerics tests, llama-1b bf16 vs FP8 (needs torchao)
#   bash tools/gpu_h100_suite.sh fp8_parity OUTDIR  # llama-125m loss, bf16 vs FP8, English corpus
#   bash tools/gpu_h100_suite.sh fp8_profile OUTDIR # llama-1b bf16 vs FP8 kernel profile, micro-batch 16, torchtitan
#   bash tools/gpu_h100_suite.sh fp8_titan OUTDIR   # llama-1b effdist bf16 / FP8 and torchtitan float8, one call
#   bash tools/gpu_h100_suite.sh fp8_7b OUTDIR      # llama-7b bf16 vs FP8, full recompute (needs an H200)
#   bash tools/gpu_h100_suite.sh h200_cal OUTDIR    # effdist calibrate, llama-1b and llama-7b (the shipped H200 tables)
#   bash tools/gpu_h100_suite.sh sparse24_table OUTDIR  # ELAS fc2 sparse-vs-dense GEMM table of this card (#23)
#   bash tools/gpu_h100_suite.sh ffn_memory OUTDIR  # what a training forward keeps alive per FFN kind, and where (#23)
#   bash tools/gpu_h100_suite.sh ffn_train OUTDIR   # FFN kinds end to end at llama-350m and llama-1b, then the probe (#23)
#
# Needs megatron-core (and, for the DeepSpeed rows, deepspeed + hjson + pydantic) importable, and the English
# corpus (docs/data.md) under data/english for the parity part.
set -u
part="${1:?usage: gpu_h100_suite.sh train|parity|rest|followup|decode32|epas3|isolated|final|transition|transition2|epas_mbs8|qk_grad_sum|frozen_rows|seeds|deepspeed2|wgrad|grad_sum|parity350|clip|clip2|region_scale|parity1b_long|parity125m_long|fp8|fp8_parity|fp8_profile|fp8_titan|h200_7b_cal|fp8_7b|h200_cal|fp8_quality125|fp8_quality1b|sparse24_table|ffn_memory|ffn_train|topk_radix|topk_radix2|mask_chunks|mask_chunks2|select4|decode_greedy|ffn_parity|plan_ffn|quality1b|quality125m|continual1b|continual1b_item2|tests OUTDIR [ARGS]}"
out="${2:-/tmp/effdist-gpu}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
log="$out/suite-$part.log"
run() { local cap=$1; shift; echo "=== $* (cap ${cap}s)" | tee -a "$log"; timeout "$cap" "$@" 2>&1 | grep -v -i warn | tee -a "$log" | tail -14; }
# Token files too large to carry raw travel xz-compressed (docs/data.md, "Carrying a corpus to a GPU machine"),
# several of them in one data/*/carry.tar where a call would need more than its 8 carried paths: unpack each
# carry.tar into its directory (files already there kept), then each data/*/*.bin.xz that has no .bin beside it.
for bundle in data/*/carry.tar; do
  [ -e "$bundle" ] && { echo "unpacking $bundle"; tar -xf "$bundle" -C "$(dirname "$bundle")" --skip-old-files; }
done
for packed in data/*/*.bin.xz; do
  [ -e "$packed" ] && [ ! -e "${packed%.xz}" ] && { echo "unpacking $packed"; xz -d -k -T0 "$packed"; }
done
# llama-125m loss parity on the English corpus: same data order, seed, batch (16 x 2048), LR and logging for
# every run. Usage: parity_125m CAP STEPS WINDOW NAME --variant ... [--baseline ...]
parity_125m() {
  local cap=$1 steps=$2 window=$3 name=$4; shift 4
  parity_model 125m 16 "$cap" "$steps" "$window" "$name" "$@"
}
# The same for another preset. Usage: parity_model SIZE MICRO_BATCH CAP STEPS WINDOW NAME --variant ...
parity_model() {
  local size=$1 micro=$2 cap=$3 steps=$4 window=$5 name=$6; shift 6
  run "$cap" python3 tools/loss_parity.py --config "configs/llama-$size.yaml" --steps "$steps" --window "$window" \
    --timeout 200 --set train.global_batch=16 --set "train.micro_batch=$micro" --set optim.warmup_steps=25 \
    --set logging.interval=1 --set logging.tensorboard=false --set checkpoint.interval=0 \
    --set data.cache_dir=/tmp/effdist-data "$@" --out-dir "/tmp/effdist-parity-$size-$name" \
    --png "$out/loss_parity_${size}_$name.png" --json "$out/loss_parity_${size}_$name.json"
}

# One run of issue #25 on the large corpus's subset, scored held out. Usage: quality_run SIZE MICRO_BATCH STEPS
# dense|epas SEED ",extra,overrides" [NAME_PREFIX [TRAIN_SUBSET]] -> $out/quality_SIZE_[PREFIX_]VARIANT_sSEED.json
# (TRAIN_SUBSET: a dataset prefix under data/english-large, train36 unless given)
# Run directories are per size: a 125m run after a 1b run of the same name and seed on a warm machine would meet
# the 1b run directory, and effdist refuses to start over a run it was not told to resume or move aside.
quality_run() {
  local size=$1 micro=$2 steps=$3 variant=$4 seed=$5 extra=$6 prefix=${7:+$7_} train=${8:-train36}
  local name="${prefix}${variant}_s$seed" large=data/english-large
  run 590 python3 tools/loss_parity.py --config "configs/llama-$size.yaml" --steps "$steps" --window 20 \
    --timeout 560 --set train.global_batch=16 --set "train.micro_batch=$micro" --set optim.warmup_steps=50 \
    --set logging.interval=1 --set logging.tensorboard=false --set checkpoint.interval=0 \
    --set data.cache_dir=/tmp/effdist-data --set "data.paths=[$large/$train]" --set "data.tokenizer=$large/tokenizer.json" \
    --eval-data "$large/heldout" --eval-windows 64 --out-dir "/tmp/effdist-quality/$size" \
    --variant "$name=train.seed=$seed$extra" --json "$out/quality_${size}_$name.json"
}

# Issue #25 item 5: a dense llama-1b run directory exported to Hugging Face format and converted back (the path a
# user's TinyLlama takes), then continued STEPS steps dense and with EPAS growing to 12 = 3L/4 (one layer per 5
# steps from step 10), seed 1, each scored held out. Usage: continue_dense_1b RUN_DIR TAG STEPS NAME_PREFIX
# [TRAIN_SUBSET] (the HF copy and the converted model go to /tmp/effdist-quality/hfTAG and initTAG).
continue_dense_1b() {
  local src=$1 tag=$2 steps=$3 prefix=$4 train=${5:-train36}
  local hf=/tmp/effdist-quality/hf$tag init=/tmp/effdist-quality/init$tag
  run 60 python3 -m effdist.cli convert effdist-to-hf --checkpoint "$src" --out "$hf" --overwrite
  run 60 python3 -m effdist.cli convert hf-to-effdist --hf-dir "$hf" --format dist --config configs/llama-1b.yaml \
    --out "$init" --overwrite
  quality_run 1b 8 "$steps" dense 1 ",checkpoint.init_from=$init" "$prefix" "$train"
  quality_run 1b 8 "$steps" epas 1 ",checkpoint.init_from=$init,epas.final_region=12,epas.enabled=true,\
epas.group_size=1,epas.start_step=10,epas.interval=5,epas.transition_steps=5" "$prefix" "$train"
}

# The early EPAS schedule of the third to fifth sessions (one layer per 5 steps from step 25, transitions of 5
# steps); a part adds its epas.final_region.
early="epas.enabled=true,epas.group_size=1,epas.start_step=25,epas.interval=5,epas.transition_steps=5"

case "$part" in
train)
  # Issue #9: the full dense step before/after the fused kernels (all presets), then one lever at a time on llama-1b.
  run 250 python3 tools/bench_train.py --steps 5 --warmup 2 --json "$out/bench_train.json" \
    --variant "unfused=train.fused_kernels=false" --variant "fused=" \
    --variant "rmsnorm=train.fused_kernels=[rmsnorm]" --variant "rope=train.fused_kernels=[rope]" \
    --variant "swiglu=train.fused_kernels=[swiglu]" --variant "loss=train.fused_kernels=[loss]" \
    --variant "fused_mbs8=train.micro_batch=8;train.global_batch=16" --variant-models llama-1b
  # Issue #5: EPAS tokens/s at regions 0, L/2, 3L/4 against the dense model, with the fused kernels on.
  run 180 python3 tools/bench_epas.py --rounds 3 --json "$out/bench_epas.json"
  # Issue #8: training-step stall of a checkpoint save, sync vs async, llama-1b.
  run 130 python3 tools/bench_checkpoint.py --model llama-1b --json "$out/bench_checkpoint.json"
  ;;
parity)
  # Issues #5/#6: loss after the same tokens on real English text, llama-125m, same data order and seed.
  # EPAS grows one layer every 15 steps from step 50 to 3L/4 = 9 layers (reached at step 170).
  parity_125m 560 250 20 all --variant dense= \
    --variant "epas=epas.enabled=true,epas.start_step=50,epas.interval=15,epas.group_size=1,epas.final_region=9" \
    --variant "moc=ffn.kind=moc" --variant "topk=ffn.kind=topk" --variant "relu2=ffn.kind=relu2" \
    --variant "elas=ffn.kind=elas,ffn.elas_warmup_steps=50" --baseline elas=relu2
  ;;
rest)
  # Issue #7: decode throughput and KV-cache bytes vs region 0 (LLaMA-1B shape, batch 1/8/32, context 512/2048).
  run 200 python3 tools/bench_decode.py --json "$out/bench_decode.json"
  # Issue #6: end-to-end llama-350m step with each FFN against dense SwiGLU (and ELAS against ReLU^2), same run.
  run 130 python3 tools/bench_train.py --models llama-350m --steps 5 --warmup 2 --json "$out/bench_train_ffn.json" \
    --variant "swiglu=" --variant "relu2=ffn.kind=relu2" --variant "moc=ffn.kind=moc" --variant "topk=ffn.kind=topk" \
    --variant "elas=ffn.kind=elas;ffn.elas_warmup_steps=0"
  # Issue #10: llama-1b under DeepSpeed ZeRO-2/3 (+CPU offload) against the default engine, one GPU.
  run 200 python3 tools/bench_train.py --models llama-1b --steps 3 --warmup 2 --json "$out/bench_deepspeed.json" \
    --variant "default=" --variant "zero2=train.engine=deepspeed;deepspeed.zero_stage=2" \
    --variant "zero3=train.engine=deepspeed;deepspeed.zero_stage=3" \
    --variant "zero3_offload=train.engine=deepspeed;deepspeed.zero_stage=3;deepspeed.offload_optimizer=true;deepspeed.offload_params=true"
  # Issue #9 detail: each kernel against the torch code it replaces.
  run 60 python3 tools/bench_kernels.py --json "$out/bench_kernels.json"
  # GPU-only correctness tests (kernels, FFNs, generation), with what time is left.
  run 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_dense.py tests/test_ffn_gpu.py tests/test_generate.py
  ;;
followup)
  # Issue #9: llama-125m/350m with the fused kernels (the train part ran every lever on llama-1b only).
  run 110 python3 tools/bench_train.py --models llama-125m,llama-350m --steps 5 --warmup 2 \
    --json "$out/bench_train_small.json" --variant "fused=" --variant "fused_mbs16=train.micro_batch=16;train.global_batch=32" \
    --variant-models llama-350m
  # Issue #5: EPAS on llama-1b again, with a per-kernel profile of each region against region 0.
  run 150 python3 tools/bench_epas.py --models llama-1b --rounds 5 --profile 3 --json "$out/bench_epas_profile.json"
  # Issue #5: a longer loss-parity run, EPAS switched on after the first fast drop of the loss (step 250, one
  # layer every 25 steps, 3L/4 from step 450), then 250 steps at the full region.
  parity_125m 260 700 50 epas_long --variant dense= \
    --variant "epas=epas.enabled=true,epas.start_step=250,epas.interval=25,epas.group_size=1,epas.final_region=9"
  run 70 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_dense.py
  ;;
decode32)
  # Issue #7 at batch 32 (the "rest" part's default sweep ran out of its time cap after batch 8).
  run 240 python3 tools/bench_decode.py --batches 32 --contexts 2048,512 --json "$out/bench_decode_b32.json"
  # Issue #5: EPAS again after the sharing path's gradient fixes, with the per-kernel profile.
  run 240 python3 tools/bench_epas.py --models llama-1b,llama-350m --rounds 4 --profile 3 --json "$out/bench_epas_v2.json"
  ;;
epas3)
  # Issue #5: EPAS after the contiguous Q/K packing (no per-layer copies in front of the attention kernels).
  run 260 python3 tools/bench_epas.py --models llama-1b,llama-350m --rounds 4 --profile 3 --json "$out/bench_epas_v3.json"
  run 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_dense.py tests/test_generate.py
  ;;
isolated)
  # Peak memory needs one process per variant: in one process, later variants' peaks included memory that
  # earlier ones left allocated (llama-1b levers rose 34 -> 70 GiB in run order). Throughput and peaks again:
  # issue #9 levers (llama-1b), issue #6 FFNs end to end (llama-350m), issue #10 DeepSpeed (llama-1b).
  run 200 python3 tools/bench_train.py --isolate --models llama-1b --steps 5 --warmup 2 --json "$out/bench_train_1b_isolated.json" \
    --variant "unfused=train.fused_kernels=false" --variant "fused=" \
    --variant "rmsnorm=train.fused_kernels=[rmsnorm]" --variant "rope=train.fused_kernels=[rope]" \
    --variant "swiglu=train.fused_kernels=[swiglu]" --variant "loss=train.fused_kernels=[loss]" \
    --variant "fused_mbs8=train.micro_batch=8;train.global_batch=16"
  run 130 python3 tools/bench_train.py --isolate --models llama-350m --steps 5 --warmup 2 --json "$out/bench_train_ffn_isolated.json" \
    --variant "swiglu=" --variant "relu2=ffn.kind=relu2" --variant "moc=ffn.kind=moc" --variant "topk=ffn.kind=topk" \
    --variant "elas=ffn.kind=elas;ffn.elas_warmup_steps=0"
  run 190 python3 tools/bench_train.py --isolate --models llama-1b --steps 3 --warmup 2 --json "$out/bench_deepspeed_isolated.json" \
    --variant "default=" --variant "zero2=train.engine=deepspeed;deepspeed.zero_stage=2" \
    --variant "zero3=train.engine=deepspeed;deepspeed.zero_stage=3" \
    --variant "zero3_offload=train.engine=deepspeed;deepspeed.zero_stage=3;deepspeed.offload_optimizer=true;deepspeed.offload_params=true"
  ;;
final)
  # Issue #5: EPAS after the last sharing-path copies were removed; then GPU kernel tests after the kernel
  # clean-up; then a late EPAS schedule on 125M (sharing from step 400 of 700, 3L/4 from step 600).
  run 120 python3 tools/bench_epas.py --models llama-1b,llama-350m --rounds 4 --json "$out/bench_epas_v4.json"
  run 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ffn_gpu.py tests/test_kernels_dense.py
  parity_125m 220 700 50 epas_late --variant dense= \
    --variant "epas_late=epas.enabled=true,epas.start_step=400,epas.interval=25,epas.group_size=1,epas.final_region=9"
  ;;
transition)
  # Issue #5: EPAS throughput after the fp32 gradient norm, then which schedule keeps 125M loss closest to dense:
  # the hard switch (as before), transitions of 15/30 steps (epas.transition_steps), an early fast schedule,
  # the final region from step 0 (no switch at all), and L/2 for reference.
  run 130 python3 tools/bench_epas.py --models llama-1b --rounds 4 --json "$out/bench_epas_v5.json"
  e="epas.enabled=true,epas.group_size=1"
  parity_125m 420 250 20 transition --variant dense= \
    --variant "hard=$e,epas.start_step=50,epas.interval=15,epas.final_region=9" \
    --variant "t15=$e,epas.start_step=50,epas.interval=15,epas.final_region=9,epas.transition_steps=15" \
    --variant "t30=$e,epas.start_step=50,epas.interval=15,epas.final_region=9,epas.transition_steps=30" \
    --variant "early=$e,epas.start_step=25,epas.interval=5,epas.final_region=9,epas.transition_steps=5" \
    --variant "fixed0=$e,epas.mode=fixed,epas.start_step=0,epas.final_region=9" \
    --variant "half=$e,epas.start_step=50,epas.interval=15,epas.final_region=6,epas.transition_steps=15"
  ;;
transition2)
  # Issue #5, after `transition`: the early schedule (sharing from step 25, one layer per 5 steps, 5-step
  # transitions) came closest to dense. Around it, with a second dense run for the run-to-run spread, then
  # the early schedule over 700 steps (22.9M tokens).
  e="epas.enabled=true,epas.group_size=1,epas.final_region=9"
  parity_125m 330 250 20 early --variant dense= --variant dense2= \
    --variant "early=$e,epas.start_step=25,epas.interval=5,epas.transition_steps=5" \
    --variant "early_t10=$e,epas.start_step=25,epas.interval=5,epas.transition_steps=10" \
    --variant "start15=$e,epas.start_step=15,epas.interval=5,epas.transition_steps=5" \
    --variant "every3=$e,epas.start_step=25,epas.interval=3,epas.transition_steps=6" \
    --baseline dense2=dense
  parity_125m 230 700 50 early_700 --variant dense= \
    --variant "early=$e,epas.start_step=25,epas.interval=5,epas.transition_steps=5"
  ;;
epas_mbs8)
  # Issue #5 at the presets' micro batch (llama-1b 8, llama-350m 8), with the per-kernel profile on llama-1b;
  # then the dense llama-1b preset alone (the fp32 gradient norm's effect on the trunk's step).
  run 200 python3 tools/bench_epas.py --models llama-1b --rounds 4 --profile 3 --json "$out/bench_epas_1b_mbs8.json"
  run 120 python3 tools/bench_epas.py --models llama-350m --rounds 4 --json "$out/bench_epas_350m_mbs8.json"
  run 120 python3 tools/bench_train.py --isolate --models llama-1b --steps 5 --warmup 2 \
    --json "$out/bench_train_1b_gradnorm.json" --variant "fused="
  ;;
qk_grad_sum)
  # Issue #5: after the packed Q/K gradient is built once per run of sharing layers (in place), llama-1b and
  # llama-350m at the presets' micro batch, profile on llama-1b; then the GPU tests.
  run 230 python3 tools/bench_epas.py --models llama-1b --rounds 6 --profile 2 --json "$out/bench_epas_1b_gradsum.json"
  run 110 python3 tools/bench_epas.py --models llama-350m --rounds 5 --json "$out/bench_epas_350m_gradsum.json"
  run 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_dense.py tests/test_generate.py tests/test_ffn_gpu.py
  ;;
frozen_rows)
  # Issue #5: after MasterWeightAdamW leaves the sharing layers' Wq/Wk rows alone (no per-step restore, less
  # AdamW work): llama-1b (profiled) and llama-350m at the presets' micro batch.
  run 230 python3 tools/bench_epas.py --models llama-1b --rounds 6 --profile 2 --json "$out/bench_epas_1b_frozen.json"
  run 110 python3 tools/bench_epas.py --models llama-350m --rounds 5 --json "$out/bench_epas_350m_frozen.json"
  ;;
seeds)
  # Issue #5: the spread behind single parity runs. Dense and the early EPAS schedule (to 9 of 12 layers) with
  # three model seeds each, 250 steps, paired by seed.
  e="$early,epas.final_region=9"
  parity_125m 500 250 20 seeds --variant "dense_s1=train.seed=1" --variant "early_s1=train.seed=1,$e" \
    --variant "dense_s2=train.seed=2" --variant "early_s2=train.seed=2,$e" \
    --variant "dense_s3=train.seed=3" --variant "early_s3=train.seed=3,$e" \
    --baseline early_s1=dense_s1 --baseline early_s2=dense_s2 --baseline early_s3=dense_s3 \
    --baseline dense_s2=dense_s1 --baseline dense_s3=dense_s1
  ;;
deepspeed2)
  # Issue #10 leftover, on 2 GPUs (nvidia-h200-x2): llama-1b data-parallel, the default engine against DeepSpeed
  # ZeRO-2/3, one torchrun per variant (each peak its own), global batch 8 = one microbatch of 4 per rank.
  for v in "default=" "zero2=train.engine=deepspeed;deepspeed.zero_stage=2" "zero3=train.engine=deepspeed;deepspeed.zero_stage=3"; do
    run 170 torchrun --standalone --nproc_per_node 2 tools/bench_train.py --models llama-1b --steps 5 --warmup 2 \
      --json "$out/bench_deepspeed_2gpu_${v%%=*}.json" --variant "$v"
  done
  ;;
wgrad)
  # Issue #9 lever "wgrad" (weight gradients accumulated straight into fp32 main_grad): its GPU test, the dense
  # llama-1b step without and with it, then EPAS with it on (the default).
  run 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgrad_fusion.py
  run 150 python3 tools/bench_train.py --isolate --models llama-1b --steps 5 --warmup 2 --json "$out/bench_train_wgrad.json" \
    --variant "no_wgrad=train.fused_kernels=[rmsnorm,rope,swiglu,loss]" --variant "fused="
  run 170 python3 tools/bench_epas.py --models llama-1b --rounds 4 --json "$out/bench_epas_1b_wgrad.json"
  ;;
grad_sum)
  # Issue #5: the anchor's Q/K gradient summed over the sharing layers several at a time (effdist.kernels.grad_sum):
  # its GPU test, then llama-1b throughput over 12 rounds with a profile.
  run 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_grad_sum.py tests/test_wgrad_fusion.py
  run 420 python3 tools/bench_epas.py --models llama-1b --rounds 12 --profile 2 --json "$out/bench_epas_1b_grad_sum.json"
  ;;
parity350)
  # Issue #5 at a larger scale: llama-350m (24 layers) dense vs EPAS growing to 3L/4 = 18 layers on the timeline of
  # the 125M early schedule (two layers per 5 steps from step 25, T = 5), two model seeds, 250 steps of 16 x 2048.
  e="epas.enabled=true,epas.group_size=2,epas.final_region=18,epas.start_step=25,epas.interval=5,epas.transition_steps=5"
  parity_model 350m 8 560 250 20 seeds --variant "dense_s1=train.seed=1" --variant "epas_s1=train.seed=1,$e" \
    --variant "dense_s2=train.seed=2" --variant "epas_s2=train.seed=2,$e" \
    --baseline epas_s1=dense_s1 --baseline epas_s2=dense_s2 --baseline dense_s2=dense_s1
  ;;
clip)
  # Issue #5, one 10-minute call: is the EPAS gap at 125M partly optimisation? The anchor's Wq/Wk gradient is the
  # sum over every layer that uses its Q/K, which inflates the global norm that clipping scales every parameter
  # by, and jumps in scale at each switch under Adam's slowly moving second moment. Dense and the early schedule
  # with clipping at 1.0 (as before) and off, and with epas.anchor_grad=mean (that gradient divided by its uses),
  # seed 1, metrics kept for grad_norm; then llama-350m dense vs EPAS to 18 of 24 layers (one seed), and
  # llama-1b throughput again to check the run-to-run spread of the 3L/4 ratio.
  e="$early,epas.final_region=9"
  parity_125m 320 250 20 clip --variant "dense=train.seed=1" --variant "early=train.seed=1,$e" \
    --variant "early_mean=train.seed=1,epas.anchor_grad=mean,$e" \
    --variant "dense_noclip=train.seed=1,optim.clip_grad=0" --variant "early_noclip=train.seed=1,optim.clip_grad=0,$e" \
    --baseline early=dense --baseline early_mean=dense --baseline early_noclip=dense_noclip --baseline dense_noclip=dense
  for r in /tmp/effdist-parity-125m-clip/*/; do cp "$r/metrics.jsonl" "$out/metrics_clip_$(basename "$r").jsonl"; done
  e="epas.enabled=true,epas.group_size=2,epas.final_region=18,epas.start_step=25,epas.interval=5,epas.transition_steps=5"
  parity_model 350m 8 170 250 20 pair --variant "dense_s1=train.seed=1" --variant "epas_s1=train.seed=1,$e" \
    --baseline epas_s1=dense_s1
  for r in /tmp/effdist-parity-350m-pair/*/; do cp "$r/metrics.jsonl" "$out/metrics_350m_$(basename "$r").jsonl"; done
  run 120 python3 tools/bench_epas.py --models llama-1b --rounds 8 --json "$out/bench_epas_1b_rerun.json"
  ;;
clip2)
  # Issue #5, after clip: the same comparison (dense, early schedule, early with epas.anchor_grad=mean) with model
  # seed 2, and llama-350m dense vs EPAS to 18 of 24 layers with seed 2 (the second of two seeds).
  e="$early,epas.final_region=9"
  parity_125m 200 250 20 clip2 --variant "dense=train.seed=2" --variant "early=train.seed=2,$e" \
    --variant "early_mean=train.seed=2,epas.anchor_grad=mean,$e" --baseline early=dense --baseline early_mean=dense
  e="epas.enabled=true,epas.group_size=2,epas.final_region=18,epas.start_step=25,epas.interval=5,epas.transition_steps=5"
  parity_model 350m 8 200 250 20 pair2 --variant "dense_s2=train.seed=2" --variant "epas_s2=train.seed=2,$e" \
    --baseline epas_s2=dense_s2
  ;;
region_scale)
  # Issue #5, one 10-minute call per model seed (third argument, default 1): how the loss cost of sharing depends
  # on the region at 125M (dense, then 6 = L/2, 7, 8 and 9 = 3L/4 of 12 layers, all on the early schedule: one
  # layer per 5 steps from step 25, T = 5), and whether it shrinks at llama-1b (12 = 3L/4 of 16 layers, same pace).
  seed="${3:-1}"
  parity_125m 300 250 20 "regions_s$seed" --variant "dense=train.seed=$seed" \
    --variant "r6=train.seed=$seed,epas.final_region=6,$early" --variant "r7=train.seed=$seed,epas.final_region=7,$early" \
    --variant "r8=train.seed=$seed,epas.final_region=8,$early" --variant "r9=train.seed=$seed,epas.final_region=9,$early"
  parity_model 1b 8 280 250 20 "s$seed" --variant "dense=train.seed=$seed" \
    --variant "r12=train.seed=$seed,epas.final_region=12,$early"
  ;;
parity1b_long)
  # Issue #5: does the llama-1b cost at 3L/4 shrink with tokens? Dense vs EPAS to 12 of 16 layers (the schedule of
  # region_scale), 500 steps = 16.4M tokens (under one pass over the 19.9M-token corpus), model seed 1.
  parity_model 1b 8 560 500 20 long --timeout 270 --variant "dense=train.seed=1" \
    --variant "r12=train.seed=1,epas.final_region=12,$early"
  ;;
parity125m_long)
  # The same question at 125M: dense vs EPAS to 9 of 12 layers, 500 steps, model seed 1 (about 2 minutes).
  parity_125m 300 500 20 long --timeout 140 --variant "dense=train.seed=1" \
    --variant "r9=train.seed=1,epas.final_region=9,$early"
  ;;
quality1b)
  # Issue #25 item 2, one run per device call: llama-1b for 1008 steps x 16 x 2048 = 33.0M tokens of the large
  # corpus's 36M-token training subset (docs/data.md, "A subset for one device call"), dense or EPAS growing to 12 =
  # 3L/4 of 16 layers on the early schedule, model seed $4 (the same data order for both variants of a seed); then
  # its held-out loss at every region (effdist eval, 64 windows of data/english-large/heldout). Arguments: dense|epas
  # SEED. The JSON is what tools/epas_quality.py pairs: quality_1b_dense_s1.json=quality_1b_epas_s1.json.
  variant="${3:?quality1b needs dense or epas}"; seed="${4:-1}"
  case "$variant" in dense) extra="" ;; epas) extra=",epas.final_region=12,$early" ;; *) echo "dense or epas"; exit 2 ;; esac
  quality_run 1b 8 1008 "$variant" "$seed" "$extra"
  ;;
quality125m)
  # Issue #25 item 3: llama-125m dense vs EPAS at L/2 = 6 of 12 layers (early schedule), the token budget of
  # quality1b (1008 steps x 16 x 2048), model seeds 1 and 2 (about 90 s a run), each run's held-out loss as above.
  for seed in ${3:-1 2}; do  # third argument: the seeds (default "1 2"; each run's JSON is written as it ends)
    quality_run 125m 16 1008 dense "$seed" ""
    quality_run 125m 16 1008 epas "$seed" ",epas.final_region=6,$early"
  done
  ;;
continual1b)
  # Issue #25 item 5, one call: a dense llama-1b pretrained for 300 steps (9.8M tokens; a 1b checkpoint cannot travel
  # between device calls, so not item 2's), exported to Hugging Face format and converted back (the path a user's
  # TinyLlama takes), then continued for 120 steps (3.9M tokens) dense and with EPAS growing to 12 = 3L/4 (one layer
  # per 5 steps from step 10), same seed and data; held-out loss of all three.
  quality_run 1b 8 300 dense 1 "" pretrain
  continue_dense_1b /tmp/effdist-quality/1b/pretrain_dense_s1 "" 120 continued
  ;;
continual1b_item2)
  # Issue #25 item 5 as the issue words it, on the warm machine that has just run `quality1b OUT dense 1` (item 2's
  # dense llama-1b of seed 1, 33.0M tokens, kept in /tmp/effdist-quality/1b/dense_s1): that model exported to
  # Hugging Face format and converted back, then continued for 300 steps (9.8M tokens) dense and with EPAS growing
  # to 12 = 3L/4 (one layer per 5 steps from step 10) on data/english-large/cont10, the 10.5M tokens after train36
  # (text the model has not seen; carried in data/english-large/carry.tar); held-out loss of both.
  src=/tmp/effdist-quality/1b/dense_s1
  [ -d "$src/checkpoints" ] || { echo "no $src/checkpoints: run quality1b OUT dense 1 on this machine first"; exit 2; }
  [ -e data/english-large/cont10.idx ] ||
    { echo "no data/english-large/cont10: carry data/english-large/carry.tar"; exit 2; }
  continue_dense_1b "$src" 2 300 item2cont cont10
  ;;
fp8)
  # Issue #27: FP8 linears (torchao float8): the GPU numerics tests, then llama-1b bf16 vs FP8 in one call, each
  # variant in its own process (peak memory), micro-batch 8, global batch 16 (the issue's shape).
  run 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8.py
  run 420 python3 tools/bench_train.py --isolate --models llama-1b --micro-batch llama-1b=8 --accum 2 --steps 6 --warmup 3 \
    --json "$out/bench_train_fp8_1b.json" --variant "bf16=" --variant "fp8=train.precision=fp8" \
    --variant "fp8_rowwise=train.precision=fp8;train.fp8_recipe=rowwise" \
    --variant "fp8_eager=train.precision=fp8;train.fp8_compile=false"
  ;;
fp8_parity)
  # Issue #27: llama-125m loss after the same tokens, bf16 vs FP8 (tensorwise and rowwise), English corpus.
  parity_125m 330 300 20 fp8 --variant bf16= --variant "fp8=train.precision=fp8" \
    --variant "fp8_rowwise=train.precision=fp8,train.fp8_recipe=rowwise" --baseline fp8=bf16 --baseline fp8_rowwise=bf16
  ;;
fp8_profile)
  # Issue #27: where the llama-1b FP8 step's time goes against bf16 (per-kernel profile by category: GEMM, FP8 GEMM,
  # attention, compiled casts, optimizer), micro-batch 16 as a lever, then torchtitan 0.2.2's own trainer with
  # float8 + compile at the same shape in the same call (needs torchtitan, torchdata, tyro, docstring-parser,
  # shtab, typeguard importable; `datasets` is stubbed by the tool).
  run 200 python3 tools/bench_train.py --isolate --models llama-1b --micro-batch llama-1b=8 --accum 2 --steps 4 --warmup 2 \
    --profile 1 --profile-variants bf16,fp8 --json "$out/bench_train_fp8_1b_profile.json" --variant bf16= \
    --variant fp8=train.precision=fp8 --variant "fp8_mbs16=train.precision=fp8;train.micro_batch=16;train.global_batch=16" \
    --variant "bf16_mbs16=train.micro_batch=16;train.global_batch=16"
  run 115 python3 tools/bench_torchtitan.py --steps 8 --warmup 4 --timeout 110 --json "$out/bench_torchtitan_1b.json" \
    --variant "float8_compile=--model.converters quantize.linear.float8 --quantize.linear.float8.filter_fqns output"
  ;;
fp8_titan)
  # Issue #27 goal 2's ratio alone: effdist bf16 and FP8 (tensorwise, compiled) at llama-1b micro-batch 8, then
  # torchtitan 0.2.2 float8 + compile and bf16 + compile at the same shape, in one call (about 2-3 minutes).
  # 25 timed steps after 5 warm-ups on both sides: with 6 timed steps effdist's FP8 rate varied by 4% between
  # runs of one day (docs/fp8.md).
  run 220 python3 tools/bench_train.py --isolate --models llama-1b --micro-batch llama-1b=8 --accum 2 --steps 25 --warmup 5 \
    --json "$out/bench_train_fp8_1b_titan.json" --variant bf16= --variant fp8=train.precision=fp8
  run 250 python3 tools/bench_torchtitan.py --steps 25 --warmup 5 --timeout 120 --json "$out/bench_torchtitan_1b.json" \
    --variant "float8_compile=--model.converters quantize.linear.float8 --quantize.linear.float8.filter_fqns output" \
    --variant bf16_compile=
  ;;
h200_7b_cal)
  # Issue #27: llama-7b on one H200 (fp32 master weights, main grads and AdamW state alone are ~113 GiB: over an
  # 80 GB card), full recompute, bf16 vs FP8 in one call, micro-batch 1, global batch 16, each in its own process.
  bash "$0" fp8_7b "$out"
  bash "$0" h200_cal "$out"
  ;;
fp8_7b)
  # The llama-7b half of h200_7b_cal (about 3-4 minutes on an H200).
  run 280 python3 tools/bench_train.py --isolate --models llama-7b --micro-batch llama-7b=1 --accum 16 --steps 3 \
    --warmup 2 --set train.recompute=true --json "$out/bench_train_fp8_7b.json" --variant bf16= \
    --variant fp8=train.precision=fp8
  ;;
h200_cal)
  # Issue #26: the shipped H200 calibration tables (the micro-batches of the 4x H200 p=4 runs in docs/results), timed
  # as wall clock around synchronized calls (calibrate's default), then llama-1b's dense layers again as the GPU's
  # work alone (--timing gpu) to compare (tools/bench_plan.py --compare-timings).
  run 150 python3 -m effdist.cli calibrate --config llama-1b --micro-batches 1,2,4,8 --variants dense,epas,relu2 \
    --out "$out/h200-llama-1b.json"
  run 110 python3 -m effdist.cli calibrate --config llama-7b --micro-batches 1,2 --variants dense,epas \
    --out "$out/h200-llama-7b.json"
  run 80 python3 -m effdist.cli calibrate --config llama-1b --micro-batches 1,2,4,8 --variants dense --timing gpu \
    --out "$out/h200-llama-1b-gpu.json"
  ;;
fp8_quality125)
  # Issue #27 item 3: llama-125m loss after the same tokens, bf16 vs FP8 (tensorwise), 500 steps, English corpus.
  parity_125m 400 500 20 fp8_500 --timeout 190 --variant bf16= --variant "fp8=train.precision=fp8" --baseline fp8=bf16
  ;;
fp8_quality1b)
  # Issue #27 item 3: the same at llama-1b (micro-batch 8, global batch 16), 500 steps.
  parity_model 1b 8 560 500 20 fp8_500 --timeout 270 --variant bf16= --variant "fp8=train.precision=fp8" \
    --baseline fp8=bf16
  ;;
sparse24_table)
  # Issue #23 item 3: ELAS's fc2 sparse-vs-dense table of this card (GEMM alone, bf16; about a minute), and the GPU
  # test of the module following a table. The JSON goes to configs/kernel_tables/ as sparse24-<card>.json.
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -E 'h100|h200|a100|b200' | tr 'A-Z' 'a-z')
  run 120 python3 tools/bench_ffn.py --sparse24-table "$out/sparse24-${card:-gpu}.json"
  run 120 python3 tools/bench_sparse24_tile.py --json "$out/sparse24_tile.json"
  run 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ffn_gpu.py -k sparse_gemm
  ;;
ffn_memory)
  # Issue #23 item 1: the sparse FFNs' peaks in training are one dense fc2 input per token and layer above their
  # saved-tensor accounting (docs/sparse_ffn.md, "Where the memory goes in training"). One trainer forward per FFN
  # kind, llama-350m at micro-batch 8: saved tensors per module against the allocator, and where the rest was allocated.
  run 300 python3 tools/probe_activation_memory.py --model llama-350m --json "$out/probe_activation_memory.json"
  ;;
plan_ffn)
  # Issue #26 item 4 with every FFN kind: the llama-1b calibration again with MoC and top-k layers, then the pp=1
  # choices predicted and measured (tools/bench_plan.py; the new choices "mb8 moc" and "mb8 topk"). The calibration
  # goes to configs/calibrations/h100-llama-1b.json, the JSON to docs/results/plan_validation_h100.json.
  run 560 python3 tools/bench_plan.py --model llama-1b --global-batch 16 --json "$out/plan_validation_h100.json" \
    --calibration-out "$out/h100-llama-1b.json"
  ;;
ffn_parity)
  # Issue #23 item 5: the 125M loss ratios of the sparse FFNs again after the kernel changes (fused selection, the
  # fc2-input fix): the `parity` part's command and data without EPAS (English corpus under data/english).
  parity_125m 500 250 20 ffn --variant dense= --variant "moc=ffn.kind=moc" --variant "topk=ffn.kind=topk" \
    --variant "relu2=ffn.kind=relu2" --variant "elas=ffn.kind=elas,ffn.elas_warmup_steps=50" --baseline elas=relu2
  ;;
topk_radix)
  # Issue #23 items 1-2: the radix threshold search of the fused top-K kernel (ffn.select_method=radix) against the
  # bisection, both with the selection saved as a bit mask and the dense-row backward kernels
  # (effdist.kernels.channel_select): the GPU tests of both first (bit-exact against the references), then llama-1b
  # end to end and llama-350m in rounds.
  run 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_topk_select.py tests/test_kernels_channel_select.py
  run 200 python3 tools/bench_train.py --isolate --models llama-1b --micro-batch llama-1b=8 --accum 2 --steps 8 \
    --warmup 3 --set data.kind=mock --set logging.tensorboard=false --json "$out/bench_train_ffn_1b_radix.json" \
    --variant swiglu= --variant moc=ffn.kind=moc --variant "moc_radix=ffn.kind=moc;ffn.select_method=radix" \
    --variant topk=ffn.kind=topk --variant "topk_radix=ffn.kind=topk;ffn.select_method=radix"
  run 240 python3 tools/bench_train.py --isolate --rounds 2 --models llama-350m --micro-batch llama-350m=8 --accum 2 \
    --steps 20 --warmup 4 --set data.kind=mock --set logging.tensorboard=false \
    --json "$out/bench_train_ffn_350m_radix_rounds.json" --variant swiglu= --variant moc=ffn.kind=moc \
    --variant "moc_radix=ffn.kind=moc;ffn.select_method=radix" --variant topk=ffn.kind=topk \
    --variant "topk_radix=ffn.kind=topk;ffn.select_method=radix"
  ;;
topk_radix2)
  # The rest of topk_radix, split off to fit one device call: the kernel sweep (outputs compared), then sparse decode
  # with each search.
  run 150 python3 tools/bench_topk_select.py --json "$out/bench_topk_select_radix.json"
  for m in bisect radix; do  # sparse decode at batch 1 and 8 with each search (llama-1b shape, CUDA graphs)
    run 150 python3 tools/bench_decode.py --ffn-kinds moc,topk --batches 1,8 --contexts 512 --regions 0 \
      --new-tokens 64 --rounds 3 --no-eager --select-method $m --json "$out/bench_decode_ffn_$m.json"
  done
  ;;
mask_chunks)
  # Issue #23 items 1-2: the masked backward kernels walk each row in chunks (the whole-row version spilled: MoC
  # 0.82x SwiGLU at llama-1b against 0.91x with indices). GPU tests, llama-1b with the selection kept as a mask
  # and as indices (ffn.save_selection) in one run, then the backward sweep of the chunk configurations.
  run 80 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_channel_select.py -k masked
  run 200 python3 tools/bench_train.py --isolate --models llama-1b --micro-batch llama-1b=8 --accum 2 --steps 8 \
    --warmup 3 --set data.kind=mock --set logging.tensorboard=false --json "$out/bench_train_ffn_1b_mask_chunks.json" \
    --variant swiglu= --variant moc=ffn.kind=moc --variant "moc_indices=ffn.kind=moc;ffn.save_selection=indices" \
    --variant topk=ffn.kind=topk --variant "topk_indices=ffn.kind=topk;ffn.save_selection=indices"
  run 150 python3 tools/bench_topk_select.py --parts backward --json "$out/bench_topk_select_mask_chunks.json"
  ;;
mask_chunks2)
  # The rest of items 1-2 with the chunk defaults chosen from mask_chunks' sweep: llama-1b again (swiglu, moc, topk),
  # then llama-350m in three rounds (noisy in single runs on this machine), one process per variant.
  run 160 python3 tools/bench_train.py --isolate --models llama-1b --micro-batch llama-1b=8 --accum 2 --steps 8 \
    --warmup 3 --set data.kind=mock --set logging.tensorboard=false --json "$out/bench_train_ffn_1b_mask_defaults.json" \
    --variant swiglu= --variant moc=ffn.kind=moc --variant topk=ffn.kind=topk
  run 330 python3 tools/bench_train.py --isolate --rounds 3 --models llama-350m --micro-batch llama-350m=8 --accum 2 \
    --steps 20 --warmup 4 --set data.kind=mock --set logging.tensorboard=false \
    --json "$out/bench_train_ffn_350m_mask_rounds.json" --variant swiglu= --variant moc=ffn.kind=moc \
    --variant topk=ffn.kind=topk
  ;;
select4)
  # The four-way bisection of the top-K kernels (three counts a round in one reduction, half the rounds): GPU tests,
  # llama-1b end to end with it against the default bisection, then the fused select + activate sweep with all three
  # searches at the training shapes (outputs compared).
  run 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_topk_select.py
  # End to end at llama-1b (issue #23 items 1-2), one process per variant, each search against the default.
  run 200 python3 tools/bench_train.py --isolate --models llama-1b --micro-batch llama-1b=8 --accum 2 --steps 8 \
    --warmup 3 --set data.kind=mock --set logging.tensorboard=false --json "$out/bench_train_ffn_1b_bisect4.json" \
    --variant swiglu= --variant moc=ffn.kind=moc --variant "moc_bisect4=ffn.kind=moc;ffn.select_method=bisect4" \
    --variant topk=ffn.kind=topk --variant "topk_bisect4=ffn.kind=topk;ffn.select_method=bisect4"
  run 260 python3 tools/bench_topk_select.py --parts fused --json "$out/bench_topk_select_bisect4.json"
  ;;
decode_greedy)
  # Issue #23 item 4's equality check on a GPU: sparse decode of MoC, top-k and ELAS against its dense-math
  # reference, 32 greedy tokens, in fp32 (in bf16 the random-weight benchmark's logits tie within rounding).
  run 300 python3 tools/bench_decode.py --ffn-kinds moc,topk,elas --batches 1,8 --contexts 512 --regions 0,8 \
    --new-tokens 32 --rounds 1 --no-eager --dtype fp32 --check-greedy 32 --json "$out/bench_decode_ffn_greedy_fp32.json"
  # The decode-sized selection at each warp count (13 us a layer at batch 1, the largest item of MoC's decode FFN).
  run 90 python3 tools/bench_topk_select.py --parts select --json "$out/bench_topk_select_decode_warps.json"
  ;;
ffn_train)
  # Issue #23 items 1-3 after the fix of the dense fc2 input that every compact kind kept alive (effdist.model.ffn.saved):
  # llama-350m and llama-1b, one process per variant, ELAS against ReLU^2 of its width, then the probe again.
  for m in llama-350m llama-1b; do
    run 260 python3 tools/bench_train.py --isolate --models $m --micro-batch $m=8 --accum 2 --steps 8 --warmup 3 \
      --set data.kind=mock --set logging.tensorboard=false --json "$out/bench_train_ffn_${m#llama-}_fc2fix.json" \
      --variant swiglu= --variant moc=ffn.kind=moc --variant topk=ffn.kind=topk --variant relu2=ffn.kind=relu2 \
      --variant "elas=ffn.kind=elas;ffn.elas_warmup_steps=0"
  done
  run 150 python3 tools/probe_activation_memory.py --model llama-350m --json "$out/probe_activation_memory_fc2fix.json"
  ;;
tests)
  run 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_dense.py tests/test_ffn_gpu.py tests/test_generate.py \
    tests/test_kernels_topk_select.py tests/test_kernels_channel_select.py
  ;;
*) echo "unknown part $part (train, parity, rest, followup, decode32, epas3, isolated, final, transition, transition2, epas_mbs8, qk_grad_sum, frozen_rows, seeds, deepspeed2, wgrad, grad_sum, parity350, clip, clip2, region_scale, parity1b_long, parity125m_long, fp8, fp8_parity, fp8_profile, fp8_titan, h200_7b_cal, fp8_7b, h200_cal, fp8_quality125, fp8_quality1b, sparse24_table, ffn_memory, ffn_train, topk_radix, topk_radix2, mask_chunks, mask_chunks2, select4, decode_greedy, ffn_parity, plan_ffn, quality1b, quality125m, continual1b, continual1b_item2, tests)"; exit 2 ;;
esac
exit 0

#!/usr/bin/env bash
# Issue 28's GPU figures on one GPU, each against its bound measured in the same run:
#   benchmarks/scale_figures.sh OUT_DIR [passes|smollm2|llama3-8b|llama3-8b-short|llama3-8b-task|short|all]
# passes:    bench_extract (per-sample gradients vs a plain forward+backward, SmolLM2 bf16),
#            bench_passes (per-batch parts vs a plain forward+backward; the pass kernels vs their torch forms,
#            checked against each other) for SmolLM2 fp32/bf16 and Llama-3-8B bf16,
#            profile_answers (one answers task under torch.profiler) for SmolLM2, and profile_fused_score
#            (the fused path's score task alone, on 1/4/16 threads, with its writes after it or in it, and under torch.profiler)
# smollm2:   SmolLM2-135M geometry, 1000 + 1000, T = 256, all 30 layers, batch 64: answers-only, then exact
#            pair scores on the fused path (keep_gradients = false, gradients_in = auto), model in bf16, each
#            with the plain forward+backward of the same model at the same batch measured in the same run
# llama3-8b: Llama-3-8B geometry (GQA 32/8, 32 layers, bf16), 1000 + 1000, T = 256, answers mode with the
#            interference sketched (keep_pairs = "top", k = 256)
# llama3-8b-short: the same with 256 + 256 samples
# llama3-8b-task: its answers task alone (profile_answers, 64 + 64): where a batch's time goes beside bench_passes' rates
# short:     the 8B passes (the kernels; the sketch on the previous scheme's projections as the same-run
#            baseline; profiled), bench_extract, then the two SmolLM2 runs: for a call with little device time left
set -u
out=${1:?OUT_DIR}; what=${2:-all}; mkdir -p "$out"
work=${WORK:-$HOME/qkov-bench}
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "rc $? ($name)"; tail -3 "$out/$name.log"; }
extract_smollm2() {  # per-sample gradients vs a plain forward+backward, bf16 (issue 28: ≤ 1.0×)
  run extract-smollm2-bf16 150 python3 -m benchmarks.bench_extract --device cuda --geometry smollm2 --dtype bfloat16 --json-out "$out/extract-smollm2-bf16.json"
}
if [[ $what == passes || $what == all ]]; then
  # per-sample gradients vs a plain forward+backward, bf16 (issue 28: ≤ 1.0×)
  extract_smollm2
  run passes-smollm2-fp32 150 python3 -m benchmarks.bench_passes --geometry smollm2 --dtype float32 --batch 16 --json-out "$out/passes-smollm2-fp32.json"
  run passes-smollm2-bf16 150 python3 -m benchmarks.bench_passes --geometry smollm2 --dtype bfloat16 --batch 16 --json-out "$out/passes-smollm2-bf16.json"
  run profile-answers-smollm2 240 python3 -m benchmarks.profile_answers --geometry smollm2 --n 1000 --batch 16 --profile-n 32 --json-out "$out/profile-answers-smollm2.json"
  run profile-fused-score 150 python3 -m benchmarks.profile_fused_score --n 1000 --layers 2 --threads 1 4 16 --write-dir "$work/pfs-writes" --json-out "$out/profile-fused-score.json"
  run passes-llama3-8b-bf16 300 python3 -m benchmarks.bench_passes --geometry llama3-8b --dtype bfloat16 --batch 4 --repeats 2 --sketch-dim 256 --profile --json-out "$out/passes-llama3-8b-bf16.json"
fi
# 8B: batch 4 fits an 80 GB card beside the model, the Fisher and two tasks' sums (59 GB); 8 on larger cards
big=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
b8=4; [[ ${big:-0} -gt 100000 ]] && b8=8
common=(--n 1000 --seq 256 --model-dtype bfloat16 --baseline --ignore-disk --no-calibrate --io-gib 2)
smollm2_answers() {
  run smollm2-answers 150 python3 -m benchmarks.bench_e2e "${common[@]}" --batch 64 --layers $(seq 0 29) --mode answers --shard-size 2000 --workdir "$work/s-answers" --json-out "$out/smollm2-answers.json"
}
smollm2_exact_fused() {
  run smollm2-exact-fused 230 python3 -m benchmarks.bench_e2e "${common[@]}" --batch 64 --layers $(seq 0 29) --keep-gradients false --gradients-in auto --shard-size 500 --workdir "$work/s-exact" --json-out "$out/smollm2-exact-fused.json"
}
if [[ $what == smollm2 || $what == all ]]; then
  smollm2_answers
  smollm2_exact_fused
fi
if [[ $what == short ]]; then  # when device time is short, most informative first: the 8B pass kernels
  # (checked against their torch forms and timed against them), then the exact fused and answers-only SmolLM2 runs
  run passes-llama3-8b-bf16 200 python3 -m benchmarks.bench_passes --geometry llama3-8b --dtype bfloat16 --batch 4 --repeats 2 --sketch-dim 256 --steps formation pass1 pass1_fused pass2_sketch pass2_sketch_fused pass2_sketch_global --profile --json-out "$out/passes-llama3-8b-bf16.json"
  extract_smollm2
  smollm2_exact_fused
  smollm2_answers
fi
if [[ $what == llama3-8b-task ]]; then  # the 8B answers task alone, in one process, with its full-size sums: each
  # pass and the consolidation between them (task_parts_s), the allocator's retries, against a plain forward+backward
  run profile-answers-llama3-8b 420 python3 -m benchmarks.profile_answers --geometry llama3-8b --n 64 --batch $b8 --keep-pairs top --sketch-dim 256 --profile-n 8 --workdir "$work/pa8" --json-out "$out/profile-answers-llama3-8b.json"
fi
if [[ $what == llama3-8b-short ]]; then  # the same geometry on fewer samples: the rates, when device time is short
  run llama3-8b-answers-256 330 python3 -m benchmarks.bench_e2e "${common[@]}" --n 256 --geometry llama3-8b --layers $(seq 0 31) --mode answers --keep-pairs top --sketch-dim 256 --batch $b8 --shard-size 512 --workdir "$work/l-answers" --json-out "$out/llama3-8b-answers-256.json"
fi
if [[ $what == llama3-8b || $what == all ]]; then  # (585 s: a device command may run 600; model build and warm-up took 95 s of them)
  run llama3-8b-answers 585 python3 -m benchmarks.bench_e2e "${common[@]}" --geometry llama3-8b --layers $(seq 0 31) --mode answers --keep-pairs top --sketch-dim 256 --batch $b8 --shard-size 2000 --workdir "$work/l-answers" --json-out "$out/llama3-8b-answers.json"
fi

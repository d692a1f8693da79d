#!/usr/bin/env bash
# The GPU checks of the trainer, in one run (176 s on one H200 at commit 48196aa, before the LoRA runs were added;
# machine start not counted), from the
# repository root:
#   bash bench/gpu_check.sh [RESULTS_DIR]
# 1. bench/step_time.py: PACS and PPO vs TRL's GRPO, step time and peak memory, random-init Qwen2.5-0.5B shape, bf16
#    (PPO added after the 176 s run; it has not run on a GPU yet);
# 2. bench/sharded_reference.py under the recipes' DeepSpeed ZeRO-3 and FSDP2 accelerate configs (one process),
#    full fine-tuning and LoRA: the fixed reference's resets, checkpoint and resume;
# 3. bench/psi_on_policy.py: bf16, fast path off, learning rate 0: pacs/psi/std where it must be 0 (pi_theta ==
#    pi_old), for completions of 256 and 2048 tokens (not yet run on a GPU).
# Needs trl, datasets, math-verify, deepspeed, peft importable (a folder .whl/ of wheels is installed first if present,
# for machines without network). STEP_ARGS="--tiny --steps 2" makes the step-time part a CPU dry run and
# PSI_ARGS=--cpu the psi check's; the accelerate launches need a GPU. Results (logs and JSON) go to RESULTS_DIR (default outputs/gpu-check).
set -u
RESULTS=${1:-outputs/gpu-check}
WORK=$(mktemp -d)
mkdir -p "$RESULTS"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RESULTS/gpu.txt" 2>&1
python3 -c "import torch, transformers, trl, accelerate, deepspeed; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'trl', trl.__version__, 'accelerate', accelerate.__version__, 'deepspeed',
deepspeed.__version__)" >> "$RESULTS/gpu.txt" 2>&1
cat "$RESULTS/gpu.txt"

status=0
echo "== step time: PACS and PPO vs GRPO"
timeout 300 python3 bench/step_time.py --output "$WORK/step" ${STEP_ARGS:-} > "$RESULTS/step_time.log" 2>&1 || status=1
cp "$WORK/step/step_time.json" "$RESULTS/" 2>/dev/null
grep -A5 "^device:" "$RESULTS/step_time.log" || tail -20 "$RESULTS/step_time.log"

echo "== psi where pi_theta == pi_old: bf16, fast path off, completions of 256 and 2048 tokens"
timeout 400 python3 bench/psi_on_policy.py --output "$WORK/psi" ${PSI_ARGS:-} > "$RESULTS/psi_on_policy.log" 2>&1 \
  || status=1
cp "$WORK/psi/psi_on_policy.json" "$RESULTS/" 2>/dev/null
grep -A6 "^device:" "$RESULTS/psi_on_policy.log" || tail -20 "$RESULTS/psi_on_policy.log"

for kind in zero3 fsdp2; do
  for peft in "" --peft; do
    name=$kind${peft:+_peft}
    echo "== fixed reference under $kind ${peft:+(LoRA)}"
    timeout 120 accelerate launch --config_file "recipes/accelerate/$kind.yaml" --num_processes 1 \
      bench/sharded_reference.py --output "$WORK/$name" $peft > "$RESULTS/$name.log" 2>&1 || status=1
    cp "$WORK/$name/sharded_reference_$name.json" "$RESULTS/" 2>/dev/null
    grep '^{"sharding"' "$RESULTS/$name.log" || tail -30 "$RESULTS/$name.log"
  done
done
exit $status

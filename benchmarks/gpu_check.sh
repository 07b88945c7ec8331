#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one call on one GPU (H100 or H200), from the project root:
#     bash benchmarks/gpu_check.sh "$OUT"
# (with the project installed: the quick start's .venv, or `pip install -e .` in the GPU's environment;
# OUT is where the logs and CSVs go). It runs, at the same time:
# two short training runs through the trainer (eager qwen3; compiled gemma2_softcap with the monitor's
# probe and validation), whose summary.json must say "cuda" and the GPU's name; and the compiled rows'
# compile, filling the compile caches. Then the timed throughput table, one row after another.
set -uo pipefail
# the quick start's environment first, where there is one: its python3 and qknorm-train (it is not activated)
venv="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
if [ -d "$venv" ]; then PATH="$venv:$PATH"; fi
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, pytorch_lightning as pl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', pl.__version__)" | tee -a "$out/gpu.txt"

(
  qknorm-train trainer=gpu model=small attention=qwen3 trainer.max_steps=200 hydra.run.dir=/tmp/gpu_runs/eager_qwen3
  qknorm-train trainer=gpu model=small attention=gemma2_softcap model.compile=true trainer.max_steps=200 hydra.run.dir=/tmp/gpu_runs/compiled_softcap
  for d in /tmp/gpu_runs/eager_qwen3 /tmp/gpu_runs/compiled_softcap; do
    python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[1], {k: s.get(k) for k in ('status','steps','device','device_name','precision','final_val_loss','final_val_bpb')})" "$d/summary.json"
  done
) > "$out/train.log" 2>&1 &
train_pid=$!

python3 benchmarks/throughput.py --device cuda --sizes gpt2_small --precision bf16 --hf --compile --prewarm \
  --presets baseline qwen3 olmo2 gemma3 wortsman2023_qk_layernorm henry2020_l2 gemma2_softcap \
  --steps 8 --warmup 3 --timeout 150 --csv "$out/throughput_gpu.csv" 2>&1 | tee "$out/throughput.log"
wait $train_pid
tail -4 "$out/train.log"

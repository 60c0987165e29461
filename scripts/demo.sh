#!/usr/bin/env bash
# Set-up plus demo: environment, synthetic vessel dataset, train, predict, evaluate.
# About 2 minutes on 2 CPU cores. Everything goes under demo/ (safe to delete).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
medseg=.venv/bin/medseg
data=demo/Dataset001_SyntheticVessels
run=demo/runs/quickstart

"$py" data_scripts/make_synthetic.py --out "$data" --cases 12 --test-cases 4 --size 64 --seed 0
"$medseg" train configs/quickstart.yaml --set data.dataset="$data" --set output_dir="$run"
"$medseg" predict --model "$run" --input "$data/imagesTs" --output "$run/predictions"
"$medseg" evaluate --pred "$run/predictions" --ref "$data/labelsTs" --output "$run/evaluation"

cat <<MSG

Demo finished. Results:
  run folder       $run   (config.yaml, checkpoints/, metrics.csv, progress.png, tensorboard/)
  predictions      $run/predictions
  evaluation       $run/evaluation/summary.json and metrics.csv
  TensorBoard      .venv/bin/tensorboard --logdir $run/tensorboard
MSG

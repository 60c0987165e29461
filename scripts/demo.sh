#!/usr/bin/env bash
# Set-up plus demo: environment, a synthetic vessel dataset whose thin branches are faint,
# Dice+CE and Dice+CE+clDice trained side by side, both evaluated, then compared case by
# case. About 3 minutes on 2 CPU cores (the demo alone 1 min 40 s). Everything goes under demo/ (safe to delete).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD  # the paths printed below hold wherever the demo was started from
bash scripts/setup.sh
py=$root/.venv/bin/python
medseg=$root/.venv/bin/medseg
data=$root/demo/Dataset001_SyntheticVessels
runs=$root/demo/runs
export MEDSEG_CACHE=${MEDSEG_CACHE:-$root/demo/cache}  # the preprocessing cache too goes under demo/

rm -rf "$runs/quickstart" "$runs/quickstart_cldice" "$runs/compare"   # a rerun starts the demo afresh
"$py" data_scripts/make_synthetic.py --out "$data" --cases 12 --test-cases 8 --size 64 --seed 0 --faint --loops 2 --force
# the same config twice: Dice+CE alone, and with clDice (Shit et al., CVPR 2021) added at half weight
train_and_evaluate() {  # RUN LOSSES
    "$medseg" train configs/quickstart.yaml --set data.dataset="$data" --set output_dir="$runs/$1" \
        --set "losses=$2"
    "$medseg" predict --model "$runs/$1" --input "$data/imagesTs" --output "$runs/$1/predictions"
    "$medseg" evaluate --pred "$runs/$1/predictions" --ref "$data/labelsTs" --output "$runs/$1/evaluation"
}
train_and_evaluate quickstart '[{name: dice_ce, weight: 1.0}]'
train_and_evaluate quickstart_cldice '[{name: dice_ce, weight: 1.0}, {name: cldice, weight: 0.5}]'
"$medseg" report compare "$runs/quickstart" "$runs/quickstart_cldice" --output "$runs/compare"

cat <<MSG

Demo finished. The table above compares the two runs on the 8 test scans (B - A: clDice minus Dice+CE).
  runs             $runs/quickstart (Dice+CE), $runs/quickstart_cldice (Dice+CE+clDice):
                   config.yaml, checkpoints/, metrics.csv, progress.png, tensorboard/, predictions/
  evaluations      $runs/*/evaluation/report.html (worst cases pictured), summary.json, metrics.csv
  comparison       $runs/compare/compare.html: paired tests, and the cases that differ most with each
                   prediction's extra components (specks, pieces of broken branches) marked
  TensorBoard      $root/.venv/bin/tensorboard --logdir $runs
MSG

#!/usr/bin/env bash
# The main job: make the data, train a few epochs, export, evaluate.
set -euo pipefail
cd "$(dirname "$0")"
python make_data.py --structures 60 --output alloy.xyz
mtt train options.yaml -o model.pt
mtt eval model.pt eval.yaml -o predictions.xyz
echo "trained, exported (examples/alloy/model.pt) and evaluated (predictions.xyz)"

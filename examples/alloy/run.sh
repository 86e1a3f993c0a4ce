#!/usr/bin/env bash
# The main job: make the data, train a few epochs, export, evaluate, and write the
# model as a mace-torch file for MACE's own engines.
set -euo pipefail
cd "$(dirname "$0")"
python make_data.py --structures 60 --output alloy.xyz
mtt train options.yaml -o model.pt
mtt eval model.pt eval.yaml -o predictions.xyz
metatrain-mace to-mace model.ckpt -o alloy.model
echo "trained, exported (examples/alloy/model.pt), evaluated (predictions.xyz) and"
echo "written as a MACE model file (examples/alloy/alloy.model)"

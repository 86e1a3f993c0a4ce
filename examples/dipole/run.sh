#!/usr/bin/env bash
# Make the dipole data, train MACE on it, export, evaluate.
set -euo pipefail
cd "$(dirname "$0")"
python make_data.py --structures 80 --output dipoles.xyz
mtt train options.yaml -o model.pt
mtt eval model.pt eval.yaml -o predictions.xyz
echo "trained, exported (examples/dipole/model.pt) and evaluated (predictions.xyz)"

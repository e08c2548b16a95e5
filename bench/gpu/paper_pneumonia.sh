#!/usr/bin/env bash
# The paper's chest X-ray experiment (configs/paper-pneumonia.yaml) on a lent GPU in the few
# minutes left to a session: EfficientNet-Lite0 (the only ImageNet checkpoint available
# offline), GAN and tuning off, one lottery level of 50% with both controls; otherwise as in
# the file (224 px, 20 epochs, AdamW 1e-3, the ticket rewound to init).
# Prepared here: python bench/gpu/pack.py ../shared/data/chest-xray-pneumonia
#   .gpu/chest-xray-pneumonia --size 224 --quality 75 --parts 1   (35 MB) and the wheels in .whl/.
# Usage on the GPU machine (carry .whl and .gpu/chest-xray-pneumonia):
#   bash bench/gpu/paper_pneumonia.sh OUT_DIR [SECONDS]
set -uo pipefail
out=${1:?out dir}; budget=${2:-250}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEDXFER_CACHE=/tmp/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
args=(configs/paper-pneumonia.yaml data.root=.gpu/chest-xray-pneumonia/p0/manifest.csv
      out_dir=/tmp/runs model.arch=efficientnet_lite0 stages.gan=false stages.tune=false
      prune.levels=1 prune.fraction=0.5)
pack() { tar czf "$out/paper-pneumonia.tgz" -C /tmp/runs --exclude='*.pt' --exclude='*.npz' experiments; }
timeout $((budget * 45 / 100)) python3 -m medxfer run "${args[@]}" stages.prune=false 2>&1 | grep -v "━"
echo "phase 1 rc=${PIPESTATUS[0]} at ${SECONDS}s"; pack
timeout $((budget - SECONDS)) python3 -m medxfer run "${args[@]}" 2>&1 | grep -v "━"
echo "phase 2 rc=${PIPESTATUS[0]} at ${SECONDS}s"; pack

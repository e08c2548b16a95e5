#!/usr/bin/env bash
# The paper's brain-tumor experiment (configs/paper-brain-tumor.yaml) on a lent GPU, with what
# that machine allows: EfficientNet-Lite0 (the only ImageNet checkpoint available offline; the
# paper's GoogLeNet / ResNet-50 / EfficientNet-B0 need torchvision downloads), GAN off (the
# classes are nearly balanced and bench/results/imbalance/brain-tumor-mri.json measured synthetic
# images hurting), one lottery level of 50% instead of five of 20% (the lent minutes).
# Everything else as in the file: 224 px, 20 Optuna trials of 5 epochs on half the training
# split, 20 epochs with the best values, the ticket with both controls at every level.
# Before (see README.md here): the wheels in .whl/ installed into /tmp/site and
# .gpu/brain/p0 copied to /tmp/brain/p0 by an earlier call; this call carries .gpu/brain/p1.
# Usage on the GPU machine: bash bench/gpu/paper.sh OUT_DIR [SECONDS]
set -uo pipefail
out=${1:?out dir}; budget=${2:-520}
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEDXFER_CACHE=/tmp/cache
mkdir -p /tmp/brain && cp -r .gpu/brain/p1 /tmp/brain/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, optuna; print('torch', torch.__version__, 'timm', timm.__version__, 'optuna', optuna.__version__)"
args=(configs/paper-brain-tumor.yaml data.root=/tmp/brain/p1/manifest.csv out_dir=/tmp/runs
      model.arch=efficientnet_lite0 stages.gan=false prune.levels=1 prune.fraction=0.5)
pack() { tar czf "$out/paper-brain.tgz" -C /tmp/runs --exclude='*.pt' --exclude='*.npz' experiments; }
# 1) everything but the lottery (tuning, training, evaluation, report), then 2) the lottery
timeout $((budget * 6 / 10)) python3 -m medxfer run "${args[@]}" stages.prune=false 2>&1 | grep -v "━"
echo "phase 1 rc=${PIPESTATUS[0]} at ${SECONDS}s"; pack
timeout $((budget - SECONDS)) python3 -m medxfer run "${args[@]}" 2>&1 | grep -v "━"
echo "phase 2 rc=${PIPESTATUS[0]} at ${SECONDS}s"; pack

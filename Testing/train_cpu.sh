#!/usr/bin/env bash
# Resumable CPU training of the bundled model: the campaign's recipe (see Resources/Training/README.md),
# two DDP ranks of one thread each (gloo).
#
#   Testing/train_cpu.sh                          # defaults below; rerun the same command to resume
#   MINUTES=60 LR=3e-5 BALANCE_CAP=5 Testing/train_cpu.sh
#
# What it does:
#   1. builds (or extends) the crop pool: Colin27 structures (every allowed one) and procedural phantoms;
#   2. trains (a first click also trains the three candidate masks, --multimask), starting from the last checkpoint in RUN_DIR, else from INIT (default: the bundled
#      weights, else the committed campaign state Resources/Training/fastsam3d-campaign.safetensors,
#      so a fresh machine continues the campaign), else from scratch (then start with BALANCE_CAP=0:
#      with a cap the first steps collapse to empty masks);
#   3. evaluates the last checkpoint on Colin27 and exports it next to the run. Replace a committed
#      file only when the development evaluation improves: Resources/Models/ (the bundled model)
#      once one click on the left putamen passes Testing/tests/test_slicer_logic.py, else
#      Resources/Training/ (see its README.md).
# Checkpoints every few minutes, so a session cut short keeps its progress in RUN_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${FASTSAM3D_CACHE:-$HOME/.cache/fastsam3d}
RUN_DIR=${RUN_DIR:-$CACHE/runs/cpu-bundled}
POOL=${POOL:-$CACHE/pool/train-s0}
POOL_SIZE=${POOL_SIZE:-800}
MINUTES=${MINUTES:-120}
STEPS=${STEPS:-100000}
LR=${LR:-3e-5}
SCHEDULE=${SCHEDULE:-constant}
BALANCE_CAP=${BALANCE_CAP:-5}
RANKS=${RANKS:-2}
# Start (when RUN_DIR has no checkpoint) from the bundled weights, else from the committed campaign state.
if [ -z "${INIT:-}" ]; then
  INIT=Resources/Models/fastsam3d-bundled.safetensors
  [ -f "$INIT" ] || INIT=Resources/Training/fastsam3d-campaign.safetensors
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=1

mkdir -p "$RUN_DIR"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$RUN_DIR/cpu.log"; }

python -c "from FastSAM3DLib.data.colin27 import find_mricron_templates as f; f()" \
  || { log "Debian mricron-data (Colin27) is needed: apt-get install mricron-data"; exit 2; }
log "pool: $POOL ($POOL_SIZE crops)"
python -m FastSAM3DLib.train.cli pool --out "$POOL" --size "$POOL_SIZE" --phantom-fraction 0.5 --min-voxels 500 \
  --include-heldout --workers "$RANKS" --seed 0

INIT_ARGS=()
if [ ! -f "$RUN_DIR/checkpoints/last.pt" ] && [ -f "$INIT" ]; then INIT_ARGS=(--init "$INIT"); fi
log "training: $RANKS rank(s) x 1 thread, $MINUTES min, lr $LR ($SCHEDULE), balance cap $BALANCE_CAP ${INIT_ARGS[*]:-}"
torchrun --standalone --nproc_per_node "$RANKS" -m FastSAM3DLib.train.cli interactive \
  --run-dir "$RUN_DIR" --pool "$POOL" --model fastsam3d-384 --device cpu --threads 1 --batch-size 1 \
  --steps "$STEPS" --max-minutes "$MINUTES" --lr "$LR" --schedule "$SCHEDULE" --warmup-steps 100 \
  --click-iters 11 --grad-iters 4 --loss dicebalanced --balance-cap "$BALANCE_CAP" --multimask --iou-weight 1 --include-heldout \
  --checkpoint-minutes 4 --eval-every 0 --log-every 20 "${INIT_ARGS[@]}" 2>&1 | tee -a "$RUN_DIR/cpu.log"

python -m FastSAM3DLib.train.cli eval "$RUN_DIR/checkpoints/last.pt" > "$RUN_DIR/eval_last.json"
python -m FastSAM3DLib.train.cli export "$RUN_DIR/checkpoints/last.pt" --out "$RUN_DIR/export/fastsam3d-bundled.safetensors" \
  --notes "CPU run $RUN_DIR" --eval-json "$RUN_DIR/eval_last.json"
log "done: $RUN_DIR (export in $RUN_DIR/export)"

#!/usr/bin/env bash
# Train the world model (benchmarks/world_model.py) on a GPU box in one time-boxed go and pack
# what evaluation needs into two archives small enough to copy back (under 16 MiB each):
# OUT_DIR/model.tgz (the base, the image encoder, the report, every run's console log) and
# OUT_DIR/adapters.tgz (every variant's last checkpointed adapter and its JSON log).
# The training and held-out worlds are not brought back: they are drawn again from their seeds.
# Usage: bash benchmarks/world_model_device.sh OUT_DIR [SECONDS [WORLD_MODEL_ARGS...]]
#   (wheels for missing packages in .whl/; the default arguments are the run of 2026-11-30)
set -u
OUT_DIR=${1:?output folder}
LIMIT=${2:-520}
shift $(( $# < 2 ? $# : 2 ))
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--vae-seconds 90 --unet-seconds 170 --id-seconds 140 --variant a:lr=1e-3,batch_size=32
  --variant b:lr=3e-4,batch_size=64 --variant c:lr=1e-3,batch_size=32,face_tokens=16)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi here"
WORK=/tmp/world-run
rm -rf "$WORK"
timeout -s TERM "$LIMIT" python3 benchmarks/world_model.py --out "$WORK" "${ARGS[@]}" 2>&1 | tee "$OUT_DIR/log.txt"
cd "$WORK" || exit 1
for d in id-*/; do
  last=$(ls -d "$d"checkpoints/step-* 2>/dev/null | tail -1)
  mkdir -p "adapters/${d%/}"
  [ -n "$last" ] && cp "$last/adapter.safetensors" "adapters/${d%/}/"
  cp -r "$d"logs "adapters/${d%/}/" 2>/dev/null
done
tar czf "$OUT_DIR/model.tgz" model report.json ./*.log ./*.json
tar czf "$OUT_DIR/adapters.tgz" adapters
ls -la "$OUT_DIR"

#!/usr/bin/env bash
# Trains logreg, svm and mlp on a9a, serves the runs with TensorBoard on 127.0.0.1 and takes
# headless-Chromium screenshots of the dashboard for the README:
#   scripts/dashboard.png          Scalars tab: train/loss, val/*, perf/samples_per_sec
#   scripts/dashboard_hparams.png  HParams tab: the three runs, their choices and final metrics
# Usage: bash scripts/dashboard_screenshot.sh   (about a minute on a CPU; needs /usr/bin/chromium)
set -euo pipefail

OUT_DIR=$(cd "$(dirname "$0")" && pwd)
CHROMIUM=/usr/bin/chromium
if [[ ! -x $CHROMIUM ]]; then
  echo "error: $CHROMIUM not found; install it with: apt-get update && apt-get install -y chromium" >&2
  exit 1
fi

WORK=$(mktemp -d /tmp/largeml-dashboard.XXXXXX)
LOGDIR=$WORK/runs
TB_PID=
cleanup() {
  if [[ -n $TB_PID ]]; then kill "$TB_PID" 2>/dev/null || true; wait "$TB_PID" || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# 1. Three real runs into one log dir (run from $WORK so no outputs/ lands in the repo).
cd "$WORK"
for model in logreg svm mlp; do
  echo "training $model ..."
  python -m largeml.train data=a9a model=$model hydra.run.dir="$LOGDIR/$model" \
    trainer.log_every_n_steps=10 > "$WORK/train_$model.log" 2>&1 \
    || { cat "$WORK/train_$model.log" >&2; exit 1; }
done

# 2. TensorBoard on a free loopback port, in the background (killed by the trap).
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
tensorboard --logdir "$LOGDIR" --host 127.0.0.1 --port "$PORT" > "$WORK/tensorboard.log" 2>&1 &
TB_PID=$!
# Wait (at most a minute) until all three runs are listed and their scalars loaded.
ready() {
  curl -s "$URL/data/runs" | grep -q mlp || return 1
  curl -s "$URL/data/plugin/scalars/tags" | python -c '
import json, sys
tags = json.load(sys.stdin)
sys.exit(0 if all("val/auc" in tags.get(r, {}) for r in ("logreg", "svm", "mlp")) else 1)'
}
for _ in $(seq 60); do ready && break; sleep 1; done
ready || { cat "$WORK/tensorboard.log" >&2; echo "error: TensorBoard did not come up at $URL" >&2; exit 1; }
echo "TensorBoard at $URL: $(curl -s "$URL/data/runs")"

# 3. Screenshots. Only 127.0.0.1 is contacted; everything that phones home is switched off.
shoot() {  # shoot OUT.png WIDTH,HEIGHT URL
  "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$(mktemp -d "$WORK/profile.XXXXXX")" --hide-scrollbars \
    --window-size="$2" --virtual-time-budget=15000 --screenshot="$1" "$3" \
    > "$WORK/chromium.log" 2>&1 || { cat "$WORK/chromium.log" >&2; exit 1; }
  echo "wrote $1 ($(stat -c %s "$1") bytes)"
}
# The Scalars tab, filtered to five charts (tagFilter lives in the URL hash). The Time Series
# tab is not used: headless Chromium draws its charts empty or only intermittently.
shoot "$OUT_DIR/dashboard.png" 1400,1040 \
  "$URL/?darkMode=false#scalars&tagFilter=%5E(train%2Floss%7Cval%2F%7Cperf%2Fsamples)"
# The HParams table: wide enough to show val/loss, val/accuracy and val/auc after the choices.
shoot "$OUT_DIR/dashboard_hparams.png" 1900,320 "$URL/?darkMode=false#hparams"

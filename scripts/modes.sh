#!/usr/bin/env bash
# docs/rendering.md's image, video, extend, loop, bridge and keyframe commands, run with the bundled model on
# inputs made from an earlier render; each writes an MP4 and a contact sheet into docs/modes/ (the figures of the
# README and docs/rendering.md).
# Usage: scripts/modes.sh [longtake executable]   (run from the repository root; a few minutes on 2 cores)
set -euo pipefail
LT=${1:-.venv/bin/longtake}
PY=$(dirname "$LT")/python
OUT=docs/modes
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
cd "$WORK"
ROOT=$OLDPWD
run() { "$ROOT/$LT" render "$@" -q --in-process; }  # the reference pool: same frames as Ray workers

run "a red ball moving right on blue" --seconds 8 --seed 1 --out a.mp4 --preview "$ROOT/$OUT/input.png"
run "a yellow ball moving left on green" --seconds 4 --seed 2 --out e.mp4
"$ROOT/$PY" -c "from longtake.video import read_frames; from PIL import Image; v = read_frames('a.mp4'); \
Image.fromarray(v[-1]).save('start.png'); Image.fromarray(v[8]).save('key1.png'); Image.fromarray(v[40]).save('key2.png')"

run "a red ball moving right on blue" --image start.png --seconds 8 --out image.mp4 --preview "$ROOT/$OUT/image.png"
run "a green ball moving right on yellow" --video a.mp4 --strength 0.6 --out video.mp4 --preview "$ROOT/$OUT/video.png"
run "a red ball moving right on blue" --extend a.mp4 --seconds 8 --out extend.mp4 --preview "$ROOT/$OUT/extend.png"
run "a red ball bouncing on blue" --loop --seconds 8 --out loop.mp4 --preview "$ROOT/$OUT/loop.png"
run "a ball on blue" --extend a.mp4 --lead-into e.mp4 --seconds 4 --out bridge.mp4 --preview "$ROOT/$OUT/bridge.png"
run "a red ball on blue" --keyframe key1.png@0 --keyframe key2.png@6 --seconds 8 --out keys.mp4 \
    --preview "$ROOT/$OUT/keyframes.png"
ls -l "$ROOT/$OUT"

#!/bin/sh
# The table and plot of "Comparing three priors" (docs/results/compare.md), an example for the
# guide "Comparing models" (docs/guide/compare.md), and the TensorBoard picture that the guide
# "Watching a run: TensorBoard" (docs/guide/tensorboard.md) shows:
# three runs at the default settings but the prior, one comparison, one picture of their
# TensorBoard events. Run from the repository root: sh docs/results/compare/commands.sh
# (about 20 minutes on 2 CPU cores; a rerun reuses nothing: remove results/compare first).
set -eu
OUT=${OUT:-results/compare}
pyrovae train --quiet --out "$OUT/runs" --name default
pyrovae train --quiet --out "$OUT/runs" --name mog-10 --prior mog --prior-components 10
pyrovae train --quiet --out "$OUT/runs" --name vamp-50 --prior vamp --prior-components 50
pyrovae compare "$OUT/runs/default" "$OUT/runs/mog-10" "$OUT/runs/vamp-50" --num-samples 1000 --quiet \
    --markdown "$OUT/compare.md" --json "$OUT/compare.json" --plot "$OUT/compare.png"
python -c "import sys; from pyrovae.board import render; render(sys.argv[2:], sys.argv[1])" \
    "$OUT/board.png" "$OUT/runs/default" "$OUT/runs/mog-10" "$OUT/runs/vamp-50"

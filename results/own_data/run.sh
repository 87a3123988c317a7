#!/usr/bin/env bash
# The worked example of docs/own-data.md, exactly as written there: scikit-learn's digits as image
# files (10 labeled images per class, 1,197 unlabeled, 500 test), then `folder-uda-mpl` and
# `folder-supervised` on the CPU, seed 0. The supervised run takes the same options minus the two
# that `folder-supervised` refuses (cutout, unlabeled_ratio: it has no strong view and no unlabeled
# batch). Each run's stdout, results.json, metrics.csv, config.json and classes.json are copied
# into results/own_data/{uda_mpl,supervised}/ (not the checkpoints, curves or tb/). The runs'
# `seconds_this_session` come from a 2-core machine shared with other jobs: not a timing to quote.
# Usage: bash results/own_data/run.sh WORKDIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:?work folder}
mkdir -p "$work" && cd "$work"
python - <<'PY'
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

x, y = load_digits(return_X_y=True)
images = np.round(x * 255 / 16).astype(np.uint8).reshape(-1, 8, 8)  # 0..16 -> 0..255, grayscale
order = np.random.RandomState(0).permutation(len(y))
test, rest = order[:500], order[500:]
labeled = np.concatenate([rest[y[rest] == c][:10] for c in range(10)])  # 10 labels per class
unlabeled = np.setdiff1d(rest, labeled)
root = Path("my_digits")
for folder, rows, by_class in [
    ("labeled", labeled, True),
    ("unlabeled", unlabeled, False),
    ("test", test, True),
]:
    for i in rows:
        path = root / folder / (str(y[i]) if by_class else "") / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(path)
PY
metapl train --preset folder-uda-mpl --data-dir my_digits --out runs/my_digits --device cpu \
  --steps 300 --set model=small_cnn --set image_size=8 --set pad=1 --set cutout=4 --set flip=false \
  --set batch_size=16 --set unlabeled_ratio=3 --set eval_every=100 > uda_mpl.log
metapl train --preset folder-supervised --data-dir my_digits --out runs/my_digits_supervised \
  --device cpu --steps 300 --set model=small_cnn --set image_size=8 --set pad=1 --set flip=false \
  --set batch_size=16 --set eval_every=100 > supervised.log
for pair in uda_mpl:runs/my_digits supervised:runs/my_digits_supervised; do
  name=${pair%%:*} run=${pair#*:}
  mkdir -p "$here/$name"
  cp "$name.log" "$here/$name/run.log"
  cp "$run"/{results.json,metrics.csv,config.json,classes.json} "$here/$name/"
done

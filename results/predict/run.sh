#!/usr/bin/env bash
# The example of docs/predict-export.md, exactly as written there: train `digits-supervised`
# (seed 0, 1,500 steps, CPU), write the first four digits of scikit-learn's digits as PNGs, then
# `metapl predict` on the folder and `--top 3` on test1.png, then the TorchScript export and the
# exported model on test0.png. Copied into results/predict/: the training run's stdout (train.log),
# results.json and config.json (not its checkpoint, curves or tb/), the two predict outputs as
# printed (predict.txt, predict_top3.txt), export's output (export.txt) and the exported model's
# class and probability for test0.png (torchscript_test0.txt). The run's
# `seconds_this_session` comes from a 2-core machine shared with other jobs: not a timing to quote.
# Usage: bash results/predict/run.sh WORKDIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:?work folder}
mkdir -p "$work" && cd "$work"
metapl train --preset digits-supervised --out runs/digits > train.log
python -c "
from sklearn.datasets import load_digits; from PIL import Image; import os
d = load_digits(); os.makedirs('my_images', exist_ok=True)
for i in range(4):  # the first four digits: 0, 1, 2, 3 (white on black, 0..255)
    Image.fromarray((d.images[i] * 255 / 16).round().astype('uint8')).save(f'my_images/test{i}.png')
"
metapl predict --run runs/digits my_images/ > predict.txt
metapl predict --run runs/digits my_images/test1.png --top 3 > predict_top3.txt
metapl export --run runs/digits --format torchscript --output digits.pt > export.txt
python -c '
import numpy as np, torch
from PIL import Image

model = torch.jit.load("digits.pt")
image = np.array(Image.open("my_images/test0.png").convert("L"))[None, :, :, None]  # [1, 8, 8, 1]
probs = model(torch.from_numpy(image))  # tensor [1, 10]
print(int(probs.argmax()), f"{float(probs.max()):.4f}")
' > torchscript_test0.txt
cp train.log predict.txt predict_top3.txt export.txt torchscript_test0.txt "$here/"
cp runs/digits/results.json runs/digits/config.json "$here/"

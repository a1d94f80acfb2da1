"""Calibration and evaluation images from the photos scikit-learn and scikit-image ship.

    pip install scikit-learn scikit-image pillow numpy
    python sample_images.py --size 320 --out DIR

writes DIR/calib.npz (22 crops: scenes, animals, objects, eight LFW faces, and two crops
each of the astronaut and cameraman photos) and DIR/eval.npz (8 other crops of those two
photos, which hold people), each one array `images` of shape [N, 3, size, size], RGB in
[0, 1], the layout detectors such as YOLOv8 take. Crops are square, random (seeded), and
resized bilinearly.
"""

import argparse
import os

import numpy as np
import skimage.data as sd
from PIL import Image
from sklearn.datasets import load_sample_images


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    rng = np.random.default_rng(0)

    def rgb(im):
        return np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3]

    def crops(im, n, frac=(0.6, 1.0)):
        im = rgb(im)
        h, w, _ = im.shape
        out = []
        for _ in range(n):
            s = int(min(h, w) * rng.uniform(*frac))
            y0, x0 = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            c = Image.fromarray(im[y0:y0 + s, x0:x0 + s]).resize((a.size, a.size), Image.BILINEAR)
            out.append(np.asarray(c, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        return out

    china, flower = load_sample_images().images
    faces = np.load(os.path.join(sd.__path__[0], "lfw_subset.npy"))[:8]
    faces = [crops((f * 255).astype(np.uint8), 1, (1.0, 1.0))[0] for f in faces]
    calib = (crops(china, 2) + crops(flower, 2) + crops(sd.coffee(), 2) + crops(sd.chelsea(), 2) + crops(sd.rocket(), 2)
             + faces + crops(sd.astronaut(), 2) + crops(sd.camera(), 2))
    ev = crops(sd.astronaut(), 4, (0.5, 1.0)) + crops(sd.camera(), 4, (0.5, 1.0))
    os.makedirs(a.out, exist_ok=True)
    np.savez(os.path.join(a.out, "calib.npz"), images=np.stack(calib))
    np.savez(os.path.join(a.out, "eval.npz"), images=np.stack(ev))
    print(f"{len(calib)} calibration and {len(ev)} evaluation images of {a.size} x {a.size}")


if __name__ == "__main__":
    main()

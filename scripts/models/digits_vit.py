#!/usr/bin/env python3
"""The bundled digits ViT: a small vision transformer trained on scikit-learn's 8x8 digits,
for the accuracy gate's transformer rows (``cargo xtask accuracy``).

The model is torchvision's ``VisionTransformer`` (the class behind ViT-B/16, so it exports
the same graph: ``nn.MultiheadAttention``, erf GELU, LayerNorm, the class token) at
``image_size=8, patch_size=2`` (16 patches and the class token), 2 layers, 4 heads, width 64,
MLP 128, 10 classes, with a one-channel patch embedding. It is trained on the same split as
``digits.py`` (``train_test_split(test_size=500, stratify=labels, random_state=0)``: the
1297 training images; the 500 held-out ones are ``qnn/data/digits_test.safetensors``), with
AdamW (one-cycle schedule to lr 2e-3, weight decay 0.05, batch 64, 150 epochs, label
smoothing 0.1, each batch shifted by up to one pixel), then exported with the TorchScript exporter at opset 17 and a dynamic batch.

What it writes, into ``qnn/data/digits_vit/`` (beside the digits files it was trained on):

* ``model.onnx``: the trained model;
* ``info.json``: the architecture, its f32 accuracy on the 500 held-out images in PyTorch,
  and the largest difference between ONNX Runtime's output and PyTorch's;
* ``output_0.pb``: ONNX Runtime's f32 logits on the 500 held-out images (a TensorProto);
* ``model.safetensors``: the weights for ``qnn::zoo::vit(&VitConfig::digits())``, the same
  model written with qnn's graph API: torchvision's ``state_dict`` keys, but ``class_token``
  and ``encoder.pos_embedding`` get a ``.value`` suffix and each attention's
  ``in_proj_weight`` / ``in_proj_bias`` become ``in_proj.weight`` / ``in_proj.bias``;
* ``logits.safetensors``: ``logits_f32`` [500, 10], PyTorch's f32 logits on the held-out
  images.

Determinism: seeds for ``random``, ``numpy`` and ``torch``, ``torch.set_num_threads(1)``.

Rerun from the repository root (needs torch, torchvision, onnx, onnxruntime, scikit-learn):

    python scripts/models/digits_vit.py
"""

import json
import math
import os
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision.models.vision_transformer import VisionTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT_DIR = os.path.join(ROOT, "qnn", "data", "digits_vit")

SEED = 0
N_TEST = 500
EPOCHS = 150
BATCH = 64
LR = 2e-3
ARCH = dict(image_size=8, patch_size=2, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_split():
    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=N_TEST, stratify=y, random_state=SEED, shuffle=True)
    assert x_tr.shape == (1297, 1, 8, 8) and x_te.shape == (500, 1, 8, 8)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).clone()  # noqa: E731
    return t(x_tr), t(y_tr), t(x_te), t(y_te)


def build():
    m = VisionTransformer(**ARCH)
    # One input channel: the patch embedding of a grey image.
    m.conv_proj = torch.nn.Conv2d(1, ARCH["hidden_dim"], kernel_size=ARCH["patch_size"], stride=ARCH["patch_size"])
    return m


def train(x_tr, y_tr):
    seed_all(SEED)
    m = build()
    opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.05)
    steps = EPOCHS * math.ceil(len(x_tr) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(SEED)
    m.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), BATCH):
            idx = perm[i:i + BATCH]
            # A one-pixel random shift: the training set is small.
            x = x_tr[idx]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y_tr[idx], label_smoothing=0.1)
            loss.backward()
            opt.step()
            sched.step()
    m.eval()
    return m


def main():
    torch.set_num_threads(1)
    x_tr, y_tr, x_te, y_te = load_split()
    m = train(x_tr, y_tr)
    with torch.no_grad():
        logits = m(x_te)
    acc = float((logits.argmax(1) == y_te).double().mean())
    print(f"f32 accuracy on the {N_TEST} held-out images: {acc * 100:.1f}%", file=sys.stderr)
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, "model.onnx")
    torch.onnx.export(m, x_te[:1], path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out = s.run(None, {"x": x_te.numpy()})[0]
    with open(os.path.join(OUT_DIR, "output_0.pb"), "wb") as fh:
        fh.write(numpy_helper.from_array(out, "y").SerializeToString())
    info = {
        "architecture": "torchvision VisionTransformer, one-channel patch embedding",
        **ARCH,
        "f32_accuracy": acc,
        "ort_vs_torch_max_abs": float(np.abs(out - logits.numpy()).max()),
        "test_images": "qnn/data/digits_test.safetensors",
    }
    ours = {}
    for k, v in m.state_dict().items():
        k = k.replace("self_attention.in_proj_weight", "self_attention.in_proj.weight")
        k = k.replace("self_attention.in_proj_bias", "self_attention.in_proj.bias")
        if k in ("class_token", "encoder.pos_embedding"):
            k += ".value"
        ours[k] = v.detach().contiguous()
    save_file(ours, os.path.join(OUT_DIR, "model.safetensors"))
    save_file({"logits_f32": logits.contiguous()}, os.path.join(OUT_DIR, "logits.safetensors"))
    with open(os.path.join(OUT_DIR, "info.json"), "w") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
    print(json.dumps(info), file=sys.stderr)


if __name__ == "__main__":
    main()

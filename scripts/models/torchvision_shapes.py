#!/usr/bin/env python3
"""State-dict layout of the torchvision reference models in `qnn`'s zoo.

What it writes: ``qnn/data/torchvision_shapes.json`` (``qnn/data/`` created if
missing), listing every ``state_dict()`` entry, in ``state_dict()`` order, of
``torchvision.models.resnet18()``, ``resnet50()``, ``mobilenet_v2()``,
``mobilenet_v3_large()`` and ``efficientnet_b0()``, each
built with ``weights=None`` (random init; no pretrained weights are downloaded,
no network use at all)::

    {"torchvision_version": "<torchvision.__version__>",
     "models": {"resnet18":     [[name, [dim, ...], dtype], ...],
                "resnet50":     [...],
                "mobilenet_v2": [...], ...}}

``dtype`` is ``"float32"`` for parameters and BatchNorm running statistics and
``"int64"`` for BatchNorm ``num_batches_tracked`` (0-d, shape ``[]``); any other
dtype is an error.  Only names, shapes and dtypes are recorded: no values and
no numeric forward checks (the weights would be too big to commit).  The file
is compact: a header line, then one line per model.

How to rerun (from /work/main)::

    ~/qrust-venv/bin/python scripts/models/torchvision_shapes.py

Needs torch and torchvision in a virtualenv (generated with torch 2.15.0 and
torchvision 0.29.2, the newest torchvision on PyPI at the time; there is no
torchvision release paired with torch 2.15 yet).  The output depends only on
the torchvision version (the architecture), not on the random seed.
"""

import json
from pathlib import Path

import torch
import torchvision
from torchvision import models

OUT = Path(__file__).resolve().parents[2] / "qnn" / "data" / "torchvision_shapes.json"

BUILDERS = {
    "resnet18": models.resnet18,
    "resnet50": models.resnet50,
    "mobilenet_v2": models.mobilenet_v2,
    "mobilenet_v3_large": models.mobilenet_v3_large,
    "efficientnet_b0": models.efficientnet_b0,
}

DTYPES = {torch.float32: "float32", torch.int64: "int64"}


def layout(model: torch.nn.Module) -> list:
    entries = []
    for name, t in model.state_dict().items():
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: unexpected dtype {t.dtype}")
        entries.append([name, list(t.shape), DTYPES[t.dtype]])
    return entries


def main() -> None:
    torch.manual_seed(0)
    layouts = {key: layout(build(weights=None)) for key, build in BUILDERS.items()}

    # Hand-formatted so that each model sits on one line (valid JSON).
    lines = ["{" + f'"torchvision_version": {json.dumps(torchvision.__version__)},', ' "models": {']
    items = list(layouts.items())
    for i, (key, entries) in enumerate(items):
        sep = "," if i + 1 < len(items) else ""
        lines.append(f"  {json.dumps(key)}: {json.dumps(entries, separators=(',', ':'))}{sep}")
    lines.append("}}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == {"torchvision_version": torchvision.__version__, "models": layouts}

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    for key, entries in layouts.items():
        print(f"{key}: {len(entries)} state_dict entries")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

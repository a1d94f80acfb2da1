#!/usr/bin/env python3
"""Peer timing: whole models in PyTorch eager-mode int8, served to ``cargo xtask bench``.

For each model, torchvision's quantizable architecture (EfficientNet-B0 has none: it is timed
in float only, and reported without int8) gets the weights ``cargo xtask bench`` wrote (``peer_server.py`` describes the files and the protocol), is fused with
``fuse_model()``, given ``get_default_qconfig("x86")`` (HistogramObserver activations,
per-channel weights), prepared, calibrated on the same images as ours (one at a time) and
converted (the whole of which is timed, one thread). ``model(x)`` runs under ``torch.inference_mode()`` with
``torch.set_num_threads(threads)``.

    QRUST_PYTHON=~/qrust-venv/bin/python cargo xtask bench --peers
(needs ``pip install torch torchvision safetensors numpy``)
"""

import os
import sys
import time

import torch
import torch.ao.quantization as tq
from torchvision.models import efficientnet_b0
from torchvision.models.quantization import mobilenet_v2, mobilenet_v3_large, resnet18, resnet50

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_server  # noqa: E402

CTORS = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "resnet50": resnet50,
    "mobilenet_v3_large": mobilenet_v3_large,
}
FLOAT_ONLY = {"efficientnet_b0": efficientnet_b0}


class Torch:
    NAME = "pytorch"

    def __init__(self):
        torch.backends.quantized.engine = "x86"
        self.int8 = {}

    def prepare(self, name, directory, inputs):
        torch.set_num_threads(1)
        if name in FLOAT_ONLY:
            m = FLOAT_ONLY[name](weights=None).eval()
            peer_server.load_state_dict(m, directory, name)
            x = torch.from_numpy(inputs["x1"])
            with torch.inference_mode():
                return None, peer_server.median_ms(lambda: m(x), 5), None
        m = CTORS[name](weights=None, quantize=False).eval()
        peer_server.load_state_dict(m, directory, name)
        x = torch.from_numpy(inputs["x1"])
        xq = torch.from_numpy(inputs["xq"])
        with torch.inference_mode():
            f32_ms = peer_server.median_ms(lambda: m(x), 5)
            ref = m(xq)
        q = CTORS[name](weights=None, quantize=False).eval()
        q.load_state_dict(m.state_dict())
        calib = [torch.from_numpy(img[None].copy()) for img in inputs["calib"]]
        # The whole quantization, timed: fuse, prepare, calibrate, convert.
        t0 = time.perf_counter()
        q.fuse_model()
        q.qconfig = tq.get_default_qconfig("x86")
        tq.prepare(q, inplace=True)
        with torch.inference_mode():
            for img in calib:
                q(img)
        tq.convert(q, inplace=True)
        quantize_ms = (time.perf_counter() - t0) * 1e3
        with torch.inference_mode():
            got = q(xq)
        self.int8[name] = q
        return peer_server.sqnr_db(ref.numpy(), got.numpy()), f32_ms, quantize_ms

    def int8_runner(self, name, threads, x):
        torch.set_num_threads(threads)
        q, x = self.int8[name], torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                q(x)

        return run


if __name__ == "__main__":
    peer_server.serve(Torch())

#!/usr/bin/env python3
"""PyTorch's quantized (and float) results for the shape and resampling ops of ``qnn``'s
op registry, for ``qnn/tests/ops.rs``.

Writes ``qnn/data/ops_golden.safetensors``:

* ``input`` f32 [2, 6, 5, 7]: float values that are exactly the dequantized bytes
  ``input_int8`` u8 (NCHW) at ``scale`` f32 [1] / ``zero_point`` i64 [1], so quantizing
  ``input`` with those parameters gives ``input_int8`` back.
* for every case ``<case>.int8`` u8: PyTorch's quantized op on the quantized input
  (``int_repr()``, NCHW; every one of these keeps the input's parameters, asserted), and
  ``<case>.f32``: the float op on ``input``.

Cases: ``nearest2`` (``F.interpolate(scale_factor=2, mode="nearest")``), ``nearest_size``
(size (9, 11)), ``bilinear2`` (scale 2, ``align_corners=False``), ``bilinear_size_ac``
(size (7, 10), ``align_corners=True``), ``bilinear_down`` (size (3, 4)), ``pad_zero``
(``F.pad(x, (1, 2, 0, 1))``), ``pad_reflect`` ((2, 1, 1, 2), reflect), ``pad_replicate``
((1, 3, 2, 0), replicate: PyTorch has no quantized kernel for it, so its ``.int8`` is the
float result quantized with the input's parameters, exactly the bytes it moves), ``hardtanh`` (-0.5, 0.7), ``shuffle3`` (``F.channel_shuffle``,
3 groups), ``gelu`` (quantized ``F.gelu``, exact form).

torch 2.15, engine x86. Run: ``python scripts/golden/qnn_ops_golden.py``.
"""

import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# Ops PyTorch has no quantized kernel for (replication_pad2d).
NO_QUANTIZED_KERNEL = {"pad_replicate"}

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "qnn", "data", "ops_golden.safetensors")


def main():
    torch.manual_seed(11)
    torch.backends.quantized.engine = "x86"
    scale, zp = 0.0173, 121
    q = torch.randint(0, 256, (2, 6, 5, 7), dtype=torch.uint8)
    x = (q.to(torch.float32) - zp) * scale
    qx = torch.quantize_per_tensor(x, scale, zp, torch.quint8)
    assert torch.equal(qx.int_repr(), q), "the float input must quantize back to its bytes"
    cases = {
        "nearest2": lambda t: F.interpolate(t, scale_factor=2, mode="nearest"),
        "nearest_size": lambda t: F.interpolate(t, size=(9, 11), mode="nearest"),
        "bilinear2": lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False),
        "bilinear_size_ac": lambda t: F.interpolate(t, size=(7, 10), mode="bilinear", align_corners=True),
        "bilinear_down": lambda t: F.interpolate(t, size=(3, 4), mode="bilinear", align_corners=False),
        "pad_zero": lambda t: F.pad(t, (1, 2, 0, 1)),
        "pad_reflect": lambda t: F.pad(t, (2, 1, 1, 2), mode="reflect"),
        "pad_replicate": lambda t: F.pad(t, (1, 3, 2, 0), mode="replicate"),
        "hardtanh": lambda t: F.hardtanh(t, -0.5, 0.7),
        "shuffle3": lambda t: F.channel_shuffle(t, 3),
        "gelu": lambda t: F.gelu(t),
    }
    out = {
        "input": x,
        "input_int8": q,
        "scale": torch.tensor([scale], dtype=torch.float32),
        "zero_point": torch.tensor([zp], dtype=torch.int64),
    }
    for name, f in cases.items():
        with torch.no_grad():
            yf = f(x)
            if name in NO_QUANTIZED_KERNEL:
                # It only moves values: quantizing its float result with the input's
                # parameters gives exactly the bytes an int8 kernel would move.
                y = torch.quantize_per_tensor(yf, scale, zp, torch.quint8)
            else:
                y = f(qx)
        assert y.is_quantized, name
        # Parameters are kept (compared as the f32 PyTorch stores).
        f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
        assert (f32(y.q_scale()), y.q_zero_point()) == (f32(scale), zp), name
        out[f"{name}.int8"] = y.int_repr().contiguous()
        out[f"{name}.f32"] = yf.contiguous()
        print(f"{name}: {list(y.shape)}")
    save_file(out, OUT)
    os.chmod(OUT, 0o644)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Peer timing: transformers in PyTorch dynamic int8 and ONNX Runtime dynamic and static int8,
served to ``cargo xtask bench --filter transformers``.

Two models, each with random weights of a trained model's kind (``ort_models.trained_like``,
seed 11: non-zero biases, norm weights around 1):

- ``vit_b_16``: torchvision's ViT-B/16, input ``x`` [n, 3, 224, 224];
- ``bert_base_seq128``: Hugging Face ``transformers``' ``BertModel`` built from its default
  configuration (BERT-base, no download), eager attention, with inputs ``input_ids`` and
  ``token_type_ids`` [n, 128] (int64) and an additive float ``attention_mask``
  [n, 1, 1, 128] (0 where a token is attended, the dtype's minimum where it is padding:
  what ``BertModel`` takes as a 4-D mask); outputs ``last_hidden_state`` and
  ``pooler_output``.

Each is built once, then quantized three ways, each served under its own name:

- ``<model>/pytorch_dynamic``: ``torch.ao.quantization.quantize_dynamic`` on the module's
  ``nn.Linear`` layers (qint8 weights), PyTorch's best-known transformer quantization;
- ``<model>/onnxruntime_dynamic``: the module exported to ONNX (opset 17, dynamic batch,
  kept as ``<model>.onnx`` beside the inputs for our side to import), ``quant_pre_process``,
  then ``quantize_dynamic`` (per-channel ``QInt8`` weights);
- ``<model>/onnxruntime_static``: the same pre-processed file through ``quantize_static``
  (QDQ, per-channel ``QInt8`` weights, ``QUInt8`` activations, MinMax calibration on the
  ``calib`` items one at a time, as ours).

The bench writes the inputs (``inputs.safetensors``) as ``<model>.<input>.<set>``, sets
``calib`` (16 items), ``x1`` (the timed item) and ``xq`` (4 items, for the SQNR), all f32
(token ids are whole numbers; they are cast to int64 here). Each flavour's SQNR is its
first output against its own float model's on ``xq``; ONNX Runtime's fp32 first output on
``xq`` is written as ``<model>.ort_f32.pb``, against which the bench checks our float
import. ``peer_server.py`` describes the protocol.

    QRUST_PYTHON=~/qrust-venv/bin/python cargo xtask bench --filter transformers --peers
(needs ``pip install torch torchvision transformers onnx onnxruntime safetensors numpy``)
"""

import os
import sys
import tempfile
import time

import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)
from torchvision.models import vit_b_16

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_server  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader  # noqa: E402
from ort_models import OneThread, save_pb, session, trained_like  # noqa: E402

INPUTS = {
    "vit_b_16": ["x"],
    "bert_base_seq128": ["input_ids", "token_type_ids", "attention_mask"],
}


class Bert(torch.nn.Module):
    """``BertModel`` with positional inputs and a tuple of outputs, for the exporter."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig()
        cfg._attn_implementation = "eager"
        self.m = BertModel(cfg, add_pooling_layer=True).eval()

    def forward(self, input_ids, token_type_ids, attention_mask):
        o = self.m(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return o.last_hidden_state, o.pooler_output


CTORS = {"vit_b_16": lambda: vit_b_16(weights=None), "bert_base_seq128": Bert}


def feeds(base, inputs, which):
    """The ONNX feeds of set ``which`` (``calib``, ``x1``, ``xq``): token ids as int64."""
    out = {}
    for name in INPUTS[base]:
        a = inputs[f"{base}.{name}.{which}"]
        out[name] = a.astype("int64") if name.endswith("_ids") else a
    return out


class Items(CalibrationDataReader):
    def __init__(self, calib):
        n = len(next(iter(calib.values())))
        self.batches = iter([{k: v[i:i + 1].copy() for k, v in calib.items()} for i in range(n)])

    def get_next(self):
        return next(self.batches, None)


def first(outputs):
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


class Transformers:
    NAME = "transformers"

    def __init__(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.base = {}
        self.runners = {}

    def model(self, base, directory, inputs):
        """The float module, its ONNX export and the pre-processed file, built once per model."""
        if base not in self.base:
            torch.manual_seed(0)
            m = trained_like(CTORS[base]().eval(), 11)
            f = os.path.join(directory, f"{base}.onnx")
            x1 = feeds(base, inputs, "x1")
            names = INPUTS[base]
            outs = ["y"] if base == "vit_b_16" else ["last_hidden_state", "pooler_output"]
            axes = {n: {0: "batch"} for n in names + outs}
            torch.onnx.export(m, tuple(torch.from_numpy(x1[n]) for n in names), f, input_names=names,
                              output_names=outs, dynamic_axes=axes, opset_version=17, dynamo=False)
            pre = os.path.join(self.tmp.name, f"{base}.pre.onnx")
            default_options = ort.SessionOptions
            ort.SessionOptions = OneThread
            try:
                t0 = time.perf_counter()
                try:
                    quant_pre_process(f, pre)
                except AssertionError:
                    # Its symbolic shape inference fails on nn.MultiheadAttention's reshapes;
                    # the other steps run without it.
                    quant_pre_process(f, pre, skip_symbolic_shape=True)
                pre_ms = (time.perf_counter() - t0) * 1e3
            finally:
                ort.SessionOptions = default_options
            fs = session(f, 1)
            ref = fs.run(None, feeds(base, inputs, "xq"))[0]
            save_pb(ref, os.path.join(directory, f"{base}.ort_f32.pb"))
            ort_f32_ms = peer_server.median_ms(lambda: fs.run(None, x1), 5)
            self.base[base] = (m, pre, pre_ms, ref, ort_f32_ms)
        return self.base[base]

    def prepare(self, name, directory, inputs):
        base, flavour = name.split("/")
        m, pre, pre_ms, ort_ref, ort_f32_ms = self.model(base, directory, inputs)
        xq, x1 = feeds(base, inputs, "xq"), feeds(base, inputs, "x1")
        tensors = lambda fs: tuple(torch.from_numpy(fs[n]) for n in INPUTS[base])  # noqa: E731
        if flavour == "pytorch_dynamic":
            torch.set_num_threads(1)
            with torch.no_grad():
                ref = first(m(*tensors(xq))).numpy()
                f32_ms = peer_server.median_ms(lambda: m(*tensors(x1)), 5)
                t0 = time.perf_counter()
                q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
                quantize_ms = (time.perf_counter() - t0) * 1e3
                got = first(q(*tensors(xq))).numpy()

            def runner(threads, q=q, xs=tensors(x1)):
                torch.set_num_threads(threads)

                def run():
                    with torch.no_grad():
                        q(*xs)

                return run

            self.runners[name] = runner
            return peer_server.sqnr_db(ref, got), f32_ms, quantize_ms
        out = os.path.join(self.tmp.name, f"{base}.{flavour}.onnx")
        default_options = ort.SessionOptions
        ort.SessionOptions = OneThread
        try:
            t0 = time.perf_counter()
            if flavour == "onnxruntime_dynamic":
                quantize_dynamic(pre, out, weight_type=QuantType.QInt8, per_channel=True)
            elif flavour == "onnxruntime_static":
                quantize_static(pre, out, Items(feeds(base, inputs, "calib")), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
            else:
                raise SystemExit(f"unknown flavour {flavour!r} of {base}")
            quantize_ms = pre_ms + (time.perf_counter() - t0) * 1e3
        finally:
            ort.SessionOptions = default_options
        got = session(out, 1).run(None, xq)[0]
        sessions = {}

        def runner(threads, out=out, sessions=sessions, x1=x1):
            if threads not in sessions:
                sessions[threads] = session(out, threads)
            s = sessions[threads]
            return lambda: s.run(None, x1)

        self.runners[name] = runner
        return peer_server.sqnr_db(ort_ref, got), ort_f32_ms, quantize_ms

    def run_file(self, path, x):
        s = session(path, 1)
        return s.run(None, {s.get_inputs()[0].name: x})[0]

    def int8_runner(self, name, threads, x):
        # Each model runs on its own timed item (``x1`` of its inputs), not the bench's image.
        return self.runners[name](threads)


if __name__ == "__main__":
    peer_server.serve(Transformers())

#!/usr/bin/env python3
"""Fixtures for models whose sequence length is symbolic (``qonnx/tests/it/sequence.rs``).

Writes ``qonnx/tests/data/sequence/<case>/``:

- ``bert``: Hugging Face ``transformers``' ``BertModel`` from a small configuration (2 layers,
  hidden size 32, 2 heads, 40 positions), random weights, exported by the TorchScript
  exporter at opset 17 with ``input_ids`` and ``token_type_ids`` ``[batch, seq]`` (int64)
  and an additive float ``attention_mask`` ``[batch, 1, 1, seq]``, both ``batch`` and
  ``seq`` symbolic; outputs ``last_hidden_state`` and ``pooler_output``.
- ``pairs``: ``x [batch, seq, 4]`` reshaped to ``[batch, seq / 2, 8]`` (tokens taken in
  pairs), then a linear layer: a model that runs only at even lengths.

Per case, for each length ``T`` in the case's list: ``T<T>_<input>.pb`` (batch 2; the last
three positions of the second item masked out for ``bert``) and ``T<T>_<output>.pb``, ONNX
Runtime's fp32 outputs (graph optimizations off); and ``calib_<input>.pb`` (8 items at the
first length).

    ~/qrust-venv/bin/python scripts/onnx/qonnx_sequence_fixture.py
(needs: pip install torch transformers onnx onnxruntime numpy)
"""

import os
import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "qonnx", "tests", "data", "sequence")


class Bert(torch.nn.Module):
    """``BertModel`` with positional inputs and a tuple of outputs, for the exporter."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=40)
        self.m = BertModel(cfg, add_pooling_layer=True).eval()

    def forward(self, input_ids, token_type_ids, attention_mask):
        o = self.m(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        return o.last_hidden_state, o.pooler_output


class Pairs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.fc(x.reshape(x.size(0), x.size(1) // 2, 8))


def bert_inputs(rng, n, t):
    ids = rng.integers(0, 100, (n, t)).astype(np.int64)
    types = (rng.random((n, t)) > 0.5).astype(np.int64)
    mask = np.zeros((n, 1, 1, t), np.float32)
    if n > 1:
        mask[1, ..., t - 3:] = -10000.0
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def pairs_inputs(rng, n, t):
    return {"x": rng.standard_normal((n, t, 4)).astype(np.float32)}


CASES = {
    # name: (module, inputs, outputs, axes of seq per input, lengths, inputs at length)
    "bert": (Bert, ["input_ids", "token_type_ids", "attention_mask"], ["last_hidden_state", "pooler_output"],
             {"input_ids": 1, "token_type_ids": 1, "attention_mask": 3}, [12, 7, 20, 40], bert_inputs),
    "pairs": (Pairs, ["x"], ["y"], {"x": 1}, [12, 6], pairs_inputs),
}


def save_pb(a, path, name):
    with open(path, "wb") as fh:
        fh.write(numpy_helper.from_array(np.ascontiguousarray(a), name).SerializeToString())


def main():
    warnings.filterwarnings("ignore")
    shutil.rmtree(OUT, ignore_errors=True)
    for seed, (name, (ctor, ins, outs, seq_axes, lengths, make)) in enumerate(CASES.items()):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = ctor().eval()
        d = os.path.join(OUT, name)
        os.makedirs(d)
        path = os.path.join(d, "model.onnx")
        x0 = make(rng, 2, lengths[0])
        axes = {n: {0: "batch", seq_axes[n]: "seq"} for n in ins}
        axes.update({o: {0: "batch"} for o in outs})
        if name == "bert":
            axes["last_hidden_state"][1] = "seq"
        else:
            axes["y"][1] = "half"
        with torch.no_grad():
            torch.onnx.export(model, tuple(torch.from_numpy(x0[n]) for n in ins), path, input_names=ins,
                              output_names=outs, dynamic_axes=axes, opset_version=17, dynamo=False)
        onnx.checker.check_model(onnx.load(path))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        for t in lengths:
            x = x0 if t == lengths[0] else make(rng, 2, t)
            ys = s.run(None, x)
            for n in ins:
                save_pb(x[n], os.path.join(d, f"T{t}_{n}.pb"), n)
            for o, y in zip(outs, ys):
                save_pb(y, os.path.join(d, f"T{t}_{o}.pb"), o)
        calib = make(rng, 8, lengths[0])
        for n in ins:
            save_pb(calib[n], os.path.join(d, f"calib_{n}.pb"), n)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({size} bytes)")


if __name__ == "__main__":
    main()

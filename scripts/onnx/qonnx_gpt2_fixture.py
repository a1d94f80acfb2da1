#!/usr/bin/env python3
"""The GPT-2 fixture of qonnx's tests (``qonnx/tests/it/gpt2.rs``).

Writes ``qonnx/tests/data/gpt2/``: Hugging Face ``transformers``' ``GPT2Model`` from a small
configuration (2 layers, width 32, 2 heads, 64 positions, 100 tokens), random weights,
exported by PyTorch's dynamo exporter at opset 18 for ``input_ids`` of shape ``[1, 12]``
(int64; ``use_cache`` off), output ``last_hidden_state``. The export writes what GPT-2's
blocks need besides linear layers: the tanh form of GELU (``gelu_new``) as ``Pow`` / ``Tanh``
arithmetic, the causal mask as a constant ``[1, 1, 12, 12]`` added to the scores, and
``Where(IsNaN(p), 0, p)`` after each softmax. Also ``input_ids.pb`` (one item),
``last_hidden_state.pb`` (ONNX Runtime's fp32 output, graph optimizations off) and
``calib_input_ids.pb`` (8 items, one at a time).

    ~/qrust-venv/bin/python scripts/onnx/qonnx_gpt2_fixture.py
(needs: pip install torch transformers onnx onnxscript onnxruntime numpy)
"""

import os
import shutil
import warnings

import numpy as np
import onnxruntime as ort
import torch
from onnx import numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "qonnx", "tests", "data", "gpt2")
TOKENS = 12


class Gpt2(torch.nn.Module):
    """``GPT2Model``'s last hidden state, for the exporter."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        cfg = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
        self.m = GPT2Model(cfg).eval()

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).last_hidden_state


def save_pb(a, path, name):
    with open(path, "wb") as fh:
        fh.write(numpy_helper.from_array(np.ascontiguousarray(a), name).SerializeToString())


def main():
    warnings.filterwarnings("ignore")
    torch.manual_seed(7)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    model = Gpt2().eval()
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 100, (1, TOKENS)).astype(np.int64)
    calib = rng.integers(0, 100, (8, TOKENS)).astype(np.int64)
    path = os.path.join(OUT, "model.onnx")
    prog = torch.onnx.export(model, (torch.from_numpy(ids),), dynamo=True, opset_version=18,
                             input_names=["input_ids"], output_names=["last_hidden_state"], external_data=False)
    prog.save(path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).numpy()
    assert np.abs(out - want).max() <= 1e-4 * np.abs(want).max(), "ONNX Runtime disagrees with PyTorch"
    save_pb(ids, os.path.join(OUT, "input_ids.pb"), "input_ids")
    save_pb(calib, os.path.join(OUT, "calib_input_ids.pb"), "input_ids")
    save_pb(out.astype(np.float32), os.path.join(OUT, "last_hidden_state.pb"), "last_hidden_state")
    size = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{size / 1e3:.0f} kB in {OUT}")


if __name__ == "__main__":
    main()

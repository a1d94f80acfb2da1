"""Runs a float ONNX model and our QDQ export of its int8 form in ONNX Runtime on the same
inputs and prints each one's SQNR against the float model's first output, beside our own
int8 output's.

    python scripts/onnx/qdq_vs_float.py float.onnx model.qdq.onnx inputs.npz ours.npy

`inputs.npz` holds one array per input name (integer token ids included: each model gets
them as the type it declares); `ours.npy` is `qrust run
model.int8.safetensors --input inputs.npz --output ours.npy`.
"""

import sys

import numpy as np
import onnxruntime as ort


def sqnr(y, ref):
    return 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((y - ref).astype(np.float64) ** 2).sum())


def main():
    float_path, qdq_path, inputs_path, ours_path = sys.argv[1:5]
    x = np.load(inputs_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    f = ort.InferenceSession(float_path, opts, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(qdq_path, opts, providers=["CPUExecutionProvider"])
    dtype = lambda t: np.int64 if "int64" in t else np.int32 if "int32" in t else np.float32
    ref = f.run(None, {i.name: x[i.name].astype(dtype(i.type)) for i in f.get_inputs()})[0]
    y = q.run(None, {i.name: x[i.name].astype(dtype(i.type)) for i in q.get_inputs()})[0]
    ours = np.load(ours_path).reshape(ref.shape)
    print(f"ONNX Runtime on the QDQ export: {sqnr(y, ref):.2f} dB against the float model")
    print(f"ours (int8):                    {sqnr(ours, ref):.2f} dB")
    print(f"the export against ours:        {sqnr(y, ours):.2f} dB")


if __name__ == "__main__":
    main()

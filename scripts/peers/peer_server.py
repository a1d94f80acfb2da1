"""What the whole-model peer scripts share: the files they read and the timing server.

``cargo xtask bench`` writes, in one directory, each model's float weights as a safetensors
``state_dict`` under torchvision's names (``<model>.safetensors``: random weights with
non-zero biases and batch-norm statistics, as a trained model has) and the inputs
(``inputs.safetensors``: ``calib`` [N, 3, 224, 224], calibrated one image at a time, ``x1``
[1, 3, 224, 224] and ``x8`` [8, 3, 224, 224], timed, and ``xq`` [16, 3, 224, 224], the
images whose outputs give the int8 SQNR against the same side's float model). Our side and
every peer quantize the same model on the same images and are timed on the same inputs.

A peer script builds its models (``Backend.prepare``), prints one JSON line
``{"ready": {model: {"sqnr_db": .., "f32_ms": .., "quantize_ms": .., "int8": true | false}}}``
(``quantize_ms``: the whole quantization on one thread, from the float model to the runnable
int8 one, calibration on the ``calib`` images included; null without an int8 form), then answers requests on standard input,
one JSON line each, ``{"model": .., "threads": .., "batch": 1 | 8}``, with ``{"int8_ms": ..}``
(the median of at least ``reps`` runs and 0.25 s, after 3 warm-up runs), or (ONNX Runtime)
``{"run_file": model.onnx, "input": "xq", "out": file.pb}`` with ``{"done": true}`` after
running that model on that input and writing its first output, until standard input closes. Between requests it is idle, so ``cargo xtask bench`` can alternate our
timings with the peers' over several rounds.
"""

import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
from safetensors.numpy import load_file


def load_inputs(directory):
    return load_file(os.path.join(directory, "inputs.safetensors"))


def load_state_dict(module, directory, name):
    """Loads ``<name>.safetensors`` into a torch module; every parameter and statistic must be
    there, and nothing else (PyTorch's ``num_batches_tracked`` counters are the exception:
    evaluation never reads them)."""
    from safetensors.torch import load_file as load_torch

    sd = load_torch(os.path.join(directory, name + ".safetensors"))
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"{name}: weights do not match torchvision's names: missing {missing}, unexpected {unexpected}")


def median_ms(run, reps):
    for _ in range(3):
        run()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < 0.25:
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sqnr_db(ref, got):
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    return float(10 * np.log10((ref**2).mean() / ((ref - got) ** 2).mean()))


def serve(backend, argv=None):
    """``backend.prepare(name, directory, inputs) -> (sqnr_db or None, f32_ms_1_thread,
    quantize_ms or None)`` (None: the peer has no int8 form of the model; it is then never
    asked to time one) and
    ``backend.int8_runner(name, threads, x) -> callable`` (a function running the int8 model
    once on ``x``)."""
    import argparse

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="the directory cargo xtask bench wrote")
    ap.add_argument("--models", required=True)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args(argv)
    inputs = load_inputs(a.dir)
    ready = {}
    for name in a.models.split(","):
        sqnr, f32_ms, quantize_ms = backend.prepare(name, a.dir, inputs)
        ready[name] = {"sqnr_db": sqnr, "f32_ms": f32_ms, "quantize_ms": quantize_ms, "int8": sqnr is not None}
        print(f"{backend.NAME} {name}: int8 SQNR {sqnr} dB, f32 {f32_ms:.2f} ms", file=sys.stderr, flush=True)
    print(json.dumps({"ready": ready}), flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        req = json.loads(line)
        if "run_file" in req:
            # Run another ONNX model (our QDQ export) on one of the inputs; write its first output.
            try:
                y = backend.run_file(req["run_file"], inputs[req["input"]])
                from onnx import numpy_helper

                with open(req["out"], "wb") as fh:
                    fh.write(numpy_helper.from_array(np.ascontiguousarray(y)).SerializeToString())
                print(json.dumps({"done": True}), flush=True)
            except Exception as e:  # noqa: BLE001 - reported to the bench, which names the file
                print(json.dumps({"error": str(e)}), flush=True)
            continue
        # Backends whose models take other inputs time their own items (x is then None).
        x = inputs.get("x1" if req["batch"] == 1 else "x8")
        if x is not None and x.shape[0] != req["batch"]:
            raise SystemExit(f"no input of batch {req['batch']}")
        run = backend.int8_runner(req["model"], req["threads"], x)
        print(json.dumps({"int8_ms": median_ms(run, a.reps)}), flush=True)

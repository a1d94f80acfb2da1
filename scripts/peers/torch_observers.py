#!/usr/bin/env python3
"""Peer timing: PyTorch's HistogramObserver and MinMaxObserver on the CPU.

Measures, with one intra-op thread (``torch.set_num_threads(1)``):

* ``histogram_gbps`` / ``histogram_ms_per_batch``: ``HistogramObserver()``
  (bins=2048, quint8, per-tensor affine) ``forward`` on one 12.8 MB float32
  batch, ``torch.randn(4, 64, 112, 112)``.  One warm-up batch is fed first,
  so the timed calls take the steady-state path (histc over the running
  range plus ``histogram + update``; the range does not grow because the
  same batch is fed again).  Median of ``--reps`` calls.
* ``minmax_gbps``: ``MinMaxObserver()`` ``forward`` on the same batch, after
  one warm-up call, median of ``--reps`` calls.
* ``calibrate_32_ms``: calibration-style total: 32 different batches of shape
  [1, 64, 56, 56] (pre-generated, not timed) fed through a fresh
  ``HistogramObserver()`` followed by ``calculate_qparams()``; median of
  ``--cal-reps`` runs.

GB/s is input bytes (numel * 4) / seconds / 1e9.  Prints one JSON object:
{"histogram_gbps", "minmax_gbps", "histogram_ms_per_batch", "calibrate_32_ms"}.

Run from the repository root:

    /work/venv/bin/python scripts/peers/torch_observers.py [--reps N] [--cal-reps M]
"""

import argparse
import json
import statistics
import time
import warnings

import torch
from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver


def median_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--cal-reps", type=int, default=5)
    args = ap.parse_args()

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 112, 112, generator=g)
    nbytes = x.numel() * x.element_size()

    hist = HistogramObserver()
    hist(x)  # warm-up batch (initialises the range)
    t_hist = median_time(lambda: hist(x), args.reps)

    mm = MinMaxObserver()
    mm(x)  # warm-up
    t_mm = median_time(lambda: mm(x), args.reps)

    cal = [torch.randn(1, 64, 56, 56, generator=g) for _ in range(32)]

    def calibrate():
        obs = HistogramObserver()
        for b in cal:
            obs(b)
        obs.calculate_qparams()

    calibrate()  # warm-up
    t_cal = median_time(calibrate, args.cal_reps)

    print(json.dumps({
        "histogram_gbps": nbytes / t_hist / 1e9,
        "minmax_gbps": nbytes / t_mm / 1e9,
        "histogram_ms_per_batch": t_hist * 1e3,
        "calibrate_32_ms": t_cal * 1e3,
    }))


if __name__ == "__main__":
    main()

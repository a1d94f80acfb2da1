#!/usr/bin/env python3
"""Steady-state throughput of qkernels' aarch64 GEMM micro-kernels, as llvm-mca predicts it.

Speed on aarch64 cannot be measured on x86 machines (emulation timings mean nothing), so
this script compiles qkernels for aarch64-unknown-linux-gnu in release mode, takes each
micro-kernel's innermost loop from the emitted assembly (the loop body holding the most
multiply-accumulate instructions), and runs llvm-mca on it for each core. It prints, per
kernel and core, the predicted cycles per loop iteration, the multiply-accumulates (MACs)
per cycle, and that as a fraction of the core's peak for the kernel's instruction: the
instruction's reciprocal throughput on that core (from the same scheduling model) times
its MACs. llvm-mca assumes every load hits the L1 cache: these are steady-state figures
for the micro-kernel's loop, not for a whole layer.

Needs: the aarch64 rustup target, and llvm-mca (Debian's llvm-19 package has llvm-mca-19).
Usage: python3 scripts/mca/aarch64_kernels.py [--mca llvm-mca-19] [--markdown]
"""

import argparse
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = "aarch64-unknown-linux-gnu"
# LLVM 19's `apple-m1` reuses the Cyclone (A7) scheduling model, so Apple cores are left out
# rather than reported from a 2013 core's pipes.
CORES = ["neoverse-v1", "neoverse-v2", "neoverse-n1"]
# Cores without the int8 matrix-multiply extension: the i8mm kernel never runs there.
NO_I8MM = {"neoverse-n1"}

# kernel: (function name fragment, MAC instruction, MACs per instruction, attributes, tile,
# the instruction on fixed sources for its peak, `{d}` its destination)
KERNELS = {
    "neon": ("neon_strip", "smlal", 4, "+neon", "4 x 16", "smlal {d}.4s, v0.4h, v1.4h"),
    "dotprod": ("dot_strip", "sdot", 16, "+neon,+dotprod", "5 x 16", "sdot {d}.4s, v0.16b, v1.4b[0]"),
    "i8mm": ("mmla_strip", "usmmla", 32, "+neon,+dotprod,+i8mm", "6 x 16", "usmmla {d}.4s, v0.16b, v1.16b"),
}


def emit_asm():
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(ROOT, "target", "mca"))
    subprocess.run(
        ["cargo", "rustc", "--release", "-p", "qkernels", "--lib", "--target", TARGET, "--",
         "--emit", "asm", "-C", "codegen-units=1"],
        cwd=ROOT, env=env, check=True,
    )
    files = glob.glob(os.path.join(ROOT, "target", "mca", TARGET, "release", "deps", "qkernels-*.s"))
    if not files:
        sys.exit("no assembly emitted")
    return open(max(files, key=os.path.getmtime)).read().splitlines()


def functions(lines):
    """Function name -> body lines (between its label and .size)."""
    out, name, body = {}, None, []
    for line in lines:
        m = re.match(r"^(_ZN[\w$.]+|[A-Za-z_][\w$.]*):\s*$", line)
        if m and not line.startswith(".L"):
            name, body = m.group(1), []
            continue
        if name is None:
            continue
        if line.strip().startswith(".size") and name in line:
            out[name] = body
            name = None
            continue
        body.append(line)
    return out


def hot_loop(body, mnemonic):
    """The loop (label .. backward branch to it) with the most `mnemonic` instructions (and
    their `2` forms, which take the upper halves)."""
    labels = {}
    best = None
    for i, line in enumerate(body):
        m = re.match(r"^(\.L\w+):", line)
        if m:
            labels[m.group(1)] = i
        m = re.match(r"^\s+(b\.\w+|b|cbnz|cbz|tbnz|tbz)\s+.*?(\.L\w+)\s*$", line)
        if m and m.group(2) in labels:
            start = labels[m.group(2)]
            insts = [l for l in body[start + 1:i + 1] if re.match(r"^\s+[a-z]", l) and not l.strip().startswith(".")]
            n = sum(1 for l in insts if l.split()[0] in (mnemonic, mnemonic + "2"))
            if best is None or n > best[0]:
                best = (n, insts)
    return best


def mca(mca_bin, insts, cpu, attrs):
    src = "\n".join(l.strip() for l in insts) + "\n"
    r = subprocess.run(
        [mca_bin, "-mtriple=aarch64", f"-mcpu={cpu}", f"-mattr={attrs}", "-iterations=1000"],
        input=src, capture_output=True, text=True, check=True,
    )
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", r.stdout).group(1))
    iters = int(re.search(r"Iterations:\s+(\d+)", r.stdout).group(1))
    return cycles / iters


def rthroughput(mca_bin, template, cpu, attrs):
    """Cycles per instruction for an independent stream of `template`: `{d}` is a different
    accumulator each time, the sources are fixed registers outside them."""
    regs = [f"v{i}" for i in range(8, 32)]
    src = "".join(template.format(d=r) + "\n" for r in regs)
    r = subprocess.run(
        [mca_bin, "-mtriple=aarch64", f"-mcpu={cpu}", f"-mattr={attrs}", "-iterations=1000"],
        input=src, capture_output=True, text=True, check=True,
    )
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", r.stdout).group(1))
    return cycles / (1000 * len(regs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mca", default="llvm-mca-19")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    funcs = functions(emit_asm())
    rows = []
    for tier, (frag, mnem, macs, attrs, tile, peak_line) in KERNELS.items():
        cands = [n for n in funcs if frag in n]
        if not cands:
            sys.exit(f"{frag} not found in the assembly")
        n_mac, insts = max((hot_loop(funcs[n], mnem) or (0, [])) for n in cands)
        if n_mac == 0:
            sys.exit(f"{frag}: no loop with {mnem}")
        for cpu in CORES:
            if tier == "i8mm" and cpu in NO_I8MM:
                continue
            cyc = mca(args.mca, insts, cpu, attrs)
            peak = macs / rthroughput(args.mca, peak_line, cpu, attrs)
            dot_peak = 16 / rthroughput(args.mca, KERNELS["dotprod"][5], cpu, "+neon,+dotprod")
            got = n_mac * macs / cyc
            rows.append((tier, tile, cpu, len(insts), n_mac, cyc, got, peak, dot_peak))
    if args.markdown:
        print("| tier | tile | core | loop instructions | of them multiply-accumulates | cycles / iteration "
              "| MACs / cycle | of the instruction's peak | of the core's `sdot` peak |")
        print("|---|---|---|---|---|---|---|---|---|")
        for t, tile, cpu, n, k, cyc, got, peak, dot in rows:
            print(f"| {t} | {tile} | {cpu} | {n} | {k} | {cyc:.2f} | {got:.1f} | {got / peak:.0%} of {peak:.0f} "
                  f"| {got / dot:.0%} of {dot:.0f} |")
    else:
        for t, tile, cpu, n, k, cyc, got, peak, dot in rows:
            print(f"{t:8} {tile:7} {cpu:12} {n:4} insts {k:3} MAC insts {cyc:7.2f} cyc/iter {got:6.1f} MAC/cyc: "
                  f"{got / peak:4.0%} of {peak:5.1f} ({mnem_of(t)} peak), {got / dot:4.0%} of {dot:5.1f} (sdot peak)")


def mnem_of(tier):
    return KERNELS[tier][1]

if __name__ == "__main__":
    main()

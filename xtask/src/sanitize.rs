//! `cargo xtask sanitize`: the crates with `unsafe` code (qtensor, qkernels, qobserve) tested
//! under AddressSanitizer once per forced instruction set (every SIMD path, as
//! `conformance` runs them), or with `--miri` under Miri on the scalar tier (the packing, the
//! scalar kernels and the dispatch around them; Miri does not run AVX-512). Both need the
//! nightly toolchain; Miri also its `miri` and `rust-src` components, which this command adds
//! with rustup when they are missing.

use std::path::Path;
use std::process::Command;

const CRATES: [&str; 6] = ["-p", "qtensor", "-p", "qkernels", "-p", "qobserve"];
const HOST: &str = "x86_64-unknown-linux-gnu";

fn status(cmd: &mut Command, what: &str) -> Result<bool, String> {
    cmd.status().map(|s| s.success()).map_err(|e| format!("cannot run {what}: {e}"))
}

fn asan(root: &Path) -> Result<(), String> {
    let (tiers, skipped) =
        crate::conformance::runnable(crate::conformance::tiers(qtensor::isa::Isa::host_arch()), false);
    for isa in &skipped {
        println!("== AddressSanitizer, QUANT_FORCE_ISA={isa}: skipped, this CPU lacks it");
    }
    let mut failed = Vec::new();
    for &isa in &tiers {
        println!("== AddressSanitizer, QUANT_FORCE_ISA={isa}");
        let ok = status(
            Command::new("cargo")
                .current_dir(root)
                .args(["+nightly", "test", "--quiet", "--target", HOST])
                .args(CRATES)
                .env("RUSTFLAGS", "-Zsanitizer=address")
                .env("RUSTDOCFLAGS", "-Zsanitizer=address")
                .env("CARGO_TARGET_DIR", root.join("target/asan"))
                .env("QUANT_FORCE_ISA", isa)
                .env("QUANT_REQUIRE_ISA", "1"),
            "cargo +nightly test (is the nightly toolchain installed?)",
        )?;
        if !ok {
            failed.push(isa);
        }
    }
    if failed.is_empty() {
        println!("AddressSanitizer: clean on {}", tiers.join(", "));
        Ok(())
    } else {
        Err(format!("AddressSanitizer run failed with QUANT_FORCE_ISA={}", failed.join(", ")))
    }
}

fn miri(root: &Path) -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["+nightly", "component", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for comp in ["miri", "rust-src"] {
        if !installed.lines().any(|l| l.starts_with(comp)) {
            status(
                Command::new("rustup").args(["component", "add", comp, "--toolchain", "nightly"]),
                "rustup component add",
            )?;
        }
    }
    println!("== Miri, QUANT_FORCE_ISA=scalar");
    // Tree borrows: rayon's crossbeam-epoch trips the older stacked-borrows model.
    let ok = status(
        Command::new("cargo")
            .current_dir(root)
            .args(["+nightly", "miri", "test", "--quiet"])
            .args(CRATES)
            .env("MIRIFLAGS", "-Zmiri-disable-isolation -Zmiri-permissive-provenance -Zmiri-tree-borrows")
            .env("QUANT_FORCE_ISA", "scalar"),
        "cargo +nightly miri",
    )?;
    if ok {
        println!("Miri: clean");
        Ok(())
    } else {
        Err("the Miri run failed (see above)".into())
    }
}

pub fn run(root: &Path, with_miri: bool) -> Result<(), String> {
    if with_miri {
        miri(root)
    } else {
        asan(root)
    }
}

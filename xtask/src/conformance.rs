//! `cargo xtask conformance`: the kernel crates' tests once per instruction set, forced with
//! `QUANT_FORCE_ISA` and made strict with `QUANT_REQUIRE_ISA=1` (a CPU without the set fails
//! instead of falling back), so every tier this CPU has is proven on every run. A tier the
//! CPU lacks (AVX-512 VNNI on Zen 2/3 and Intel client CPUs, AMX everywhere but Sapphire
//! Rapids and later Xeons) cannot run there: it is skipped, and the run names it. With
//! `--target aarch64-unknown-linux-gnu` the tests are cross-built and run by cargo's runner
//! for that target (`qemu-aarch64 -cpu max` in CI), once per aarch64 tier.

use std::path::Path;
use std::process::Command;

use qtensor::isa::{Arch, Isa};

/// The tiers qkernels' registry has kernels for on `arch`, scalar first.
pub fn tiers(arch: Arch) -> Vec<&'static str> {
    qkernels::registry::tiers(arch).iter().map(|i| i.name()).collect()
}

/// The tiers of `tiers` to run on this machine, and the ones skipped: every tier the host
/// CPU supports (cross-built targets run every tier under their runner).
pub fn runnable(tiers: Vec<&'static str>, cross: bool) -> (Vec<&'static str>, Vec<&'static str>) {
    let supported = |t: &str| Isa::ALL.iter().any(|i| i.name() == t && i.is_supported());
    tiers.into_iter().partition(|&t| cross || supported(t))
}

/// Runs the kernel crates' tests once per tier of the host, or of `target`'s architecture.
pub fn run(root: &Path, target: Option<&str>) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let arch = match target {
        None => Isa::host_arch(),
        Some(t) if t.starts_with("aarch64-") => Arch::Aarch64,
        Some(t) if t.starts_with("x86_64-") => Arch::X86_64,
        Some(t) => return Err(format!("--target {t}: conformance knows the tiers of x86_64-* and aarch64-* targets")),
    };
    let (tiers, skipped) = runnable(tiers(arch), target.is_some_and(|t| !t.starts_with("x86_64-")));
    for isa in &skipped {
        println!("== kernel conformance, QUANT_FORCE_ISA={isa}: skipped, this CPU lacks it (or the kernel does not grant it)");
    }
    let mut failed = Vec::new();
    for &isa in &tiers {
        println!(
            "== kernel conformance, QUANT_FORCE_ISA={isa}{}",
            target.map(|t| format!(" ({t})")).unwrap_or_default()
        );
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(root).args(["test", "--quiet", "-p", "qtensor", "-p", "qkernels", "-p", "qobserve"]);
        if let Some(t) = target {
            cmd.args(["--target", t]);
        }
        let status = cmd
            .env("QUANT_FORCE_ISA", isa)
            .env("QUANT_REQUIRE_ISA", "1")
            .status()
            .map_err(|e| format!("running {cargo} test: {e}"))?;
        if !status.success() {
            failed.push(isa);
        }
    }
    if failed.is_empty() {
        println!(
            "every instruction set passes: {}{}",
            tiers.join(", "),
            if skipped.is_empty() { String::new() } else { format!(" (skipped: {})", skipped.join(", ")) }
        );
        Ok(())
    } else {
        Err(format!(
            "kernel conformance failed with QUANT_FORCE_ISA={} (if this CPU lacks the set, run on one that has it)",
            failed.join(", ")
        ))
    }
}

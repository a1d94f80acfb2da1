//! `cargo xtask conformance`: the kernel crates' tests once per instruction set, forced with
//! `QUANT_FORCE_ISA` and made strict with `QUANT_REQUIRE_ISA=1` (a CPU without the set fails
//! instead of falling back), so every tier is proven on every CI run.

use std::path::Path;
use std::process::Command;

pub const TIERS: [&str; 3] = ["scalar", "avx2", "avx512vnni"];

pub fn run(root: &Path) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut failed = Vec::new();
    for isa in TIERS {
        println!("== kernel conformance, QUANT_FORCE_ISA={isa}");
        let status = Command::new(&cargo)
            .current_dir(root)
            .args(["test", "--quiet", "-p", "qtensor", "-p", "qkernels", "-p", "qobserve"])
            .env("QUANT_FORCE_ISA", isa)
            .env("QUANT_REQUIRE_ISA", "1")
            .status()
            .map_err(|e| format!("running {cargo} test: {e}"))?;
        if !status.success() {
            failed.push(isa);
        }
    }
    if failed.is_empty() {
        println!("every instruction set passes: {}", TIERS.join(", "));
        Ok(())
    } else {
        Err(format!(
            "kernel conformance failed with QUANT_FORCE_ISA={} (if this CPU lacks the set, run on one that has it)",
            failed.join(", ")
        ))
    }
}

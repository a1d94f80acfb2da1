//! The kernel registry: one table of kernels (`Kernels`) per instruction-set tier this CPU
//! supports, built once. Each table starts as the generic tier's (`generic`, the scalar
//! references and the loops compiled per tier), and each architecture then overrides the
//! entries its tiers have, lowest tier first (`x86_64::register`, `aarch64::register`).
//!
//! This is the one module that names the architecture folders. The drivers (`frame`) only
//! call through a table, and a packed layer keeps the table that packed it, so the layout it
//! was packed in and the kernels that read it cannot disagree.

use std::sync::OnceLock;

use qtensor::isa::{Arch, Isa};

use crate::frame::kernels::Kernels;

/// The tiers each architecture has kernels for, lowest first (scalar, the generic tier, on
/// every architecture).
const TIERS: [(Arch, &[Isa]); 2] = [
    (Arch::X86_64, &[Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx]),
    (Arch::Aarch64, &[Isa::Scalar, Isa::Neon, Isa::Dotprod, Isa::I8mm]),
];

/// The tiers qkernels has kernels for on `arch`, lowest first: what `xtask conformance` and
/// `sanitize` run once each. Only the generic tier on an architecture without its own.
pub fn tiers(arch: Arch) -> &'static [Isa] {
    TIERS.iter().find(|(a, _)| *a == arch).map_or(&[Isa::Scalar], |(_, t)| t)
}

/// The table of `isa` capped to what this CPU supports.
pub(crate) fn kernels(isa: Isa) -> &'static Kernels {
    static TABLES: OnceLock<Vec<Kernels>> = OnceLock::new();
    let tables = TABLES
        .get_or_init(|| tiers(Isa::host_arch()).iter().copied().filter(|t| t.is_supported()).map(build).collect());
    let isa = isa.capped_to_supported();
    tables.iter().find(|k| k.isa == isa).unwrap_or(&tables[0])
}

/// `isa`'s table: the generic one, overridden by the architecture's tiers `isa` includes.
/// `isa` is supported by this CPU (the caller filtered).
fn build(isa: Isa) -> Kernels {
    let mut k = crate::generic::kernels();
    k.isa = isa;
    #[cfg(target_arch = "x86_64")]
    crate::x86_64::register(&mut k, isa);
    #[cfg(target_arch = "aarch64")]
    crate::aarch64::register(&mut k, isa);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_tier_of_this_architecture_has_its_own_table() {
        let tiers = tiers(Isa::host_arch());
        assert_eq!(tiers[0], Isa::Scalar);
        for &t in tiers {
            assert!(t.arch() == Arch::Any || t.arch() == Isa::host_arch(), "{t} listed for the wrong architecture");
            let k = kernels(t);
            assert_eq!(k.isa, t.capped_to_supported(), "table of {t}");
        }
        // Every tier of the list: qtensor's tiers of this architecture, no more, no fewer.
        let qtensor_tiers: Vec<Isa> =
            Isa::ALL.into_iter().filter(|i| i.arch() == Arch::Any || i.arch() == Isa::host_arch()).collect();
        assert_eq!(tiers, &qtensor_tiers[..]);
    }
}

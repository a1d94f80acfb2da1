//! Which SIMD instruction set the workspace's kernels use, chosen once per process.
//!
//! Every kernel in `qtensor` and `qkernels` has a scalar reference twin and one or more SIMD
//! versions; [`selected`] decides, once, which one runs. Two environment variables control it,
//! so that a test suite can be run once per instruction set:
//!
//! - `QUANT_FORCE_ISA` = `scalar` | `avx2` | `avx512vnni` | `amx` (x86-64) | `neon` | `dotprod` |
//!   `i8mm` (aarch64) | `auto` (the default): use at most this instruction set. If the CPU
//!   lacks it, the best one it has below it is used; a tier of the other architecture is an
//!   error (a warning and `auto` without `QUANT_REQUIRE_ISA`).
//! - `QUANT_REQUIRE_ISA=1`: a forced instruction set the CPU lacks is a hard failure instead of
//!   a silent fall-back, so CI proves that every path really ran.
//!
//! Detection is at run time (`is_x86_feature_detected!`, `is_aarch64_feature_detected!`):
//! binaries are built for the baseline target and still use AVX-512 or the dot-product
//! instructions where the CPU has them. Never build with `-C target-cpu=native`; there is no
//! need.
//!
//! Tiers are ordered within an architecture (each implies the ones before it there); compare
//! them with [`Isa::includes`], which knows that an x86 tier says nothing about an aarch64
//! one.

use std::fmt;
use std::sync::OnceLock;

/// Environment variable that caps the instruction set (see the module docs).
pub const FORCE_ENV: &str = "QUANT_FORCE_ISA";
/// Environment variable that turns a missing forced instruction set into a failure.
pub const REQUIRE_ENV: &str = "QUANT_REQUIRE_ISA";

/// An instruction-set tier. Within one architecture, each tier implies the ones before it
/// ([`Isa::includes`]); the scalar tier runs everywhere.
///
/// Deliberately not `Ord`: an x86 tier and an aarch64 tier are not comparable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust; the reference every other tier is tested against bit for bit.
    Scalar,
    /// x86-64 AVX2 + FMA (Haswell and later, Zen 1 and later).
    Avx2,
    /// x86-64 AVX-512 F/BW/VL with VNNI (Ice Lake and later, Zen 4 and later).
    Avx512Vnni,
    /// x86-64 AVX-512 VNNI with the AMX-INT8 tile instructions (`tdpbusd`: Sapphire Rapids
    /// and later Xeons), which the kernel must also grant the process (Linux 5.16 and later,
    /// asked for once by [`Isa::is_supported`]).
    Amx,
    /// aarch64 Advanced SIMD (every aarch64 CPU): widening multiply-accumulate.
    Neon,
    /// aarch64 with the dot-product instructions `sdot`/`udot` (Armv8.4, optional from 8.2:
    /// Cortex-A55/A75 and later, Neoverse N1 and later, Apple M1 and later).
    Dotprod,
    /// aarch64 with the int8 matrix-multiply instructions `usmmla`/`usdot` as well (Armv8.6,
    /// optional from 8.2: Neoverse V1/N2 and later, Apple M2 and later, Graviton 3 and later).
    I8mm,
}

/// The architecture a tier belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// The scalar tier: every architecture.
    Any,
    /// x86-64.
    X86_64,
    /// aarch64.
    Aarch64,
}

impl Isa {
    /// Every tier, lowest first within each architecture.
    pub const ALL: [Isa; 7] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx, Isa::Neon, Isa::Dotprod, Isa::I8mm];

    /// The name used by `QUANT_FORCE_ISA`.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Amx => "amx",
            Isa::Neon => "neon",
            Isa::Dotprod => "dotprod",
            Isa::I8mm => "i8mm",
        }
    }

    /// The architecture the tier belongs to.
    pub const fn arch(self) -> Arch {
        match self {
            Isa::Scalar => Arch::Any,
            Isa::Avx2 | Isa::Avx512Vnni | Isa::Amx => Arch::X86_64,
            Isa::Neon | Isa::Dotprod | Isa::I8mm => Arch::Aarch64,
        }
    }

    /// The architecture this binary was built for.
    pub const fn host_arch() -> Arch {
        if cfg!(target_arch = "x86_64") {
            Arch::X86_64
        } else if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::Any
        }
    }

    /// Whether this tier implies `other`: `other` is scalar, or of the same architecture and
    /// not above this one. `Avx512Vnni.includes(Avx2)` is true; `I8mm.includes(Avx2)` false.
    pub fn includes(self, other: Isa) -> bool {
        other == Isa::Scalar || (self.arch() == other.arch() && self.rank() >= other.rank())
    }

    /// The tier's place within its architecture (scalar 0).
    const fn rank(self) -> u8 {
        match self {
            Isa::Scalar => 0,
            Isa::Avx2 | Isa::Neon => 1,
            Isa::Dotprod | Isa::Avx512Vnni => 2,
            Isa::I8mm | Isa::Amx => 3,
        }
    }

    /// Parses a `QUANT_FORCE_ISA` name (case-insensitive).
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the tier.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::Dotprod => Isa::Neon.is_supported() && std::arch::is_aarch64_feature_detected!("dotprod"),
            #[cfg(target_arch = "aarch64")]
            Isa::I8mm => Isa::Dotprod.is_supported() && std::arch::is_aarch64_feature_detected!("i8mm"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => Isa::Avx512Vnni.is_supported() && amx_granted(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The best tier this CPU supports.
    pub fn best_supported() -> Isa {
        Isa::ALL.into_iter().rev().find(|i| i.is_supported()).unwrap_or(Isa::Scalar)
    }

    /// The best supported tier that `self` includes (scalar for a tier of another
    /// architecture).
    pub fn capped_to_supported(self) -> Isa {
        Isa::ALL.into_iter().rev().find(|i| self.includes(*i) && i.is_supported()).unwrap_or(Isa::Scalar)
    }
}

/// Whether this CPU has AMX-TILE and AMX-INT8 and the kernel lets this process use the tile
/// data (asked for once, with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: Linux
/// enables AMX per process, and the first tile instruction without that permission faults).
/// Asked as soon as anything checks the tier (the kernels' tables are built for every
/// supported tier), whatever `QUANT_FORCE_ISA` says; once granted, Linux refuses alternate
/// signal stacks too small for the tile state (about 11 KiB) in this process's threads.
#[cfg(target_arch = "x86_64")]
fn amx_granted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // Leaf 7 exists: the caller checked AVX-512 VNNI first, which it reports.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (tile, int8) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 25 & 1 == 1);
        if !(tile && int8 && cfg!(target_os = "linux")) {
            return false;
        }
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: the Linux x86-64 system call convention (number in rax, arguments in rdi and
        // rsi, rcx and r11 clobbered, result in rax); `arch_prctl(ARCH_REQ_XCOMP_PERM, ..)`
        // reads no memory and only changes which state components this process may use.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    })
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The tier the kernels use in this process: read from the environment once, then cached.
///
/// # Panics
/// Only when `QUANT_REQUIRE_ISA=1` is set and `QUANT_FORCE_ISA` names a tier this CPU lacks,
/// or a name that does not exist: that switch exists to make such a run fail loudly.
pub fn selected() -> Isa {
    static SELECTED: OnceLock<Isa> = OnceLock::new();
    *SELECTED.get_or_init(|| {
        let forced = std::env::var(FORCE_ENV).ok();
        let require = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        match resolve(forced.as_deref(), require) {
            Ok(isa) => isa,
            Err(msg) if require => panic!("{msg}"),
            Err(msg) => {
                eprintln!("warning: {msg}");
                Isa::best_supported()
            }
        }
    })
}

/// Pure selection logic behind [`selected`], for tests: `forced` is the value of
/// `QUANT_FORCE_ISA`, `require` whether `QUANT_REQUIRE_ISA` is set.
///
/// # Errors
/// A message naming the problem when `forced` is not a tier name, or (with `require`) names
/// a tier this CPU lacks.
pub fn resolve(forced: Option<&str>, require: bool) -> Result<Isa, String> {
    let Some(name) = forced.filter(|s| !s.trim().is_empty() && !s.trim().eq_ignore_ascii_case("auto")) else {
        return Ok(Isa::best_supported());
    };
    let Some(isa) = Isa::parse(name) else {
        let names: Vec<&str> = Isa::ALL.iter().map(|i| i.name()).collect();
        return Err(format!("{FORCE_ENV}={name:?} is not an instruction set; use one of auto, {}", names.join(", ")));
    };
    if isa.arch() != Arch::Any && isa.arch() != Isa::host_arch() {
        return Err(format!(
            "{FORCE_ENV}={name} names a {:?} tier, but this binary runs on {:?}; its tiers are {}",
            isa.arch(),
            Isa::host_arch(),
            Isa::ALL
                .iter()
                .filter(|i| i.arch() == Arch::Any || i.arch() == Isa::host_arch())
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if require && !isa.is_supported() {
        return Err(format!(
            "{FORCE_ENV}={name} but this CPU lacks {isa} (best available: {}); {REQUIRE_ENV}=1 \
             makes that a failure: run on a CPU with {isa}, or unset {REQUIRE_ENV} to fall back",
            Isa::best_supported()
        ));
    }
    Ok(isa.capped_to_supported())
}

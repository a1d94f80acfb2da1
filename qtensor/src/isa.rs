//! Which SIMD instruction set the workspace's kernels use, chosen once per process.
//!
//! Every kernel in `qtensor` and `qkernels` has a scalar reference twin and one or more SIMD
//! versions; [`selected`] decides, once, which one runs. Two environment variables control it,
//! so that a test suite can be run once per instruction set:
//!
//! - `QUANT_FORCE_ISA` = `scalar` | `avx2` | `avx512vnni` | `auto` (the default): use at most
//!   this instruction set. If the CPU lacks it, the best one it has below it is used.
//! - `QUANT_REQUIRE_ISA=1`: a forced instruction set the CPU lacks is a hard failure instead of
//!   a silent fall-back, so CI proves that every path really ran.
//!
//! Detection is at run time (`is_x86_feature_detected!`): binaries are built for the baseline
//! x86-64 target and still use AVX-512 where the CPU has it. Never build with
//! `-C target-cpu=native`; there is no need.

use std::fmt;
use std::sync::OnceLock;

/// Environment variable that caps the instruction set (see the module docs).
pub const FORCE_ENV: &str = "QUANT_FORCE_ISA";
/// Environment variable that turns a missing forced instruction set into a failure.
pub const REQUIRE_ENV: &str = "QUANT_REQUIRE_ISA";

/// An instruction-set tier. Ordered: each tier implies the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust; the reference every other tier is tested against bit for bit.
    Scalar,
    /// x86-64 AVX2 + FMA (Haswell and later, Zen 1 and later).
    Avx2,
    /// x86-64 AVX-512 F/BW/VL with VNNI (Ice Lake and later, Zen 4 and later).
    Avx512Vnni,
}

impl Isa {
    /// Every tier, lowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];

    /// The name used by `QUANT_FORCE_ISA`.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
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
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best tier this CPU supports.
    pub fn best_supported() -> Isa {
        Isa::ALL.into_iter().rev().find(|i| i.is_supported()).unwrap_or(Isa::Scalar)
    }

    /// The best supported tier that is not above `self`.
    pub fn capped_to_supported(self) -> Isa {
        Isa::ALL.into_iter().rev().find(|i| *i <= self && i.is_supported()).unwrap_or(Isa::Scalar)
    }
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
        return Err(format!(
            "{FORCE_ENV}={name:?} is not an instruction set; use one of auto, scalar, avx2, avx512vnni"
        ));
    };
    if require && !isa.is_supported() {
        return Err(format!(
            "{FORCE_ENV}={name} but this CPU lacks {isa} (best available: {}); {REQUIRE_ENV}=1 \
             makes that a failure: run on a CPU with {isa}, or unset {REQUIRE_ENV} to fall back",
            Isa::best_supported()
        ));
    }
    Ok(isa.capped_to_supported())
}

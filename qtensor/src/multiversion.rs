//! Compiling one loop three times: baseline x86-64 (the scalar twin), AVX2 and AVX-512, and
//! picking one at run time, for every kernel crate (qkernels' generic tier, qobserve's scans). For loops the compiler vectorises well (byte maxima, integer
//! window sums), the same Rust code under `#[target_feature]` is the vector path; Rust keeps
//! floating-point semantics exact, so the versions cannot differ, and the tests still compare
//! them.

/// `multiversion!(vis fn name(args) -> ret { body })` defines `name(isa, args) -> ret`, which
/// runs `body` compiled for the best of `isa` and the CPU's tiers. On other architectures
/// than x86-64 it is `body` as written (aarch64's baseline already has NEON, which the
/// compiler uses).
#[macro_export]
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: $crate::isa::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                generic($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                generic($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            match isa.capped_to_supported() {
                // SAFETY: the tier was capped to what this CPU supports; the AVX-512 VNNI
                // and AMX tiers imply AVX-512 F/BW/VL.
                $crate::isa::Isa::Avx512Vnni | $crate::isa::Isa::Amx => return unsafe { avx512($($arg),*) },
                // SAFETY: as above, AVX2 and FMA.
                $crate::isa::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                _ => {}
            }
            let _ = isa;
            generic($($arg),*)
        }
    };
}

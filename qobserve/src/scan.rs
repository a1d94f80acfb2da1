//! The reductions every observer needs: min and max of the finite values of a slice, and a
//! count of the non-finite ones. Written as 16 independent lanes so the compiler vectorises
//! it, and compiled three times (baseline, AVX2, AVX-512) behind a run-time dispatch: the
//! same Rust code, so the results cannot differ between the versions.

use qtensor::isa;

/// Min and max over the finite values (`+inf` / `-inf` when there are none), and how many
/// values were NaN or infinite.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Scan {
    pub min: f32,
    pub max: f32,
    pub nonfinite: usize,
}

impl Scan {
    pub const EMPTY: Scan = Scan { min: f32::INFINITY, max: f32::NEG_INFINITY, nonfinite: 0 };

    pub fn merge(self, o: Scan) -> Scan {
        Scan { min: self.min.min(o.min), max: self.max.max(o.max), nonfinite: self.nonfinite + o.nonfinite }
    }
}

const LANES: usize = 16;

#[inline(always)]
fn scan_generic(xs: &[f32]) -> Scan {
    let mut mn = [f32::INFINITY; LANES];
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut bad = [0u32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let v = c[i];
            let finite = v.abs() < f32::INFINITY;
            bad[i] += u32::from(!finite);
            let lo = if finite { v } else { f32::INFINITY };
            let hi = if finite { v } else { f32::NEG_INFINITY };
            mn[i] = if lo < mn[i] { lo } else { mn[i] };
            mx[i] = if hi > mx[i] { hi } else { mx[i] };
        }
    }
    let mut s = Scan::EMPTY;
    for &v in chunks.remainder() {
        if v.abs() < f32::INFINITY {
            s.min = s.min.min(v);
            s.max = s.max.max(v);
        } else {
            s.nonfinite += 1;
        }
    }
    for i in 0..LANES {
        s.min = s.min.min(mn[i]);
        s.max = s.max.max(mx[i]);
        s.nonfinite += bad[i] as usize;
    }
    s
}

/// [`Scan`] of `xs` with the selected instruction set.
pub(crate) fn scan(xs: &[f32]) -> Scan {
    scan_with(isa::selected(), xs)
}

qtensor::multiversion! {
    /// [`scan`] with an explicit instruction set (for the conformance tests).
    pub(crate) fn scan_with(xs: &[f32]) -> Scan {
        scan_generic(xs)
    }
}

/// Per-channel scans of a row-major tensor of `shape` along `axis`.
pub(crate) fn scan_channels(xs: &[f32], shape: &[usize], axis: usize) -> Vec<Scan> {
    let channels = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out = vec![Scan::EMPTY; channels];
    if inner >= 16 {
        for (b, block) in xs.chunks_exact(inner.max(1)).enumerate() {
            let c = b % channels;
            out[c] = out[c].merge(scan(block));
        }
    } else {
        for (i, &v) in xs.iter().enumerate() {
            let c = (i / inner.max(1)) % channels;
            let s = &mut out[c];
            if v.abs() < f32::INFINITY {
                s.min = s.min.min(v);
                s.max = s.max.max(v);
            } else {
                s.nonfinite += 1;
            }
        }
    }
    out
}

//! The GEMM on every instruction set and thread count equals a naive i64 reference.

use proptest::prelude::*;
use qkernels::{bias_operands, gemm, Activation, BiasForm, GemmOutput, OutputQuant, PackedWeights, QMatrix};
use qtensor::{QParams, QTensor, QuantRange};

#[derive(Debug, Clone)]
struct Case {
    m: usize,
    k: usize,
    n: usize,
    lda_pad: usize,
    a: Vec<u8>,
    w: Vec<i8>,
    za: i32,
    per_channel: bool,
    zw: Vec<i32>,
    sw: Vec<f32>,
    bias: Option<Vec<f32>>,
    out: OutputQuant,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..20,
        prop_oneof![1usize..70, 60usize..300],
        prop_oneof![1usize..40, 60usize..140],
        0usize..5,
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(m, k, n, lda_pad, per_channel, symmetric, seed)| {
            let mut next = crate::xorshift(seed | 1);
            let lda = k + lda_pad;
            // Rows of 7-bit codes (AVX2's vpmaddubsw kernel) in two cases of three, mixed with
            // full-range rows (its exact kernel) in one of those.
            let caps = next() % 3;
            let a: Vec<u8> = (0..m)
                .flat_map(|_| {
                    let cap: u64 = if caps == 0 || (caps == 1 && next().is_multiple_of(4)) { 256 } else { 128 };
                    (0..lda).map(|_| (next() % cap) as u8).collect::<Vec<_>>()
                })
                .collect();
            // Uniform weights in one case of three; else a trained layer's kind, mostly small
            // with a few at the extremes, whose pairs of quads AVX2 sums in i16 (some pairs
            // split, in the second kind) and which it runs with `vpmaddubsw` on full-range rows
            // (some quads exact, in the second kind).
            let w: Vec<i8> = match next() % 3 {
                0 => (0..n * k).map(|_| next() as i8).collect(),
                1 => (0..n * k).map(|_| ((next() % 61) as i32 - 30) as i8).collect(),
                _ => (0..n * k)
                    .map(|_| if next().is_multiple_of(64) { next() as i8 } else { ((next() % 41) as i32 - 20) as i8 })
                    .collect(),
            };
            let za = (next() % 256) as i32;
            let chans = if per_channel { n } else { 1 };
            let zw: Vec<i32> = (0..chans).map(|_| if symmetric { 0 } else { (next() % 256) as i32 - 128 }).collect();
            let sw: Vec<f32> = (0..chans).map(|_| 0.001 + (next() % 1000) as f32 * 1e-4).collect();
            let bias =
                (!next().is_multiple_of(3)).then(|| (0..n).map(|_| ((next() % 2001) as f32 - 1000.0) * 1e-3).collect());
            let activation = [Activation::None, Activation::Relu, Activation::Relu6][(next() % 3) as usize];
            // An output scale that puts typical outputs across the u8 range.
            let typical = (k as f32).sqrt() * 128.0 * 80.0 * 0.02 * 0.05;
            let out = OutputQuant {
                scale: typical / 100.0 * (0.5 + (next() % 100) as f32 / 100.0),
                zero_point: (next() % 256) as i32,
                activation,
            };
            Case { m, k, n, lda_pad, a, w, za, per_channel, zw, sw, bias, out }
        })
}

fn weights(c: &Case) -> QTensor<i8> {
    let params = if c.per_channel {
        QParams::per_channel(c.sw.clone(), c.zw.clone(), 0).unwrap()
    } else {
        QParams::per_tensor(c.sw[0], c.zw[0]).unwrap()
    };
    QTensor::from_int_repr(
        ndarray::Array2::from_shape_vec((c.n, c.k), c.w.clone()).unwrap(),
        params,
        QuantRange::full(qtensor::DType::I8),
    )
    .unwrap()
}

/// Σ (a - za)(w - zw) in i64: the definition.
fn naive_raw(c: &Case) -> Vec<i64> {
    let lda = c.k + c.lda_pad;
    let mut out = vec![0i64; c.m * c.n];
    for i in 0..c.m {
        for j in 0..c.n {
            let zw = c.zw[if c.per_channel { j } else { 0 }] as i64;
            out[i * c.n + j] =
                (0..c.k).map(|kk| (c.a[i * lda + kk] as i64 - c.za as i64) * (c.w[j * c.k + kk] as i64 - zw)).sum();
        }
    }
    out
}

fn run_u8(c: &Case, isa: qtensor::isa::Isa, threads: usize) -> Vec<u8> {
    let packed = PackedWeights::with_isa(isa, &weights(c)).unwrap();
    let a = QMatrix { data: &c.a, m: c.m, k: c.k, lda: c.k + c.lda_pad, scale: 0.02, zero_point: c.za };
    let mut out = vec![0u8; c.m * c.n];
    gemm(&a, &packed, c.bias.as_deref(), GemmOutput::U8 { data: &mut out, ldc: c.n, quant: c.out }, threads).unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::cases(96)))]

    #[test]
    fn every_isa_and_thread_count_matches_the_reference(c in case()) {
        let raw = naive_raw(&c);
        let expected = u8_reference(&c, &raw);
        for isa in crate::isas_under_test() {
            for threads in 1..=3 {
                let got = run_u8(&c, isa, threads);
                prop_assert_eq!(&got, &expected, "{} threads={}", isa, threads);
            }
            let packed = PackedWeights::with_isa(isa, &weights(&c)).unwrap();
            let a = QMatrix { data: &c.a, m: c.m, k: c.k, lda: c.k + c.lda_pad, scale: 0.02, zero_point: c.za };
            let mut out = vec![0i32; c.m * c.n];
            gemm(&a, &packed, None, GemmOutput::I32 { data: &mut out, ldc: c.n }, 1).unwrap();
            prop_assert_eq!(out.iter().map(|&v| v as i64).collect::<Vec<_>>(), raw.clone(), "{} i32", isa);
            let relu = c.out.activation == Activation::Relu;
            for threads in 1..=2 {
                prop_assert_eq!(run_f32(&c, isa, relu, threads), f32_reference(&c, &raw, relu), "{} f32", isa);
            }
        }
    }
}

/// Requantized output of the raw sums, FBGEMM's formula.
fn u8_reference(c: &Case, raw: &[i64]) -> Vec<u8> {
    let (lo, hi) = c.out.bounds();
    (0..c.m * c.n)
        .map(|idx| {
            let j = idx % c.n;
            let sw = c.sw[if c.per_channel { j } else { 0 }];
            let ab = 0.02f32 * sw;
            let form = if c.per_channel { BiasForm::PerChannel } else { BiasForm::PerTensorFused };
            let (bx, by) = bias_operands(c.bias.as_ref().map_or(0.0, |b| b[j]), ab, form);
            qkernels::requantize_scalar(raw[idx] as i32, bx, by, ab / c.out.scale, c.out.zero_point, lo, hi) as u8
        })
        .collect()
}

/// Output scales so small that the scaled sums leave i32's range (where a float-to-int
/// conversion gives `i32::MIN`), and moderate ones: every tier clamps as the scalar formula
/// does (large positive values to `hi`, negative ones to `lo`), on strips of 16 columns and
/// partial ones, with and without a ReLU, on 1 and 2 threads.
#[test]
fn outputs_scaled_beyond_i32_saturate_on_every_isa() {
    let mut next = crate::xorshift(0x3c6e_f372_fe94_f82b);
    for (m, k, n) in [(7, 64, 32), (5, 40, 21)] {
        for scale in [1e-12f32, 1e-7, 1e-3] {
            for activation in [Activation::None, Activation::Relu] {
                let c = Case {
                    m,
                    k,
                    n,
                    lda_pad: 0,
                    a: (0..m * k).map(|_| (next() % 128) as u8).collect(),
                    w: (0..n * k).map(|_| next() as i8).collect(),
                    za: (next() % 128) as i32,
                    per_channel: true,
                    zw: vec![0; n],
                    sw: (0..n).map(|_| 0.001 + (next() % 1000) as f32 * 1e-4).collect(),
                    bias: Some((0..n).map(|_| ((next() % 2001) as f32 - 1000.0) * 1e-3).collect()),
                    out: OutputQuant { scale, zero_point: (next() % 256) as i32, activation },
                };
                let want = u8_reference(&c, &naive_raw(&c));
                if scale < 1e-6 {
                    let (lo, hi) = c.out.bounds();
                    assert!(
                        want.contains(&(lo as u8)) && want.contains(&(hi as u8)),
                        "both saturations at scale {scale}"
                    );
                }
                for isa in crate::isas_under_test() {
                    for threads in 1..=2 {
                        assert_eq!(run_u8(&c, isa, threads), want, "{m}x{k}x{n} scale {scale} {activation:?} {isa}");
                    }
                }
            }
        }
    }
}

/// Blocks of 16 rows and more (the AMX tier's tiles): whole and partial tiles of rows, one to
/// four panels of columns with partial last panels, K of whole 64-byte chunks, with a partial
/// last chunk (of whole groups of four, or not), and shorter than one chunk; `u8`, `i32` and
/// `f32` output, with and without weight zero points, on every tier and 1-2 threads.
#[test]
fn blocks_of_whole_tiles_of_rows_match_the_reference() {
    let mut next = crate::xorshift(0x7a3c_19e5_02d4_b861);
    let shapes = [
        (16, 64, 16),
        (17, 128, 33),
        (32, 576, 64),
        (47, 124, 100),
        (96, 253, 48),
        (33, 68, 40),
        (64, 100, 64),
        (97, 64, 20),
        (200, 61, 70),
        (150, 700, 130),
    ];
    for (i, (m, k, n)) in shapes.into_iter().enumerate() {
        let symmetric = i % 2 == 0;
        let lda_pad = (next() % 5) as usize;
        let c = Case {
            m,
            k,
            n,
            lda_pad,
            a: (0..m * (k + lda_pad)).map(|_| next() as u8).collect(),
            w: (0..n * k).map(|_| next() as i8).collect(),
            za: (next() % 256) as i32,
            per_channel: i % 3 != 1,
            zw: (0..n).map(|_| if symmetric { 0 } else { (next() % 256) as i32 - 128 }).collect(),
            sw: (0..n).map(|_| 0.001 + (next() % 1000) as f32 * 1e-4).collect(),
            bias: Some((0..n).map(|_| ((next() % 2001) as f32 - 1000.0) * 1e-3).collect()),
            out: OutputQuant {
                scale: (k as f32).sqrt() * 128.0 * 80.0 * 0.02 * 0.05 / 100.0,
                zero_point: (next() % 256) as i32,
                activation: [Activation::None, Activation::Relu, Activation::Relu6][i % 3],
            },
        };
        let raw = naive_raw(&c);
        let want_u8 = u8_reference(&c, &raw);
        let want_f32 = f32_reference(&c, &raw, i % 2 == 1);
        for isa in crate::isas_under_test() {
            for threads in 1..=2 {
                assert_eq!(run_u8(&c, isa, threads), want_u8, "{m}x{k}x{n} {isa} threads={threads} u8");
                assert_eq!(run_f32(&c, isa, i % 2 == 1, threads), want_f32, "{m}x{k}x{n} {isa} threads={threads} f32");
            }
            let packed = PackedWeights::with_isa(isa, &weights(&c)).unwrap();
            let a = QMatrix { data: &c.a, m, k, lda: k + lda_pad, scale: 0.02, zero_point: c.za };
            let mut out = vec![0i32; m * n];
            gemm(&a, &packed, None, GemmOutput::I32 { data: &mut out, ldc: n }, 1).unwrap();
            assert_eq!(out.iter().map(|&v| v as i64).collect::<Vec<_>>(), raw, "{m}x{k}x{n} {isa} i32");
        }
    }
}

/// AVX2's `vpmaddubsw` kernel at the edge of its range: weights at the extremes (so that a
/// pair sum of 128 or 129 times them just fits in i16), activations at the packing's bound
/// and one above it (the exact kernel), against the definition.
#[test]
fn avx2_pair_sums_are_exact_up_to_their_bound() {
    use qtensor::isa::Isa;
    if !Isa::Avx2.is_supported() {
        return;
    }
    let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15);
    for (wlo, whi) in [(-128i8, 127i8), (127, 127), (-128, -128), (-128, 0), (0, 127)] {
        let (m, k, n) = (9, 37, 19);
        let w: Vec<i8> = (0..n * k).map(|_| if next().is_multiple_of(2) { wlo } else { whi }).collect();
        let probe = Case {
            m,
            k,
            n,
            lda_pad: 0,
            a: Vec::new(),
            w: w.clone(),
            za: 0,
            per_channel: false,
            zw: vec![0],
            sw: vec![0.01],
            bias: None,
            out: OutputQuant { scale: 1.0, zero_point: 0, activation: Activation::None },
        };
        let packed = PackedWeights::with_isa(Isa::Avx2, &weights(&probe)).unwrap();
        let bound = packed.pair_sums_up_to().expect("8-bit weights never saturate below 128");
        assert!(bound >= 128, "{wlo} {whi}: {bound}");
        for top in [bound, bound.saturating_add(1)] {
            // Every row at the top code but for a few random codes below it.
            let a: Vec<u8> =
                (0..m * k).map(|_| if next().is_multiple_of(5) { (next() % top as u64) as u8 } else { top }).collect();
            let c = Case { a, za: (next() % 256) as i32, ..probe.clone() };
            let raw = naive_raw(&c);
            let qa = QMatrix { data: &c.a, m, k, lda: k, scale: 0.02, zero_point: c.za };
            let mut out = vec![0i32; m * n];
            gemm(&qa, &packed, None, GemmOutput::I32 { data: &mut out, ldc: n }, 1).unwrap();
            assert_eq!(
                out.iter().map(|&v| v as i64).collect::<Vec<_>>(),
                raw,
                "weights {wlo}/{whi}, codes up to {top}"
            );
        }
    }
}

/// `c`'s rows through `packed` (AVX2 weights of `c`): the i32 sums equal the definition and
/// the `u8` output its requantization.
fn assert_avx2_exact(c: &Case, packed: &PackedWeights, what: &str) {
    let raw = naive_raw(c);
    let qa = QMatrix { data: &c.a, m: c.m, k: c.k, lda: c.k + c.lda_pad, scale: 0.02, zero_point: c.za };
    let mut out = vec![0i32; c.m * c.n];
    gemm(&qa, packed, None, GemmOutput::I32 { data: &mut out, ldc: c.n }, 1).unwrap();
    assert_eq!(out.iter().map(|&v| v as i64).collect::<Vec<_>>(), raw, "{what}");
    assert_eq!(run_u8(c, qtensor::isa::Isa::Avx2, 1), u8_reference(c, &raw), "u8, {what}");
}

/// AVX2's pairs of quads summed in i16, at the edge: with inputs up to 129 (the bound a pair
/// of weights 127 + 127 sets), two quads pair only if every lane's four weights sum to at
/// most 254 (or -254) (129 x 254 = 32766 fits in i16; 255 could wrap). Quads whose
/// neighbours would overflow find other partners; rows at the bound everywhere, and random
/// rows below it, against the definition.
#[test]
fn avx2_paired_quads_are_exact_at_the_edge_of_i16() {
    use qtensor::isa::Isa;
    if !Isa::Avx2.is_supported() {
        return;
    }
    let mut next = crate::xorshift(0x51f1_5ea5_e0c0_ffee);
    let (m, k, n) = (11, 64, 24);
    let probe = |w: Vec<i8>| Case {
        m,
        k,
        n,
        lda_pad: 0,
        a: Vec::new(),
        w,
        za: 0,
        per_channel: false,
        zw: vec![0],
        sw: vec![0.01],
        bias: None,
        out: OutputQuant { scale: 1.0, zero_point: 0, activation: Activation::None },
    };
    let check = |probe: &Case, packed: &PackedWeights, next: &mut dyn FnMut() -> u64, what: &str| {
        for all_top in [true, false] {
            let a: Vec<u8> = (0..m * k).map(|_| if all_top { 129 } else { (next() % 130) as u8 }).collect();
            let c = Case { a, za: (next() % 256) as i32, ..probe.clone() };
            assert_avx2_exact(&c, packed, &format!("{what}, rows at the bound: {all_top}"));
        }
    };
    // Sets lane `lane` (0: k % 4 in 0..2, 1: in 2..4) of quad q of column j.
    let set = |w: &mut [i8], j: usize, q: usize, lane: usize, v: [i8; 2]| {
        let at = j * k + 4 * q + 2 * lane;
        w[at..at + 2].copy_from_slice(&v);
    };
    // Small weights, with quads 0..8 of column 0 at 127 + 127 in lane 0, and quads 8..16 at
    // 0 there: in K's order every neighbour pair of the first half would overflow; in the
    // strip's own order each heavy quad takes a light one, and none runs alone.
    let mut w: Vec<i8> = (0..n * k).map(|_| ((next() % 41) as i32 - 20) as i8).collect();
    for q in 0..16 {
        set(&mut w, 0, q, 0, if q < 8 { [127, 127] } else { [0, -((next() % 20) as i8)] });
    }
    // The edges in the second strip (columns 16..24): 254 and -254, which fit only beside
    // a quad with no weight of their sign in that lane.
    set(&mut w, 17, 3, 1, [127, 127]);
    set(&mut w, 20, 6, 0, [-128, -126]);
    let probe_a = probe(w);
    let packed = PackedWeights::with_isa(Isa::Avx2, &weights(&probe_a)).unwrap();
    assert_eq!(packed.pair_sums_up_to(), Some(129));
    assert!(packed.kernel().contains("(quads paired in i16, 0.0% alone)"), "{}", packed.kernel());
    check(&probe_a, &packed, &mut next, "heavy quads paired with light ones");
    // At the edge: quads 0..3 of column 5 at 127 + 127 in lane 1, the others at 1 + 0 there:
    // 254 + 1 could wrap, so the three run alone, and of the other 13 six pairs leave one:
    // 4 of the 32 quads of the two strips alone.
    let mut w: Vec<i8> = (0..n * k).map(|_| ((next() % 41) as i32 - 20) as i8).collect();
    for q in 0..16 {
        set(&mut w, 5, q, 1, if q < 3 { [127, 127] } else { [1, 0] });
    }
    let probe_c = probe(w);
    let packed = PackedWeights::with_isa(Isa::Avx2, &weights(&probe_c)).unwrap();
    assert!(packed.kernel().contains("(quads paired in i16, 12.5% alone)"), "{}", packed.kernel());
    check(&probe_c, &packed, &mut next, "heavy quads alone");
    // Every quad heavy in one lane of one column: no two fit together, so no pairs at all.
    let mut w: Vec<i8> = (0..n * k).map(|_| ((next() % 41) as i32 - 20) as i8).collect();
    for q in 0..16 {
        set(&mut w, 5, q, 1, [127, (100 + next() % 28) as i8]);
    }
    let probe_b = probe(w);
    let packed = PackedWeights::with_isa(Isa::Avx2, &weights(&probe_b)).unwrap();
    assert!(!packed.kernel().contains("paired"), "{}", packed.kernel());
    check(&probe_b, &packed, &mut next, "no pairs");
}

/// AVX2's `vpmaddubsw` on full-range rows (codes above the pair bound, up to 255): a quad
/// whose two weights of a 16-bit lane sum to 128 (or -128) stays on it (255 x 128 = 32640
/// fits in i16), one summing to 129 (or -129) runs exactly. Rows at 255 everywhere, and
/// random full-range rows, against the definition; K with a partial last quad.
#[test]
fn avx2_full_range_rows_are_exact_at_the_edge_of_i16() {
    use qtensor::isa::Isa;
    if !Isa::Avx2.is_supported() {
        return;
    }
    let mut next = crate::xorshift(0x0bad_cafe_f00d_d00d);
    let (m, k, n) = (10, 66, 16);
    let mut w: Vec<i8> = (0..n * k).map(|_| ((next() % 21) as i32 - 10) as i8).collect();
    let mut set = |j: usize, at: usize, v: [i8; 2]| w[j * k + at..j * k + at + 2].copy_from_slice(&v);
    set(1, 8, [100, 28]); // 128: vpmaddubsw
    set(2, 20, [100, 29]); // 129: exact
    set(9, 34, [-100, -28]); // -128: vpmaddubsw
    set(12, 64, [-100, -29]); // -129, in the partial last quad: exact
    set(15, 41, [60, 69]); // k = 41 and 42 lie in different lanes: 60 and 69 apart, vpmaddubsw
    let probe = Case {
        m,
        k,
        n,
        lda_pad: 0,
        a: Vec::new(),
        w,
        za: 0,
        per_channel: false,
        zw: vec![0],
        sw: vec![0.01],
        bias: None,
        out: OutputQuant { scale: 1.0, zero_point: 0, activation: Activation::None },
    };
    let packed = PackedWeights::with_isa(Isa::Avx2, &weights(&probe)).unwrap();
    // The bound: 32767 / 129 = 254 (the pair of 100 and 29).
    assert_eq!(packed.pair_sums_up_to(), Some(254));
    // 2 of the 2 panels x 17 quads exact.
    assert!(
        packed.kernel().ends_with("above it vpmaddubsw with 5.9% of quads on exact vpmaddwd"),
        "{}",
        packed.kernel()
    );
    for all_top in [true, false] {
        let a: Vec<u8> = (0..m * k).map(|_| if all_top { 255 } else { next() as u8 }).collect();
        let c = Case { a, za: (next() % 256) as i32, ..probe.clone() };
        assert_avx2_exact(&c, &packed, &format!("rows at 255: {all_top}"));
    }
}

/// AVX2 rows with a few codes above the pair bound (without a full-range layout): the pair
/// kernel on the codes clamped to the bound, each excess added exactly; rows with more than
/// K / 8 such codes, and rows within the bound, in the same blocks (two row blocks, two
/// blocks of columns, whose second reads what the first worked out from the rows, a partial
/// last quad and panel, padded rows), with and without quads paired in i16, against the definition in
/// `u8`, `f32` and `i32` output on 1 and 2 threads.
#[test]
fn avx2_rows_with_few_codes_above_the_bound_are_exact() {
    use qtensor::isa::Isa;
    if !Isa::Avx2.is_supported() {
        return;
    }
    let mut next = crate::xorshift(0x7a3c_51e9_0d2b_c4f1);
    let (m, k, n, lda_pad) = (150, 70, 85, 3);
    // Uniform weights (no pairs of quads); and small negative ones with, in one quad of a
    // column in 20, a 16-bit lane of 65 + 65 (which 255 would saturate, in too many of the
    // panels' quads for a full-range layout), whose quads pair in i16 with the others.
    let uniform: Vec<i8> = (0..n * k).map(|_| next() as i8).collect();
    let mut trained: Vec<i8> = (0..n * k).map(|_| -((next() % 21) as i8)).collect();
    for j in 0..n {
        for g in 0..k / 4 {
            if next().is_multiple_of(20) {
                let at = j * k + 4 * g + 2 * (next() % 2) as usize;
                trained[at..at + 2].copy_from_slice(&[65, 65]);
            }
        }
    }
    for (w, paired) in [(uniform, false), (trained, true)] {
        let probe = Case {
            m,
            k,
            n,
            lda_pad,
            a: Vec::new(),
            w,
            za: (next() % 256) as i32,
            per_channel: true,
            zw: vec![0; n],
            sw: (0..n).map(|_| 0.001 + (next() % 1000) as f32 * 1e-4).collect(),
            bias: Some((0..n).map(|_| ((next() % 2001) as f32 - 1000.0) * 1e-3).collect()),
            out: OutputQuant { scale: 30.0, zero_point: 100, activation: Activation::None },
        };
        let packed = PackedWeights::with_isa(Isa::Avx2, &weights(&probe)).unwrap();
        let bound = packed.pair_sums_up_to().unwrap();
        let name = packed.kernel();
        assert!(bound < u8::MAX && name.contains("clamped to it plus their excess"), "{name}");
        assert_eq!(name.contains("quads paired in i16"), paired, "{name}");
        let limit = k / 8;
        let lda = k + lda_pad;
        let mut a: Vec<u8> = (0..m * lda).map(|_| (next() % (bound as u64 + 1)) as u8).collect();
        for r in 0..m {
            // Row kinds: within the bound; 1, K / 8 and K / 8 + 1 codes above it (at the
            // partial last quad too); all at 255.
            let above = match r % 5 {
                0 => 0,
                1 => 1,
                2 => limit,
                3 => limit + 1,
                _ => k,
            };
            let mut at: Vec<usize> = (0..k).collect();
            for i in 0..above {
                let j = i + (next() % (k - i) as u64) as usize;
                at.swap(i, j);
                a[r * lda + at[i]] = bound + 1 + (next() % (u8::MAX - bound) as u64) as u8;
            }
            if r % 10 == 1 {
                a[r * lda + k - 1] = u8::MAX;
            }
        }
        let c = Case { a, ..probe.clone() };
        let raw = naive_raw(&c);
        assert_avx2_exact(&c, &packed, &format!("paired quads: {paired}"));
        for threads in 1..=2 {
            assert_eq!(
                run_u8(&c, Isa::Avx2, threads),
                u8_reference(&c, &raw),
                "u8, paired {paired}, {threads} threads"
            );
            assert_eq!(run_f32(&c, Isa::Avx2, false, threads), f32_reference(&c, &raw, false), "f32, paired {paired}");
        }
    }
}

/// Blocks whose every row takes the pair kernel (within the bound, or with at most K / 8
/// codes above it, clamped and their excess added) run strip by strip in two passes (sums,
/// then requantization): `u8` output equal to the reference over several row blocks (the
/// last ending in a partial tile of rows), whole and partial strips of columns, weights with
/// and without zero points, quads paired and not.
#[test]
fn avx2_blocks_of_pair_rows_are_exact() {
    use qtensor::isa::Isa;
    if !Isa::Avx2.is_supported() {
        return;
    }
    let mut next = crate::xorshift(0x3c6e_f372_fe94_f82b);
    let (m, k, n, lda_pad) = (151, 70, 40, 5);
    let uniform: Vec<i8> = (0..n * k).map(|_| next() as i8).collect();
    let trained: Vec<i8> = (0..n * k).map(|_| ((next() % 41) as i8) - 20).collect();
    for (w, paired) in [(uniform, false), (trained, true)] {
        for zw in [vec![0; n], (0..n).map(|_| (next() % 7) as i32 - 3).collect()] {
            let probe = Case {
                m,
                k,
                n,
                lda_pad,
                a: Vec::new(),
                w: w.clone(),
                za: (next() % 256) as i32,
                per_channel: true,
                zw: zw.clone(),
                sw: (0..n).map(|_| 0.001 + (next() % 1000) as f32 * 1e-4).collect(),
                bias: Some((0..n).map(|_| ((next() % 2001) as f32 - 1000.0) * 1e-3).collect()),
                out: OutputQuant { scale: 30.0, zero_point: 100, activation: Activation::None },
            };
            let packed = PackedWeights::with_isa(Isa::Avx2, &weights(&probe)).unwrap();
            let bound = packed.pair_sums_up_to().unwrap();
            let name = packed.kernel();
            assert_eq!(name.contains("quads paired in i16"), paired, "{name}");
            let lda = k + lda_pad;
            for sparse in [false, true] {
                let mut a: Vec<u8> = (0..m * lda).map(|_| (next() % (bound as u64 + 1)) as u8).collect();
                if sparse && bound < u8::MAX {
                    // Rows within the bound, or with 1 or K / 8 codes above it.
                    for r in 0..m {
                        let above = [0, 1, k / 8][r % 3];
                        for _ in 0..above {
                            let at = (next() % k as u64) as usize;
                            a[r * lda + at] = bound + 1 + (next() % (u8::MAX - bound) as u64) as u8;
                        }
                    }
                }
                let c = Case { a, ..probe.clone() };
                let raw = naive_raw(&c);
                for threads in 1..=2 {
                    assert_eq!(
                        run_u8(&c, Isa::Avx2, threads),
                        u8_reference(&c, &raw),
                        "paired {paired}, zw {:?}, sparse {sparse}, {threads} threads",
                        &zw[..3]
                    );
                }
            }
        }
    }
}

/// Dequantized output: `fma(raw, 0.02 * sw[j], bias[j])`, then the ReLU.
fn f32_reference(c: &Case, raw: &[i64], relu: bool) -> Vec<u32> {
    (0..c.m * c.n)
        .map(|idx| {
            let j = idx % c.n;
            let ab = 0.02f32 * c.sw[if c.per_channel { j } else { 0 }];
            let y = (raw[idx] as i32 as f32).mul_add(ab, c.bias.as_ref().map_or(0.0, |b| b[j]));
            if relu { y.max(0.0) } else { y }.to_bits()
        })
        .collect()
}

fn run_f32(c: &Case, isa: qtensor::isa::Isa, relu: bool, threads: usize) -> Vec<u32> {
    let packed = PackedWeights::with_isa(isa, &weights(c)).unwrap();
    let a = QMatrix { data: &c.a, m: c.m, k: c.k, lda: c.k + c.lda_pad, scale: 0.02, zero_point: c.za };
    let mut out = vec![0f32; c.m * c.n];
    gemm(&a, &packed, c.bias.as_deref(), GemmOutput::F32 { data: &mut out, ldc: c.n, relu }, threads).unwrap();
    out.iter().map(|v| v.to_bits()).collect()
}

/// The f32 output over several row and column blocks (96 rows, 64 columns each), with and
/// without weight zero points.
#[test]
fn f32_output_over_many_blocks_matches_the_reference() {
    let mut next = crate::xorshift(0x51f3_2a9b_77c0_1e4d);
    for (m, k, n, symmetric) in [(97, 70, 130, true), (200, 33, 70, false), (130, 301, 17, true)] {
        let lda_pad = (next() % 3) as usize;
        let c = Case {
            m,
            k,
            n,
            lda_pad,
            a: (0..m * (k + lda_pad)).map(|_| next() as u8).collect(),
            w: (0..n * k).map(|_| next() as i8).collect(),
            za: (next() % 256) as i32,
            per_channel: true,
            zw: (0..n).map(|_| if symmetric { 0 } else { (next() % 256) as i32 - 128 }).collect(),
            sw: (0..n).map(|_| 0.001 + (next() % 1000) as f32 * 1e-4).collect(),
            bias: Some((0..n).map(|_| ((next() % 2001) as f32 - 1000.0) * 1e-3).collect()),
            out: OutputQuant { scale: 1.0, zero_point: 0, activation: Activation::None },
        };
        let raw = naive_raw(&c);
        for relu in [false, true] {
            let want = f32_reference(&c, &raw, relu);
            for isa in crate::isas_under_test() {
                for threads in 1..=2 {
                    assert_eq!(run_f32(&c, isa, relu, threads), want, "{m}x{k}x{n} {isa} threads={threads}");
                }
            }
        }
    }
}

#[test]
fn the_largest_k_is_exact_and_beyond_it_is_an_error() {
    let k = qkernels::MAX_K;
    // Worst case: every product is (255 - 0) * (-128 - 127) in magnitude terms.
    let c = Case {
        m: 1,
        k,
        n: 2,
        lda_pad: 0,
        a: vec![255; k],
        w: vec![-128; 2 * k],
        za: 0,
        per_channel: false,
        zw: vec![127],
        sw: vec![0.01],
        bias: None,
        out: OutputQuant { scale: 1.0, zero_point: 0, activation: Activation::None },
    };
    let expected = naive_raw(&c);
    assert!(expected[0].abs() <= i32::MAX as i64 && expected[0].abs() > i32::MAX as i64 - 65025);
    for isa in crate::isas_under_test() {
        let packed = PackedWeights::with_isa(isa, &weights(&c)).unwrap();
        let a = QMatrix { data: &c.a, m: 1, k, lda: k, scale: 0.02, zero_point: 0 };
        let mut out = vec![0i32; 2];
        gemm(&a, &packed, None, GemmOutput::I32 { data: &mut out, ldc: 2 }, 1).unwrap();
        assert_eq!(out[0] as i64, expected[0], "{isa}");
    }
    let too_big =
        QTensor::<i8>::quantize(&ndarray::Array2::<f32>::zeros((1, k + 1)), QParams::per_tensor(1.0, 0).unwrap())
            .unwrap();
    let err = PackedWeights::new(&too_big).unwrap_err().to_string();
    assert!(err.contains("K = 33026") && err.contains("33025"), "{err}");
}

//! The matrix product of two computed values (`torch.matmul`, ONNX `MatMul` with both inputs
//! computed at run time: attention's `Q·Kᵀ` and `attention·V`): `[.., m, k] x [.., k, n]`,
//! the leading (batch) axes broadcast as NumPy does. In float, `ndarray`'s product per batch;
//! in int8, each batch's right operand is packed at run time as the GEMM's weights (its codes
//! shifted to i8 with the zero point shifted alike, so the products are exact) and the sums
//! requantized to the observed output parameters, FBGEMM's epilogue as every int8 layer's.

use ndarray::{ArrayD, IxDyn};
use qkernels::{GemmOutput, OutputQuant, PackedWeights, QMatrix, QuantU8};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use super::shape::{logical_vec, stored_vec, transpose_bytes};
use super::{attrs, op_err, parse, OpWriter, QOp, SavedQ};
use crate::error::{NnError, Result};
use crate::quant::{budget, quantized, Run, Value};
use crate::scratch;

/// The output shape of `a x b`: both of rank 2 or more, `a`'s last axis `b`'s second to
/// last, the batch axes broadcast (equal, or 1, or missing on one side). `None` otherwise.
pub fn matmul_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let (ra, rb) = (a.len(), b.len());
    if ra < 2 || rb < 2 || a[ra - 1] != b[rb - 2] {
        return None;
    }
    let rank = ra.max(rb);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank - 2 {
        // Axis i of the output, right-aligned in each operand's batch axes.
        let da = if i + ra >= rank { a[i + ra - rank] } else { 1 };
        let db = if i + rb >= rank { b[i + rb - rank] } else { 1 };
        out.push(match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        });
    }
    out.extend([a[ra - 2], b[rb - 1]]);
    Some(out)
}

fn shape_err(a: &[usize], b: &[usize], name: &str) -> NnError {
    NnError::Shape {
        module: name.to_string(),
        kind: "matmul",
        expected: format!(
            "a right operand [.., {}, n] for the left one {a:?} (rank 2 or more, batch axes equal, 1 or missing)",
            a.last().copied().unwrap_or(0)
        ),
        got: b.to_vec(),
    }
}

/// For each batch of the output (in order), the offsets of its `a` and `b` matrices, in
/// matrices from each operand's start.
fn batch_offsets(a: &[usize], b: &[usize], out: &[usize]) -> Vec<(usize, usize)> {
    let rank = out.len();
    let batches: usize = out[..rank - 2].iter().product();
    // Per output batch axis: the operands' strides in matrices (0 where broadcast).
    let strides = |s: &[usize]| {
        let r = s.len();
        let mut st = vec![0usize; rank - 2];
        let mut acc = 1;
        for i in (0..rank - 2).rev() {
            if i + r >= rank {
                let d = s[i + r - rank];
                st[i] = if d == 1 { 0 } else { acc };
                acc *= d;
            }
        }
        st
    };
    let (sa, sb) = (strides(a), strides(b));
    (0..batches)
        .map(|mut t| {
            let (mut oa, mut ob) = (0, 0);
            for i in (0..rank - 2).rev() {
                let idx = t % out[i];
                t /= out[i];
                oa += idx * sa[i];
                ob += idx * sb[i];
            }
            (oa, ob)
        })
        .collect()
}

/// `a x b` in float: one [`qkernels::matmul_f32`] per batch, written in place; on more than
/// one thread the batches are shared out.
pub(crate) fn matmul_f32(a: &ArrayD<f32>, b: &ArrayD<f32>, name: &str, threads: usize) -> Result<ArrayD<f32>> {
    let out = matmul_shape(a.shape(), b.shape()).ok_or_else(|| shape_err(a.shape(), b.shape(), name))?;
    let (m, k, n) = (out[out.len() - 2], a.shape()[a.ndim() - 1], out[out.len() - 1]);
    let (a, b) = (a.as_standard_layout(), b.as_standard_layout());
    let (da, db) = (a.as_slice().expect("standard layout"), b.as_slice().expect("standard layout"));
    let mut y = scratch::take_f32(out.iter().product());
    let batch = |(oa, ob): (usize, usize), yt: &mut [f32]| {
        qkernels::matmul_f32(&da[oa * m * k..][..m * k], &db[ob * k * n..][..k * n], (m, k, n), yt)
            .expect("a batch's matrices have the product's sizes");
    };
    let offsets = batch_offsets(a.shape(), b.shape(), &out);
    if m * n > 0 {
        if threads > 1 && offsets.len() > 1 {
            use rayon::prelude::*;
            y.par_chunks_mut(m * n).zip(offsets).for_each(|(yt, o)| batch(o, yt));
        } else {
            y.chunks_mut(m * n).zip(offsets).for_each(|(yt, o)| batch(o, yt));
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&out), y).expect("the output's length"))
}

/// Attention's float steps (the dynamic modes'), `scores = q x kt`, the softmax over each
/// row of scores, `scores x v`, computed head by head with each head's scores in one buffer
/// of the thread's: the same functions as the three ops one after the other
/// ([`matmul_f32`]'s per-batch products, [`qkernels::softmax_in_place`] per row), so the same
/// bits, without the whole score tensor going through memory between the steps. On more than
/// one thread the heads are shared out. With `key_is_k`, `kt` holds `k` itself (its last two
/// axes swapped), read as its transpose ([`qkernels::matmul_f32_bt`], the same bits). The
/// shapes must fit ([`attention_fits`], for `k`'s transpose).
pub(crate) fn attention_f32(
    q: &ArrayD<f32>,
    kt: &ArrayD<f32>,
    key_is_k: bool,
    v: &ArrayD<f32>,
    run: Run,
) -> Result<ArrayD<f32>> {
    let (qs, vs) = (q.shape(), v.shape());
    let ks = if key_is_k { swap_last_two(kt.shape()) } else { kt.shape().to_vec() };
    assert!(attention_fits(qs, &ks, vs), "attention_f32: the caller checks the shapes");
    let r = qs.len();
    let (m, k, n, d) = (qs[r - 2], qs[r - 1], ks[r - 1], vs[r - 1]);
    let mut out = qs.to_vec();
    out[r - 1] = d;
    let len = budget(&out, 4, run, "attention")?;
    budget(&[m, n], 4, run, "attention scores")?;
    let heads: usize = qs[..r - 2].iter().product();
    let (q, kt, v) = (q.as_standard_layout(), kt.as_standard_layout(), v.as_standard_layout());
    let (dq, dk, dv) = (
        q.as_slice().expect("standard layout"),
        kt.as_slice().expect("standard layout"),
        v.as_slice().expect("standard layout"),
    );
    let mut y = scratch::take_f32(len);
    let head = |h: usize, yh: &mut [f32]| {
        let mut scores = scratch::take_f32(m * n);
        let (qh, kh) = (&dq[h * m * k..][..m * k], &dk[h * k * n..][..k * n]);
        if key_is_k {
            qkernels::matmul_f32_bt(qh, kh, (m, k, n), &mut scores)
        } else {
            qkernels::matmul_f32(qh, kh, (m, k, n), &mut scores)
        }
        .expect("a head's matrices have the product's sizes");
        if n > 0 {
            qkernels::softmax_in_place(&mut scores, n, 1, 1);
        }
        qkernels::matmul_f32(&scores, &dv[h * n * d..][..n * d], (m, n, d), yh)
            .expect("a head's matrices have the product's sizes");
        scratch::give_f32(scores);
    };
    if m * d > 0 {
        if run.threads > 1 && heads > 1 {
            use rayon::prelude::*;
            y.par_chunks_mut(m * d).enumerate().for_each(|(h, yh)| head(h, yh));
        } else {
            y.chunks_mut(m * d).enumerate().for_each(|(h, yh)| head(h, yh));
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&out), y).expect("the output's length"))
}

/// `shape` with its last two axes swapped.
pub(crate) fn swap_last_two(shape: &[usize]) -> Vec<usize> {
    let mut s = shape.to_vec();
    let r = s.len();
    if r >= 2 {
        s.swap(r - 2, r - 1);
    }
    s
}

/// The product in the converted model.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MatMulOp {
    qs: [SavedQ; 2],
    out_q: SavedQ,
    int8: bool,
}

impl MatMulOp {
    pub(crate) fn new(qs: [QuantU8; 2], out_q: QuantU8, int8: bool) -> Self {
        MatMulOp { qs: [qs[0].into(), qs[1].into()], out_q: out_q.into(), int8 }
    }
    fn params(&self) -> [QuantU8; 3] {
        [self.qs[0].0, self.qs[1].0, self.out_q.0]
    }

    /// Whether it runs in int8.
    pub(crate) fn is_int8(&self) -> bool {
        self.int8
    }
}

/// Whether `scores = q x kt`, a softmax over its last axis, then `scores x v` can run head by
/// head ([`attention`]): every operand 4-D or 3-D alike, the same batch axes, and the
/// matrices' sizes chained.
pub(crate) fn attention_fits(q: &[usize], kt: &[usize], v: &[usize]) -> bool {
    let r = q.len();
    r >= 3
        && kt.len() == r
        && v.len() == r
        && q[..r - 2] == kt[..r - 2]
        && q[..r - 2] == v[..r - 2]
        && q[r - 1] == kt[r - 2]
        && kt[r - 1] == v[r - 2]
}

/// What lies between attention's first product and its softmax, both optional and in this
/// order: a scaling by a constant (`scale`, [`super::scalar::MulScalarOp`]: BERT's
/// `1 / sqrt(d)`), then an int8 addition of a mask computed before the product (`mask`:
/// BERT's additive attention mask, broadcast over heads and rows).
#[derive(Default)]
pub(crate) struct Between<'a> {
    pub scale: Option<f32>,
    pub mask: Option<MaskAdd<'a>>,
}

/// The mask addition inside attention: the addition, the mask, and whether the scores are
/// the addition's first operand.
pub(crate) struct MaskAdd<'a> {
    pub add: &'a super::add::AddOp,
    pub mask: Value,
    pub scores_first: bool,
}

/// Whether a mask of shape `mask` adds to scores of shape `scores` without changing their
/// shape (it broadcasts to them).
pub(crate) fn mask_fits(scores: &[usize], mask: &[usize]) -> bool {
    super::mul::broadcast_shape(scores, mask).is_some_and(|s| s == scores)
}

/// Attention's int8 steps, `scores = q x kt` (`first`), optionally scaled and masked
/// (`between`), the softmax over each row of scores (`softmax`), `scores x v` (`second`),
/// computed head by head with each head's scores kept in small buffers in logical order: the
/// same arithmetic as the ops one after the other (the same bytes out), without moving the
/// whole score tensor between its stored and logical orders at every step. On more than one
/// thread the heads are shared out. With `key_is_k`, `kt` holds `k` itself (its last two axes
/// swapped), which the first product packs as it is (the same bytes). The shapes must fit
/// ([`attention_fits`], for `k`'s transpose, and [`mask_fits`] for a mask).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    (first, softmax, second): (&MatMulOp, &super::softmax::SoftmaxOp, &MatMulOp),
    between: Between<'_>,
    q: Value,
    kt: Value,
    key_is_k: bool,
    v: Value,
    run: Run,
) -> Result<Value> {
    let [qa, qb, _] = first.params();
    let so = first.params()[2];
    let [_, vb, out_q] = second.params();
    let (qd, qshape, qq) = quantized(q, qa)?;
    let (kd, kshape, kq) = quantized(kt, qb)?;
    let (vd, vshape, vq) = quantized(v, vb)?;
    let r = qshape.len();
    let n = if key_is_k { kshape[r - 2] } else { kshape[r - 1] };
    let (m, k, d) = (qshape[r - 2], qshape[r - 1], vshape[r - 1]);
    let mut out = qshape.clone();
    out[r - 1] = d;
    let len = budget(&out, 1, run, "attention")?;
    budget(&[m, n], 1, run, "attention scores")?;
    let mut scores_shape = qshape.clone();
    scores_shape[r - 1] = n;
    // The mask in logical order, and per head the offset of its `[mm, nn]` matrix (`mm` 1 or
    // m, `nn` 1 or n: repeated over the rows and keys it does not have).
    let mask = match between.mask {
        Some(MaskAdd { add, mask, scores_first }) => {
            let [q0, q1, add_q] = add.params();
            let (md, mshape, mq) = quantized(mask, if scores_first { q1 } else { q0 })?;
            assert!(mask_fits(&scores_shape, &mshape), "attention: the caller checks the mask's shape");
            let md = logical_vec(md, &mshape);
            let mut padded = vec![1; r.saturating_sub(mshape.len())];
            padded.extend_from_slice(&mshape);
            let offsets: Vec<usize> = batch_offsets(&scores_shape, &padded, &scores_shape)
                .into_iter()
                .map(|(_, o)| o * padded[r - 2] * padded[r - 1])
                .collect();
            Some((md, mq, (padded[r - 2], padded[r - 1]), offsets, add_q, add.relu, scores_first))
        }
        None => None,
    };
    let (qd, kd, vd) = (logical_vec(qd, &qshape), logical_vec(kd, &kshape), logical_vec(vd, &vshape));
    let heads: usize = qshape[..r - 2].iter().product();
    let mut y = scratch::take(len);
    // One head: its scores, probabilities and a spare in buffers of the calling thread's.
    let head = |h: usize, yh: &mut [u8], threads: usize| -> Result<()> {
        let (mut scores, mut probs, mut spare) = (scratch::take(m * n), scratch::take(m * n), scratch::take(m * n));
        let qh = (&qd[h * m * k..][..m * k], &[m, k][..], qq);
        let kh = (&kd[h * k * n..][..k * n], &[k, n][..], kq);
        let done = matmul_u8(qh, kh, key_is_k, &[m, n], so, &mut scores, threads).and_then(|()| {
            let mut sq = so;
            if let Some(c) = between.scale {
                sq = qkernels::mul_scalar(&scores, sq, c, &mut spare).map_err(op_err)?;
                std::mem::swap(&mut scores, &mut spare);
            }
            if let Some((md, mq, (mm, nn), offsets, add_q, relu, scores_first)) = &mask {
                // This head's mask, repeated to [m, n], in the probabilities' buffer (free
                // until the softmax).
                let mh = &md[offsets[h]..][..mm * nn];
                for (i, row) in probs.chunks_exact_mut(n).enumerate() {
                    let src = &mh[if *mm == 1 { 0 } else { i * nn }..][..*nn];
                    if *nn == 1 {
                        row.fill(src[0]);
                    } else {
                        row.copy_from_slice(src);
                    }
                }
                let done = if *scores_first {
                    qkernels::add(&scores, sq, &probs, *mq, &mut spare, *add_q, *relu)
                } else {
                    qkernels::add(&probs, *mq, &scores, sq, &mut spare, *add_q, *relu)
                };
                done.map_err(op_err)?;
                std::mem::swap(&mut scores, &mut spare);
                sq = *add_q;
            }
            qkernels::softmax_u8(&scores, sq, (m, n, 1), softmax.out_q(), &mut probs).map_err(op_err)?;
            let ph = (&probs[..], &[m, n][..], softmax.out_q());
            let vh = (&vd[h * n * d..][..n * d], &[n, d][..], vq);
            matmul_u8(ph, vh, false, &[m, d], out_q, yh, threads)
        });
        scratch::give(scores);
        scratch::give(probs);
        scratch::give(spare);
        done
    };
    let done = if run.threads > 1 && heads > 1 && m * d > 0 {
        // Heads are independent: the threads share them out, each head's products on one.
        use rayon::prelude::*;
        y.par_chunks_mut(m * d).enumerate().try_for_each(|(h, yh)| head(h, yh, 1))
    } else {
        (0..heads).try_for_each(|h| head(h, &mut y[h * m * d..][..m * d], run.threads))
    };
    for b in [qd, kd, vd] {
        scratch::give(b);
    }
    if let Some((md, ..)) = mask {
        scratch::give(md);
    }
    done?;
    Ok(Value::U8 { data: stored_vec(y, &out), shape: out, q: out_q })
}

pub(crate) const OP: (&str, super::OpLoader) =
    ("MatMul", |j, _, node| Ok(Box::new(parse::<MatMulOp>(j, node, "MatMul")?)));

/// `a x b` on codes: `a` (`[m, k]` per batch, parameters `qa`) times `b` (`[k, n]`, `qb`),
/// requantized to `qo`, written into `y` (`[m, n]` per batch). With `b_transposed`, `db`
/// holds each batch's `b` transposed (`[n, k]`, the packing's order; `bshape` still says
/// `[.., k, n]`).
#[allow(clippy::too_many_arguments)]
fn matmul_u8(
    (da, ashape, qa): (&[u8], &[usize], QuantU8),
    (db, bshape, qb): (&[u8], &[usize], QuantU8),
    b_transposed: bool,
    out: &[usize],
    qo: QuantU8,
    y: &mut [u8],
    threads: usize,
) -> Result<()> {
    let (m, k, n) = (out[out.len() - 2], ashape[ashape.len() - 1], out[out.len() - 1]);
    let quant = OutputQuant { scale: qo.scale, zero_point: qo.zero_point, activation: qkernels::Activation::None };
    // One batch: the right operand's codes as i8 weights, `b - 128` with zero point
    // `zb - 128` (so that `w - zw == b - zb` exactly), transposed to `[n, k]`.
    let batch = |(oa, ob): (usize, usize), yt: &mut [u8], threads: usize| -> Result<()> {
        let b = &db[ob * k * n..][..k * n];
        let codes: Vec<i8> = if b_transposed {
            b.iter().map(|&v| (v ^ 0x80) as i8).collect()
        } else {
            let mut bt = scratch::take(n * k);
            transpose_bytes(b, k, n, &mut bt);
            let codes = bt.iter().map(|&v| (v ^ 0x80) as i8).collect();
            scratch::give(bt);
            codes
        };
        let w = PackedWeights::from_codes(qtensor::isa::selected(), codes, n, k, qb.scale, qb.zero_point - 128)
            .map_err(op_err)?;
        let a = QMatrix { data: &da[oa * m * k..][..m * k], m, k, lda: k, scale: qa.scale, zero_point: qa.zero_point };
        qkernels::gemm(&a, &w, None, GemmOutput::U8 { data: yt, ldc: n, quant }, threads).map_err(op_err)
    };
    let offsets = batch_offsets(ashape, bshape, out);
    if threads > 1 && offsets.len() > 1 && m * n > 0 {
        // Batches (heads) are independent: the threads share them out, each on one.
        use rayon::prelude::*;
        return y.par_chunks_mut(m * n).zip(offsets).try_for_each(|(yt, o)| batch(o, yt, 1));
    }
    for (t, o) in offsets.into_iter().enumerate() {
        batch(o, &mut y[t * m * n..][..m * n], threads)?;
    }
    Ok(())
}

impl QOp for MatMulOp {
    fn op_name(&self) -> &'static str {
        OP.0
    }
    fn run(&self, args: &mut Vec<Value>, _in_q: QuantU8, run: Run) -> Result<Value> {
        let b = args.pop().expect("two inputs");
        let a = args.pop().expect("two inputs");
        if !self.int8 {
            budget(&matmul_shape(a.shape(), b.shape()).unwrap_or_default(), 4, run, "matmul")?;
            let (a, b) = (a.into_f32(), b.into_f32());
            let y = matmul_f32(&a, &b, "", run.threads)?;
            scratch::recycle_f32(a);
            scratch::recycle_f32(b);
            return Ok(Value::F32(y));
        }
        let [qa, qb, qo] = self.params();
        let (ad, ashape, aq) = quantized(a, qa)?;
        let (bd, bshape, bq) = quantized(b, qb)?;
        let out = matmul_shape(&ashape, &bshape).ok_or_else(|| shape_err(&ashape, &bshape, ""))?;
        let len = budget(&out, 1, run, "matmul")?;
        let (ad, bd) = (logical_vec(ad, &ashape), logical_vec(bd, &bshape));
        let mut y = scratch::take(len);
        let done = matmul_u8((&ad, &ashape, aq), (&bd, &bshape, bq), false, &out, qo, &mut y, run.threads);
        scratch::give(ad);
        scratch::give(bd);
        done?;
        Ok(Value::U8 { data: stored_vec(y, &out), shape: out, q: qo })
    }
    fn out_q(&self) -> Option<QuantU8> {
        Some(self.params()[2])
    }
    fn quantizes_input(&self, k: usize, _in_q: QuantU8) -> Option<QuantU8> {
        self.int8.then(|| self.params()[k])
    }
    fn takes_inputs(&self, n: usize) -> bool {
        n == 2
    }
    /// A right operand without batch axes is shared by every image: never split by batch.
    fn images_apart(&self) -> bool {
        false
    }
    fn kernel(&self) -> Option<String> {
        self.int8.then(|| format!("GEMM, right operand packed per call, {}", qtensor::isa::selected()))
    }
    fn save(&self, _node: &str, _w: &mut OpWriter) -> Result<J> {
        Ok(attrs(self))
    }
    any_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_broadcast_their_batch_axes() {
        assert_eq!(matmul_shape(&[2, 3], &[3, 4]), Some(vec![2, 4]));
        assert_eq!(matmul_shape(&[5, 2, 3], &[3, 4]), Some(vec![5, 2, 4]));
        assert_eq!(matmul_shape(&[1, 2, 3], &[6, 3, 4]), Some(vec![6, 2, 4]));
        assert_eq!(matmul_shape(&[2, 1, 7, 3], &[4, 3, 5]), Some(vec![2, 4, 7, 5]));
        assert_eq!(matmul_shape(&[2, 3], &[4, 5]), None);
        assert_eq!(matmul_shape(&[2, 2, 3], &[3, 3, 4]), None);
        assert_eq!(matmul_shape(&[3], &[3, 4]), None);
    }

    #[test]
    fn batch_offsets_follow_broadcasting() {
        let out = matmul_shape(&[2, 1, 7, 3], &[4, 3, 5]).unwrap();
        let offs = batch_offsets(&[2, 1, 7, 3], &[4, 3, 5], &out);
        assert_eq!(offs, vec![(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]);
    }

    /// The int8 product equals the exact integer sums requantized by FBGEMM's formula
    /// (`round_half_even(raw * (sa * sb / so)) + zo`, clamped), batch by batch, with a right
    /// operand broadcast over the batch.
    #[test]
    fn int8_products_are_the_exact_sums_requantized() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (ashape, bshape) in
            [(vec![3, 4, 37], vec![37, 19]), (vec![2, 1, 7, 5], vec![3, 5, 70]), (vec![1, 1], vec![1, 1])]
        {
            let out = matmul_shape(&ashape, &bshape).unwrap();
            let la: usize = ashape.iter().product();
            let lb: usize = bshape.iter().product();
            let da: Vec<u8> = (0..la).map(|_| next() as u8).collect();
            let db: Vec<u8> = (0..lb).map(|_| next() as u8).collect();
            let (qa, qb) = (QuantU8 { scale: 0.02, zero_point: 131 }, QuantU8 { scale: 0.013, zero_point: 7 });
            let qo = QuantU8 { scale: 0.9, zero_point: 120 };
            let mut y = vec![0u8; out.iter().product()];
            matmul_u8((&da, &ashape, qa), (&db, &bshape, qb), false, &out, qo, &mut y, 1).unwrap();
            let (m, k, n) = (out[out.len() - 2], ashape[ashape.len() - 1], out[out.len() - 1]);
            let mult = qa.scale * qb.scale / qo.scale;
            let mut clamped = 0;
            for (t, (oa, ob)) in batch_offsets(&ashape, &bshape, &out).into_iter().enumerate() {
                for i in 0..m {
                    for j in 0..n {
                        let raw: i32 = (0..k)
                            .map(|kk| {
                                (da[oa * m * k + i * k + kk] as i32 - qa.zero_point)
                                    * (db[ob * k * n + kk * n + j] as i32 - qb.zero_point)
                            })
                            .sum();
                        let want = ((raw as f32 * mult).round_ties_even() as i32 + qo.zero_point).clamp(0, 255);
                        clamped += usize::from(want == 0 || want == 255);
                        assert_eq!(
                            y[t * m * n + i * n + j] as i32,
                            want,
                            "{ashape:?} x {bshape:?} batch {t} ({i}, {j})"
                        );
                    }
                }
            }
            // The cases exercise the range, not the clamp.
            assert!(clamped * 10 < y.len(), "{clamped} of {} clamped", y.len());
        }
    }

    #[test]
    fn logical_and_stored_are_inverse() {
        let shape = [2, 3, 2, 2];
        let data: Vec<u8> = (0..24).collect();
        let back = stored_vec(logical_vec(data.clone(), &shape), &shape);
        assert_eq!(back, data);
        // NHWC (0, 0, 0, 1) is channel 1 of pixel 0: logical index 1 * h * w.
        assert_eq!(logical_vec(data, &shape)[4], 1);
    }
}

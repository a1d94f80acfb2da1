//! The 256-entry lookup table, one byte at a time.

pub(crate) fn lut(table: &[u8; 256], x: &[u8], out: &mut [u8]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = table[*v as usize];
    }
}

/// `out[i] = table[top - x[i]]` (a softmax row's exponentials by each code's distance below
/// the row's largest), one value at a time.
pub(crate) fn lookup_below(table: &[f32; 256], x: &[u8], top: u8, out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = table[usize::from(top - *v)];
    }
}

#[cfg(test)]
mod tests {
    use qtensor::isa::Isa;

    /// Every tier's `lookup_below` gives the generic twin's values, bit for bit, on random
    /// lengths (the 16-wide blocks and their tails), codes, tops and tables.
    #[test]
    fn lookups_below_the_top_are_the_same_on_every_tier() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let table: [f32; 256] = std::array::from_fn(|_| f32::from_bits(next() as u32 & 0x7f7f_ffff));
        for len in (0..70).chain([197, 1000]) {
            let top = if len % 3 == 0 { 255 } else { (next() % 256) as u8 };
            let x: Vec<u8> = (0..len).map(|_| (next() % (u64::from(top) + 1)) as u8).collect();
            let mut want = vec![0f32; len];
            super::lookup_below(&table, &x, top, &mut want);
            for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                let mut got = vec![f32::NAN; len];
                (crate::registry::kernels(isa).lookup_below)(&table, &x, top, &mut got);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{isa}: {len} codes below {top}");
            }
        }
    }
}

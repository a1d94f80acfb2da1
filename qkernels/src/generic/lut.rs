//! The 256-entry lookup table, one byte at a time.

pub(crate) fn lut(table: &[u8; 256], x: &[u8], out: &mut [u8]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = table[*v as usize];
    }
}

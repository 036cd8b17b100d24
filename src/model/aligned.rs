//! Zeroed f32 scratch buffers that start on a 64-byte boundary, so that the
//! kernels' 512-bit loads and stores of whole channel groups never straddle
//! two cache lines (a `Vec<f32>` is only 16-byte aligned).
//!
//! It only allocates and views memory; it computes nothing.

use std::ops::{Deref, DerefMut};

/// One cache line of values.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// `len` zeroed f32 values, the first at a 64-byte boundary.
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0.0; 16]); len.div_ceil(16)],
            len,
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: `lines` holds at least `len` initialised f32 values back to
        // back (`Line` is a `repr(C)` array of 16 without padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as for `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_as_long_as_asked() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0.0));
            assert_eq!(b.as_ptr() as usize % 64, 0);
            b.iter_mut().for_each(|v| *v = 1.0);
            assert_eq!(b.iter().sum::<f32>(), len as f32);
        }
    }
}

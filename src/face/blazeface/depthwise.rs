//! The depthwise 3x3 rows of a BlazeBlock (stride 1 or 2, and at stride 2
//! the 2x2 max-pool of the skip from the same input rows): a portable loop,
//! and vector registers (AVX-512F, AVX2) that keep the nine taps and the
//! bias along a row, storing f32 or, for the bf16 products, bfloat16.
//!
//! It reads a bordered map and writes one row; it does not run the
//! pointwise product or know the network.

use super::LANES;
use super::block::Block;
#[cfg(target_arch = "x86_64")]
use crate::model::simd::{Avx2, Avx512, Simd};

/// Depthwise 3x3 of output row `y` into `out` (`out_side x cin_p`), and at
/// stride 2 the block's skip, the 2x2 max-pool of the same input rows, into
/// `pool` (`out_side x cin_p`; untouched at stride 1).
///
/// Stride 1 reads bordered rows `y..y+3` (a one-pixel zero border is the
/// padding); stride 2 reads input rows `2y..2y+3`, i.e. bordered rows
/// `2y+1..2y+4`, which reaches the bottom/right border only (PyTorch pads
/// those sides by 2 and the last row/column past the picture is never read).
pub(super) fn depthwise_row(b: &Block, input: &[f32], y: usize, out: &mut [f32], pool: &mut [f32]) {
    let cin_p = b.cin_p;
    let in_row = (b.side + 2) * cin_p;
    let off = if b.stride == 1 { 0 } else { 1 };
    for x in 0..b.out_side() {
        let o = &mut out[x * cin_p..][..cin_p];
        o.copy_from_slice(&b.dw_b);
        for ky in 0..3 {
            for kx in 0..3 {
                let at = (b.stride * y + ky + off) * in_row + (b.stride * x + kx + off) * cin_p;
                let px = &input[at..][..cin_p];
                let w = &b.dw_w[(ky * 3 + kx) * cin_p..][..cin_p];
                for ((o, p), w) in o.iter_mut().zip(px).zip(w) {
                    *o += p * w;
                }
            }
        }
        if b.stride == 2 {
            let at = |dy: usize, dx: usize| {
                &input[(2 * y + dy + 1) * in_row + (2 * x + dx + 1) * cin_p..][..cin_p]
            };
            let (p, q, r, t) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
            let o = &mut pool[x * cin_p..][..cin_p];
            for i in 0..cin_p {
                o[i] = p[i].max(q[i]).max(r[i]).max(t[i]);
            }
        }
    }
}

/// How a depthwise row's registers are stored: [`Keep`] (f32) or [`Round`]
/// (bfloat16, the input of the bf16 pointwise products, which then need no
/// rounding pass of their own).
#[cfg(target_arch = "x86_64")]
trait Put<S: Simd, T> {
    /// `v`'s lanes at `p`.
    ///
    /// # Safety
    /// As `S`'s operations, and `p` holds `S::LANES` values.
    unsafe fn put(p: *mut T, v: S::V);
}

/// Depthwise outputs stored as f32.
#[cfg(target_arch = "x86_64")]
struct Keep;

/// Depthwise outputs rounded to bfloat16 (AVX512-BF16 with AVX512-VL).
#[cfg(target_arch = "x86_64")]
struct Round;

#[cfg(target_arch = "x86_64")]
impl<S: Simd> Put<S, f32> for Keep {
    #[inline(always)]
    unsafe fn put(p: *mut f32, v: S::V) {
        // SAFETY: the caller's contract.
        unsafe { S::store(p, v) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Put<Avx512, u16> for Round {
    #[inline(always)]
    unsafe fn put(p: *mut u16, v: std::arch::x86_64::__m512) {
        // SAFETY: the caller's contract (and the CPU's AVX512-BF16).
        unsafe { crate::model::simd::store_bf16(p, v) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Put<Avx2, u16> for Round {
    #[inline(always)]
    unsafe fn put(p: *mut u16, v: std::arch::x86_64::__m256) {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (and the CPU's AVX512-BF16 and
        // AVX512-VL).
        unsafe {
            let half: __m128i = std::mem::transmute(_mm256_cvtneps_pbh(v));
            _mm_storeu_si128(p.cast(), half);
        }
    }
}

/// One depthwise row's pointers, checked against its buffers: the input's
/// first tap, the output and the pool (skip) row.
#[cfg(target_arch = "x86_64")]
struct DwRow<T> {
    input: *const f32,
    out: *mut T,
    pool: *mut f32,
}

#[cfg(target_arch = "x86_64")]
impl<T> Clone for DwRow<T> {
    fn clone(&self) -> Self {
        *self
    }
}

#[cfg(target_arch = "x86_64")]
impl<T> Copy for DwRow<T> {}

#[cfg(target_arch = "x86_64")]
impl<T> DwRow<T> {
    /// Output row `y` of block `b`, from `input` (the bordered map) into
    /// `out` and (at stride 2) `pool`, each `out_side x cin_p`.
    fn new(b: &Block, input: &[f32], y: usize, out: &mut [T], pool: &mut [f32]) -> Self {
        let (cin_p, n) = (b.cin_p, b.out_side());
        let in_row = (b.side + 2) * cin_p;
        let off = if b.stride == 1 { 0 } else { 1 };
        let first = (b.stride * y + off) * in_row + off * cin_p;
        let last = first + 2 * in_row + (b.stride * (n - 1) + 2) * cin_p + cin_p;
        assert!(last <= input.len() && out.len() >= n * cin_p && cin_p.is_multiple_of(LANES));
        assert!(b.stride == 1 || pool.len() >= n * cin_p);
        Self {
            input: input[first..].as_ptr(),
            out: out.as_mut_ptr(),
            pool: pool.as_mut_ptr(),
        }
    }
}

/// [`depthwise_row`] for the channels `k..k + S::LANES`, in vector
/// registers: the nine taps and the bias stay in registers along the row.
///
/// # Safety
/// The CPU supports `S`'s instructions (and `O`'s); `row` was made for `b`
/// and the row's buffers; `k + S::LANES <= b.cin_p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn depthwise_cols<S: Simd, T, O: Put<S, T>>(
    b: &Block,
    row: DwRow<T>,
    k: usize,
    cin_p: usize,
) {
    debug_assert_eq!(cin_p, b.cin_p);
    let in_row = (b.side + 2) * cin_p;
    let n = b.out_side();
    let (ip, op, pp) = (row.input, row.out, row.pool);
    // SAFETY: weights and bias hold 9 * cin_p and cin_p values; every input
    // index is inside the rows `DwRow::new` checked, every output (and
    // pooled value at stride 2) below n * cin_p.
    unsafe {
        // (No closures here: they would not inherit the caller's target
        // features.)
        let mut w = [S::zero(); 9];
        for (t, v) in w.iter_mut().enumerate() {
            *v = S::load(b.dw_w.as_ptr().add(t * cin_p + k));
        }
        let bias = S::load(b.dw_b.as_ptr().add(k));
        // Four outputs at a time at stride 1: each loaded input pixel serves
        // every output whose window holds it (6 loads per kernel row instead
        // of 12).
        let whole = if b.stride == 1 { n / 4 * 4 } else { 0 };
        for x in (0..whole).step_by(4) {
            let base = ip.add(x * cin_p + k);
            let mut acc = [bias; 4];
            for ky in 0..3 {
                let r = base.add(ky * in_row);
                let mut px = [S::zero(); 6];
                for (j, v) in px.iter_mut().enumerate() {
                    *v = S::load(r.add(j * cin_p));
                }
                for kx in 0..3 {
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a = S::fmadd(px[i + kx], w[ky * 3 + kx], *a);
                    }
                }
            }
            for (i, a) in acc.into_iter().enumerate() {
                O::put(op.add((x + i) * cin_p + k), a);
            }
        }
        for x in whole..n {
            let base = ip.add(b.stride * x * cin_p + k);
            let mut acc = bias;
            for ky in 0..3 {
                for kx in 0..3 {
                    let v = S::load(base.add(ky * in_row + kx * cin_p));
                    acc = S::fmadd(v, w[ky * 3 + kx], acc);
                }
            }
            O::put(op.add(x * cin_p + k), acc);
            if b.stride == 2 {
                // The window's top-left 2x2 pixels are the pool's.
                let m = crate::model::simd::max2x2::<S>(base, base.add(in_row), cin_p, 0);
                S::store(pp.add(x * cin_p + k), m);
            }
        }
    }
}

/// [`depthwise_row`] on AVX-512F, 16 channels a register; a last 8 or fewer
/// channels take an 8-lane register (half the work on CPUs that split
/// 512-bit operations in two), and the padded 8 lanes after them are
/// written as zero.
///
/// # Safety
/// The CPU supports AVX-512F (and `O`'s instructions).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn depthwise_row_wide<T, O: Put<Avx512, T> + Put<Avx2, T>>(
    b: &Block,
    input: &[f32],
    y: usize,
    out: &mut [T],
    pool: &mut [f32],
) {
    let row = DwRow::new(b, input, y, out, pool);
    // SAFETY: `row` was checked for this block. The channel counts as
    // constants: every offset in the kernels is a multiple of one, and
    // becomes an immediate (a live register or a spilled one otherwise).
    unsafe {
        match b.cin_p {
            32 => depthwise_wide_cols::<T, O>(b, row, 32),
            48 => depthwise_wide_cols::<T, O>(b, row, 48),
            64 => depthwise_wide_cols::<T, O>(b, row, 64),
            80 => depthwise_wide_cols::<T, O>(b, row, 80),
            96 => depthwise_wide_cols::<T, O>(b, row, 96),
            other => depthwise_wide_cols::<T, O>(b, row, other),
        }
    }
}

/// The columns of [`depthwise_row_wide`] for `cin_p` channels a pixel.
///
/// # Safety
/// As [`depthwise_cols`], with `cin_p == b.cin_p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn depthwise_wide_cols<T, O: Put<Avx512, T> + Put<Avx2, T>>(
    b: &Block,
    row: DwRow<T>,
    cin_p: usize,
) {
    let full = b.cin / LANES * LANES;
    // SAFETY: the columns stay below cin_p (a multiple of 16 at or above
    // cin); `row` was checked for this block.
    unsafe {
        for k in (0..full).step_by(LANES) {
            depthwise_cols::<Avx512, T, O>(b, row, k, cin_p);
        }
        match b.cin - full {
            0 => {}
            rest if rest > LANES / 2 => depthwise_cols::<Avx512, T, O>(b, row, full, cin_p),
            _ => {
                depthwise_cols::<Avx2, T, O>(b, row, full, cin_p);
                let k = full + LANES / 2;
                for x in 0..b.out_side() {
                    <O as Put<Avx2, T>>::put(row.out.add(x * cin_p + k), Avx2::zero());
                    if b.stride == 2 {
                        Avx2::store(row.pool.add(x * cin_p + k), Avx2::zero());
                    }
                }
            }
        }
    }
}

/// [`depthwise_row`] on AVX-512F.
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn depthwise_row_avx512(
    b: &Block,
    input: &[f32],
    y: usize,
    out: &mut [f32],
    pool: &mut [f32],
) {
    // SAFETY: the caller's contract.
    unsafe { depthwise_row_wide::<f32, Keep>(b, input, y, out, pool) }
}

/// [`depthwise_row`] on AVX-512F with its outputs rounded to bfloat16.
///
/// # Safety
/// The CPU supports AVX-512F, AVX512-BF16 and AVX512-VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
pub(super) unsafe fn depthwise_row_bf16(
    b: &Block,
    input: &[f32],
    y: usize,
    out: &mut [u16],
    pool: &mut [f32],
) {
    // SAFETY: the caller's contract.
    unsafe { depthwise_row_wide::<u16, Round>(b, input, y, out, pool) }
}

/// [`depthwise_row`] on AVX2 with FMA.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn depthwise_row_avx2(
    b: &Block,
    input: &[f32],
    y: usize,
    out: &mut [f32],
    pool: &mut [f32],
) {
    let row = DwRow::new(b, input, y, out, pool);
    // SAFETY: cin_p is a multiple of 8; `row` was checked for this block.
    unsafe {
        for k in (0..b.cin_p).step_by(Avx2::LANES) {
            depthwise_cols::<Avx2, f32, Keep>(b, row, k, b.cin_p);
        }
    }
}

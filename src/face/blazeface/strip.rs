//! The register tiles of the detector's pointwise products: a strip of
//! pixels times a group of output-channel registers, multiplied and stored
//! with its epilogue (bias, skip, ReLU) without leaving the registers, on
//! AVX-512F, AVX512-BF16 and AVX2 with FMA.
//!
//! Only the tiles: which strips and groups a row is cut into is
//! [`super::pointwise`]'s business.

use std::arch::x86_64::*;

use crate::model::simd::{Avx2, Avx512, Simd};

use super::LANES;
use super::pointwise::{Group, NARROW, STRIP, Taps, WIDE_AVX2};

/// A pointwise register tile: input, its taps, pixel stride, weights,
/// where to store.
pub(super) type StripKernel<T> = unsafe fn(*const T, Taps, usize, *const T, Store);

/// Where and how a register tile of a pointwise product is stored: `bias`
/// (16 R values for `R = G + H` registers), `skip` (null, or the tile's
/// pixels of `skip_c` values indexed by absolute channel, `first + ..`),
/// ReLU or not, and `out` (the tile's pixels `out_stride` apart of 16 R
/// values).
#[derive(Clone, Copy)]
pub(super) struct Store {
    pub(super) bias: *const f32,
    pub(super) skip: *const f32,
    pub(super) skip_c: usize,
    pub(super) first: usize,
    pub(super) relu: bool,
    pub(super) out: *mut f32,
    pub(super) out_stride: usize,
}

impl Store {
    /// The same store from pixel `p` and lane `c` of the tile on.
    ///
    /// # Safety
    /// Both stay inside the tile [`Store`] describes.
    unsafe fn at(self, p: usize, c: usize) -> Self {
        // SAFETY: the caller's contract.
        unsafe {
            Self {
                bias: self.bias.add(c),
                skip: if self.skip.is_null() {
                    self.skip
                } else {
                    self.skip.add(p * self.skip_c)
                },
                first: self.first + c,
                out: self.out.add(p * self.out_stride + c),
                ..self
            }
        }
    }
}

/// How a strip's products take their taps: one f32 tap per step with FMA
/// ([`Single`]), or two bfloat16 taps per step with `vdpbf16ps`
/// ([`Pairs`]). Weights are laid out `[taps / STEP][16 R][STEP]`.
trait Step {
    /// The values of the input and the weights.
    type T;
    /// Taps per step.
    const STEP: usize;
    /// One pixel's taps of a step, as the broadcast takes them.
    type Taken: Copy;
    /// Reads one pixel's taps of a step.
    ///
    /// # Safety
    /// `p` holds `STEP` values.
    unsafe fn take(p: *const Self::T) -> Self::Taken;
    /// `acc + x * w` over the step's taps, 16 lanes (`w` 16 `STEP` values).
    ///
    /// # Safety
    /// The CPU supports the step's instructions; `w` holds `16 STEP` values.
    unsafe fn madd(acc: __m512, x: Self::Taken, w: *const Self::T) -> __m512;
    /// [`Step::madd`] on 8 lanes.
    ///
    /// # Safety
    /// As [`Step::madd`], `w` holding `8 STEP` values.
    unsafe fn madd8(acc: __m256, x: Self::Taken, w: *const Self::T) -> __m256;
}

/// One f32 tap per step (AVX-512F FMA).
struct Single;

/// Two bfloat16 taps per step (AVX512-BF16 `vdpbf16ps`, with AVX512-VL).
struct Pairs;

impl Step for Single {
    type T = f32;
    const STEP: usize = 1;
    type Taken = f32;

    #[inline(always)]
    unsafe fn take(p: *const f32) -> f32 {
        // SAFETY: the caller's contract.
        unsafe { *p }
    }

    #[inline(always)]
    unsafe fn madd(acc: __m512, x: f32, w: *const f32) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe { _mm512_fmadd_ps(_mm512_set1_ps(x), _mm512_loadu_ps(w), acc) }
    }

    #[inline(always)]
    unsafe fn madd8(acc: __m256, x: f32, w: *const f32) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_fmadd_ps(_mm256_set1_ps(x), _mm256_loadu_ps(w), acc) }
    }
}

impl Step for Pairs {
    type T = u16;
    const STEP: usize = 2;
    /// Two adjacent bf16 values read as one i32.
    type Taken = i32;

    #[inline(always)]
    unsafe fn take(p: *const u16) -> i32 {
        // SAFETY: the caller's contract.
        unsafe { p.cast::<i32>().read_unaligned() }
    }

    #[inline(always)]
    unsafe fn madd(acc: __m512, x: i32, w: *const u16) -> __m512 {
        // SAFETY: the caller's contract; the transmutes reinterpret bits.
        unsafe {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(x));
            let w: __m512bh = std::mem::transmute(_mm512_loadu_ps(w.cast()));
            _mm512_dpbf16_ps(acc, x, w)
        }
    }

    #[inline(always)]
    unsafe fn madd8(acc: __m256, x: i32, w: *const u16) -> __m256 {
        // SAFETY: the caller's contract; the transmutes reinterpret bits.
        unsafe {
            let x: __m256bh = std::mem::transmute(_mm256_set1_epi32(x));
            let w: __m256bh = std::mem::transmute(_mm256_loadu_ps(w.cast()));
            _mm256_dpbf16_ps(acc, x, w)
        }
    }
}

/// One strip of `P` pixels times `G` 16-lane registers (and an 8-lane one
/// when `H`) of a pointwise product, with its epilogue, in registers from
/// the first multiply to the store; the taps taken as `K` says.
///
/// # Safety
/// The CPU supports AVX-512F and `K`'s instructions; with `R = G + H`
/// registers, `input` holds `P` pixels `in_stride` apart of the values
/// `taps` reads (a run of several of an even length for [`Pairs`], the
/// value past an odd run readable), `w` one row of `16 R K::STEP` values
/// per step; `to` as [`Store`] says.
#[inline(always)]
unsafe fn strip<K: Step, const P: usize, const G: usize, const H: bool>(
    input: *const K::T,
    taps: Taps,
    in_stride: usize,
    w: *const K::T,
    to: Store,
) {
    let row = (G + usize::from(H)) * LANES * K::STEP;
    // SAFETY: the caller's contract (the CPU's AVX-512F).
    let (mut acc, mut tail) = unsafe { ([[Avx512::zero(); G]; P], [[Avx2::zero(); 1]; P]) };
    for run in 0..taps.runs {
        // SAFETY: the caller's contract (the taps stay inside the input and
        // the weights' rows).
        let (input, w) = unsafe {
            (
                input.add(run * taps.pitch),
                w.add(run * taps.len / K::STEP * row),
            )
        };
        for step in 0..taps.len.div_ceil(K::STEP) {
            // SAFETY: as above, for every pixel, register and step.
            unsafe {
                let wp = w.add(step * row);
                for (p, (regs, t)) in acc.iter_mut().zip(tail.iter_mut()).enumerate() {
                    let x = K::take(input.add(p * in_stride + K::STEP * step));
                    for (k, r) in regs.iter_mut().enumerate() {
                        *r = K::madd(*r, x, wp.add(k * LANES * K::STEP));
                    }
                    if H {
                        t[0] = K::madd8(t[0], x, wp.add(G * LANES * K::STEP));
                    }
                }
            }
        }
    }
    // SAFETY: the caller's contract.
    unsafe { pw_store::<G, H>(&acc, &tail, to) };
}

/// [`strip`] in f32.
///
/// # Safety
/// As [`strip`]; the CPU supports AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn pw_strip<const P: usize, const G: usize, const H: bool>(
    input: *const f32,
    taps: Taps,
    in_stride: usize,
    w: *const f32,
    to: Store,
) {
    // SAFETY: the caller's contract.
    unsafe { strip::<Single, P, G, H>(input, taps, in_stride, w, to) }
}

/// [`strip`] in bfloat16, two taps a step.
///
/// # Safety
/// As [`strip`]; the CPU supports AVX-512F, AVX512-BF16 and AVX512-VL.
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn pw_strip_bf16<const P: usize, const G: usize, const H: bool>(
    input: *const u16,
    taps: Taps,
    in_stride: usize,
    w: *const u16,
    to: Store,
) {
    // SAFETY: the caller's contract.
    unsafe { strip::<Pairs, P, G, H>(input, taps, in_stride, w, to) }
}

/// [`pw_strip`] on AVX2 with FMA, for a group of `N` 8-lane registers
/// (`N` from 1 to 6: `MAX_GROUP` 16-lane registers, the last possibly
/// half), as tiles of 6 or 4 pixels times 2 registers
/// ([`crate::model::simd::avx2_tiles`] says why).
///
/// # Safety
/// The CPU supports AVX2 and FMA; `input` holds `P` pixels `in_stride`
/// apart of the values `taps` reads, `w` a row of `8 N` values per tap;
/// `to` as [`Store`] says for `8 N` lanes.
#[target_feature(enable = "avx2,fma")]
unsafe fn pw_strip_avx2<const P: usize, const N: usize>(
    input: *const f32,
    taps: Taps,
    in_stride: usize,
    w: *const f32,
    to: Store,
) {
    let row = N * Avx2::LANES;
    for (p, pixels) in crate::model::simd::avx2_pixels(P) {
        for (c, regs) in crate::model::simd::avx2_tiles(N) {
            // SAFETY: every tile stays inside the strip's pixels and the
            // group's lanes (the caller's contract).
            unsafe {
                let input = input.add(p * in_stride);
                let w = (w.add(c * Avx2::LANES), row);
                let to = to.at(p, c * Avx2::LANES);
                match (pixels, regs) {
                    (6, 2) => pw_tile::<Avx2, 6, 2>(input, taps, in_stride, w, to),
                    (6, _) => pw_tile::<Avx2, 6, 1>(input, taps, in_stride, w, to),
                    (_, 2) => pw_tile::<Avx2, 4, 2>(input, taps, in_stride, w, to),
                    _ => pw_tile::<Avx2, 4, 1>(input, taps, in_stride, w, to),
                }
            }
        }
    }
}

/// A register tile of a pointwise product: `P` pixels times `C` registers
/// of output channels, weights `w.1` values per tap from `w.0`, then bias,
/// skip, ReLU and the store.
///
/// # Safety
/// The CPU supports `S`'s instructions; `input` holds `P` pixels
/// `in_stride` apart of the values `taps` reads, the weights a row per tap;
/// `to` as [`Store`] says for `C` registers.
#[inline(always)]
unsafe fn pw_tile<S: Simd, const P: usize, const C: usize>(
    input: *const f32,
    taps: Taps,
    in_stride: usize,
    w: (*const f32, usize),
    to: Store,
) {
    // SAFETY: in bounds by the function's contract.
    unsafe {
        let runs = (taps.runs, taps.len, taps.pitch);
        let acc = crate::model::simd::tile_sums::<S, P, C>(input, in_stride, runs, w);
        store_tile::<S, C>(&acc, to);
    }
}

/// The epilogue of a pointwise register tile: bias, skip, ReLU, store.
/// Inlined into the strip, so the sums go from registers to the map (a
/// call would spill every one of them first).
///
/// # Safety
/// The CPU supports AVX-512F; `to` as [`Store`] says.
#[inline(always)]
unsafe fn pw_store<const G: usize, const H: bool>(
    acc: &[[std::arch::x86_64::__m512; G]],
    tail: &[[std::arch::x86_64::__m256; 1]],
    to: Store,
) {
    // SAFETY: the caller's contract; the 8-lane register follows the G
    // 16-lane ones, and the 8 padded lanes after it are written as zero (the
    // next block adds them as its skip, and the maps' buffers are reused).
    unsafe {
        store_tile::<Avx512, G>(acc, to);
        if H {
            let to = to.at(0, G * LANES);
            store_tile::<Avx2, 1>(tail, to);
            for p in 0..tail.len() {
                Avx2::store(to.out.add(p * to.out_stride + LANES / 2), Avx2::zero());
            }
        }
    }
}

/// `$kernel::<P, G, H>` for a group of `G` 16-lane registers and an 8-lane
/// one when `H`.
macro_rules! for_group {
    ($kernel:ident, $p:ident, $g:expr) => {
        match ($g.full, $g.half) {
            (0, _) => $kernel::<$p, 0, true>,
            (1, false) => $kernel::<$p, 1, false>,
            (1, true) => $kernel::<$p, 1, true>,
            (2, false) => $kernel::<$p, 2, false>,
            (2, true) => $kernel::<$p, 2, true>,
            _ => $kernel::<$p, 3, false>,
        }
    };
}

/// The bfloat16 strip kernel for a group's registers and a strip of
/// `pixels` (one of `WIDTHS`).
pub(super) fn strip_bf16(g: &Group, pixels: usize) -> StripKernel<u16> {
    match pixels {
        STRIP => for_group!(pw_strip_bf16, STRIP, g),
        _ => for_group!(pw_strip_bf16, NARROW, g),
    }
}

/// The AVX-512F strip kernel for a group's registers and a strip of
/// `pixels` (one of `WIDTHS`).
pub(super) fn strip_f32(g: &Group, pixels: usize) -> StripKernel<f32> {
    match pixels {
        STRIP => for_group!(pw_strip, STRIP, g),
        _ => for_group!(pw_strip, NARROW, g),
    }
}

/// The AVX2 strip kernel for a group's registers and a strip of `pixels`
/// (one of `WIDTHS_AVX2`).
pub(super) fn strip_avx2(g: &Group, pixels: usize) -> StripKernel<f32> {
    match pixels {
        WIDE_AVX2 => avx2_for::<WIDE_AVX2>(g),
        STRIP => avx2_for::<STRIP>(g),
        _ => avx2_for::<NARROW>(g),
    }
}

/// The AVX2 strip kernel of `P` pixels for a group's 8-lane registers.
fn avx2_for<const P: usize>(g: &Group) -> StripKernel<f32> {
    match g.width() / Avx2::LANES {
        1 => pw_strip_avx2::<P, 1>,
        2 => pw_strip_avx2::<P, 2>,
        3 => pw_strip_avx2::<P, 3>,
        4 => pw_strip_avx2::<P, 4>,
        5 => pw_strip_avx2::<P, 5>,
        _ => pw_strip_avx2::<P, 6>,
    }
}

/// The epilogue of a register tile of `C` registers per pixel: bias, skip,
/// ReLU, store.
///
/// # Safety
/// The CPU supports `S`'s instructions; `to` as [`Store`] says for the
/// tile's pixels and `C` registers.
#[inline(always)]
unsafe fn store_tile<S: Simd, const C: usize>(acc: &[[S::V; C]], to: Store) {
    let Store {
        bias,
        skip,
        skip_c,
        first,
        relu,
        out,
        out_stride,
    } = to;
    // SAFETY: in bounds by the function's contract.
    unsafe {
        for (p, row) in acc.iter().enumerate() {
            for (k, r) in row.iter().enumerate() {
                let mut v = S::add(*r, S::load(bias.add(k * S::LANES)));
                let c = first + k * S::LANES;
                if !skip.is_null() && c < skip_c {
                    v = S::add(v, S::load(skip.add(p * skip_c + c)));
                }
                if relu {
                    v = S::max(v, S::zero());
                }
                S::store(out.add(p * out_stride + k * S::LANES), v);
            }
        }
    }
}

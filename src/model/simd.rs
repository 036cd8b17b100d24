//! The vector instruction sets the CPU kernels are written for, behind one
//! small trait, so a kernel is written once and compiled for each.
//!
//! `Simd`'s operations are `#[inline(always)]` and carry no target
//! features of their own: a kernel generic over `Simd` is instantiated
//! inside a function compiled with the features (`#[target_feature]`), where
//! the operations inline to single instructions. Calling them anywhere else
//! is the caller's promise that the CPU has the features ([`Isa::detect`]).
//!
//! This module knows registers only: no layouts, no networks.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The instruction sets the kernels run on, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: 16 f32 lanes per register, 32 registers.
    Avx512,
    /// AVX2 with FMA: 8 f32 lanes per register, 16 registers (x86-64 CPUs
    /// without AVX-512, such as AMD Zen 1 to 3 and Intel before Ice Lake).
    Avx2,
}

impl Isa {
    /// The widest instruction set this CPU runs, if any; AVX2 on a CPU with
    /// AVX-512 where the environment sets `PROFILE_NO_AVX512` (the kernels
    /// then run as on a CPU without it: to test and measure that path).
    pub fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && !avx512_declined() {
                return Some(Self::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Some(Self::Avx2);
            }
        }
        None
    }
}

/// Whether the CPU is AMD's (CPUID vendor "AuthenticAMD").
///
/// The one fact the kernels choose by besides the instruction sets: on AMD's
/// cores with AVX512-BF16 (Zen 4, Zen 5) the bf16 kernels ran 1.4-1.8 times
/// as fast as the f32 ones; an Intel core without AMX issued `vdpbf16ps` at
/// a quarter of its FMA rate (half the multiply-adds; docs/KERNELS.md), so
/// f32 is faster there.
pub(crate) fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let leaf = __cpuid(0);
        [leaf.ebx, leaf.edx, leaf.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .eq(*b"AuthenticAMD")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the environment declines AVX-512 (`PROFILE_NO_AVX512`, read once).
fn avx512_declined() -> bool {
    static DECLINED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DECLINED.get_or_init(|| std::env::var_os("PROFILE_NO_AVX512").is_some())
}

/// One f32 vector register and the operations the kernels use.
///
/// # Safety
/// Every operation needs the CPU features of its implementation; see the
/// module comment.
pub(crate) trait Simd {
    /// The register.
    type V: Copy;
    /// f32 lanes per register.
    const LANES: usize;
    /// All lanes zero.
    unsafe fn zero() -> Self::V;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// `LANES` values from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self::V;
    /// `LANES` values to `p` (unaligned).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c`, rounded once.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a - b`.
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise maximum.
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
}

/// AVX-512F registers.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx512 {
    type V = __m512;
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_max_ps(a, b) }
    }
}

/// AVX2 registers with FMA.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    type V = __m256;
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_max_ps(a, b) }
    }
}

/// The sums of a register tile: `P` pixels times `C` registers of output
/// channels, over `runs` runs of `len` input values. Pixel `p`'s run `r`
/// starts at `input + p * stride + r * pitch`; the weights hold one row of
/// `w.1` values per input value, run after run, from `w.0` (the tile reads
/// its `C` registers of each row). A 1x1 convolution is one run of its
/// input channels; a KxK one K runs (one per kernel row) of K pixels'
/// channels.
///
/// # Safety
/// The CPU supports `S`'s instructions; every read is in bounds.
#[inline(always)]
pub(crate) unsafe fn tile_sums<S: Simd, const P: usize, const C: usize>(
    input: *const f32,
    stride: usize,
    (runs, len, pitch): (usize, usize, usize),
    (w, w_row): (*const f32, usize),
) -> [[S::V; C]; P] {
    // SAFETY: in bounds by the function's contract. (No closures here: they
    // would not inherit the caller's target features.)
    unsafe {
        let mut acc = [[S::zero(); C]; P];
        for run in 0..runs {
            let ip = input.add(run * pitch);
            let wp = w.add(run * len * w_row);
            for j in 0..len {
                let mut wv = [S::zero(); C];
                for (g, v) in wv.iter_mut().enumerate() {
                    *v = S::load(wp.add(j * w_row + g * S::LANES));
                }
                for (p, row) in acc.iter_mut().enumerate() {
                    let a = S::splat(*ip.add(p * stride + j));
                    for (r, v) in row.iter_mut().zip(&wv) {
                        *r = S::fmadd(a, *v, *r);
                    }
                }
            }
        }
        acc
    }
}

/// The 16 lanes of `v` rounded to bfloat16 (round to nearest even), stored
/// at `p`.
///
/// # Safety
/// Called only where the CPU supports AVX-512F and AVX512-BF16 (from a
/// function compiled with them, where this inlines to two instructions);
/// `p` holds 16 values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn store_bf16(p: *mut u16, v: __m512) {
    // SAFETY: the function's contract.
    unsafe {
        let half: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(p.cast(), half);
    }
}

/// The 2x2 maximum of one register of channels (from `ch`): two adjacent
/// pixels of `c` values each at `a` (one row) and at `b` (the next).
///
/// # Safety
/// The CPU supports `S`'s instructions; `a` and `b` hold `c + ch +
/// S::LANES` values.
#[inline(always)]
pub(crate) unsafe fn max2x2<S: Simd>(a: *const f32, b: *const f32, c: usize, ch: usize) -> S::V {
    // SAFETY: in bounds by the function's contract.
    unsafe {
        let top = S::max(S::load(a.add(ch)), S::load(a.add(c + ch)));
        S::max(top, S::max(S::load(b.add(ch)), S::load(b.add(c + ch))))
    }
}

/// An AVX2 register tile's split of `regs` 8-lane registers of output
/// channels into tiles of at most 2, as `(first register, count)`. With the
/// pixels split as [`avx2_pixels`] says, a tile holds at most 6 x 2 sums,
/// the 2 weights and the broadcast input in the 16 registers (LLVM spills
/// one sum of a 4 x 3 tile, which costs half the speed).
pub(crate) fn avx2_tiles(regs: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..regs).step_by(2).map(move |c| (c, (regs - c).min(2)))
}

/// An AVX2 register tile's split of `pixels` pixels (a multiple of 4) into
/// tiles of 6 and 4, as `(first pixel, count)`.
pub(crate) fn avx2_pixels(pixels: usize) -> impl Iterator<Item = (usize, usize)> {
    let sixes = if pixels % 6 == 4 || pixels.is_multiple_of(6) {
        pixels / 6
    } else {
        0
    };
    let split = sixes * 6;
    (0..split)
        .step_by(6)
        .map(|p| (p, 6))
        .chain((split..pixels).step_by(4).map(|p| (p, 4)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vendor test agrees with the kernel's own reading of the CPU.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn vendor_matches_proc_cpuinfo() {
        let info = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        let vendor = info
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id"))
            .and_then(|l| l.split(':').nth(1))
            .map(str::trim)
            .expect("a vendor_id line");
        assert_eq!(amd(), vendor == "AuthenticAMD", "{vendor}");
    }
}

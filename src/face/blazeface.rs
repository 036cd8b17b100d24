//! The BlazeFace short-range ("front", 128x128) detector network on the CPU:
//! a 5x5 stride-2 stem, sixteen BlazeBlocks (depthwise 3x3, pointwise 1x1,
//! skip, ReLU) and four 1x1 heads, producing the raw outputs that
//! [`super::decode`] turns into faces.
//!
//! Each BlazeBlock runs fused, one output row at a time: the depthwise row
//! goes into a small buffer, the pointwise product of that row (AVX-512 or
//! AVX2 register tiles, or a portable loop)
//! gets the bias, the skip (max-pooled for stride 2) and ReLU, and is written
//! straight into the zero-bordered input of the next block. Channels are
//! padded to multiples of 16 with zero weights, so every row is whole
//! registers. A picture's activations stay in a per-thread scratch kept by the
//! network; the hot path does not allocate.
//!
//! This module knows the network and its weights file; it does not decode
//! boxes, pick faces or touch pictures (see [`super::decode`], [`super::align`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use crate::model::Precision;
use crate::model::aligned::AlignedBuf;
use crate::model::simd::Isa;
#[cfg(target_arch = "x86_64")]
use crate::model::simd::{Avx2, Avx512, Simd};

/// Register width in f32 lanes: channel counts are padded to a multiple.
const LANES: usize = 16;
/// Pixels per register tile of the pointwise products.
const STRIP: usize = 8;
/// Pixels per register tile where a map row holds fewer than [`STRIP`]
/// (the 4x4 maps of the quick look): a half strip, rather than a strip
/// half of zero padding.
const NARROW: usize = 4;
/// Pixels per strip of the AVX2 kernels where a row has room: two register
/// tiles of 6 pixels (12 sums, where 4-pixel tiles have only the 8 that
/// two FMA pipes of 4 cycles' latency need in flight).
const WIDE_AVX2: usize = 12;
/// Strip widths the kernels take, widest first: a row is cut greedily.
const WIDTHS: [usize; 2] = [STRIP, NARROW];
const WIDTHS_AVX2: [usize; 3] = [WIDE_AVX2, STRIP, NARROW];
/// Output-channel registers per register tile, at most.
const MAX_GROUP: usize = 3;
/// Anchors of the front model at its own 128x128 input: 16x16 cells x 2
/// plus 8x8 cells x 6.
pub const ANCHORS: usize = 896;
/// Raw numbers per anchor: box (4) and six landmarks (12).
pub const COORDS: usize = 16;
/// Input pixels per cell of the first two heads' map (16x16 at 128) and of
/// the last two heads' (8x8 at 128).
const HEAD16_STRIDE: usize = 8;
const HEAD8_STRIDE: usize = 16;
/// Anchors per cell of each pair of heads.
const HEAD16_PER_CELL: usize = 2;
const HEAD8_PER_CELL: usize = 6;

/// Errors raised while loading detector weights.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    /// The file could not be read.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        cause: std::io::Error,
    },
    /// The file is not a BlazeFace front model.
    #[error("{path}: {detail}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

/// Which kernels run the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// AVX-512F register tiles (x86-64 CPUs that have it).
    Avx512,
    /// [`Kernels::Avx512`] with the pointwise products in bfloat16 (inputs
    /// and weights rounded, sums in f32; AVX512-BF16 `vdpbf16ps`).
    Avx512Bf16,
    /// AVX2 and FMA register tiles, in f32 (x86-64 CPUs without AVX-512).
    Avx2,
    /// Plain Rust loops, any CPU.
    Portable,
}

impl Kernels {
    /// The fastest kernels this CPU runs. AVX512-BF16 pays where its dot
    /// product outruns two f32 FMAs (AMD Zen 4 and 5); where the CPU has
    /// AMX (Intel), it runs at the FMA rate, and bfloat16 only adds the
    /// rounding (the full look took 1.07 ms in bfloat16 against 0.78 in f32
    /// on such a Xeon), so the f32 kernels serve there.
    pub fn best() -> Self {
        if Precision::Bf16.available() && !crate::model::amx::available() {
            return Kernels::Avx512Bf16;
        }
        match Isa::detect() {
            Some(Isa::Avx512) => Kernels::Avx512,
            Some(Isa::Avx2) => Kernels::Avx2,
            None => Kernels::Portable,
        }
    }

    /// The fastest kernels this CPU runs at f32 (the reference precision).
    pub fn best_f32() -> Self {
        Self::for_precision(Precision::F32)
    }

    /// The fastest kernels this CPU runs at `precision` or finer.
    pub fn for_precision(precision: Precision) -> Self {
        match (Self::best(), precision) {
            (Kernels::Avx512Bf16, Precision::F32) => Kernels::Avx512,
            (best, _) => best,
        }
    }

    /// Whether this CPU runs these kernels.
    pub fn runs_here(self) -> bool {
        match self {
            Kernels::Avx512Bf16 => Precision::Bf16.available(),
            Kernels::Avx512 => Isa::detect() == Some(Isa::Avx512),
            Kernels::Avx2 => Isa::detect().is_some(),
            Kernels::Portable => true,
        }
    }
}

/// A 1x1 convolution `cin_p -> cout_p` (both padded to 16), weights laid out
/// per register group as `[cin_p][16 * g]`.
#[derive(Clone)]
struct Pointwise {
    /// Input channels multiplied (the padding past them is zero, so skipped).
    cin: usize,
    /// Output channels before padding.
    cout: usize,
    cin_p: usize,
    cout_p: usize,
    /// The output channels in groups of registers, each one register tile.
    groups: Vec<Group>,
    /// Offset of each group's weights in `weights`.
    offsets: Vec<usize>,
    weights: Vec<f32>,
    /// The same weights in bfloat16, input channels in adjacent pairs
    /// (`[cin_p / 2][16 * g][2]` per group, at the same offsets).
    weights_bf16: Vec<u16>,
    bias: Vec<f32>,
}

/// Output channels `first..` in `full` 16-lane registers, plus an 8-lane
/// one when `half` (the last 8 or fewer channels of a layer: on CPUs that
/// split 512-bit operations in two, half the work of a full register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Group {
    first: usize,
    full: usize,
    half: bool,
}

impl Group {
    /// Lanes the group's weights and outputs are laid out for.
    fn width(&self) -> usize {
        (self.full + usize::from(self.half)) * LANES
    }
}

/// Splits `cout` channels into register groups of at most [`MAX_GROUP`]
/// registers, evenly (3+3, 2+2, 3+2 rather than a lone register), an 8-lane
/// register last when the remainder fits in one.
fn groups(cout: usize) -> Vec<Group> {
    let rem = cout % LANES;
    let half = rem > 0 && rem <= LANES / 2;
    let mut left = cout / LANES + usize::from(rem > 0);
    let mut first = 0;
    let mut out = Vec::new();
    while left > 0 {
        let g = if left == 4 { 2 } else { left.min(MAX_GROUP) };
        left -= g;
        let last_half = half && left == 0;
        out.push(Group {
            first,
            full: g - usize::from(last_half),
            half: last_half,
        });
        first += g * LANES;
    }
    out
}

impl Pointwise {
    /// From PyTorch `[cout, cin, 1, 1]` weights (or any `[cout][cin]` rows).
    fn new(w: &[f32], b: &[f32], cin: usize, cout: usize) -> Self {
        let (cin_p, cout_p) = (pad16(cin), pad16(cout));
        let groups = groups(cout);
        let mut weights = Vec::with_capacity(cin_p * cout_p);
        let mut offsets = Vec::new();
        for group in &groups {
            let first = group.first;
            offsets.push(weights.len());
            for ci in 0..cin_p {
                for lane in 0..group.width() {
                    let co = first + lane;
                    weights.push(if ci < cin && co < cout {
                        w[co * cin + ci]
                    } else {
                        0.0
                    });
                }
            }
        }
        let mut bias = vec![0.0; cout_p];
        bias[..cout].copy_from_slice(&b[..cout]);
        // Each group's `[cin_p][width]` block paired as the classifier's are.
        let weights_bf16 = groups
            .iter()
            .zip(&offsets)
            .flat_map(|(group, &off)| {
                let width = group.width();
                crate::model::direct::pair_bf16(&weights[off..][..cin_p * width], cin_p, width)
            })
            .collect();
        Self {
            cin,
            cout,
            cin_p,
            cout_p,
            groups,
            offsets,
            weights,
            weights_bf16,
            bias,
        }
    }

    /// `out[p][..cout_p] = epilogue(bias + in[p] x W)` for `n` pixels of
    /// `input`. The pixels past the last whole [`NARROW`] strip (maps
    /// narrower than that, when the network runs on a small input) go
    /// through a zero-padded strip in `staging`.
    fn run(
        &self,
        kernels: Kernels,
        input: Input<'_>,
        n: usize,
        then: Epilogue<'_>,
        out: &mut [f32],
        staging: &mut Staging,
    ) {
        let whole = n / NARROW * NARROW;
        self.run_strips(kernels, input, whole, then, out, &mut staging.bf16);
        if whole < n {
            self.run_rest(kernels, input, whole, n, then, out, staging);
        }
    }

    /// The last `n - whole` (fewer than [`NARROW`]) pixels of
    /// [`Pointwise::run`], for an input of `cin_p` values per pixel.
    #[allow(clippy::too_many_arguments)]
    fn run_rest(
        &self,
        kernels: Kernels,
        input: Input<'_>,
        whole: usize,
        n: usize,
        then: Epilogue<'_>,
        out: &mut [f32],
        staging: &mut Staging,
    ) {
        let rest = n - whole;
        let Staging {
            bf16,
            input: inp,
            input16: inp16,
            output: outp,
            skip: skipp,
        } = staging;
        let (cin_p, cout_p) = (self.cin_p, self.cout_p);
        assert!(
            input.stride == cin_p && input.taps.runs == 1,
            "a map row's pixels"
        );
        let values = match input.values {
            Values::F32(values) => Values::F32(stage(inp, values, whole, rest, cin_p)),
            Values::Bf16(values) => Values::Bf16(stage(inp16, values, whole, rest, cin_p)),
        };
        let then = match then {
            Epilogue::BiasSkipRelu(skip, c) => {
                Epilogue::BiasSkipRelu(stage(skipp, skip, whole, rest, c), c)
            }
            other => other,
        };
        let outp = &mut outp[..NARROW * cout_p];
        let staged = Input { values, ..input };
        self.run_strips(kernels, staged, NARROW, then, outp, bf16);
        out[whole * cout_p..][..rest * cout_p].copy_from_slice(&outp[..rest * cout_p]);
    }

    /// [`Pointwise::run`] for `n` a multiple of [`NARROW`]; `bf16` holds an
    /// f32 input rounded to bfloat16 for [`Kernels::Avx512Bf16`].
    fn run_strips(
        &self,
        kernels: Kernels,
        input: Input<'_>,
        n: usize,
        then: Epilogue<'_>,
        out: &mut [f32],
        bf16: &mut [u16],
    ) {
        assert!(n.is_multiple_of(NARROW) && out.len() >= n * self.cout_p);
        let taps = input.taps;
        assert!(
            taps.runs * taps.len <= self.cin_p && (taps.runs == 1 || taps.len.is_multiple_of(2))
        );
        let (skip, skip_c, relu) = match then {
            Epilogue::Bias => (None, 0, false),
            Epilogue::BiasRelu => (None, 0, true),
            Epilogue::BiasSkipRelu(skip, c) => {
                assert!(c.is_multiple_of(LANES) && c <= self.cout_p && skip.len() >= n * c);
                (Some(skip), c, true)
            }
        };
        let then = (skip, skip_c, relu);
        let stride = input.stride;
        match (kernels, input.values) {
            #[cfg(target_arch = "x86_64")]
            (Kernels::Avx512Bf16, values) => {
                let values: &[u16] = match values {
                    Values::Bf16(v) => v,
                    Values::F32(v) => {
                        // Rounded to bfloat16 once for every group.
                        assert!(taps.runs == 1 && stride.is_multiple_of(LANES));
                        let len = n * stride;
                        // SAFETY: AVX512-BF16 present (`Kernels::best`);
                        // both slices hold `len` values, a multiple of 16.
                        unsafe { crate::model::direct::round_bf16(&v[..len], &mut bf16[..len]) };
                        &bf16[..len]
                    }
                };
                // SAFETY: AVX512-BF16 present (`Kernels::best`); the strips
                // as for `Kernels::Avx512`, with the bf16 weights laid out at
                // the same offsets.
                unsafe {
                    let input = ((values, stride, taps), &WIDTHS[..]);
                    self.each_strip(input, &self.weights_bf16, n, then, out, |g, p| {
                        if p == STRIP {
                            strip_bf16::<STRIP>(g)
                        } else {
                            strip_bf16::<NARROW>(g)
                        }
                    })
                };
            }
            #[cfg(target_arch = "x86_64")]
            (Kernels::Avx512, Values::F32(values)) => {
                // SAFETY: the CPU has AVX-512F (`Kernels::best`).
                unsafe {
                    let input = ((values, stride, taps), &WIDTHS[..]);
                    self.each_strip(input, &self.weights, n, then, out, |g, p| {
                        if p == STRIP {
                            strip_f32::<STRIP>(g)
                        } else {
                            strip_f32::<NARROW>(g)
                        }
                    })
                };
            }
            #[cfg(target_arch = "x86_64")]
            (Kernels::Avx2, Values::F32(values)) => {
                // SAFETY: the CPU has AVX2 and FMA (`Kernels::best`).
                unsafe {
                    let input = ((values, stride, taps), &WIDTHS_AVX2[..]);
                    self.each_strip(input, &self.weights, n, then, out, |g, p| match p {
                        WIDE_AVX2 => strip_avx2::<WIDE_AVX2>(g),
                        STRIP => strip_avx2::<STRIP>(g),
                        _ => strip_avx2::<NARROW>(g),
                    })
                };
            }
            (_, Values::F32(values)) => {
                assert!(n == 0 || values.len() >= (n - 1) * stride + taps.span());
                for (group, &off) in self.groups.iter().zip(&self.offsets) {
                    let (first, width) = (group.first, group.width());
                    let w = &self.weights[off..off + self.cin_p * width];
                    for p in 0..n {
                        let o = &mut out[p * self.cout_p + first..][..width];
                        o.copy_from_slice(&self.bias[first..first + width]);
                        for r in 0..taps.runs {
                            let px = &values[p * stride + r * taps.pitch..][..taps.len];
                            let rows = w[r * taps.len * width..].chunks_exact(width);
                            for (a, row) in px.iter().zip(rows) {
                                for (o, w) in o.iter_mut().zip(row) {
                                    *o += a * w;
                                }
                            }
                        }
                    }
                }
                for (p, px) in out[..n * self.cout_p]
                    .chunks_exact_mut(self.cout_p)
                    .enumerate()
                {
                    if let Some(skip) = skip {
                        for (o, s) in px.iter_mut().zip(&skip[p * skip_c..][..skip_c]) {
                            *o += s;
                        }
                    }
                    if relu {
                        px.iter_mut().for_each(|v| *v = v.max(0.0));
                    }
                }
            }
            (kernels, Values::Bf16(_)) => {
                unreachable!("bfloat16 pixels are made for Avx512Bf16 only, not {kernels:?}")
            }
        }
    }

    /// Every group's register tiles over `n` pixels (a multiple of
    /// [`NARROW`]) of `input` (values, pixel stride, taps, and the strip
    /// widths the kernels take; f32 or bf16 as `weights`): strips as wide as
    /// fit, each run by the function `kernel` picks for its group and strip
    /// width, then the epilogue `then` (skip, its channels, ReLU).
    ///
    /// # Safety
    /// The CPU runs the picked kernels; `weights` holds this layer's groups
    /// at `offsets` in the kernels' layout, `out` `n * cout_p` values, the
    /// skip `n` pixels of its channels.
    #[cfg(target_arch = "x86_64")]
    unsafe fn each_strip<T>(
        &self,
        ((input, stride, taps), widths): ((&[T], usize, Taps), &[usize]),
        weights: &[T],
        n: usize,
        (skip, skip_c, relu): (Option<&[f32]>, usize, bool),
        out: &mut [f32],
        kernel: impl Fn(&Group, usize) -> StripKernel<T>,
    ) {
        if n == 0 {
            return;
        }
        // The bf16 kernels read whole pairs: an odd run reads one value past.
        assert!(input.len() >= (n - 1) * stride + taps.span().next_multiple_of(2));
        for (group, &off) in self.groups.iter().zip(&self.offsets) {
            let first = group.first;
            let w = weights[off..].as_ptr();
            let bias = self.bias[first..].as_ptr();
            for (p, pixels) in strips(n, widths) {
                let run = kernel(group, pixels);
                let store = Store {
                    bias,
                    skip: skip.map_or(std::ptr::null(), |s| s[p * skip_c..].as_ptr()),
                    skip_c,
                    first,
                    relu,
                    out: out[p * self.cout_p + first..].as_mut_ptr(),
                    out_stride: self.cout_p,
                };
                // SAFETY: the input holds `pixels` pixels `stride` apart of
                // the taps' values from p (asserted above), the group's
                // weights cin_p * 16g values, bias and out 16g values from
                // `first` per pixel, skip `pixels` pixels of skip_c values
                // (the caller's contract and `run_strips`' asserts).
                unsafe { run(input[p * stride..].as_ptr(), taps, stride, w, store) };
            }
        }
    }

    /// Multiply-adds times two over `pixels` pixels (real channels only).
    fn flops(&self, pixels: usize) -> u64 {
        2 * (self.cin * self.cout * pixels) as u64
    }
}

/// Buffers a pointwise product stages its input in, kept with a thread's
/// scratch: the input rounded to bfloat16 (one row of a map), and the
/// zero-padded last [`NARROW`] strip of a map narrower than one.
struct Staging {
    bf16: Vec<u16>,
    input: Vec<f32>,
    input16: Vec<u16>,
    output: Vec<f32>,
    skip: Vec<f32>,
}

impl Staging {
    /// Room for rows of up to `pixels` pixels of up to `channels` values.
    fn new(pixels: usize, channels: usize) -> Self {
        Self {
            bf16: vec![0; pixels * channels],
            input: vec![0.0; NARROW * channels],
            input16: vec![0; NARROW * channels],
            output: vec![0.0; NARROW * channels],
            skip: vec![0.0; NARROW * channels],
        }
    }
}

/// `(first pixel, width)` of the strips that cover `n` pixels, each the
/// widest of `widths` (widest first, `n` a multiple of the last) that fits.
fn strips(n: usize, widths: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let width = *widths.iter().find(|&&w| at + w <= n)?;
        at += width;
        Some((at - width, width))
    })
}

/// The `rest` pixels from `whole` on of `values` (`channels` values each)
/// into a zero-padded [`NARROW`] strip in `staging`.
fn stage<'a, T: Copy + Default>(
    staging: &'a mut [T],
    values: &[T],
    whole: usize,
    rest: usize,
    channels: usize,
) -> &'a [T] {
    let strip = &mut staging[..NARROW * channels];
    strip[..rest * channels].copy_from_slice(&values[whole * channels..][..rest * channels]);
    strip[rest * channels..].fill(T::default());
    strip
}

/// What a pointwise product gets before it is stored.
#[derive(Clone, Copy)]
enum Epilogue<'a> {
    /// The bias only (heads).
    Bias,
    /// Bias, then ReLU (the stem).
    BiasRelu,
    /// Bias, plus the skip (pixels of `.1` channels; channels past them get
    /// none), then ReLU (a BlazeBlock).
    BiasSkipRelu(&'a [f32], usize),
}

/// A pointwise product's input: pixels `stride` values apart, each read as
/// `taps` says.
#[derive(Clone, Copy)]
struct Input<'a> {
    values: Values<'a>,
    stride: usize,
    taps: Taps,
}

impl<'a> Input<'a> {
    /// The first `cin` channels of each pixel of a map row, `stride` values
    /// per pixel.
    fn row(values: Values<'a>, stride: usize, cin: usize) -> Self {
        Self {
            values,
            stride,
            taps: Taps {
                runs: 1,
                len: cin,
                pitch: 0,
            },
        }
    }
}

/// The values a pointwise product reads: f32, or already rounded to
/// bfloat16 (for [`Kernels::Avx512Bf16`] only).
#[derive(Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Values<'a> {
    /// The values from the `at`-th on.
    fn from(self, at: usize) -> Self {
        match self {
            Values::F32(v) => Values::F32(&v[at..]),
            Values::Bf16(v) => Values::Bf16(&v[at..]),
        }
    }
}

/// Where a pixel's input values lie, from its first: `runs` runs of `len`
/// values, `pitch` apart, meeting the weights' rows in that order. A 1x1
/// convolution reads one run, its input channels; the stem reads its 5x5
/// window straight from the picture, as five rows of 16 values (5 pixels of
/// 3 channels, and one more value that meets a zero weight).
#[derive(Clone, Copy, Debug)]
struct Taps {
    runs: usize,
    len: usize,
    pitch: usize,
}

impl Taps {
    /// Values a pixel's taps span from its first.
    fn span(&self) -> usize {
        (self.runs - 1) * self.pitch + self.len
    }
}

/// A pointwise register tile: input, its taps, pixel stride, weights,
/// where to store.
#[cfg(target_arch = "x86_64")]
type StripKernel<T> = unsafe fn(*const T, Taps, usize, *const T, Store);

/// Where and how a register tile of a pointwise product is stored: `bias`
/// (16 R values for `R = G + H` registers), `skip` (null, or the tile's
/// pixels of `skip_c` values indexed by absolute channel, `first + ..`),
/// ReLU or not, and `out` (the tile's pixels `out_stride` apart of 16 R
/// values).
#[derive(Clone, Copy)]
struct Store {
    bias: *const f32,
    skip: *const f32,
    skip_c: usize,
    first: usize,
    relu: bool,
    out: *mut f32,
    out_stride: usize,
}

impl Store {
    /// The same store from pixel `p` and lane `c` of the tile on.
    ///
    /// # Safety
    /// Both stay inside the tile [`Store`] describes.
    #[cfg(target_arch = "x86_64")]
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

/// One strip of `P` pixels times `G` 16-lane registers (and an 8-lane one
/// when `H`) of a pointwise product, with its epilogue, in registers from
/// the first multiply to the store.
///
/// # Safety
/// The CPU supports AVX-512F; with `R = G + H` registers, `input` holds `P`
/// pixels `in_stride` apart of the values `taps` reads, `w` one row of
/// `16 R` values for each tap; `to` as [`Store`] says.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pw_strip<const P: usize, const G: usize, const H: bool>(
    input: *const f32,
    taps: Taps,
    in_stride: usize,
    w: *const f32,
    to: Store,
) {
    use std::arch::x86_64::*;
    let row = (G + usize::from(H)) * LANES;
    let mut acc = [[_mm512_setzero_ps(); G]; P];
    let mut tail = [[_mm256_setzero_ps(); 1]; P];
    for run in 0..taps.runs {
        // SAFETY: the caller's contract (the taps stay inside the input and
        // the weights' rows).
        let (input, w) = unsafe { (input.add(run * taps.pitch), w.add(run * taps.len * row)) };
        for ci in 0..taps.len {
            let wp = unsafe { w.add(ci * row) };
            let mut wv = [_mm512_setzero_ps(); G];
            for (k, v) in wv.iter_mut().enumerate() {
                *v = unsafe { _mm512_loadu_ps(wp.add(k * LANES)) };
            }
            let wt = if H {
                unsafe { _mm256_loadu_ps(wp.add(G * LANES)) }
            } else {
                _mm256_setzero_ps()
            };
            for (p, (row, t)) in acc.iter_mut().zip(tail.iter_mut()).enumerate() {
                let x = unsafe { *input.add(p * in_stride + ci) };
                let a = _mm512_set1_ps(x);
                for (r, v) in row.iter_mut().zip(&wv) {
                    *r = _mm512_fmadd_ps(a, *v, *r);
                }
                if H {
                    t[0] = _mm256_fmadd_ps(_mm256_set1_ps(x), wt, t[0]);
                }
            }
        }
    }
    // SAFETY: the caller's contract.
    unsafe { pw_store::<G, H>(&acc, &tail, to) };
}

/// [`pw_strip`] in bfloat16: `input` holds bf16 values (the padding past
/// an odd run zero: it reads one more), `w` `[taps / 2][16 R][2]` bf16
/// values; the taps are taken two at a time.
///
/// # Safety
/// As [`pw_strip`], and the CPU supports AVX512-BF16 (with AVX512-VL).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn pw_strip_bf16<const P: usize, const G: usize, const H: bool>(
    input: *const u16,
    taps: Taps,
    in_stride: usize,
    w: *const u16,
    to: Store,
) {
    use std::arch::x86_64::*;
    let row = (G + usize::from(H)) * LANES * 2;
    let mut acc = [[_mm512_setzero_ps(); G]; P];
    let mut tail = [[_mm256_setzero_ps(); 1]; P];
    for run in 0..taps.runs {
        // SAFETY: the caller's contract (the taps stay inside the input and
        // the weights' rows; a run of several is of an even length).
        let (input, w) = unsafe { (input.add(run * taps.pitch), w.add(run * taps.len / 2 * row)) };
        for pair in 0..taps.len.div_ceil(2) {
            let wp = unsafe { w.add(pair * row) };
            let mut wv = [_mm512_setzero_ps(); G];
            for (k, v) in wv.iter_mut().enumerate() {
                *v = unsafe { _mm512_loadu_ps(wp.add(k * 2 * LANES).cast()) };
            }
            let wt = if H {
                unsafe { _mm256_loadu_ps(wp.add(G * 2 * LANES).cast()) }
            } else {
                _mm256_setzero_ps()
            };
            for (p, (row, t)) in acc.iter_mut().zip(tail.iter_mut()).enumerate() {
                // Two adjacent bf16 values read as one i32.
                let both = unsafe {
                    input
                        .add(p * in_stride + 2 * pair)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(both)) };
                for (r, v) in row.iter_mut().zip(&wv) {
                    *r = _mm512_dpbf16_ps(*r, a, unsafe {
                        std::mem::transmute::<__m512, __m512bh>(*v)
                    });
                }
                if H {
                    let a: __m256bh = unsafe { std::mem::transmute(_mm256_set1_epi32(both)) };
                    t[0] = _mm256_dpbf16_ps(t[0], a, unsafe {
                        std::mem::transmute::<__m256, __m256bh>(wt)
                    });
                }
            }
        }
    }
    // SAFETY: the caller's contract.
    unsafe { pw_store::<G, H>(&acc, &tail, to) };
}

/// [`pw_strip`] on AVX2 with FMA, for a group of `N` 8-lane registers
/// (`N` from 1 to 6: [`MAX_GROUP`] 16-lane registers, the last possibly
/// half), as tiles of 6 or 4 pixels times 2 registers
/// ([`crate::model::simd::avx2_tiles`] says why).
///
/// # Safety
/// The CPU supports AVX2 and FMA; `input` holds `P` pixels `in_stride`
/// apart of the values `taps` reads, `w` a row of `8 N` values per tap;
/// `to` as [`Store`] says for `8 N` lanes.
#[cfg(target_arch = "x86_64")]
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
#[cfg(target_arch = "x86_64")]
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
#[cfg(target_arch = "x86_64")]
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

/// The bfloat16 strip kernel of `P` pixels for a group's registers.
#[cfg(target_arch = "x86_64")]
fn strip_bf16<const P: usize>(g: &Group) -> StripKernel<u16> {
    match (g.full, g.half) {
        (0, _) => pw_strip_bf16::<P, 0, true>,
        (1, false) => pw_strip_bf16::<P, 1, false>,
        (1, true) => pw_strip_bf16::<P, 1, true>,
        (2, false) => pw_strip_bf16::<P, 2, false>,
        (2, true) => pw_strip_bf16::<P, 2, true>,
        _ => pw_strip_bf16::<P, 3, false>,
    }
}

/// The AVX-512F strip kernel of `P` pixels for a group's registers.
#[cfg(target_arch = "x86_64")]
fn strip_f32<const P: usize>(g: &Group) -> StripKernel<f32> {
    match (g.full, g.half) {
        (0, _) => pw_strip::<P, 0, true>,
        (1, false) => pw_strip::<P, 1, false>,
        (1, true) => pw_strip::<P, 1, true>,
        (2, false) => pw_strip::<P, 2, false>,
        (2, true) => pw_strip::<P, 2, true>,
        _ => pw_strip::<P, 3, false>,
    }
}

/// The AVX2 strip kernel of `P` pixels for a group's registers.
#[cfg(target_arch = "x86_64")]
fn strip_avx2<const P: usize>(g: &Group) -> StripKernel<f32> {
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
#[cfg(target_arch = "x86_64")]
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

/// One BlazeBlock: depthwise 3x3 (stride 1 or 2), pointwise, skip, ReLU.
#[derive(Clone)]
struct Block {
    /// Input side; the output side is `side / stride`.
    side: usize,
    stride: usize,
    cin: usize,
    cin_p: usize,
    /// Depthwise weights `[9][cin_p]` and bias `[cin_p]`.
    dw_w: Vec<f32>,
    dw_b: Vec<f32>,
    pw: Pointwise,
}

impl Block {
    fn out_side(&self) -> usize {
        self.side / self.stride
    }

    fn flops(&self) -> u64 {
        let px = self.out_side() * self.out_side();
        2 * (9 * self.cin * px) as u64 + self.pw.flops(px)
    }
}

/// The 5x5 stride-2 stem: 3 -> 24 channels, a pointwise product whose
/// taps read each pixel's window straight from the picture (see [`Taps`]),
/// with weights `[5][16][32]` (the 16th tap of each window row zero).
#[derive(Clone)]
struct Stem {
    pw: Pointwise,
}

/// Taps per window row of the stem: 5 pixels of 3 channels, and one of
/// zero weight, so the rows pair up for the bfloat16 kernels.
const STEM_ROW: usize = 16;
/// Stem output channels (before padding).
const STEM_OUT: usize = 24;

/// The detector's network, ready to run.
pub struct BlazeFace {
    side: usize,
    stem: Stem,
    blocks: Vec<Block>,
    /// Blocks of `backbone1` (the 16x16 map feeds the first two heads).
    backbone1: usize,
    /// `classifier_8` (2) and `regressor_8` (32) as one 1x1 conv on the
    /// 88-channel map (16x16 at 128).
    head16: Pointwise,
    /// `classifier_16` (6) and `regressor_16` (96) on the 96-channel map
    /// (8x8 at 128).
    head8: Pointwise,
    anchors: Vec<[f32; 4]>,
    default_threshold: f32,
    kernels: Kernels,
    scratch: Mutex<Vec<Scratch>>,
}

/// One thread's buffers for one picture.
struct Scratch {
    /// Normalised input with its zero border (1 top/left, 2 bottom/right),
    /// and a few values past it that the stem's last taps read (they meet
    /// zero weights).
    input: Vec<f32>,
    /// The same rounded to bfloat16, for [`Kernels::Avx512Bf16`].
    input16: Vec<u16>,
    /// Two maps, each large enough for the largest one with its one-pixel
    /// zero border: the stem writes the first, then each block reads one and
    /// writes the other, so a picture's activations stay in cache.
    maps: [AlignedBuf; 2],
    /// One depthwise row (f32, or bfloat16 for [`Kernels::Avx512Bf16`])
    /// and one max-pooled (skip) row.
    dw_row: AlignedBuf,
    dw_row16: Vec<u16>,
    pool_row: AlignedBuf,
    /// Head outputs.
    head16: Vec<f32>,
    head8: Vec<f32>,
    /// The pointwise products' staging.
    staging: Staging,
}

/// `(cin, cout, stride)` of the front model's blocks, `backbone1` then `backbone2`.
const FRONT: [(usize, usize, usize); 16] = [
    (24, 24, 1),
    (24, 28, 1),
    (28, 32, 2),
    (32, 36, 1),
    (36, 42, 1),
    (42, 48, 2),
    (48, 56, 1),
    (56, 64, 1),
    (64, 72, 1),
    (72, 80, 1),
    (80, 88, 1),
    (88, 96, 2),
    (96, 96, 1),
    (96, 96, 1),
    (96, 96, 1),
    (96, 96, 1),
];
const FRONT_BACKBONE1: usize = 11;

fn pad16(c: usize) -> usize {
    c.div_ceil(LANES) * LANES
}

impl BlazeFace {
    /// Reads a front model from a safetensors file (PyTorch names and layout,
    /// as in `shared/models/blazeface/front.safetensors`), to run on `kernels`.
    pub fn load(path: &Path, kernels: Kernels) -> Result<Self, DetectorError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|cause| DetectorError::Io {
            path: shown.clone(),
            cause,
        })?;
        Self::from_bytes(&bytes, kernels).map_err(|detail| DetectorError::Format {
            path: shown,
            detail,
        })
    }

    /// Builds the network from the bytes of a weights file.
    pub fn from_bytes(bytes: &[u8], kernels: Kernels) -> Result<Self, String> {
        if !kernels.runs_here() {
            return Err(format!("this CPU does not run the {kernels:?} kernels"));
        }
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| format!("not a safetensors file: {e}"))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| format!("not a safetensors file: {e}"))?;
        let side: usize = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("input_size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(128);
        if side != 128 {
            return Err(format!(
                "input_size {side}: only the 128x128 front model is supported"
            ));
        }
        let default_threshold = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("min_score_thresh"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.75);
        let mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(format!("{name}: expected f32, found {:?}", view.dtype()));
            }
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        let mut get = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
            let (s, v) = tensors
                .remove(name)
                .ok_or_else(|| format!("tensor `{name}` is missing"))?;
            if s != shape {
                return Err(format!(
                    "tensor `{name}` has shape {s:?}, expected {shape:?}"
                ));
            }
            Ok(v)
        };

        let stem_w = get("backbone1.0.weight", &[STEM_OUT, 3, 5, 5])?;
        let stem_b = get("backbone1.0.bias", &[STEM_OUT])?;
        // PyTorch [co][c][i][j] -> taps ordered (i, j, c), STEM_ROW per row.
        let taps = 5 * STEM_ROW;
        let mut rows = vec![0f32; STEM_OUT * taps];
        for co in 0..STEM_OUT {
            for c in 0..3 {
                for i in 0..5 {
                    for j in 0..5 {
                        rows[co * taps + i * STEM_ROW + j * 3 + c] =
                            stem_w[((co * 3 + c) * 5 + i) * 5 + j];
                    }
                }
            }
        }
        let stem = Stem {
            pw: Pointwise::new(&rows, &stem_b, taps, STEM_OUT),
        };

        let input_side = side;
        let mut blocks = Vec::new();
        let mut side = side / 2;
        for (i, &(cin, cout, stride)) in FRONT.iter().enumerate() {
            let prefix = if i < FRONT_BACKBONE1 {
                format!("backbone1.{}.convs", i + 2)
            } else {
                format!("backbone2.{}.convs", i - FRONT_BACKBONE1)
            };
            let dw = get(&format!("{prefix}.0.weight"), &[cin, 1, 3, 3])?;
            let db = get(&format!("{prefix}.0.bias"), &[cin])?;
            let pw = get(&format!("{prefix}.1.weight"), &[cout, cin, 1, 1])?;
            let pb = get(&format!("{prefix}.1.bias"), &[cout])?;
            let cin_p = pad16(cin);
            let mut dw_w = vec![0f32; 9 * cin_p];
            for c in 0..cin {
                for t in 0..9 {
                    dw_w[t * cin_p + c] = dw[c * 9 + t];
                }
            }
            let mut dw_b = vec![0f32; cin_p];
            dw_b[..cin].copy_from_slice(&db);
            blocks.push(Block {
                side,
                stride,
                cin,
                cin_p,
                dw_w,
                dw_b,
                pw: Pointwise::new(&pw, &pb, cin, cout),
            });
            side /= stride;
        }

        // Each pair of heads as one 1x1 conv: the logits first, then the boxes.
        let mut heads = Vec::new();
        for (cls, reg, cin, per_cell) in [
            ("classifier_8", "regressor_8", 88, 2),
            ("classifier_16", "regressor_16", 96, 6),
        ] {
            let mut w = get(&format!("{cls}.weight"), &[per_cell, cin, 1, 1])?;
            let mut b = get(&format!("{cls}.bias"), &[per_cell])?;
            w.extend(get(
                &format!("{reg}.weight"),
                &[per_cell * COORDS, cin, 1, 1],
            )?);
            b.extend(get(&format!("{reg}.bias"), &[per_cell * COORDS])?);
            heads.push(Pointwise::new(&w, &b, cin, per_cell * (1 + COORDS)));
        }
        let (head16, head8) = (heads.remove(0), heads.remove(0));
        let anchors: Vec<[f32; 4]> = get("anchors", &[ANCHORS, 4])?
            .chunks_exact(4)
            .map(|a| [a[0], a[1], a[2], a[3]])
            .collect();
        if anchors != anchors_for(input_side) {
            return Err("the anchors are not the front model's SSD anchors".into());
        }
        Ok(Self {
            side: input_side,
            stem,
            blocks,
            backbone1: FRONT_BACKBONE1,
            head16,
            head8,
            anchors,
            default_threshold,
            kernels,
            scratch: Mutex::new(Vec::new()),
        })
    }

    /// The same network on a smaller (or larger) square input: `side` a
    /// multiple of 16, at least 32. Fully convolutional, it sees a face of
    /// so many pixels the same way at any input side; the anchors follow the
    /// smaller grids. At 64 it costs a quarter of the 128 pass.
    pub fn at_side(&self, side: usize) -> Result<Self, String> {
        if side < 32 || !side.is_multiple_of(16) {
            return Err(format!(
                "detector input side {side}: a multiple of 16, at least 32"
            ));
        }
        let mut blocks = self.blocks.clone();
        let mut at = side / 2;
        for b in &mut blocks {
            b.side = at;
            at /= b.stride;
        }
        Ok(Self {
            side,
            stem: self.stem.clone(),
            blocks,
            backbone1: self.backbone1,
            head16: self.head16.clone(),
            head8: self.head8.clone(),
            anchors: anchors_for(side),
            default_threshold: self.default_threshold,
            kernels: self.kernels,
            scratch: Mutex::new(Vec::new()),
        })
    }

    /// Side of the square input picture (128 unless built by
    /// [`BlazeFace::at_side`]).
    pub fn input_side(&self) -> usize {
        self.side
    }

    /// The score threshold written in the weights file (0.75).
    pub fn default_threshold(&self) -> f32 {
        self.default_threshold
    }

    /// Anchors `(x_center, y_center, w, h)`, relative to the input.
    pub fn anchors(&self) -> &[[f32; 4]] {
        &self.anchors
    }

    /// Multiply-adds times two of one forward pass.
    pub fn flops(&self) -> u64 {
        let stem_px = (self.side / 2) * (self.side / 2);
        let (m16, m8) = self.head_sides();
        let heads = self.head16.flops(m16 * m16) + self.head8.flops(m8 * m8);
        self.stem.pw.flops(stem_px) + self.blocks.iter().map(Block::flops).sum::<u64>() + heads
    }

    /// Sides of the maps the two pairs of heads read (16 and 8 at 128).
    fn head_sides(&self) -> (usize, usize) {
        (self.side / HEAD16_STRIDE, self.side / HEAD8_STRIDE)
    }

    /// Raw outputs for `n` pictures of `side x side` RGB values in 0..=255
    /// (HWC, back to back): per picture `anchors().len() * COORDS` box
    /// numbers and `anchors().len()` logits, in the anchors' order.
    pub fn raw(&self, pictures: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let len = self.side * self.side * 3;
        let n = pictures.len() / len;
        let a = self.anchors.len();
        let mut boxes = vec![0f32; n * a * COORDS];
        let mut logits = vec![0f32; n * a];
        let mut s = self.take_scratch();
        for (i, pic) in pictures.chunks_exact(len).enumerate() {
            self.picture(
                pic,
                &mut s,
                &mut boxes[i * a * COORDS..][..a * COORDS],
                &mut logits[i * a..][..a],
            );
        }
        self.give_scratch(s);
        (boxes, logits)
    }

    /// [`BlazeFace::raw`] for one picture of RGB bytes.
    pub fn raw_u8(&self, picture: &[u8], boxes: &mut [f32], logits: &mut [f32]) {
        let mut s = self.take_scratch();
        self.picture(picture, &mut s, boxes, logits);
        self.give_scratch(s);
    }

    fn take_scratch(&self) -> Scratch {
        self.scratch
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_else(|| self.new_scratch())
    }

    fn give_scratch(&self, s: Scratch) {
        if let Ok(mut p) = self.scratch.lock() {
            p.push(s);
        }
    }

    fn new_scratch(&self) -> Scratch {
        let (m16, m8) = self.head_sides();
        let stem_side = self.side / 2;
        let mut largest = (stem_side + 2).pow(2) * self.stem.pw.cout_p;
        let mut widest = 0;
        for b in &self.blocks {
            largest = largest.max((b.out_side() + 2).pow(2) * b.pw.cout_p);
            widest = widest.max(b.pw.cout_p).max(b.cin_p);
        }
        let widest = widest.max(self.head16.cout_p).max(self.head8.cout_p);
        let maps = [AlignedBuf::zeroed(largest), AlignedBuf::zeroed(largest)];
        let input = ((self.side + 3).pow(2) * 3 + 1).next_multiple_of(LANES);
        Scratch {
            input: vec![0f32; input],
            input16: vec![0u16; input],
            maps,
            dw_row: AlignedBuf::zeroed(stem_side * widest),
            dw_row16: vec![0; stem_side * widest],
            pool_row: AlignedBuf::zeroed(stem_side * widest),
            head16: vec![0f32; m16 * m16 * self.head16.cout_p],
            head8: vec![0f32; m8 * m8 * self.head8.cout_p],
            staging: Staging::new(stem_side.max(STRIP), widest),
        }
    }

    /// Normalises one picture (RGB values 0..=255, as bytes or floats) into
    /// the bordered input and runs the network on it.
    fn picture<T: Copy + Into<f32>>(
        &self,
        pic: &[T],
        s: &mut Scratch,
        boxes: &mut [f32],
        logits: &mut [f32],
    ) {
        let side = self.side;
        let stride = (side + 3) * 3;
        for (y, row) in pic.chunks_exact(side * 3).enumerate().take(side) {
            let dst = &mut s.input[(y + 1) * stride + 3..][..side * 3];
            for (d, &v) in dst.iter_mut().zip(row) {
                *d = v.into() * (1.0 / 127.5) - 1.0;
            }
        }
        self.network(s, boxes, logits);
    }

    /// Runs the network on `s.input` (already normalised and bordered).
    fn network(&self, s: &mut Scratch, boxes: &mut [f32], logits: &mut [f32]) {
        let (m16, m8) = self.head_sides();
        self.stem(s);
        let [first, second] = &mut s.maps;
        let (mut input, mut output) = (first, second);
        for (i, block) in self.blocks.iter().enumerate() {
            run_block(
                block,
                self.kernels,
                input,
                output,
                (&mut s.dw_row, &mut s.dw_row16, &mut s.pool_row),
                &mut s.staging,
            );
            // Heads: 16x16 map after backbone1, 8x8 map after backbone2.
            if i + 1 == self.backbone1 {
                let out = &mut s.head16;
                head(&self.head16, self.kernels, output, m16, out, &mut s.staging);
            }
            std::mem::swap(&mut input, &mut output);
        }
        head(
            &self.head8,
            self.kernels,
            input,
            m8,
            &mut s.head8,
            &mut s.staging,
        );
        let mut anchor = 0;
        for (map, side, per_cell, width) in [
            (&s.head16, m16, HEAD16_PER_CELL, self.head16.cout_p),
            (&s.head8, m8, HEAD8_PER_CELL, self.head8.cout_p),
        ] {
            for px in map.chunks_exact(width).take(side * side) {
                for a in 0..per_cell {
                    logits[anchor] = px[a];
                    boxes[anchor * COORDS..][..COORDS]
                        .copy_from_slice(&px[per_cell + a * COORDS..][..COORDS]);
                    anchor += 1;
                }
            }
        }
    }

    /// 5x5 stride-2 convolution with ReLU into the first map.
    fn stem(&self, s: &mut Scratch) {
        let out_side = self.side / 2;
        let in_row = (self.side + 3) * 3;
        let cout_p = self.stem.pw.cout_p;
        let map_stride = (out_side + 2) * cout_p;
        clear_border(&mut s.maps[0], out_side, cout_p);
        let values = match self.kernels {
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512Bf16 => {
                // SAFETY: AVX512-BF16 present (`Kernels::best`); both buffers
                // hold the same number of values, a multiple of 16.
                unsafe { crate::model::direct::round_bf16(&s.input, &mut s.input16) };
                Values::Bf16(&s.input16)
            }
            _ => Values::F32(&s.input),
        };
        for y in 0..out_side {
            // Output pixel x's window starts at input row 2y, column 2x.
            let input = Input {
                values: values.from(2 * y * in_row),
                stride: 2 * 3,
                taps: Taps {
                    runs: 5,
                    len: STEM_ROW,
                    pitch: in_row,
                },
            };
            let dst = &mut s.maps[0][(y + 1) * map_stride + cout_p..][..out_side * cout_p];
            self.stem.pw.run(
                self.kernels,
                input,
                out_side,
                Epilogue::BiasRelu,
                dst,
                &mut s.staging,
            );
        }
    }
}

/// A head's 1x1 convolution over every pixel of a bordered map.
fn head(
    pw: &Pointwise,
    kernels: Kernels,
    map: &[f32],
    side: usize,
    out: &mut [f32],
    staging: &mut Staging,
) {
    let row = (side + 2) * pw.cin_p;
    for y in 0..side {
        let input = &map[(y + 1) * row + pw.cin_p..][..side * pw.cin_p];
        pw.run(
            kernels,
            Input::row(Values::F32(input), pw.cin_p, pw.cin),
            side,
            Epilogue::Bias,
            &mut out[y * side * pw.cout_p..],
            staging,
        );
    }
}

/// MediaPipe's SSD anchors of the short-range detector for a `side` input:
/// per cell of the stride-8 grid two, of the stride-16 grid six, each
/// `(x_center, y_center, 1, 1)` relative to the input.
fn anchors_for(side: usize) -> Vec<[f32; 4]> {
    let mut out = Vec::new();
    for (stride, per_cell) in [
        (HEAD16_STRIDE, HEAD16_PER_CELL),
        (HEAD8_STRIDE, HEAD8_PER_CELL),
    ] {
        let n = side / stride;
        for y in 0..n {
            for x in 0..n {
                let c = [(x as f32 + 0.5) / n as f32, (y as f32 + 0.5) / n as f32];
                out.extend(std::iter::repeat_n([c[0], c[1], 1.0, 1.0], per_cell));
            }
        }
    }
    out
}

/// One BlazeBlock, row by row, from `input` (bordered, `cin_p` channels) into
/// `output` (bordered, `cout_p` channels).
fn run_block(
    b: &Block,
    kernels: Kernels,
    input: &[f32],
    output: &mut [f32],
    (dw_row, dw_row16, pool_row): (&mut [f32], &mut [u16], &mut [f32]),
    staging: &mut Staging,
) {
    let (cin_p, cout_p) = (b.cin_p, b.pw.cout_p);
    let in_row = (b.side + 2) * cin_p;
    let out_side = b.out_side();
    let out_row = (out_side + 2) * cout_p;
    clear_border(output, out_side, cout_p);
    for y in 0..out_side {
        let values = match kernels {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX512-BF16 present (`Kernels::best`).
            Kernels::Avx512Bf16 => unsafe {
                depthwise_row_bf16(b, input, y, dw_row16, pool_row);
                Values::Bf16(dw_row16)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F present (`Kernels::best`).
            Kernels::Avx512 => unsafe {
                depthwise_row_avx512(b, input, y, dw_row, pool_row);
                Values::F32(dw_row)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 and FMA present (`Kernels::best`).
            Kernels::Avx2 => unsafe {
                depthwise_row_avx2(b, input, y, dw_row, pool_row);
                Values::F32(dw_row)
            },
            _ => {
                depthwise_row(b, input, y, dw_row, pool_row);
                Values::F32(dw_row)
            }
        };
        let skip: &[f32] = if b.stride == 1 {
            &input[(y + 1) * in_row + cin_p..][..out_side * cin_p]
        } else {
            &pool_row[..out_side * cin_p]
        };
        let dst = &mut output[(y + 1) * out_row + cout_p..][..out_side * cout_p];
        b.pw.run(
            kernels,
            Input::row(values, cin_p, b.cin),
            out_side,
            Epilogue::BiasSkipRelu(skip, cin_p),
            dst,
            staging,
        );
    }
}

/// Zeroes the one-pixel border of a `side x side` map of `channels` lanes
/// per pixel: the map's buffer last held another layer's activations in
/// another layout, and the border is the next block's padding. The
/// interior is written whole, padded lanes included (zero weights give zero).
fn clear_border(map: &mut [f32], side: usize, channels: usize) {
    let row = (side + 2) * channels;
    map[..row].fill(0.0);
    map[(side + 1) * row..][..row].fill(0.0);
    for y in 1..=side {
        map[y * row..][..channels].fill(0.0);
        map[y * row + (side + 1) * channels..][..channels].fill(0.0);
    }
}

/// Depthwise 3x3 of output row `y` into `out` (`out_side x cin_p`), and at
/// stride 2 the block's skip, the 2x2 max-pool of the same input rows, into
/// `pool` (`out_side x cin_p`; untouched at stride 1).
///
/// Stride 1 reads bordered rows `y..y+3` (a one-pixel zero border is the
/// padding); stride 2 reads input rows `2y..2y+3`, i.e. bordered rows
/// `2y+1..2y+4`, which reaches the bottom/right border only (PyTorch pads
/// those sides by 2 and the last row/column past the picture is never read).
fn depthwise_row(b: &Block, input: &[f32], y: usize, out: &mut [f32], pool: &mut [f32]) {
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
unsafe fn depthwise_row_avx512(
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
unsafe fn depthwise_row_bf16(
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
unsafe fn depthwise_row_avx2(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_cover_a_row_widest_first() {
        let cut = |n, widths| strips(n, widths).collect::<Vec<_>>();
        assert_eq!(cut(32, &WIDTHS_AVX2[..]), [(0, 12), (12, 12), (24, 8)]);
        assert_eq!(cut(16, &WIDTHS_AVX2[..]), [(0, 12), (12, 4)]);
        assert_eq!(cut(8, &WIDTHS_AVX2[..]), [(0, 8)]);
        assert_eq!(cut(4, &WIDTHS_AVX2[..]), [(0, 4)]);
        assert_eq!(cut(32, &WIDTHS[..]), [(0, 8), (8, 8), (16, 8), (24, 8)]);
        assert_eq!(cut(12, &WIDTHS[..]), [(0, 8), (8, 4)]);
        assert!(cut(0, &WIDTHS[..]).is_empty());
        for n in (4..=128).step_by(4) {
            for widths in [&WIDTHS[..], &WIDTHS_AVX2[..]] {
                let mut at = 0;
                for (p, w) in strips(n, widths) {
                    assert_eq!(p, at);
                    at += w;
                }
                assert_eq!(at, n, "{n} pixels in strips of {widths:?}");
            }
        }
    }

    #[test]
    fn pointwise_groups_cover_every_channel() {
        for cout in [2usize, 24, 28, 34, 48, 56, 64, 72, 80, 88, 96, 102] {
            let gs = groups(cout);
            let lanes: usize = gs
                .iter()
                .map(|g| g.full * LANES + usize::from(g.half) * 8)
                .sum();
            assert!(lanes >= cout && lanes < cout + LANES, "cout {cout}: {gs:?}");
            assert!(gs.iter().all(|g| g.full + usize::from(g.half) <= MAX_GROUP));
            assert!(
                gs.iter().rev().skip(1).all(|g| !g.half),
                "half register last"
            );
            let mut first = 0;
            for g in &gs {
                assert_eq!(g.first, first);
                first += g.width();
            }
        }
        // 24 channels: one full register and a half one.
        assert_eq!(
            groups(24),
            vec![Group {
                first: 0,
                full: 1,
                half: true
            }]
        );
    }
}

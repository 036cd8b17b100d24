//! The detector's 1x1 convolutions (the blocks' pointwise products, the
//! stem read as one, the heads): weights laid out per register group, each
//! map row cut into strips the register tiles of [`super::strip`] run, with
//! a portable loop where the CPU has neither AVX-512 nor AVX2.
//!
//! It knows one product over one row of pixels and what is added before the
//! store (bias, skip, ReLU); it does not know blocks, maps or the network.

#[cfg(target_arch = "x86_64")]
use super::strip::{Store, StripKernel, strip_avx2, strip_bf16, strip_f32};
use super::{Kernels, LANES, pad16};

/// Pixels per register tile of the pointwise products.
pub(super) const STRIP: usize = 8;
/// Pixels per register tile where a map row holds fewer than [`STRIP`]
/// (the 4x4 maps of the quick look): a half strip, rather than a strip
/// half of zero padding.
pub(super) const NARROW: usize = 4;
/// Pixels per strip of the AVX2 kernels where a row has room: two register
/// tiles of 6 pixels (12 sums, where 4-pixel tiles have only the 8 that
/// two FMA pipes of 4 cycles' latency need in flight).
pub(super) const WIDE_AVX2: usize = 12;
/// Strip widths the kernels take, widest first: a row is cut greedily.
pub(super) const WIDTHS: [usize; 2] = [STRIP, NARROW];
pub(super) const WIDTHS_AVX2: [usize; 3] = [WIDE_AVX2, STRIP, NARROW];
/// Output-channel registers per register tile, at most.
const MAX_GROUP: usize = 3;

/// A 1x1 convolution `cin_p -> cout_p` (both padded to 16), weights laid out
/// per register group as `[cin_p][16 * g]`.
#[derive(Clone)]
pub(super) struct Pointwise {
    /// Input channels multiplied (the padding past them is zero, so skipped).
    pub(super) cin: usize,
    /// Output channels before padding.
    cout: usize,
    pub(super) cin_p: usize,
    pub(super) cout_p: usize,
    /// The output channels in groups of registers, each one register tile.
    groups: Vec<Group>,
    /// Offset of each group's weights in `weights`.
    offsets: Vec<usize>,
    weights: Vec<f32>,
    /// The same weights in bfloat16, input channels in adjacent pairs
    /// (`[cin_p / 2][16 * g][2]` per group, at the same offsets).
    weights_bf16: Vec<u16>,
    /// The same again as one group of every output channel
    /// (`[cin_p / 2][cout_p][2]`), for the AMX tile products.
    weights_amx: Vec<u16>,
    bias: Vec<f32>,
}

/// Output channels `first..` in `full` 16-lane registers, plus an 8-lane
/// one when `half` (the last 8 or fewer channels of a layer: on CPUs that
/// split 512-bit operations in two, half the work of a full register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Group {
    pub(super) first: usize,
    pub(super) full: usize,
    pub(super) half: bool,
}

impl Group {
    /// Lanes the group's weights and outputs are laid out for.
    pub(super) fn width(&self) -> usize {
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
    pub(super) fn new(w: &[f32], b: &[f32], cin: usize, cout: usize) -> Self {
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
        let mut all = vec![0f32; cin_p * cout_p];
        for (ci, row) in all.chunks_exact_mut(cout_p).enumerate().take(cin) {
            for (co, v) in row.iter_mut().enumerate().take(cout) {
                *v = w[co * cin + ci];
            }
        }
        let weights_amx = crate::model::direct::pair_bf16(&all, cin_p, cout_p);
        Self {
            cin,
            cout,
            cin_p,
            cout_p,
            groups,
            offsets,
            weights,
            weights_bf16,
            weights_amx,
            bias,
        }
    }

    /// `products[p][..cout_p] = in[p] x W` (no bias) for `n` pixels (a
    /// multiple of 16) of bfloat16 values laid out as `rows` says, on AMX
    /// tiles; [`Pointwise::finish`] then adds the rest.
    ///
    /// # Safety
    /// `tiles` were configured on this thread; `input` holds every value
    /// `rows` names for `n` pixels; `rows` covers `cin_p` values a pixel in
    /// runs of a multiple of 16.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn product_amx(
        &self,
        tiles: &crate::model::amx::Tiles,
        input: &[u16],
        rows: crate::model::amx::Rows,
        n: usize,
        products: &mut [f32],
    ) {
        let (cin_p, cout_p) = (self.cin_p, self.cout_p);
        assert!(n.is_multiple_of(LANES) && products.len() >= n * cout_p);
        let run = cin_p / rows.runs;
        assert!(run * rows.runs == cin_p && run.is_multiple_of(LANES));
        assert!(
            n == 0 || input.len() >= (n - 1) * rows.stride + (rows.runs - 1) * rows.pitch + run
        );
        // SAFETY: the sizes were checked above; the tiles by the caller.
        unsafe {
            crate::model::amx::product(
                tiles,
                input.as_ptr(),
                rows,
                (n, cin_p, cout_p, cout_p),
                self.weights_amx.as_ptr(),
                products.as_mut_ptr(),
            )
        }
    }

    /// `out[p] = epilogue(bias + products[p])` for `n` pixels of `cout_p`
    /// values: the end of [`Pointwise::product_amx`].
    ///
    /// # Safety
    /// The CPU supports AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn finish(
        &self,
        products: &[f32],
        n: usize,
        then: Epilogue<'_>,
        out: &mut [f32],
    ) {
        use crate::model::simd::{Avx512, Simd};
        let cout_p = self.cout_p;
        assert!(products.len() >= n * cout_p && out.len() >= n * cout_p);
        let (skip, skip_c, relu) = match then {
            Epilogue::Bias => (&[][..], 0, false),
            Epilogue::BiasRelu => (&[][..], 0, true),
            Epilogue::BiasSkipRelu(skip, c) => {
                assert!(c.is_multiple_of(LANES) && c <= cout_p && skip.len() >= n * c);
                (skip, c, true)
            }
        };
        // SAFETY: AVX-512F (the caller's contract); every load and store
        // is 16 values inside the slices checked above (cout_p and skip_c
        // multiples of 16).
        unsafe {
            for p in 0..n {
                let (from, to) = (
                    products.as_ptr().add(p * cout_p),
                    out.as_mut_ptr().add(p * cout_p),
                );
                for c in (0..cout_p).step_by(LANES) {
                    let mut v = Avx512::add(
                        Avx512::load(from.add(c)),
                        Avx512::load(self.bias.as_ptr().add(c)),
                    );
                    if c < skip_c {
                        v = Avx512::add(v, Avx512::load(skip.as_ptr().add(p * skip_c + c)));
                    }
                    if relu {
                        v = Avx512::max(v, Avx512::zero());
                    }
                    Avx512::store(to.add(c), v);
                }
            }
        }
    }

    /// `out[p][..cout_p] = epilogue(bias + in[p] x W)` for `n` pixels of
    /// `input`. The pixels past the last whole [`NARROW`] strip (maps
    /// narrower than that, when the network runs on a small input) go
    /// through a zero-padded strip in `staging`.
    pub(super) fn run(
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
                    self.each_strip(input, &self.weights_bf16, n, then, out, strip_bf16)
                };
            }
            #[cfg(target_arch = "x86_64")]
            (Kernels::Avx512 | Kernels::Amx, Values::F32(values)) => {
                // SAFETY: the CPU has AVX-512F (`Kernels::best`).
                unsafe {
                    let input = ((values, stride, taps), &WIDTHS[..]);
                    self.each_strip(input, &self.weights, n, then, out, strip_f32)
                };
            }
            #[cfg(target_arch = "x86_64")]
            (Kernels::Avx2, Values::F32(values)) => {
                // SAFETY: the CPU has AVX2 and FMA (`Kernels::best`).
                unsafe {
                    let input = ((values, stride, taps), &WIDTHS_AVX2[..]);
                    self.each_strip(input, &self.weights, n, then, out, strip_avx2)
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
    pub(super) fn flops(&self, pixels: usize) -> u64 {
        2 * (self.cin * self.cout * pixels) as u64
    }
}

/// Buffers a pointwise product stages its input in, kept with a thread's
/// scratch: the input rounded to bfloat16 (one row of a map), and the
/// zero-padded last [`NARROW`] strip of a map narrower than one.
pub(super) struct Staging {
    bf16: Vec<u16>,
    input: Vec<f32>,
    input16: Vec<u16>,
    output: Vec<f32>,
    skip: Vec<f32>,
}

impl Staging {
    /// Room for rows of up to `pixels` pixels of up to `channels` values.
    pub(super) fn new(pixels: usize, channels: usize) -> Self {
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
pub(super) enum Epilogue<'a> {
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
pub(super) struct Input<'a> {
    pub(super) values: Values<'a>,
    pub(super) stride: usize,
    pub(super) taps: Taps,
}

impl<'a> Input<'a> {
    /// The first `cin` channels of each pixel of a map row, `stride` values
    /// per pixel.
    pub(super) fn row(values: Values<'a>, stride: usize, cin: usize) -> Self {
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
pub(super) enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Values<'a> {
    /// The values from the `at`-th on.
    pub(super) fn from(self, at: usize) -> Self {
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
pub(super) struct Taps {
    pub(super) runs: usize,
    pub(super) len: usize,
    pub(super) pitch: usize,
}

impl Taps {
    /// Values a pixel's taps span from its first.
    pub(super) fn span(&self) -> usize {
        (self.runs - 1) * self.pitch + self.len
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

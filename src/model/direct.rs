//! The inference network as direct convolutions on AVX-512F or AVX2 (the
//! kernels are written once over `simd::Simd`): no im2col copy, no
//! intermediate tensors, batch norm already folded into the weights.
//!
//! Each picture runs through every block while its activations stay in cache.
//! A block whose input has a multiple of 16 channels (every block but the
//! first) is a Winograd convolution. Where the products run on vector
//! registers (f32 on AVX-512F or AVX2, AVX512-BF16) it is F(4x4, 3x3): each
//! 4x4 output tile, four max-pool windows, costs 36 multiplies per
//! input/output channel pair instead of 144 (2.25 per output instead of 4),
//! for larger transforms and about four times the rounding error of F(2x2,
//! 3x3) in bfloat16. On AMX tiles a map of fewer than 16 such tiles keeps
//! F(2x2, 3x3): each 2x2 output tile, exactly one max-pool window, costs 16
//! multiplies instead of 36. Either way a tile's products are one
//! small matrix product per position, run by a register-tiled kernel. The
//! first block (3 input channels) computes two output rows at a time with a
//! direct register-tiled kernel (a strip of pixels times 16 or 32 output
//! channels, accumulated over the nine taps and every input channel).
//! Either way the block then max-pools, adds the bias,
//! applies ReLU and writes straight into the zero-padded input of the next
//! block; the last block feeds global average pooling and the linear layer.
//! Scratch buffers are kept by the network and handed to whichever thread
//! runs, so the hot path does not allocate.
//!
//! Only for x86-64 CPUs with AVX-512F or AVX2 and FMA, and for shapes the
//! tiles fit (output
//! channels a multiple of 16, every block's input side a multiple of 8):
//! [`DirectNet::new`] says `None` otherwise and the caller keeps the im2col
//! path. This module knows nothing of candle tensors, files or training.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::aligned::AlignedBuf;
use super::simd::Isa;
#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512, Simd, store_bf16};

/// Output channels held by one AVX-512 register.
const LANES: usize = 16;
/// Taps of a 3x3 kernel.
const TAPS: usize = 9;
/// Winograd tiles transformed and multiplied together (bounds the scratch
/// to a few hundred KiB, so it stays in L2).
const WINO_CHUNK: usize = 64;
/// Positions of a Winograd F(2x2, 3x3) tile (4x4).
const WINO: usize = 16;
/// F(2x2, 3x3) weight transform `G` (interpolation points 0, 1, -1 and
/// infinity).
const G2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];
/// Positions of a Winograd F(4x4, 3x3) tile (6x6).
const WIDE: usize = 36;
/// F(4x4, 3x3) tiles transformed and multiplied together (each covers four
/// F(2x2, 3x3) tiles).
const WIDE_CHUNK: usize = 16;
/// F(4x4, 3x3) input transform `B^T` for the interpolation points 0, 1, -1,
/// 2, -1/2 and infinity ([`bt4_simd`] writes it out; this table checks it).
/// These points round to bfloat16 with about two thirds of the error of the
/// usual 0, ±1, ±2 (rms 1.3% of a 48-channel layer's outputs against 2.1%;
/// F(2x2, 3x3): 0.3%).
#[cfg(test)]
const BT4: [[f32; 6]; 6] = [
    [1.0, 1.5, -2.0, -1.5, 1.0, 0.0],
    [0.0, -1.0, -2.5, -0.5, 1.0, 0.0],
    [0.0, 1.0, 0.5, -2.5, 1.0, 0.0],
    [0.0, -0.5, -1.0, 0.5, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 1.0, 1.5, -2.0, -1.5, 1.0],
];
/// F(4x4, 3x3) weight transform `G` for the same points.
const G4: [[f64; 3]; 6] = [
    [1.0, 0.0, 0.0],
    [-1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0],
    [1.0 / 3.0, -1.0 / 3.0, 1.0 / 3.0],
    [1.0 / 15.0, 2.0 / 15.0, 4.0 / 15.0],
    [-16.0 / 15.0, 8.0 / 15.0, -4.0 / 15.0],
    [0.0, 0.0, 1.0],
];
/// F(4x4, 3x3) output transform `A^T` for the same points ([`at4_simd`] writes
/// it out; this table checks it).
#[cfg(test)]
const AT4: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -0.5, 0.0],
    [0.0, 1.0, 1.0, 4.0, 0.25, 0.0],
    [0.0, 1.0, -1.0, 8.0, -0.125, 1.0],
];
/// Values left between one Winograd position's block of a chunk and the
/// next: the blocks are whole multiples of 4 KiB, so without the skew a
/// tile's 16 positions would fall in one L1 set.
const WINO_SKEW: usize = 32;
/// Values of a kernel row's run in the first block's AMX products (a tile
/// takes 16 bfloat16 values a row at least): three pixels' channels and
/// zero weights after them.
const AMX_RUN: usize = 16;
/// Spare bfloat16 values after the first block's padded input, which the
/// last pixel's runs read (against zero weights).
const BF16_SPARE: usize = AMX_RUN;

/// Values of one kernel row's run in the first (direct, bfloat16) block of
/// `cin` input channels: three pixels' channels, padded to an even count
/// for `vdpbf16ps`, or to [`AMX_RUN`] on AMX tiles.
fn first_run(cin: usize, amx: bool) -> usize {
    if amx {
        AMX_RUN
    } else {
        (3 * cin).next_multiple_of(2)
    }
}
/// Pictures a thread claims at a time in [`DirectNet::logits`], and the
/// fewest worth a thread of their own.
pub const MIN_PER_THREAD: usize = 4;

/// One folded conv block: packed weights and bias.
struct Block {
    /// Input side (square) and channels; output channels.
    side: usize,
    cin: usize,
    cout: usize,
    /// Output-channel registers per register tile (1, 2 or 3).
    group: usize,
    /// Pixels (direct) or Winograd tiles per register tile (8 or 16).
    strip: usize,
    /// Whether this block runs as Winograd F(2x2, 3x3), or F(4x4, 3x3) when
    /// `wide`.
    winograd: bool,
    /// Whether the Winograd tiles are F(4x4, 3x3): 36 positions, each tile
    /// four pooled pixels (bfloat16 products on AVX512-BF16 only).
    wide: bool,
    /// Direct: `[cout / (16*group)][9][cin][16*group]`.
    /// Winograd: `[positions][cout / (16*group)][cin][16*group]`, transformed.
    weights: Vec<f32>,
    /// In bfloat16: the same weights rounded, inputs in adjacent pairs.
    /// Winograd: `[positions][cout / (16*group)][cin / 2][16*group][2]`. Direct
    /// (the first block only, whose input is the picture): each kernel row's
    /// `3 * cin` taps and channels as one run, padded to an even count (to
    /// [`AMX_RUN`] on AMX tiles), `[cout / (16*group)][3][run / 2][16*group][2]`.
    /// Empty when the products run in f32.
    weights_bf16: Vec<u16>,
    /// Whether the bfloat16 products (Winograd, or the first block's
    /// direct ones) run on AMX tiles ([`super::amx`]) rather than
    /// AVX512-BF16.
    amx: bool,
    /// The instruction set of the f32 kernels (AVX-512 wherever bfloat16
    /// products are).
    isa: Isa,
    bias: Vec<f32>,
}

/// The folded network in the layout the kernels read.
pub struct DirectNet {
    blocks: Vec<Block>,
    /// `[features, labels]`, row-major.
    fc_w: Vec<f32>,
    fc_b: Vec<f32>,
    labels: usize,
    /// Scratch of the threads not running now, kept warm between batches
    /// (the helper threads of a split batch are new each time).
    scratch: Mutex<Vec<Scratch>>,
}

/// One thread's scratch while it runs pictures of one network: one padded
/// input buffer per block, two conv rows, Winograd buffers.
struct Scratch {
    padded: Vec<AlignedBuf>,
    /// The first block's padded input in bfloat16, when that block runs in
    /// bfloat16, with [`BF16_SPARE`] spare values at the end (a kernel row's
    /// run is padded, and the zero weights meet the values past it).
    input_bf16: Vec<u16>,
    rows: AlignedBuf,
    /// The channels of a Winograd tile's pooled pixels (one, or four when
    /// wide), or of one pooled pixel of a direct block.
    pixel: AlignedBuf,
    /// Global average pool of the last block.
    features: Vec<f32>,
    /// Winograd: transformed input `[positions][tiles][cin]` and products
    /// `[positions][tiles][cout]` of one chunk of tiles; the input in
    /// bfloat16 when the block's products are (and `wino_in` empty if no
    /// block's products are f32).
    wino_in: AlignedBuf,
    wino_in_bf16: Vec<u16>,
    wino_out: AlignedBuf,
}

/// Arithmetic of the Winograd blocks' products (the bulk of the work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 products: the same numbers as the tensor paths to about 1e-5.
    F32,
    /// Transformed inputs and weights rounded to bfloat16, products summed
    /// in f32 (AVX512-BF16 `vdpbf16ps`: twice the multiply-adds of an f32
    /// FMA per instruction); logits move by about 1e-2.
    Bf16,
}

impl Precision {
    /// Whether this CPU runs the kernels at this precision.
    pub fn available(self) -> bool {
        match self {
            Self::F32 => available(),
            Self::Bf16 => available() && bf16_available(),
        }
    }

    /// The precision the kernels run fastest at on this CPU: bfloat16 where
    /// its products outrun f32 FMAs (on AMX tiles, or AVX512-BF16 on AMD
    /// cores), f32 elsewhere. The same answer at every start on one CPU: no
    /// timing decides it.
    pub fn fastest() -> Self {
        if Self::Bf16.available() && (super::amx::available() || super::simd::amd()) {
            Self::Bf16
        } else {
            Self::F32
        }
    }
}

/// Whether this CPU has AVX512-BF16.
fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16") && Isa::detect() == Some(Isa::Avx512)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the kernels (in f32 at least).
pub fn available() -> bool {
    Isa::detect().is_some()
}

impl DirectNet {
    /// Builds the network from folded blocks (`[Cout, Cin, 3, 3]` weights with
    /// the batch-norm scale applied, and the per-channel shift), the linear
    /// layer as `[features, labels]` and its bias, its Winograd products at
    /// `precision`. `None` when the CPU or the shapes do not suit the kernels.
    pub fn new(
        input_size: usize,
        input_channels: usize,
        convs: &[(Vec<f32>, Vec<f32>)],
        fc_w: Vec<f32>,
        fc_b: Vec<f32>,
        precision: Precision,
    ) -> Option<Self> {
        let input = (input_size, input_channels);
        Self::on(Isa::detect()?, input, convs, (fc_w, fc_b), precision)
    }

    /// [`DirectNet::new`] with the f32 kernels on `isa` (AVX2 also runs on
    /// CPUs with AVX-512); bfloat16 products need AVX-512. `None` where the
    /// CPU does not run them.
    fn on(
        isa: Isa,
        (input_size, input_channels): (usize, usize),
        convs: &[(Vec<f32>, Vec<f32>)],
        (fc_w, fc_b): (Vec<f32>, Vec<f32>),
        precision: Precision,
    ) -> Option<Self> {
        let runs = match isa {
            Isa::Avx512 => Isa::detect() == Some(Isa::Avx512),
            Isa::Avx2 => precision == Precision::F32 && Isa::detect().is_some(),
        };
        if !runs || !precision.available() || convs.is_empty() {
            return None;
        }
        let mut side = input_size;
        let mut cin = input_channels;
        let mut blocks = Vec::with_capacity(convs.len());
        for (w, b) in convs {
            let cout = b.len();
            if !cout.is_multiple_of(LANES)
                || !side.is_multiple_of(8)
                || side < 8
                || w.len() != cout * cin * TAPS
            {
                return None;
            }
            let winograd = cin.is_multiple_of(LANES);
            // On AMX tiles: the Winograd products, and the first block's
            // direct products where a kernel row's run fits in 16 values
            // and a conv row is whole tiles of 16 pixels.
            let amx = precision == Precision::Bf16
                && super::amx::available()
                && (winograd
                    || (blocks.is_empty() && 3 * cin <= AMX_RUN && side.is_multiple_of(16)));
            // F(4x4, 3x3) wherever the products run on vector registers, in
            // f32 or bfloat16: the larger tiles need 2.25 multiply-adds per
            // output instead of 4 (about 1e-6 of rounding in f32) and, on
            // AMX tiles, where the products are cheap, halve the transforms
            // around them. AMX takes 16 tiles a product, so there a map of
            // fewer F(4x4, 3x3) tiles keeps F(2x2, 3x3).
            let wide = winograd && (!amx || (side / 4).pow(2).is_multiple_of(16));
            let (group, strip, weights) = if winograd {
                let group = if cout.is_multiple_of(3 * LANES) {
                    3
                } else if cout.is_multiple_of(2 * LANES) {
                    2
                } else {
                    1
                };
                if wide {
                    // (side / 4)^2 tiles, side a multiple of 8: a multiple
                    // of 4, and of 8 unless side / 4 is twice an odd number.
                    // AVX2 takes 16 tiles where it can (6 + 6 + 4), and so
                    // does one f32 AVX-512 register of output channels.
                    let tiles = (side / 4).pow(2);
                    let sixteen = isa == Isa::Avx2 || (precision == Precision::F32 && group == 1);
                    let strip = if sixteen && tiles.is_multiple_of(16) {
                        16
                    } else if tiles.is_multiple_of(8) {
                        8
                    } else {
                        4
                    };
                    let u = winograd_weights(w, (cin, cout, group * LANES), &G4);
                    (group, strip, u)
                } else {
                    let strip = if group == 1 { 16 } else { 8 };
                    let u = winograd_weights(w, (cin, cout, group * LANES), &G2);
                    (group, strip, u)
                }
            } else {
                let group = if cout.is_multiple_of(2 * LANES) { 2 } else { 1 };
                let strip = if group == 1 && side.is_multiple_of(16) {
                    16
                } else {
                    8
                };
                let width = group * LANES;
                let mut packed = vec![0f32; w.len()];
                for co in 0..cout {
                    let (g, lane) = (co / width, co % width);
                    for ci in 0..cin {
                        for tap in 0..TAPS {
                            packed[((g * TAPS + tap) * cin + ci) * width + lane] =
                                w[(co * cin + ci) * TAPS + tap];
                        }
                    }
                }
                (group, strip, packed)
            };
            let weights_bf16 = match precision {
                Precision::Bf16 if winograd => pair_bf16(&weights, cin, group * LANES),
                Precision::Bf16 if blocks.is_empty() => {
                    flat_bf16(&weights, (cin, first_run(cin, amx)), group * LANES)
                }
                _ => Vec::new(),
            };
            blocks.push(Block {
                side,
                cin,
                cout,
                group,
                strip,
                winograd,
                wide,
                weights,
                amx,
                isa,
                weights_bf16,
                bias: b.clone(),
            });
            side /= 2;
            cin = cout;
        }
        let labels = fc_b.len();
        if labels == 0 || fc_w.len() != cin * labels {
            return None;
        }
        Some(Self {
            blocks,
            fc_w,
            fc_b,
            labels,
            scratch: Mutex::new(Vec::new()),
        })
    }

    /// The arithmetic of the Winograd products.
    pub fn precision(&self) -> Precision {
        if self.blocks.iter().any(|b| !b.weights_bf16.is_empty()) {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    /// Whether the Winograd products run on AMX tiles.
    pub fn uses_amx(&self) -> bool {
        self.blocks.iter().any(|b| b.amx)
    }

    /// Input values per picture (`side * side * channels`, NHWC).
    pub fn input_len(&self) -> usize {
        let b = &self.blocks[0];
        b.side * b.side * b.cin
    }

    /// Number of outputs per picture.
    pub fn labels(&self) -> usize {
        self.labels
    }

    /// Logits `[n, labels]` for `n` normalised NHWC pictures laid end to end,
    /// on up to `threads` threads (this one included) when there are at
    /// least [`MIN_PER_THREAD`] pictures for each. The threads claim chunks
    /// of [`MIN_PER_THREAD`] pictures until none are left, so one slowed by
    /// other work (the decoders share the cores) holds the batch up by one
    /// chunk at most.
    ///
    /// # Panics
    /// When `input.len()` is not a whole number of pictures.
    pub fn logits(&self, input: &[f32], threads: usize) -> Vec<f32> {
        let len = self.input_len();
        assert!(
            input.len().is_multiple_of(len),
            "input is not a whole number of pictures"
        );
        let n = input.len() / len;
        let threads = threads.clamp(1, (n / MIN_PER_THREAD).max(1));
        let mut out = vec![0f32; n * self.labels];
        if threads == 1 {
            self.run(input, &mut out);
            return out;
        }
        let chunks: Vec<Mutex<(&[f32], &mut [f32])>> = input
            .chunks(MIN_PER_THREAD * len)
            .zip(out.chunks_mut(MIN_PER_THREAD * self.labels))
            .map(Mutex::new)
            .collect();
        let next = AtomicUsize::new(0);
        let work = || {
            while let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                // Each chunk is claimed once, so the lock is never contended.
                if let Ok(mut guard) = chunk.lock() {
                    let (pictures, logits) = &mut *guard;
                    self.run(pictures, logits);
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        });
        drop(chunks);
        out
    }

    /// Runs whole pictures on this thread, writing `labels` logits each.
    fn run(&self, input: &[f32], out: &mut [f32]) {
        let mut scratch = self
            .scratch
            .lock()
            .ok()
            .and_then(|mut kept| kept.pop())
            .unwrap_or_else(|| self.new_scratch());
        for (picture, logits) in input
            .chunks_exact(self.input_len())
            .zip(out.chunks_exact_mut(self.labels))
        {
            self.picture(picture, &mut scratch, logits);
        }
        if let Ok(mut kept) = self.scratch.lock() {
            kept.push(scratch);
        }
    }

    /// Scratch laid out for this network. The padded buffers start zeroed;
    /// pictures write their interiors only, so the borders stay zero.
    fn new_scratch(&self) -> Scratch {
        let most = |size: fn(&Block) -> usize| self.blocks.iter().map(size).max().unwrap_or(0);
        Scratch {
            padded: self
                .blocks
                .iter()
                .map(|b| AlignedBuf::zeroed((b.side + 2) * (b.side + 2) * b.cin))
                .collect(),
            input_bf16: match &self.blocks[..] {
                [b, ..] if b.direct_bf16() => vec![0; b.bf16_input_len()],
                _ => Vec::new(),
            },
            rows: AlignedBuf::zeroed(most(|b| 2 * b.side * b.cout)),
            pixel: AlignedBuf::zeroed(most(|b| b.pooled_per_tile() * b.cout)),
            features: Vec::new(),
            // Transformed inputs: f32 where the products are, else bfloat16.
            wino_in: AlignedBuf::zeroed(most(|b| {
                if b.winograd && b.weights_bf16.is_empty() {
                    b.wino_room(b.cin)
                } else {
                    0
                }
            })),
            wino_in_bf16: vec![
                0;
                most(|b| if b.winograd && !b.weights_bf16.is_empty() {
                    b.wino_room(b.cin)
                } else {
                    0
                })
            ],
            wino_out: AlignedBuf::zeroed(most(
                |b| if b.winograd { b.wino_room(b.cout) } else { 0 },
            )),
        }
    }

    fn picture(&self, picture: &[f32], s: &mut Scratch, out: &mut [f32]) {
        let Scratch {
            padded,
            input_bf16,
            rows,
            pixel,
            features: pooled,
            wino_in,
            wino_in_bf16,
            wino_out,
        } = s;
        // Copy the picture into the first padded buffer's interior (in
        // bfloat16 when the first block runs in it).
        let b0 = &self.blocks[0];
        let (side, c) = (b0.side, b0.cin);
        if b0.direct_bf16() {
            b0.fill_bf16(picture, input_bf16);
        } else {
            for y in 0..side {
                let to = ((y + 1) * (side + 2) + 1) * c;
                padded[0][to..to + side * c].copy_from_slice(&picture[y * side * c..][..side * c]);
            }
        }
        let last = self.blocks.len() - 1;
        pooled.clear();
        pooled.resize(self.blocks[last].cout, 0.0);
        for (i, block) in self.blocks.iter().enumerate() {
            let (done, rest) = padded.split_at_mut(i + 1);
            let input = &done[i];
            let half = block.side / 2;
            if block.winograd {
                let pixel = &mut pixel[..block.pooled_per_tile() * block.cout];
                if i == last {
                    block.winograd_pool(
                        input,
                        (wino_in, wino_in_bf16),
                        wino_out,
                        pixel,
                        |_, _, v| {
                            for (p, v) in pooled.iter_mut().zip(v) {
                                *p += v;
                            }
                        },
                    );
                } else {
                    let next = &mut rest[0];
                    let c = block.cout;
                    block.winograd_pool(
                        input,
                        (wino_in, wino_in_bf16),
                        wino_out,
                        pixel,
                        |y, x, v| {
                            next[((y + 1) * (half + 2) + x + 1) * c..][..c].copy_from_slice(v);
                        },
                    );
                }
                continue;
            }
            // SAFETY: AMX was found available when the block was built.
            #[cfg(target_arch = "x86_64")]
            let tiles = block.amx.then(|| unsafe { super::amx::Tiles::configure() });
            for y in (0..block.side).step_by(2) {
                if block.direct_bf16() {
                    #[cfg(target_arch = "x86_64")]
                    block.conv_rows_bf16(input_bf16, y, rows, tiles.as_ref());
                    #[cfg(not(target_arch = "x86_64"))]
                    block.conv_rows_bf16(input_bf16, y, rows);
                } else {
                    block.conv_rows(input, y, rows);
                }
                let rows = &rows[..2 * block.side * block.cout];
                let c = block.cout;
                if i == last {
                    let pixel = &mut pixel[..c];
                    for x in 0..half {
                        block.pool_rows(rows, x, pixel);
                        for (p, v) in pooled.iter_mut().zip(pixel.iter()) {
                            *p += v;
                        }
                    }
                } else {
                    // The pooled row straight into the next block's map,
                    // inside its border.
                    let next = &mut rest[0];
                    let stride = (half + 2) * c;
                    let row = &mut next[(y / 2 + 1) * stride..][..stride];
                    block.pool_rows(rows, 0, &mut row[c..][..half * c]);
                }
            }
        }
        let count = {
            let b = &self.blocks[last];
            ((b.side / 2) * (b.side / 2)) as f32
        };
        for p in pooled.iter_mut() {
            *p /= count;
        }
        for (l, logit) in out.iter_mut().enumerate() {
            let mut acc = self.fc_b[l];
            for (f, p) in pooled.iter().enumerate() {
                acc += p * self.fc_w[f * self.labels + l];
            }
            *logit = acc;
        }
    }
}

impl Block {
    /// Whether this is a direct block running in bfloat16 (the first).
    fn direct_bf16(&self) -> bool {
        !self.winograd && !self.weights_bf16.is_empty()
    }

    /// The picture (`[side][side][cin]` f32) rounded to bfloat16 into the
    /// interior of `input` (`[side+2][side+2][cin]` plus the spare value; the
    /// border stays zero).
    fn fill_bf16(&self, picture: &[f32], input: &mut [u16]) {
        let (side, cin) = (self.side, self.cin);
        let len = side * cin;
        assert!(picture.len() == side * len && input.len() == self.bf16_input_len());
        let whole = len / LANES * LANES;
        for y in 0..side {
            let src = &picture[y * len..][..len];
            let dst = &mut input[((y + 1) * (side + 2) + 1) * cin..][..len];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: bf16 weights exist only where AVX512-BF16 was found;
            // both slices hold `whole` values, a multiple of 16.
            unsafe {
                round_bf16(&src[..whole], &mut dst[..whole])
            };
            for (d, &v) in dst[whole..].iter_mut().zip(&src[whole..]) {
                *d = to_bf16(v);
            }
        }
    }

    /// Padded bfloat16 input values of the first block: the map with its
    /// border, and the spare values a kernel row's last run reads past it.
    fn bf16_input_len(&self) -> usize {
        (self.side + 2) * (self.side + 2) * self.cin + BF16_SPARE
    }

    /// [`Block::conv_rows`] of the first block in bfloat16, from its padded
    /// input (see [`Block::fill_bf16`]): each kernel row is one run of
    /// `3 * cin` consecutive values (three pixels' channels), taken in pairs,
    /// on `tiles` where the block runs on AMX (a product per conv row, each
    /// run read as [`AMX_RUN`] values).
    fn conv_rows_bf16(
        &self,
        input: &[u16],
        y: usize,
        rows: &mut [f32],
        #[cfg(target_arch = "x86_64")] tiles: Option<&super::amx::Tiles>,
    ) {
        let (side, cin, cout) = (self.side, self.cin, self.cout);
        let run = first_run(cin, self.amx);
        let pairs = run / 2;
        let width = self.group * LANES;
        assert!(
            input.len() == self.bf16_input_len() && 3 * cin <= run && run - 3 * cin < BF16_SPARE
        );
        assert!(rows.len() >= 2 * side * cout && y + 1 < side);
        assert!(self.weights_bf16.len() == cout * 3 * pairs * 2 && side.is_multiple_of(self.strip));
        let row_stride = (side + 2) * cin;
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = tiles {
            assert!(self.amx && side.is_multiple_of(16));
            let runs = super::amx::Rows {
                stride: cin,
                runs: 3,
                pitch: row_stride,
            };
            for dy in 0..2 {
                // SAFETY: AMX (the block was built for it) and the tiles
                // configured by the caller. Pixel x of conv row y+dy reads
                // padded rows y+dy..y+dy+3 from column x, `run` values each:
                // at most `run - 3 * cin` values past the row, inside the
                // next row or the spare values (checked above); the weights
                // hold `3 * run * cout` values; the products `side` pixels
                // of `cout` values inside `rows`.
                unsafe {
                    super::amx::product(
                        tiles,
                        input.as_ptr().add((y + dy) * row_stride),
                        runs,
                        (side, 3 * run, cout, width),
                        self.weights_bf16.as_ptr(),
                        rows.as_mut_ptr().add(dy * side * cout),
                    )
                };
            }
            return;
        }
        for (pixel, g, dst) in self.row_tiles(y) {
            let (src, w) = (pixel * cin, g * 3 * pairs * 2 * width);
            // SAFETY: bf16 weights exist only where AVX512-BF16 was found.
            // The tile reads rows y+dy..y+dy+3 from column x, `2 * pairs`
            // values past each of `strip` pixels: at most one value past the
            // row, which is the next row's or the spare value at the end
            // (checked above); the weights of group g span
            // 3 * pairs * 2 * width values; it writes `strip` pixels of
            // `width` channels inside `rows`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let (i, wp, o) = (
                    input.as_ptr().add(src),
                    self.weights_bf16.as_ptr().add(w),
                    rows.as_mut_ptr().add(dst),
                );
                let at = (row_stride, cin, pairs);
                match (self.strip, self.group) {
                    (16, 1) => tile_bf16_runs::<16, 1, 3>(i, at, wp, o, cout),
                    (8, 1) => tile_bf16_runs::<8, 1, 3>(i, at, wp, o, cout),
                    _ => tile_bf16_runs::<8, 2, 3>(i, at, wp, o, cout),
                }
            }
        }
    }

    /// The register tiles of conv rows `y` and `y + 1`: the padded input
    /// pixel each starts at (row y+dy, column x), its output-channel group,
    /// and its offset in the rows' buffer.
    fn row_tiles(&self, y: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let (side, cout, width) = (self.side, self.cout, self.group * LANES);
        (0..2).flat_map(move |dy| {
            (0..side).step_by(self.strip).flat_map(move |x| {
                (0..cout / width).map(move |g| {
                    let dst = (dy * side + x) * cout + g * width;
                    ((y + dy) * (side + 2) + x, g, dst)
                })
            })
        })
    }

    /// Conv output rows `y` and `y + 1` (without bias) into `rows`,
    /// `[2][side][cout]`, from the padded input `[side+2][side+2][cin]`.
    fn conv_rows(&self, input: &[f32], y: usize, rows: &mut [f32]) {
        let (side, cin, cout) = (self.side, self.cin, self.cout);
        let width = self.group * LANES;
        assert!(input.len() == (side + 2) * (side + 2) * cin);
        assert!(rows.len() >= 2 * side * cout && y + 1 < side);
        assert!(self.weights.len() == cout * TAPS * cin && side.is_multiple_of(self.strip));
        let row_stride = (side + 2) * cin;
        for (pixel, g, dst) in self.row_tiles(y) {
            let (src, w) = (pixel * cin, g * TAPS * cin * width);
            // SAFETY: `available()` was checked when the network was built.
            // The tile reads padded rows y+dy..y+dy+2 and columns
            // x..x+strip+2, all inside `input` (checked above); the weights
            // of group g span TAPS*cin*width values inside `weights`; it
            // writes `strip` pixels of `width` channels starting at `dst`,
            // inside `rows`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let (i, wp, o) = (
                    input.as_ptr().add(src),
                    self.weights.as_ptr().add(w),
                    rows.as_mut_ptr().add(dst),
                );
                match (self.isa, self.strip, self.group) {
                    (Isa::Avx2, strip, group) => {
                        tile_avx2::<3>((strip, group), i, row_stride, cin, wp, o, cout)
                    }
                    (_, 16, 1) => tile::<16, 1, 3>(i, row_stride, cin, wp, o, cout),
                    (_, 8, 1) => tile::<8, 1, 3>(i, row_stride, cin, wp, o, cout),
                    _ => tile::<8, 2, 3>(i, row_stride, cin, wp, o, cout),
                }
            }
        }
    }

    /// Winograd positions per tile: 16, or 36 when wide.
    fn positions(&self) -> usize {
        if self.wide { WIDE } else { WINO }
    }

    /// Output pixels along a Winograd tile's side: 2, or 4 when wide.
    fn tile_side(&self) -> usize {
        if self.wide { 4 } else { 2 }
    }

    /// Pooled pixels a Winograd tile makes (1, or 4 when wide; 1 for a
    /// direct block's 2x2 window).
    fn pooled_per_tile(&self) -> usize {
        (self.tile_side() / 2).pow(2)
    }

    /// Winograd tiles of the whole block.
    fn wino_tiles(&self) -> usize {
        (self.side / self.tile_side()).pow(2)
    }

    /// Tiles per Winograd chunk: all of them for small sides, else
    /// [`WINO_CHUNK`] ([`WIDE_CHUNK`] when wide). Every chunk, the last
    /// included, is a multiple of the register tile's `strip` (F(2x2, 3x3):
    /// 16 tiles, sides being multiples of 8; wide: see [`DirectNet::new`]).
    fn wino_chunk(&self) -> usize {
        self.wino_tiles()
            .min(if self.wide { WIDE_CHUNK } else { WINO_CHUNK })
    }

    /// Scratch values for one chunk's transformed values of `c` channels at
    /// every position, blocks skewed apart.
    fn wino_room(&self, c: usize) -> usize {
        self.positions() * (self.wino_chunk() * c + WINO_SKEW)
    }

    /// The whole block as Winograd F(2x2, 3x3) (F(4x4, 3x3) when wide) from
    /// the padded input `[side+2][side+2][cin]`: each tile's outputs are
    /// max-pooled in 2x2 windows, biased and ReLU'd, and handed to
    /// `emit(y, x, values)` as pooled pixel (y, x); `pixel` holds a tile's
    /// pooled pixels.
    fn winograd_pool(
        &self,
        input: &[f32],
        (v, v16): (&mut [f32], &mut [u16]),
        m: &mut [f32],
        pixel: &mut [f32],
        mut emit: impl FnMut(usize, usize, &[f32]),
    ) {
        let (side, cin, cout) = (self.side, self.cin, self.cout);
        let (chunk, width, t) = (self.wino_chunk(), self.group * LANES, self.tile_side());
        let (across, total, pooled) = (side / t, self.wino_tiles(), self.pooled_per_tile());
        assert!(input.len() == (side + 2) * (side + 2) * cin);
        assert!(m.len() >= self.wino_room(cout));
        assert!(pixel.len() == pooled * cout && self.bias.len() == cout);
        assert!(self.weights.len() == self.positions() * cout * cin);
        let bf16 = !self.weights_bf16.is_empty();
        assert!(if bf16 { v16.len() } else { v.len() } >= self.wino_room(cin));
        assert!(!bf16 || self.weights_bf16.len() == self.positions() * cout * cin);
        assert!(self.wide || bf16, "f32 products are always F(4x4, 3x3)");
        assert!(total.is_multiple_of(self.strip) && chunk.is_multiple_of(self.strip));
        assert!((total % chunk).is_multiple_of(self.strip) && 16 % self.strip == 0);
        assert!(cin.is_multiple_of(LANES) && cout.is_multiple_of(width));
        let row_stride = (side + 2) * cin;
        // SAFETY: AMX was found available when the block was built.
        #[cfg(target_arch = "x86_64")]
        let tiles = self.amx.then(|| unsafe { super::amx::Tiles::configure() });
        for start in (0..total).step_by(chunk) {
            // The last chunk may be shorter (a multiple of the strip).
            let n = chunk.min(total - start);
            // Values from one position's block to the next's.
            let (vs, ms) = (n * cin + WINO_SKEW, n * cout + WINO_SKEW);
            // SAFETY (all three steps): `available()` was checked when the
            // network was built. Tile k reads padded rows t*y..t*y+t+2 and
            // columns t*x..t*x+t+2 (y, x < across), inside `input`; the
            // chunk's transformed input spans `positions` blocks of n * cin
            // values `vs` apart in `v`, its products as many blocks of
            // n * cout `ms` apart in `m`, inside their room (checked above),
            // and the weights of one position and register group cin * width
            // values of `weights` (all checked above; the same counts of `v16`
            // and `weights_bf16` in bfloat16); channel offsets step by whole
            // registers; AVX512-BF16 was checked when bf16 weights were made;
            // a tile's `pooled` pixels of `cout` values fill `pixel`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                for k in 0..n {
                    let (y, x) = ((start + k) / across, (start + k) % across);
                    let src = input.as_ptr().add((t * y * (side + 2) + t * x) * cin);
                    if self.isa == Isa::Avx2 {
                        // F(4x4, 3x3) in f32, every channel.
                        let dst = v.as_mut_ptr().add(k * cin);
                        wide_input_avx2(src, row_stride, cin, dst, vs);
                        continue;
                    }
                    for c in (0..cin).step_by(LANES) {
                        if self.wide && bf16 {
                            let dst = v16.as_mut_ptr().add(k * cin + c);
                            wide_input_bf16(src.add(c), row_stride, cin, dst, vs);
                        } else if self.wide {
                            let dst = v.as_mut_ptr().add(k * cin + c);
                            wide_input(src.add(c), row_stride, cin, dst, vs);
                        } else {
                            let dst = v16.as_mut_ptr().add(k * cin + c);
                            wino_input_bf16(src.add(c), row_stride, cin, dst, vs);
                        }
                    }
                }
                for pos in 0..self.positions() {
                    if let Some(tiles) = &tiles {
                        super::amx::product(
                            tiles,
                            v16.as_ptr().add(pos * vs),
                            super::amx::Rows::dense(cin),
                            (n, cin, cout, width),
                            self.weights_bf16.as_ptr().add(pos * cout * cin),
                            m.as_mut_ptr().add(pos * ms),
                        );
                    } else if bf16 {
                        let tile = match (self.strip, self.group) {
                            (4, 3) => tile_bf16::<4, 3>,
                            (4, 2) => tile_bf16::<4, 2>,
                            (4, _) => tile_bf16::<4, 1>,
                            (8, 3) => tile_bf16::<8, 3>,
                            (8, 2) => tile_bf16::<8, 2>,
                            (8, _) => tile_bf16::<8, 1>,
                            _ => tile_bf16::<16, 1>,
                        };
                        self.products(v16, &self.weights_bf16, m, pos, (n, vs, ms), tile);
                    } else {
                        // One position: a 1x1 "convolution" of the tiles.
                        // (AVX2 tiles are F(4x4, 3x3): 16, 8 or 4 per strip.)
                        let tile = match (self.isa, self.strip, self.group) {
                            (Isa::Avx2, 16, 3) => wino_tile_avx2::<16, 3>,
                            (Isa::Avx2, 16, 2) => wino_tile_avx2::<16, 2>,
                            (Isa::Avx2, 16, _) => wino_tile_avx2::<16, 1>,
                            (Isa::Avx2, 8, 3) => wino_tile_avx2::<8, 3>,
                            (Isa::Avx2, 8, 2) => wino_tile_avx2::<8, 2>,
                            (Isa::Avx2, 8, _) => wino_tile_avx2::<8, 1>,
                            (Isa::Avx2, _, 3) => wino_tile_avx2::<4, 3>,
                            (Isa::Avx2, _, 2) => wino_tile_avx2::<4, 2>,
                            (Isa::Avx2, _, _) => wino_tile_avx2::<4, 1>,
                            (_, 16, _) => wino_tile::<16, 1>,
                            (_, 8, 3) => wino_tile::<8, 3>,
                            (_, 8, 2) => wino_tile::<8, 2>,
                            (_, 8, _) => wino_tile::<8, 1>,
                            (_, _, 3) => wino_tile::<4, 3>,
                            (_, _, 2) => wino_tile::<4, 2>,
                            _ => wino_tile::<4, 1>,
                        };
                        self.products(v, &self.weights, m, pos, (n, vs, ms), tile);
                    }
                }
                for k in 0..n {
                    let (y, x) = ((start + k) / across, (start + k) % across);
                    if self.isa == Isa::Avx2 {
                        let (from, bias) = (m.as_ptr().add(k * cout), self.bias.as_ptr());
                        wide_output_avx2(from, ms, bias, pixel.as_mut_ptr(), cout);
                    } else {
                        for c in (0..cout).step_by(LANES) {
                            let (from, bias) =
                                (m.as_ptr().add(k * cout + c), self.bias.as_ptr().add(c));
                            if self.wide {
                                wide_output(from, ms, bias, pixel.as_mut_ptr().add(c), cout);
                            } else {
                                wino_output(from, ms, bias, pixel.as_mut_ptr().add(c));
                            }
                        }
                    }
                    let per_side = t / 2;
                    for (q, values) in pixel.chunks_exact(cout).enumerate() {
                        emit(
                            per_side * y + q / per_side,
                            per_side * x + q % per_side,
                            values,
                        );
                    }
                }
            }
        }
    }

    /// One Winograd position's products: `m[pos]` `[n][cout]` from `v[pos]`
    /// `[n][cin]` (position blocks `vs` and `ms` values apart) and the
    /// position's `weights` (f32 or bf16, as `tile` reads them), register
    /// tile by register tile.
    ///
    /// # Safety
    /// The CPU runs `tile`; `v` holds `WINO` blocks of `n * cin` values `vs`
    /// apart, `m` `WINO` of `n * cout` `ms` apart, `weights`
    /// `WINO * cout * cin` in `tile`'s layout; `n` is a multiple of the strip.
    #[cfg(target_arch = "x86_64")]
    unsafe fn products<T>(
        &self,
        v: &[T],
        weights: &[T],
        m: &mut [f32],
        pos: usize,
        (n, vs, ms): (usize, usize, usize),
        tile: ProductTile<T>,
    ) {
        let (cin, cout, width) = (self.cin, self.cout, self.group * LANES);
        // SAFETY: by the function's contract, every offset below is inside
        // the buffers (weights of one position and group: cin * width).
        unsafe {
            let vp = v.as_ptr().add(pos * vs);
            let mp = m.as_mut_ptr().add(pos * ms);
            for g in 0..cout / width {
                let u = weights
                    .as_ptr()
                    .add((pos * (cout / width) + g) * cin * width);
                for k in (0..n).step_by(self.strip) {
                    tile(vp.add(k * cin), cin, u, mp.add(k * cout + g * width), cout);
                }
            }
        }
    }

    /// 2x2 max-pool of two conv rows, plus bias, then ReLU: the pooled
    /// pixels from `from` on, as many as `out` holds (`cout` values each),
    /// in one call into the vector code.
    fn pool_rows(&self, rows: &[f32], from: usize, out: &mut [f32]) {
        let (side, c) = (self.side, self.cout);
        let (top, bottom) = rows.split_at(side * c);
        let n = out.len() / c;
        assert!(out.len() == n * c && from + n <= side / 2);
        assert!(self.bias.len() == c && c.is_multiple_of(LANES));
        let (a, b) = (&top[2 * from * c..], &bottom[2 * from * c..]);
        // SAFETY: the CPU runs `self.isa` (checked when the network was
        // built); `a` and `b` hold 2n pixels of `c` values, `bias` `c`
        // values and `out` n pixels (asserted above), `c` a multiple of 16.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let at = (a.as_ptr(), b.as_ptr(), self.bias.as_ptr());
            match self.isa {
                Isa::Avx512 => pool_avx512(at, out.as_mut_ptr(), c, n),
                Isa::Avx2 => pool_avx2(at, out.as_mut_ptr(), c, n),
            }
        }
    }
}

/// `n` pooled pixels of [`Block::pool_rows`] on AVX-512F.
///
/// # Safety
/// As [`pool_simd`] for each of `n` pixels, on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pool_avx512(at: (*const f32, *const f32, *const f32), out: *mut f32, c: usize, n: usize) {
    // SAFETY: the caller's contract.
    unsafe { pool_pixels::<Avx512>(at, out, c, n) }
}

/// `n` pooled pixels of [`Block::pool_rows`] on AVX2.
///
/// # Safety
/// As [`pool_simd`] for each of `n` pixels, on a CPU with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pool_avx2(at: (*const f32, *const f32, *const f32), out: *mut f32, c: usize, n: usize) {
    // SAFETY: the caller's contract.
    unsafe { pool_pixels::<Avx2>(at, out, c, n) }
}

/// [`pool_simd`] for `n` pixels side by side.
///
/// # Safety
/// As [`pool_simd`] for each pixel: `at.0` and `at.1` hold `2 n c` values,
/// `out` `n c`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pool_pixels<S: Simd>(
    (a, b, bias): (*const f32, *const f32, *const f32),
    out: *mut f32,
    c: usize,
    n: usize,
) {
    for x in 0..n {
        // SAFETY: the function's contract.
        unsafe {
            pool_simd::<S>(
                (a.add(2 * x * c), b.add(2 * x * c), bias),
                out.add(x * c),
                c,
            )
        }
    }
}

/// The 2x2 max of two adjacent pixels in each of two conv rows (`at.0`
/// and `at.1`, `2 c` values each), plus the bias (`at.2`), ReLU'd, into
/// `out` (`c` values).
///
/// # Safety
/// The CPU supports `S`'s instructions; the reads and writes are in bounds
/// and `c` is a multiple of `S::LANES`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pool_simd<S: Simd>(
    (a, b, bias): (*const f32, *const f32, *const f32),
    out: *mut f32,
    c: usize,
) {
    // SAFETY: in bounds by the function's contract.
    unsafe {
        for ch in (0..c).step_by(S::LANES) {
            let m = crate::model::simd::max2x2::<S>(a, b, c, ch);
            S::store(
                out.add(ch),
                S::max(S::add(m, S::load(bias.add(ch))), S::zero()),
            );
        }
    }
}

/// One register tile: `P` pixels times `G` registers of output channels,
/// summed over a `K`x`K` window and `cin` input channels. `K = 3` is the
/// direct 3x3 convolution of one output row; `K = 1` is one Winograd
/// position's product (each "pixel" then a tile's `cin` transformed inputs).
///
/// # Safety
/// The CPU supports AVX-512F; `input` points at pixel (row, x) of a buffer
/// with `row_stride` values per row and `cin` per pixel, and holds rows
/// row..row+K, columns x..x+P+K-1; `w` holds `K * K * cin * 16 * G` values
/// (`[K*K][cin][16*G]`); `out` has room for `P` pixels `out_stride` apart of
/// `16 * G` values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn tile<const P: usize, const G: usize, const K: usize>(
    input: *const f32,
    row_stride: usize,
    cin: usize,
    w: *const f32,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: the caller's contract; each input channel's weights are one
    // row of G registers.
    unsafe { tile_simd::<Avx512, P, G, K>(input, row_stride, cin, (w, G * LANES), out, out_stride) }
}

/// [`tile`] on AVX2 with FMA for a register tile of `strip` pixels times
/// `group` 16-lane registers, as tiles of 6 or 4 pixels times 2 8-lane
/// registers ([`super::simd::avx2_tiles`] says why).
///
/// # Safety
/// The CPU supports AVX2 and FMA; otherwise as [`tile`] with `P = strip`,
/// `G = group` (strip a multiple of 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const K: usize>(
    (strip, group): (usize, usize),
    input: *const f32,
    row_stride: usize,
    cin: usize,
    w: *const f32,
    out: *mut f32,
    out_stride: usize,
) {
    let row = group * LANES;
    for (p, pixels) in super::simd::avx2_pixels(strip) {
        for (c, regs) in super::simd::avx2_tiles(row / Avx2::LANES) {
            // SAFETY: every tile stays inside the strip's pixels and the
            // group's lanes (the caller's contract).
            unsafe {
                let i = input.add(p * cin);
                let w = (w.add(c * Avx2::LANES), row);
                let o = out.add(p * out_stride + c * Avx2::LANES);
                match (pixels, regs) {
                    (6, 2) => tile_simd::<Avx2, 6, 2, K>(i, row_stride, cin, w, o, out_stride),
                    (6, _) => tile_simd::<Avx2, 6, 1, K>(i, row_stride, cin, w, o, out_stride),
                    (_, 2) => tile_simd::<Avx2, 4, 2, K>(i, row_stride, cin, w, o, out_stride),
                    _ => tile_simd::<Avx2, 4, 1, K>(i, row_stride, cin, w, o, out_stride),
                }
            }
        }
    }
}

/// [`tile`] for any register width: `P` pixels times `C` registers of
/// output channels, each input channel's weights one row of `w.1` values
/// from `w.0` (`[K*K][cin][w.1]`, of which the tile reads its `C`
/// registers).
///
/// # Safety
/// The CPU supports `S`'s instructions; otherwise as [`tile`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_simd<S: Simd, const P: usize, const C: usize, const K: usize>(
    input: *const f32,
    row_stride: usize,
    cin: usize,
    (w, w_row): (*const f32, usize),
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: in bounds by the function's contract. A kernel row's K taps
    // and their channels are one run of K * cin values, in the input (from
    // each pixel on) and in the weights alike: one loop instead of K short
    // ones.
    unsafe {
        let runs = (K, K * cin, row_stride);
        let acc = crate::model::simd::tile_sums::<S, P, C>(input, cin, runs, (w, w_row));
        for (p, row) in acc.iter().enumerate() {
            for (g, r) in row.iter().enumerate() {
                S::store(out.add(p * out_stride + g * S::LANES), *r);
            }
        }
    }
}

/// A Winograd position's register tile: `P` tiles' inputs (`cin` values
/// each), `cin`, the weights, the products, their stride.
#[cfg(target_arch = "x86_64")]
type ProductTile<T> = unsafe fn(*const T, usize, *const T, *mut f32, usize);

/// [`tile`] for one Winograd position: `P` tiles (each "pixel" a tile's
/// `cin` transformed inputs) times `G` registers of output channels.
///
/// # Safety
/// As [`tile`] with `K = 1`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wino_tile<const P: usize, const G: usize>(
    input: *const f32,
    cin: usize,
    w: *const f32,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: the caller's contract.
    unsafe { tile::<P, G, 1>(input, 0, cin, w, out, out_stride) }
}

/// [`wino_tile`] on AVX2 with FMA.
///
/// # Safety
/// As [`tile_avx2`] with `K = 1`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wino_tile_avx2<const P: usize, const G: usize>(
    input: *const f32,
    cin: usize,
    w: *const f32,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: the caller's contract.
    unsafe { tile_avx2::<1>((P, G), input, 0, cin, w, out, out_stride) }
}

/// [`tile`] for one Winograd position in bfloat16: `P` tiles times `G`
/// registers of output channels, summed over `cin` input channels two at a
/// time (`vdpbf16ps` multiplies a pair of inputs by a pair of weights per
/// lane and adds both products to the f32 sum).
///
/// # Safety
/// The CPU supports AVX-512F and AVX512-BF16; `input` holds `P` tiles of
/// `cin` (even) bf16 values; `w` holds `cin * 16 * G` values laid out
/// `[cin / 2][16 * G][2]`; `out` has room for `P` rows `out_stride` apart of
/// `16 * G` values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16<const P: usize, const G: usize>(
    input: *const u16,
    cin: usize,
    w: *const u16,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: the same contract: one "row" of P tiles, `cin` values apart,
    // one run of `cin` values each.
    unsafe { tile_bf16_runs::<P, G, 1>(input, (0, cin, cin / 2), w, out, out_stride) }
}

/// A bfloat16 register tile: `P` pixels times `G` registers of output
/// channels, summed over `R` rows, each row a run of `2 * pairs`
/// consecutive input values from the pixel on, taken two at a time
/// (`vdpbf16ps` multiplies a pair of inputs by a pair of weights per lane
/// and adds both products to the f32 sum). `R = 3` is the first block's
/// direct convolution (a kernel row's run is three pixels' channels, plus a
/// zero-weighted spare when odd); `R = 1` one Winograd position's product.
///
/// # Safety
/// The CPU supports AVX-512F and AVX512-BF16; `input` points at pixel
/// (row, x) of a bf16 buffer with `row_stride` values per row and
/// `pixel_stride` per pixel, and holds, for rows row..row+R and each of the
/// `P` pixels, `2 * pairs` values from the pixel on; `w` holds
/// `R * pairs * 2 * 16 * G` bf16 values laid out `[R][pairs][16 * G][2]`;
/// `out` has room for `P` rows `out_stride` apart of `16 * G` values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16_runs<const P: usize, const G: usize, const R: usize>(
    input: *const u16,
    (row_stride, pixel_stride, pairs): (usize, usize, usize),
    w: *const u16,
    out: *mut f32,
    out_stride: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); G]; P];
    for ky in 0..R {
        // SAFETY: in bounds by the function's contract.
        let ip = unsafe { input.add(ky * row_stride) };
        let wp = unsafe { w.add(ky * pairs * G * 2 * LANES) };
        for pair in 0..pairs {
            let mut wv = [_mm512_setzero_ps(); G];
            for (g, v) in wv.iter_mut().enumerate() {
                // SAFETY: in bounds by the function's contract.
                *v = unsafe { _mm512_loadu_ps(wp.add((pair * G + g) * 2 * LANES).cast()) };
            }
            for (p, row) in acc.iter_mut().enumerate() {
                // SAFETY: in bounds by the function's contract; the pair is
                // two adjacent u16, read unaligned as one i32.
                let both = unsafe {
                    ip.add(p * pixel_stride + 2 * pair)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(both)) };
                for (r, v) in row.iter_mut().zip(&wv) {
                    let b: __m512bh = unsafe { std::mem::transmute(*v) };
                    *r = _mm512_dpbf16_ps(*r, a, b);
                }
            }
        }
    }
    for (p, row) in acc.iter().enumerate() {
        for (g, r) in row.iter().enumerate() {
            unsafe { _mm512_storeu_ps(out.add(p * out_stride + g * LANES), *r) };
        }
    }
}

/// Direct weights `[groups][9][cin][width]` as the bfloat16 runs of
/// [`tile_bf16_runs`] (or of the AMX tiles): per group and kernel row, value
/// `kx * cin + ci` of the run, padded with zeros to `run` values (even, at
/// least `3 * cin`) and paired, `[groups][3][run / 2][width][2]`.
fn flat_bf16(w: &[f32], (cin, run): (usize, usize), width: usize) -> Vec<u16> {
    assert!(run.is_multiple_of(2) && run >= 3 * cin);
    let pairs = run / 2;
    let groups = w.len() / (TAPS * cin * width);
    let mut out = vec![0u16; groups * 3 * pairs * 2 * width];
    for g in 0..groups {
        for ky in 0..3 {
            for kx in 0..3 {
                for ci in 0..cin {
                    let j = kx * cin + ci;
                    for lane in 0..width {
                        let from = ((g * TAPS + ky * 3 + kx) * cin + ci) * width + lane;
                        let to = (((g * 3 + ky) * pairs + j / 2) * width + lane) * 2 + j % 2;
                        out[to] = to_bf16(w[from]);
                    }
                }
            }
        }
    }
    out
}

/// f32 to bfloat16, rounded to nearest even (as `vcvtneps2bf16`).
pub(crate) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// `src` rounded to bfloat16 into `dst`, 16 values at a time.
///
/// # Safety
/// The CPU supports AVX-512F and AVX512-BF16; both slices have the same
/// length, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn round_bf16(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    assert!(src.len() == dst.len() && src.len().is_multiple_of(LANES));
    for (s, d) in src.chunks_exact(LANES).zip(dst.chunks_exact_mut(LANES)) {
        // SAFETY: 16 values each side.
        unsafe { store_bf16(d.as_mut_ptr(), _mm512_loadu_ps(s.as_ptr())) };
    }
}

/// Weights in blocks of `[cin][width]` (the Winograd weights
/// `[16][groups][cin][width]`, a pointwise layer's groups) as bfloat16 in
/// input-channel pairs, `[cin / 2][width][2]` per block, for [`tile_bf16`]
/// and the detector's pointwise tiles.
pub(crate) fn pair_bf16(u: &[f32], cin: usize, width: usize) -> Vec<u16> {
    let mut out = vec![0u16; u.len()];
    for (src, dst) in u
        .chunks_exact(cin * width)
        .zip(out.chunks_exact_mut(cin * width))
    {
        for ci in 0..cin {
            for lane in 0..width {
                dst[((ci / 2) * width + lane) * 2 + ci % 2] = to_bf16(src[ci * width + lane]);
            }
        }
    }
    out
}

/// Winograd weights `U = G g G^T` of a block's `[cout][cin][3][3]` weights
/// for the weight transform `g_t` ([`G2`] for F(2x2, 3x3), [`G4`] for
/// F(4x4, 3x3)), laid out `[positions][cout / width][cin][width]` for the
/// product tiles, `positions` being the square of `g_t`'s rows.
fn winograd_weights(
    w: &[f32],
    (cin, cout, width): (usize, usize, usize),
    g_t: &[[f64; 3]],
) -> Vec<f32> {
    let a = g_t.len();
    let mut u = vec![0f32; a * a * cout * cin];
    for co in 0..cout {
        let (grp, lane) = (co / width, co % width);
        for ci in 0..cin {
            let g = |r: usize, c: usize| f64::from(w[(co * cin + ci) * TAPS + r * 3 + c]);
            for (i, gi) in g_t.iter().enumerate() {
                // Row i of G g.
                let row: [f64; 3] = std::array::from_fn(|c| (0..3).map(|r| gi[r] * g(r, c)).sum());
                for (j, gj) in g_t.iter().enumerate() {
                    let value: f64 = (0..3).map(|c| row[c] * gj[c]).sum();
                    let pos = i * a + j;
                    u[((pos * (cout / width) + grp) * cin + ci) * width + lane] = value as f32;
                }
            }
        }
    }
    u
}

/// `B^T x` (the table `BT4`) of six vectors on AVX-512F, as the kernels
/// compute it ([`bt4_simd`]).
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn bt4(x: &[std::arch::x86_64::__m512; 6]) -> [std::arch::x86_64::__m512; 6] {
    // SAFETY: the caller's contract.
    unsafe { bt4_simd::<Avx512>(x) }
}

/// `B^T x` (the table `BT4`) of six vectors, written out.
///
/// # Safety
/// The CPU supports `S`'s instructions.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bt4_simd<S: Simd>(x: &[S::V; 6]) -> [S::V; 6] {
    // SAFETY: the caller's contract.
    unsafe {
        let [d0, d1, d2, d3, d4, d5] = *x;
        let e = S::sub(d1, d3);
        let f = S::sub(d4, d2);
        [
            S::fmadd(
                S::splat(1.5),
                e,
                S::fmadd(S::splat(-2.0), d2, S::add(d0, d4)),
            ),
            S::fmadd(
                S::splat(-2.5),
                d2,
                S::fmadd(S::splat(-0.5), d3, S::sub(d4, d1)),
            ),
            S::fmadd(
                S::splat(0.5),
                d2,
                S::fmadd(S::splat(-2.5), d3, S::add(d4, d1)),
            ),
            S::fmadd(S::splat(-0.5), e, f),
            S::fmadd(S::splat(2.0), e, f),
            S::fmadd(
                S::splat(1.5),
                S::sub(d2, d4),
                S::fmadd(S::splat(-2.0), d3, S::add(d1, d5)),
            ),
        ]
    }
}

/// `A^T x` (the table `AT4`) of six vectors on AVX-512F, as the kernels
/// compute it ([`at4_simd`]).
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn at4(x: &[std::arch::x86_64::__m512; 6]) -> [std::arch::x86_64::__m512; 4] {
    // SAFETY: the caller's contract.
    unsafe { at4_simd::<Avx512>(x) }
}

/// `A^T x` (the table `AT4`) of six vectors, written out.
///
/// # Safety
/// The CPU supports `S`'s instructions.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn at4_simd<S: Simd>(x: &[S::V; 6]) -> [S::V; 4] {
    // SAFETY: the caller's contract.
    unsafe {
        let [m0, m1, m2, m3, m4, m5] = *x;
        let (a, b) = (S::add(m1, m2), S::sub(m1, m2));
        [
            S::add(S::add(m0, a), S::add(m3, m4)),
            S::fmadd(S::splat(2.0), m3, S::fmadd(S::splat(-0.5), m4, b)),
            S::fmadd(S::splat(4.0), m3, S::fmadd(S::splat(0.25), m4, a)),
            S::fmadd(
                S::splat(8.0),
                m3,
                S::fmadd(S::splat(-0.125), m4, S::add(b, m5)),
            ),
        ]
    }
}

/// F(4x4, 3x3) input transform `V = B^T d B` ([`bt4_simd`]) of one 6x6 tile for
/// one register of channels: reads pixel (r, c) at
/// `src + r * row_stride + c * pixel_stride`, returns position `6 i + j` at
/// `[i][j]`.
///
/// # Safety
/// The CPU supports `S`'s instructions; the reads are in bounds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn wide_transform_simd<S: Simd>(
    src: *const f32,
    row_stride: usize,
    pixel_stride: usize,
) -> [[S::V; 6]; 6] {
    // SAFETY: in bounds by the function's contract. (Loops, not closures:
    // a closure would not inherit the caller's target features.)
    unsafe {
        // t = B^T d, one column of d at a time, stored transposed: t[i][c].
        let mut t = [[S::zero(); 6]; 6];
        for c in 0..6 {
            let mut col = [S::zero(); 6];
            for (r, v) in col.iter_mut().enumerate() {
                *v = S::load(src.add(r * row_stride + c * pixel_stride));
            }
            for (row, v) in t.iter_mut().zip(bt4_simd::<S>(&col)) {
                row[c] = v;
            }
        }
        // V = t B: row i of V is B^T applied to row i of t.
        let mut v = [[S::zero(); 6]; 6];
        for (row, out) in t.iter().zip(v.iter_mut()) {
            *out = bt4_simd::<S>(row);
        }
        v
    }
}

/// F(4x4, 3x3) input transform ([`wide_transform_simd`]) of one 6x6 tile
/// for 16 channels, rounded to bfloat16: writes position p (32 bytes) at
/// `dst + p * pos_stride`.
///
/// # Safety
/// The CPU supports AVX-512F and AVX512-BF16; the reads and writes are in
/// bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn wide_input_bf16(
    src: *const f32,
    row_stride: usize,
    pixel_stride: usize,
    dst: *mut u16,
    pos_stride: usize,
) {
    // SAFETY: in bounds by the function's contract.
    let v = unsafe { wide_transform_simd::<Avx512>(src, row_stride, pixel_stride) };
    for (i, row) in v.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            unsafe { store_bf16(dst.add((i * 6 + j) * pos_stride), *v) };
        }
    }
}

/// F(4x4, 3x3) input transform ([`wide_transform_simd`]) of one 6x6 tile
/// for 16 channels, in f32: writes position p at `dst + p * pos_stride`.
///
/// # Safety
/// The CPU supports AVX-512F; the reads and writes are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wide_input(
    src: *const f32,
    row_stride: usize,
    pixel_stride: usize,
    dst: *mut f32,
    pos_stride: usize,
) {
    // SAFETY: in bounds by the function's contract.
    unsafe {
        let v = wide_transform_simd::<Avx512>(src, row_stride, pixel_stride);
        for (i, row) in v.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                Avx512::store(dst.add((i * 6 + j) * pos_stride), *v);
            }
        }
    }
}

/// F(4x4, 3x3) input transform on AVX2 with FMA, in f32, for all `cin`
/// channels of a tile (a multiple of 8, `cin` apart from pixel to pixel):
/// position p of channel c at `dst + p * pos_stride + c`.
///
/// # Safety
/// The CPU supports AVX2 and FMA; the reads and writes are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wide_input_avx2(
    src: *const f32,
    row_stride: usize,
    cin: usize,
    dst: *mut f32,
    pos_stride: usize,
) {
    for c in (0..cin).step_by(Avx2::LANES) {
        // SAFETY: in bounds by the function's contract.
        unsafe {
            let v = wide_transform_simd::<Avx2>(src.add(c), row_stride, cin);
            for (i, row) in v.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    Avx2::store(dst.add((i * 6 + j) * pos_stride + c), *v);
                }
            }
        }
    }
}

/// F(4x4, 3x3) output transform `Y = A^T M A` ([`at4_simd`]) of one tile for 16
/// channels (position p read at `src + p * pos_stride`), then each 2x2
/// window's max plus the bias, ReLU'd: pooled pixel q (row-major in the
/// tile's 2x2) written at `out + q * out_stride`.
///
/// # Safety
/// The CPU supports AVX-512F; the reads and the writes are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wide_output(
    src: *const f32,
    pos_stride: usize,
    bias: *const f32,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: the caller's contract.
    unsafe { wide_output_simd::<Avx512>(src, pos_stride, bias, out, out_stride) }
}

/// [`wide_output`] on AVX2 with FMA, for all `cout` channels of a tile (a
/// multiple of 8; pooled pixels `cout` apart).
///
/// # Safety
/// The CPU supports AVX2 and FMA; the reads and the writes are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wide_output_avx2(
    src: *const f32,
    pos_stride: usize,
    bias: *const f32,
    out: *mut f32,
    cout: usize,
) {
    for c in (0..cout).step_by(Avx2::LANES) {
        // SAFETY: in bounds by the function's contract.
        unsafe { wide_output_simd::<Avx2>(src.add(c), pos_stride, bias.add(c), out.add(c), cout) };
    }
}

/// [`wide_output`] for any register width.
///
/// # Safety
/// The CPU supports `S`'s instructions; the reads and the writes are in
/// bounds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn wide_output_simd<S: Simd>(
    src: *const f32,
    pos_stride: usize,
    bias: *const f32,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: in bounds by the function's contract.
    unsafe {
        // s = A^T M, one column of M at a time, stored transposed: s[i][c].
        let mut s = [[S::zero(); 6]; 4];
        for c in 0..6 {
            let mut col = [S::zero(); 6];
            for (r, v) in col.iter_mut().enumerate() {
                *v = S::load(src.add((r * 6 + c) * pos_stride));
            }
            for (row, v) in s.iter_mut().zip(at4_simd::<S>(&col)) {
                row[c] = v;
            }
        }
        // Y = s A: row i of Y is A^T applied to row i of s.
        let mut y = [[S::zero(); 4]; 4];
        for (row, out) in s.iter().zip(y.iter_mut()) {
            *out = at4_simd::<S>(row);
        }
        let b = S::load(bias);
        for q in 0..4 {
            let (r, c) = (2 * (q / 2), 2 * (q % 2));
            let best = S::max(
                S::max(y[r][c], y[r][c + 1]),
                S::max(y[r + 1][c], y[r + 1][c + 1]),
            );
            S::store(out.add(q * out_stride), S::max(S::add(best, b), S::zero()));
        }
    }
}

/// Input transform `V = B^T d B` of one 4x4 tile for 16 channels: reads
/// pixel (r, c) at `src + r * row_stride + c * pixel_stride` and returns the
/// 16 positions.
///
/// # Safety
/// The CPU supports AVX-512F; the reads are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn wino_transform(
    src: *const f32,
    row_stride: usize,
    pixel_stride: usize,
) -> [std::arch::x86_64::__m512; WINO] {
    // SAFETY: the caller's contract.
    unsafe { wino_transform_simd::<Avx512>(src, row_stride, pixel_stride) }
}

/// [`wino_transform`] for any register width.
///
/// # Safety
/// The CPU supports `S`'s instructions; the reads are in bounds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn wino_transform_simd<S: Simd>(
    src: *const f32,
    row_stride: usize,
    pixel_stride: usize,
) -> [S::V; WINO] {
    // SAFETY: in bounds by the function's contract. (No closures here: they
    // would not inherit the caller's target features.)
    unsafe {
        let mut d = [[S::zero(); 4]; 4];
        for (r, row) in d.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = S::load(src.add(r * row_stride + c * pixel_stride));
            }
        }
        // t = B^T d (over rows), then V = t B (over columns).
        let mut t = [[S::zero(); 4]; 4];
        for c in 0..4 {
            t[0][c] = S::sub(d[0][c], d[2][c]);
            t[1][c] = S::add(d[1][c], d[2][c]);
            t[2][c] = S::sub(d[2][c], d[1][c]);
            t[3][c] = S::sub(d[1][c], d[3][c]);
        }
        let mut v = [S::zero(); WINO];
        for (r, row) in t.iter().enumerate() {
            v[4 * r] = S::sub(row[0], row[2]);
            v[4 * r + 1] = S::add(row[1], row[2]);
            v[4 * r + 2] = S::sub(row[2], row[1]);
            v[4 * r + 3] = S::sub(row[1], row[3]);
        }
        v
    }
}

/// F(2x2, 3x3) input transform ([`wino_transform`]) of one 4x4 tile for 16
/// channels, rounded to bfloat16: position p (32 bytes) written at
/// `dst + p * pos_stride`.
///
/// # Safety
/// The CPU supports AVX-512F and AVX512-BF16; the reads and writes are in
/// bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn wino_input_bf16(
    src: *const f32,
    row_stride: usize,
    pixel_stride: usize,
    dst: *mut u16,
    pos_stride: usize,
) {
    // SAFETY: in bounds by the function's contract.
    let v = unsafe { wino_transform(src, row_stride, pixel_stride) };
    for (p, v) in v.into_iter().enumerate() {
        unsafe { store_bf16(dst.add(p * pos_stride), v) };
    }
}

/// Output transform `Y = A^T M A` of one tile for 16 channels (position p
/// read at `src + p * pos_stride`), then the max of the 2x2 outputs plus the
/// bias, ReLU'd, into `out`.
///
/// # Safety
/// The CPU supports AVX-512F; the reads and the write are in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wino_output(src: *const f32, pos_stride: usize, bias: *const f32, out: *mut f32) {
    // SAFETY: the caller's contract.
    unsafe { wino_output_simd::<Avx512>(src, pos_stride, bias, out) }
}

/// [`wino_output`] for any register width.
///
/// # Safety
/// The CPU supports `S`'s instructions; the reads and the write are in
/// bounds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn wino_output_simd<S: Simd>(
    src: *const f32,
    pos_stride: usize,
    bias: *const f32,
    out: *mut f32,
) {
    // SAFETY: in bounds by the function's contract.
    unsafe {
        let mut m = [S::zero(); WINO];
        for (p, v) in m.iter_mut().enumerate() {
            *v = S::load(src.add(p * pos_stride));
        }
        // s = A^T m (over rows): 2x4.
        let mut s = [[S::zero(); 4]; 2];
        for j in 0..4 {
            let (a, b, c, d) = (m[j], m[4 + j], m[8 + j], m[12 + j]);
            s[0][j] = S::add(S::add(a, b), c);
            s[1][j] = S::sub(S::sub(b, c), d);
        }
        let mut best = S::splat(f32::NEG_INFINITY);
        for r in &s {
            let y0 = S::add(S::add(r[0], r[1]), r[2]);
            let y1 = S::sub(S::sub(r[1], r[2]), r[3]);
            best = S::max(best, S::max(y0, y1));
        }
        let y = S::max(S::add(best, S::load(bias)), S::zero());
        S::store(out, y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::numbers;

    /// The network in plain loops: 3x3 convolution (zero padding), bias,
    /// 2x2 max-pool, ReLU per block; global average pool; linear layer.
    fn plain_logits(
        side: usize,
        mut cin: usize,
        picture: &[f32],
        convs: &[(Vec<f32>, Vec<f32>)],
        (fc_w, fc_b): (&[f32], &[f32]),
    ) -> Vec<f32> {
        let (mut side, mut map) = (side, picture.to_vec());
        for (w, b) in convs {
            let cout = b.len();
            let half = side / 2;
            let mut next = vec![f32::NEG_INFINITY; half * half * cout];
            for y in 0..side {
                for x in 0..side {
                    for co in 0..cout {
                        let mut acc = b[co];
                        for (ky, kx) in (0..3).flat_map(|ky| (0..3).map(move |kx| (ky, kx))) {
                            let (iy, ix) = ((y + ky).wrapping_sub(1), (x + kx).wrapping_sub(1));
                            if iy >= side || ix >= side {
                                continue;
                            }
                            for ci in 0..cin {
                                acc += map[(iy * side + ix) * cin + ci]
                                    * w[((co * cin + ci) * 3 + ky) * 3 + kx];
                            }
                        }
                        let at = &mut next[((y / 2) * half + x / 2) * cout + co];
                        *at = at.max(acc);
                    }
                }
            }
            next.iter_mut().for_each(|v| *v = v.max(0.0));
            (side, cin, map) = (half, cout, next);
        }
        let pooled: Vec<f32> = (0..cin)
            .map(|c| map.iter().skip(c).step_by(cin).sum::<f32>() / (side * side) as f32)
            .collect();
        fc_b.iter()
            .enumerate()
            .map(|(l, b)| {
                b + (0..cin)
                    .map(|f| pooled[f] * fc_w[f * fc_b.len() + l])
                    .sum::<f32>()
            })
            .collect()
    }

    #[test]
    fn every_instruction_set_computes_the_plain_network() {
        // Geometries whose blocks take every f32 register tile: direct
        // first blocks of 1 and 2 registers; F(4x4, 3x3) strips of 4 tiles
        // (an 8x8 map) times 1, 2 and 3 registers, of 8 tiles times 2 and
        // 3, and of 16 tiles times 1 (on AVX-512; AVX2 splits them its own
        // way); and a network of one (direct) block, pooled straight into
        // the global average.
        for (side, channels) in [
            (32, vec![16, 48, 32]),
            (16, vec![32, 16]),
            (16, vec![16, 48]),
            (64, vec![16, 32, 16, 16]),
            (8, vec![16]),
        ] {
            let mut cin = 3;
            let convs: Vec<(Vec<f32>, Vec<f32>)> = channels
                .iter()
                .enumerate()
                .map(|(i, &cout)| {
                    let scale = 1.0 / (9.0 * cin as f32).sqrt();
                    let w = numbers(cout * cin * TAPS, i as u64 + 1);
                    let w = w.into_iter().map(|v| v * 2.0 * scale).collect();
                    cin = cout;
                    (w, numbers(cout, i as u64 + 50))
                })
                .collect();
            let fc = (numbers(cin * 2, 99), numbers(2, 98));
            let pictures = numbers(2 * side * side * 3, 7);
            let want: Vec<f32> = pictures
                .chunks_exact(side * side * 3)
                .flat_map(|p| plain_logits(side, 3, p, &convs, (&fc.0, &fc.1)))
                .collect();
            for isa in [Isa::Avx512, Isa::Avx2] {
                let Some(net) = DirectNet::on(isa, (side, 3), &convs, fc.clone(), Precision::F32)
                else {
                    eprintln!("this CPU does not run {isa:?}");
                    continue;
                };
                let got = net.logits(&pictures, 1);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-4,
                        "{isa:?} {channels:?}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn wide_transforms_compute_a_3x3_convolution() {
        // A^T [(G g) ⊙ (B^T d)] is the 3-tap correlation of d with g, for
        // every basis filter and input: output i, tap k, input l = i + k.
        let cases = (0..4).flat_map(|i| (0..3).flat_map(move |k| (0..6).map(move |l| (i, k, l))));
        for (i, k, l) in cases {
            let sum: f64 = (0..6)
                .map(|j| f64::from(AT4[i][j]) * G4[j][k] * f64::from(BT4[j][l]))
                .sum();
            let want = if l == i + k { 1.0 } else { 0.0 };
            assert!((sum - want).abs() < 1e-12, "({i}, {k}, {l}): {sum}");
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn written_out_transforms_are_the_matrices() {
        use std::arch::x86_64::*;
        if Isa::detect() != Some(Isa::Avx512) {
            eprintln!("this CPU has no AVX-512F: nothing to check");
            return;
        }
        let x = [0.75f32, -1.25, 2.5, 0.125, -3.0, 1.5];
        // SAFETY: AVX-512F was found above.
        let (b, a) = unsafe {
            let v: [__m512; 6] = std::array::from_fn(|j| _mm512_set1_ps(x[j]));
            (bt4(&v), at4(&v))
        };
        let lane = |v: __m512| {
            let mut out = [0f32; 16];
            // SAFETY: 16 values.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
            out[7]
        };
        for (row, v) in BT4.iter().zip(b) {
            let want: f32 = row.iter().zip(&x).map(|(c, x)| c * x).sum();
            assert!((lane(v) - want).abs() < 1e-5, "{} against {want}", lane(v));
        }
        for (row, v) in AT4.iter().zip(a) {
            let want: f32 = row.iter().zip(&x).map(|(c, x)| c * x).sum();
            assert!((lane(v) - want).abs() < 1e-5, "{} against {want}", lane(v));
        }
    }
}

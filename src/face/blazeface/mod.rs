//! The BlazeFace short-range ("front", 128x128) detector network on the CPU:
//! a 5x5 stride-2 stem, sixteen BlazeBlocks (depthwise 3x3, pointwise 1x1,
//! skip, ReLU) and four 1x1 heads, producing the raw outputs that
//! [`super::decode`] turns into faces.
//!
//! Each BlazeBlock runs fused, one output row at a time: the depthwise row
//! goes into a small buffer, the pointwise product of that row (AVX-512 or
//! AVX2 register tiles, or a portable loop)
//! gets the bias, the skip (max-pooled for stride 2) and ReLU, and is written
//! straight into the zero-bordered input of the next block. On AMX tiles
//! ([`Kernels::Amx`]) a pass takes as many rows as make 16 pixels, and the
//! stem and heads run as tile products too. Channels are padded to
//! multiples of 16 with zero weights, so every row is whole registers. A
//! picture's activations stay in a per-thread scratch kept by the network;
//! the hot path does not allocate.
//!
//! This module knows the network and its weights file; it does not decode
//! boxes, pick faces or touch pictures (see [`super::decode`], [`mod@super::align`]).
//!
//! The stages live in their own files: `stem.rs` runs the 5x5 stem,
//! `block.rs` one BlazeBlock row by row, `depthwise.rs` its 3x3 rows,
//! `pointwise.rs` the 1x1 products (the stem's, the blocks' and the heads')
//! and `strip.rs` their register tiles; `heads.rs` runs the four heads and
//! lays their outputs out per anchor.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use crate::model::Precision;
use crate::model::aligned::AlignedBuf;
use crate::model::simd::Isa;

#[cfg(target_arch = "x86_64")]
use crate::model::amx::Tiles;
#[cfg(target_arch = "x86_64")]
use block::run_block_amx;
use block::{Block, amx_pixels, run_block};
use heads::{HEAD8_STRIDE, HEAD16_STRIDE, anchors_for, head, to_anchors};
use pointwise::{Pointwise, STRIP, Staging};
use stem::{STEM_OUT, Stem};

/// Without AMX, nothing configures tiles.
#[cfg(not(target_arch = "x86_64"))]
type Tiles = ();

mod block;
mod depthwise;
mod heads;
mod pointwise;
mod stem;
#[cfg(target_arch = "x86_64")]
mod strip;

/// Register width in f32 lanes: channel counts are padded to a multiple.
const LANES: usize = 16;
/// Anchors of the front model at its own 128x128 input: 16x16 cells x 2
/// plus 8x8 cells x 6.
pub const ANCHORS: usize = 896;
/// Raw numbers per anchor: box (4) and six landmarks (12).
pub const COORDS: usize = 16;

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
    /// [`Kernels::Avx512`] with the 1x1 products (the stem's, the blocks'
    /// and the heads') on AMX tiles in bfloat16 (inputs and weights rounded,
    /// sums in f32; Intel Xeons since Sapphire Rapids). The depthwise rows
    /// stay on AVX-512.
    Amx,
    /// AVX2 and FMA register tiles, in f32 (x86-64 CPUs without AVX-512).
    Avx2,
    /// Plain Rust loops, any CPU.
    Portable,
}

impl Kernels {
    /// The fastest kernels this CPU runs: those of
    /// [`Precision::fastest`].
    pub fn best() -> Self {
        Self::for_precision(Precision::fastest())
    }

    /// The fastest kernels this CPU runs at f32 (the reference precision).
    pub fn best_f32() -> Self {
        Self::for_precision(Precision::F32)
    }

    /// The fastest kernels this CPU runs at `precision`, or at f32 where it
    /// has no bfloat16 products: AMX tiles where the CPU has them (Intel),
    /// else AVX512-BF16.
    pub fn for_precision(precision: Precision) -> Self {
        if precision == Precision::Bf16 && Precision::Bf16.available() {
            return if crate::model::amx::available() {
                Kernels::Amx
            } else {
                Kernels::Avx512Bf16
            };
        }
        match Isa::detect() {
            Some(Isa::Avx512) => Kernels::Avx512,
            Some(Isa::Avx2) => Kernels::Avx2,
            None => Kernels::Portable,
        }
    }

    /// Whether this CPU runs these kernels.
    pub fn runs_here(self) -> bool {
        match self {
            Kernels::Avx512Bf16 => Precision::Bf16.available(),
            Kernels::Amx => Precision::Bf16.available() && crate::model::amx::available(),
            Kernels::Avx512 => Isa::detect() == Some(Isa::Avx512),
            Kernels::Avx2 => Isa::detect().is_some(),
            Kernels::Portable => true,
        }
    }
}

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
    /// One depthwise row (f32, or bfloat16 for [`Kernels::Avx512Bf16`] and
    /// [`Kernels::Amx`], which takes as many rows as make a tile of 16
    /// pixels, and rounds a head's whole map here) and one max-pooled (skip)
    /// row (as many).
    dw_row: AlignedBuf,
    dw_row16: Vec<u16>,
    pool_row: AlignedBuf,
    /// The AMX tile products of one pass (a block's rows, a stem row or a
    /// head's map), before bias, skip and ReLU.
    products: AlignedBuf,
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
        let stem = Stem::from_pytorch(&stem_w, &stem_b);

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
        // Pixels of one pass: a map row, or one AMX pass (block::amx_pixels).
        let row = self
            .blocks
            .iter()
            .map(|b| amx_pixels(b.out_side()))
            .fold(stem_side, usize::max);
        // Pixels of the heads' AMX products (whole maps).
        let heads = [m16, m8]
            .map(|m| (m * m).next_multiple_of(LANES))
            .into_iter()
            .fold(row, usize::max);
        let maps = [AlignedBuf::zeroed(largest), AlignedBuf::zeroed(largest)];
        let input = ((self.side + 3).pow(2) * 3 + 1).next_multiple_of(LANES);
        Scratch {
            input: vec![0f32; input],
            input16: vec![0u16; input],
            maps,
            dw_row: AlignedBuf::zeroed(stem_side * widest),
            dw_row16: vec![0; heads * widest],
            pool_row: AlignedBuf::zeroed(row * widest),
            products: AlignedBuf::zeroed(heads * widest),
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
        // SAFETY: `Kernels::Amx` runs here (checked when the network was
        // built), so AMX is available.
        #[cfg(target_arch = "x86_64")]
        let tiles = (self.kernels == Kernels::Amx)
            .then(|| unsafe { crate::model::amx::Tiles::configure() });
        #[cfg(not(target_arch = "x86_64"))]
        let tiles: Option<()> = None;
        self.stem(s, tiles.as_ref());
        let [first, second] = &mut s.maps;
        let (mut input, mut output) = (first, second);
        for (i, block) in self.blocks.iter().enumerate() {
            match &tiles {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AMX, AVX-512F and AVX512-BF16 (`Kernels::Amx` runs
                // here); the tiles are configured; the scratch was made for
                // this network's passes (`new_scratch`).
                Some(tiles) => unsafe {
                    let bufs = (
                        &mut s.dw_row16[..],
                        &mut s.pool_row[..],
                        &mut s.products[..],
                    );
                    run_block_amx(block, tiles, input, output, bufs)
                },
                _ => run_block(
                    block,
                    self.kernels,
                    input,
                    output,
                    (&mut s.dw_row, &mut s.dw_row16, &mut s.pool_row),
                    &mut s.staging,
                ),
            }
            // Heads: 16x16 map after backbone1, 8x8 map after backbone2.
            if i + 1 == self.backbone1 {
                let out = &mut s.head16;
                let bufs = (&mut s.dw_row16[..], &mut s.products[..], &mut s.staging);
                head(
                    &self.head16,
                    self.kernels,
                    tiles.as_ref(),
                    output,
                    m16,
                    out,
                    bufs,
                );
            }
            std::mem::swap(&mut input, &mut output);
        }
        let bufs = (&mut s.dw_row16[..], &mut s.products[..], &mut s.staging);
        let out = &mut s.head8;
        head(
            &self.head8,
            self.kernels,
            tiles.as_ref(),
            input,
            m8,
            out,
            bufs,
        );
        let heads = [
            (&s.head16[..], m16, self.head16.cout_p),
            (&s.head8[..], m8, self.head8.cout_p),
        ];
        to_anchors(heads, boxes, logits);
    }
}

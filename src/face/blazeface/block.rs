//! One BlazeBlock, fused and row by row: the depthwise row
//! ([`super::depthwise`]), its pointwise product ([`super::pointwise`]) with
//! bias, skip (max-pooled at stride 2) and ReLU, written straight into the
//! zero-bordered map the next block reads.
//!
//! It does not own the maps or know the network's order of blocks.

use super::Kernels;
use super::depthwise::depthwise_row;
#[cfg(target_arch = "x86_64")]
use super::depthwise::{depthwise_row_avx2, depthwise_row_avx512, depthwise_row_bf16};
use super::pointwise::{Epilogue, Input, Pointwise, Staging, Values};

/// One BlazeBlock: depthwise 3x3 (stride 1 or 2), pointwise, skip, ReLU.
#[derive(Clone)]
pub(super) struct Block {
    /// Input side; the output side is `side / stride`.
    pub(super) side: usize,
    pub(super) stride: usize,
    pub(super) cin: usize,
    pub(super) cin_p: usize,
    /// Depthwise weights `[9][cin_p]` and bias `[cin_p]`.
    pub(super) dw_w: Vec<f32>,
    pub(super) dw_b: Vec<f32>,
    pub(super) pw: Pointwise,
}

impl Block {
    pub(super) fn out_side(&self) -> usize {
        self.side / self.stride
    }

    pub(super) fn flops(&self) -> u64 {
        let px = self.out_side() * self.out_side();
        2 * (9 * self.cin * px) as u64 + self.pw.flops(px)
    }
}

/// One BlazeBlock, row by row, from `input` (bordered, `cin_p` channels) into
/// `output` (bordered, `cout_p` channels).
pub(super) fn run_block(
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
            // SAFETY: AVX-512F present (`Kernels::best`); the AMX kernels
            // take `run_block_amx`, this is their f32 fallback.
            Kernels::Avx512 | Kernels::Amx => unsafe {
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
                // The portable kernels (and any other where a caller did not
                // take the AMX path).
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

/// One BlazeBlock with its pointwise products on AMX tiles: the depthwise
/// rows (rounded to bfloat16) of as many output rows as make 16 pixels, or
/// of one row where a row holds 16 or more, then one tile product over
/// them (rounded up to whole tiles of 16 pixels; the rows past the last
/// pixel hold earlier values and their products are not read), then bias,
/// skip and ReLU into `output`, as [`run_block`] does.
///
/// # Safety
/// The CPU has AVX-512F, AVX512-BF16 and AMX-BF16 (`Kernels::Amx`), and
/// `tiles` were configured on this thread. `dw16` and `pool` hold the
/// depthwise and pool values of [`amx_pixels`] pixels of `cin_p` values,
/// `products` their products (`cout_p` values each).
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn run_block_amx(
    b: &Block,
    tiles: &crate::model::amx::Tiles,
    input: &[f32],
    output: &mut [f32],
    (dw16, pool, products): (&mut [u16], &mut [f32], &mut [f32]),
) {
    let (cin_p, cout_p) = (b.cin_p, b.pw.cout_p);
    let in_row = (b.side + 2) * cin_p;
    let out_side = b.out_side();
    let out_row = (out_side + 2) * cout_p;
    let rows = amx_rows(out_side);
    let n = rows * out_side;
    let padded = amx_pixels(out_side);
    assert!(dw16.len() >= padded * cin_p && pool.len() >= n * cin_p);
    let dense = crate::model::amx::Rows::dense(cin_p);
    clear_border(output, out_side, cout_p);
    for y0 in (0..out_side).step_by(rows) {
        let here = rows.min(out_side - y0);
        for r in 0..here {
            let at = r * out_side * cin_p;
            // SAFETY: AVX512-BF16 (the caller's contract); the row's
            // buffers are checked by the row itself.
            unsafe { depthwise_row_bf16(b, input, y0 + r, &mut dw16[at..], &mut pool[at..]) };
        }
        // SAFETY: the tiles (the caller's contract); the product reads
        // `padded` pixels of `dw16`, checked above.
        unsafe { b.pw.product_amx(tiles, dw16, dense, padded, products) };
        for r in 0..here {
            let y = y0 + r;
            let skip: &[f32] = if b.stride == 1 {
                &input[(y + 1) * in_row + cin_p..][..out_side * cin_p]
            } else {
                &pool[r * out_side * cin_p..][..out_side * cin_p]
            };
            let dst = &mut output[(y + 1) * out_row + cout_p..][..out_side * cout_p];
            let then = Epilogue::BiasSkipRelu(skip, cin_p);
            let from = &products[r * out_side * cout_p..];
            // SAFETY: AVX-512F (the caller's contract).
            unsafe { b.pw.finish(from, out_side, then, dst) };
        }
    }
}

/// Pixels one AMX pass of a block with `out_side`-pixel rows runs: whole
/// rows up to 16 pixels (one row where a row holds more), rounded up to
/// whole tiles of 16.
pub(super) fn amx_pixels(out_side: usize) -> usize {
    (amx_rows(out_side) * out_side).next_multiple_of(16)
}

/// Output rows one AMX pass takes: as many as make 16 pixels, at least one.
fn amx_rows(out_side: usize) -> usize {
    (16 / out_side).clamp(1, out_side)
}

/// Zeroes the one-pixel border of a `side x side` map of `channels` lanes
/// per pixel: the map's buffer last held another layer's activations in
/// another layout, and the border is the next block's padding. The
/// interior is written whole, padded lanes included (zero weights give zero).
pub(super) fn clear_border(map: &mut [f32], side: usize, channels: usize) {
    let row = (side + 2) * channels;
    map[..row].fill(0.0);
    map[(side + 1) * row..][..row].fill(0.0);
    for y in 1..=side {
        map[y * row..][..channels].fill(0.0);
        map[y * row + (side + 1) * channels..][..channels].fill(0.0);
    }
}

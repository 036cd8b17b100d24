//! The detector's four 1x1 heads (scores and boxes on the 16x16 and the
//! 8x8 maps at 128), their anchors, and the layout of their outputs per
//! anchor that [`super::super::decode`] reads. It does not decode boxes.

use super::pointwise::{Epilogue, Input, Pointwise, Staging, Values};
use super::{COORDS, Kernels, LANES, Tiles};

/// Input pixels per cell of the first two heads' map (16x16 at 128) and of
/// the last two heads' (8x8 at 128).
pub(super) const HEAD16_STRIDE: usize = 8;
pub(super) const HEAD8_STRIDE: usize = 16;
/// Anchors per cell of each pair of heads.
pub(super) const HEAD16_PER_CELL: usize = 2;
pub(super) const HEAD8_PER_CELL: usize = 6;

/// A head's 1x1 convolution over every pixel of a bordered map; on AMX
/// tiles where `tiles` are given (the map rounded to bfloat16 into `map16`,
/// one product for the whole map into `products`, then the bias).
pub(super) fn head(
    pw: &Pointwise,
    kernels: Kernels,
    tiles: Option<&Tiles>,
    map: &[f32],
    side: usize,
    out: &mut [f32],
    (map16, products, staging): (&mut [u16], &mut [f32], &mut Staging),
) {
    let row = (side + 2) * pw.cin_p;
    #[cfg(target_arch = "x86_64")]
    if let Some(tiles) = tiles {
        let (n, c) = (side * side, pw.cin_p);
        let padded = n.next_multiple_of(LANES);
        assert!(map16.len() >= padded * c && out.len() >= n * pw.cout_p);
        // SAFETY: AMX, AVX-512F and AVX512-BF16 (`Kernels::Amx` runs here),
        // the tiles configured by the caller; each row rounds `side * c`
        // values (a multiple of 16) into room checked above; the product
        // reads `padded` pixels of `map16` (the rows past `n` hold earlier
        // values, whose products are not read) and `product_amx` and
        // `finish` check their slices.
        unsafe {
            for y in 0..side {
                let from = &map[(y + 1) * row + c..][..side * c];
                crate::model::direct::round_bf16(from, &mut map16[y * side * c..][..side * c]);
            }
            let dense = crate::model::amx::Rows::dense(c);
            pw.product_amx(tiles, map16, dense, padded, products);
            pw.finish(products, n, Epilogue::Bias, out);
        }
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (tiles, map16, products);
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
pub(super) fn anchors_for(side: usize) -> Vec<[f32; 4]> {
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

/// Copies the heads' outputs, `(map, side, width)` for the 16x16 and the
/// 8x8 map (each pixel `width` values: its anchors' scores, then their
/// boxes), into one score per anchor in `logits` and [`COORDS`] numbers per
/// anchor in `boxes`, in the anchors' order.
pub(super) fn to_anchors(
    heads: [(&[f32], usize, usize); 2],
    boxes: &mut [f32],
    logits: &mut [f32],
) {
    let mut anchor = 0;
    for ((map, side, width), per_cell) in heads.into_iter().zip([HEAD16_PER_CELL, HEAD8_PER_CELL]) {
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

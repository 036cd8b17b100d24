//! The detector's 5x5 stride-2 stem (3 -> 24 channels, ReLU) as a pointwise
//! product whose taps read each output pixel's window straight from the
//! normalised picture. It knows nothing of the blocks after it.

use super::block::clear_border;
use super::pointwise::{Epilogue, Input, Pointwise, Taps, Values};
use super::{BlazeFace, Kernels, LANES, Scratch, Tiles};

/// The 5x5 stride-2 stem: 3 -> 24 channels, a pointwise product whose
/// taps read each pixel's window straight from the picture (see [`Taps`]),
/// with weights `[5][16][32]` (the 16th tap of each window row zero).
#[derive(Clone)]
pub(super) struct Stem {
    pub(super) pw: Pointwise,
}

/// Taps per window row of the stem: 5 pixels of 3 channels, and one of
/// zero weight, so the rows pair up for the bfloat16 kernels.
pub(super) const STEM_ROW: usize = 16;
/// Stem output channels (before padding).
pub(super) const STEM_OUT: usize = 24;

impl Stem {
    /// The stem from PyTorch's `[24][3][5][5]` weights and 24 biases: taps
    /// ordered (row, column, channel), [`STEM_ROW`] per window row.
    pub(super) fn from_pytorch(weights: &[f32], bias: &[f32]) -> Self {
        let taps = 5 * STEM_ROW;
        let mut rows = vec![0f32; STEM_OUT * taps];
        for co in 0..STEM_OUT {
            for c in 0..3 {
                for i in 0..5 {
                    for j in 0..5 {
                        rows[co * taps + i * STEM_ROW + j * 3 + c] =
                            weights[((co * 3 + c) * 5 + i) * 5 + j];
                    }
                }
            }
        }
        Self {
            pw: Pointwise::new(&rows, bias, taps, STEM_OUT),
        }
    }
}

impl BlazeFace {
    /// 5x5 stride-2 convolution with ReLU into the first map (on AMX
    /// tiles where `tiles` are given and a map row is whole tiles).
    pub(super) fn stem(&self, s: &mut Scratch, tiles: Option<&Tiles>) {
        let out_side = self.side / 2;
        let in_row = (self.side + 3) * 3;
        let cout_p = self.stem.pw.cout_p;
        let map_stride = (out_side + 2) * cout_p;
        clear_border(&mut s.maps[0], out_side, cout_p);
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = tiles.filter(|_| out_side.is_multiple_of(LANES)) {
            // Output pixel x's window: five runs of 16 values from input
            // row 2y + i, column 2x, 6 values from one pixel's to the next's.
            let rows = crate::model::amx::Rows {
                stride: 2 * 3,
                runs: 5,
                pitch: in_row,
            };
            // SAFETY: AMX, AVX-512F and AVX512-BF16 (`Kernels::Amx` runs
            // here), the tiles configured by the caller; `input16` holds as
            // many values as `input`; `product_amx` and `finish` check their
            // slices.
            unsafe {
                crate::model::direct::round_bf16(&s.input, &mut s.input16);
                for y in 0..out_side {
                    let input = &s.input16[2 * y * in_row..];
                    let products = &mut s.products[..out_side * cout_p];
                    self.stem
                        .pw
                        .product_amx(tiles, input, rows, out_side, products);
                    let dst = &mut s.maps[0][(y + 1) * map_stride + cout_p..][..out_side * cout_p];
                    self.stem
                        .pw
                        .finish(products, out_side, Epilogue::BiasRelu, dst);
                }
            }
            return;
        }
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

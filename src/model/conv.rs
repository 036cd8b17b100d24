//! The fast CPU convolution: 3x3 "same" convolutions in NHWC layout, computed as
//! one im2col copy feeding one `matmul`, and a 2x2 max-pool in the same layout.
//!
//! Both are candle custom ops with their own backward pass (`col2im` for the
//! unfold, gradient routing to the arg-max for the pool), so the network
//! built from them stays differentiable through candle's autograd. They run
//! on CPU storage only; on other devices the model uses candle's `conv2d`
//! (see [`super::ConvImpl`]). The unfold and its adjoint are also offered on
//! plain slices, for the training step of [`super::backprop`].
//!
//! This module knows nothing of the network: it offers tensor operations only.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// Number of taps of a 3x3 kernel.
pub(super) const TAPS: usize = 9;

/// The f32 values of a contiguous CPU tensor; an error otherwise.
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fast conv ops need contiguous f32 input"),
    }
}

fn dims4(layout: &Layout) -> Result<(usize, usize, usize, usize)> {
    layout.shape().dims4()
}

/// Unfolds `[B, H, W, C]` into `[B*H*W, 9*C]` rows: for every output pixel, the
/// 3x3 neighbourhood (zero padded) in (ky, kx, c) order.
struct Im2col;

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "im2col3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = dims4(layout)?;
        let src = contiguous_f32(storage, layout)?;
        let row = TAPS * c;
        let mut dst = vec![0f32; b * h * w * row];
        let (pixels, values) = (h * w * c, h * w * row);
        for n in 0..b {
            let img = &src[n * pixels..][..pixels];
            let rows = &mut dst[n * values..][..values];
            unfold(img, rows, (h, w, c));
        }
        Ok((CpuStorage::F32(dst), Shape::from((b * h * w, row))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (b, h, w, c) = arg.dims4()?;
        let grad = grad_res
            .contiguous()?
            .apply_op1_no_bwd(&Col2im { b, h, w, c })?;
        Ok(Some(grad))
    }
}

/// The adjoint of [`Im2col`]: sums each row's taps back onto the input pixels.
struct Col2im {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "col2im3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Self { b, h, w, c } = *self;
        let src = contiguous_f32(storage, layout)?;
        let row = TAPS * c;
        if src.len() != b * h * w * row {
            candle_core::bail!("col2im: {} values for {b}x{h}x{w}x{c}", src.len());
        }
        let mut dst = vec![0f32; b * h * w * c];
        let (pixels, values) = (h * w * c, h * w * row);
        for n in 0..b {
            let rows = &src[n * values..][..values];
            let img = &mut dst[n * pixels..][..pixels];
            fold_add(rows, img, (h, w, c));
        }
        Ok((CpuStorage::F32(dst), Shape::from((b, h, w, c))))
    }
}

/// Writes the 3x3 windows of one `h x w x c` picture as unfolded rows
/// (`[h*w, 9*c]`); taps outside the picture are left as they are.
pub(super) fn unfold(img: &[f32], rows: &mut [f32], geometry: (usize, usize, usize)) {
    tap_runs(geometry, |to, from, len| {
        rows[to..to + len].copy_from_slice(&img[from..from + len]);
    });
}

/// Adds unfolded rows back onto the picture they came from (the adjoint of
/// [`unfold`]).
pub(super) fn fold_add(rows: &[f32], img: &mut [f32], geometry: (usize, usize, usize)) {
    tap_runs(geometry, |from, to, len| {
        for (d, s) in img[to..to + len].iter_mut().zip(&rows[from..from + len]) {
            *d += *s;
        }
    });
}

/// The 3x3 windows of one `h x w` picture of `c` channels, as runs:
/// `run(row_at, pixel_at, len)` for every output pixel and kernel row that
/// falls inside the picture, `len` values that lie at `row_at` in the
/// unfolded rows ([`Im2col`]) and at `pixel_at` in the picture. The three
/// horizontal taps of a kernel row are adjacent in both, so each run is
/// one copy.
fn tap_runs((h, w, c): (usize, usize, usize), mut run: impl FnMut(usize, usize, usize)) {
    let row = TAPS * c;
    for y in 0..h {
        for x in 0..w {
            let x0 = x.saturating_sub(1);
            let x1 = (x + 1).min(w - 1);
            let kx0 = x0 + 1 - x;
            let len = (x1 - x0 + 1) * c;
            for ky in 0..3 {
                let Some(sy) = (y + ky).checked_sub(1).filter(|&sy| sy < h) else {
                    continue;
                };
                run(
                    (y * w + x) * row + (ky * 3 + kx0) * c,
                    (sy * w + x0) * c,
                    len,
                );
            }
        }
    }
}

/// Reorders a conv weight `[Cout, Cin, 3, 3]` (candle's layout) into the
/// `[9*Cin, Cout]` matrix that multiplies `Im2col` rows. Differentiable.
pub fn weight_matrix(weight: &Tensor) -> Result<Tensor> {
    let (cout, cin, kh, kw) = weight.dims4()?;
    if (kh, kw) != (3, 3) {
        candle_core::bail!("fast conv supports 3x3 kernels, got {kh}x{kw}");
    }
    weight.permute((2, 3, 1, 0))?.reshape((TAPS * cin, cout))
}

/// A 3x3 convolution with zero padding 1 and stride 1 on an NHWC tensor
/// `[B, H, W, Cin]`, with `wmat` from [`weight_matrix`]; returns `[B, H, W, Cout]`.
/// Differentiable with respect to both arguments.
pub fn conv3x3_nhwc(x: &Tensor, wmat: &Tensor) -> Result<Tensor> {
    let (b, h, w, _) = x.dims4()?;
    let cout = wmat.dim(1)?;
    let cols = x.contiguous()?.apply_op1(Im2col)?;
    cols.matmul(wmat)?.reshape((b, h, w, cout))
}

/// 2x2 max-pool with stride 2 on an NHWC tensor (odd edges are dropped, as
/// candle's `max_pool2d` does). Differentiable.
pub fn max_pool2x2_nhwc(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool)
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "maxpool2x2_nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = dims4(layout)?;
        let src = contiguous_f32(storage, layout)?;
        let (oh, ow) = (h / 2, w / 2);
        let mut dst = vec![0f32; b * oh * ow * c];
        for n in 0..b {
            for y in 0..oh {
                for x in 0..ow {
                    let out = &mut dst[((n * oh + y) * ow + x) * c..][..c];
                    let at = |dy: usize, dx: usize| {
                        &src[((n * h + 2 * y + dy) * w + 2 * x + dx) * c..][..c]
                    };
                    let (a, b2, c2, d) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
                    for i in 0..c {
                        out[i] = a[i].max(b2[i]).max(c2[i].max(d[i]));
                    }
                }
            }
        }
        Ok((CpuStorage::F32(dst), Shape::from((b, oh, ow, c))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // Recompute the arg-max from the input and the pooled output.
        let routed = arg.apply_op3_no_bwd(res, &grad_res.contiguous()?, &MaxPoolBwd)?;
        Ok(Some(routed))
    }
}

/// Backward of [`MaxPool`]: the pool input `[B, H, W, C]`, the pooled
/// output and its gradient (both `[B, H/2, W/2, C]`) give the input gradient.
struct MaxPoolBwd;

impl CustomOp3 for MaxPoolBwd {
    fn name(&self) -> &'static str {
        "maxpool2x2_nhwc_bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = dims4(l1)?;
        let src = contiguous_f32(s1, l1)?;
        let pooled = contiguous_f32(s2, l2)?;
        let grads = contiguous_f32(s3, l3)?;
        let (oh, ow) = (h / 2, w / 2);
        if pooled.len() != b * oh * ow * c || grads.len() != pooled.len() {
            candle_core::bail!("maxpool backward: shape mismatch");
        }
        let mut dst = vec![0f32; b * h * w * c];
        for n in 0..b {
            for y in 0..oh {
                for x in 0..ow {
                    let at = ((n * oh + y) * ow + x) * c;
                    let (po, go) = (&pooled[at..at + c], &grads[at..at + c]);
                    for i in 0..c {
                        let (max, grad) = (po[i], go[i]);
                        // The first tap holding the maximum takes the gradient.
                        'taps: for dy in 0..2 {
                            for dx in 0..2 {
                                let idx = ((n * h + 2 * y + dy) * w + 2 * x + dx) * c + i;
                                if src[idx] == max {
                                    dst[idx] = grad;
                                    break 'taps;
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok((CpuStorage::F32(dst), Shape::from((b, h, w, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_diff;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Reference: candle's conv2d in NCHW, returned in NHWC.
    fn reference(x: &Tensor, w: &Tensor) -> Tensor {
        x.permute((0, 3, 1, 2))
            .unwrap()
            .conv2d(w, 1, 1, 1, 1)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
    }

    #[test]
    fn forward_matches_candle_conv2d() {
        for &(b, h, w, cin, cout) in &[
            (1, 5, 7, 3, 4),
            (3, 8, 8, 16, 8),
            (2, 1, 1, 2, 3),
            (2, 6, 2, 5, 5),
        ] {
            let x = rand(&[b, h, w, cin], 1);
            let wt = rand(&[cout, cin, 3, 3], 2);
            let fast = conv3x3_nhwc(&x, &weight_matrix(&wt).unwrap()).unwrap();
            assert!(max_diff(&fast, &reference(&x, &wt)) < 1e-5);
        }
    }

    #[test]
    fn gradients_match_candle_conv2d() {
        let x = Var::from_tensor(&rand(&[2, 6, 5, 4], 3)).unwrap();
        let wt = Var::from_tensor(&rand(&[3, 4, 3, 3], 4)).unwrap();
        let upstream = rand(&[2, 6, 5, 3], 5);
        let loss_fast = (conv3x3_nhwc(&x, &weight_matrix(&wt).unwrap()).unwrap() * &upstream)
            .unwrap()
            .sum_all()
            .unwrap();
        let loss_ref = (reference(&x, &wt) * &upstream).unwrap().sum_all().unwrap();
        let gf = loss_fast.backward().unwrap();
        let gr = loss_ref.backward().unwrap();
        for v in [x.as_tensor(), wt.as_tensor()] {
            let d = max_diff(gf.get(v).unwrap(), gr.get(v).unwrap());
            assert!(d < 1e-4, "gradient differs by {d}");
        }
    }

    #[test]
    fn max_pool_matches_reduction_forward_and_backward() {
        // Reference: the pool as two differentiable max reductions. (candle's
        // own `max_pool2d` backward scales gradients by the window's share of
        // maxima, so it is not a usable reference for the gradient.)
        let x = Var::from_tensor(&rand(&[2, 6, 8, 3], 6)).unwrap();
        let upstream = rand(&[2, 3, 4, 3], 7);
        let fast = max_pool2x2_nhwc(&x).unwrap();
        let reference = x
            .reshape((2, 3, 2, 4, 2, 3))
            .unwrap()
            .max(4)
            .unwrap()
            .max(2)
            .unwrap();
        let candle_fwd = x
            .permute((0, 3, 1, 2))
            .unwrap()
            .max_pool2d(2)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        assert!(max_diff(&fast, &reference) < 1e-6);
        assert!(max_diff(&fast, &candle_fwd) < 1e-6);
        let gf = (fast * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gr = (reference * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(gf.get(&x).unwrap(), gr.get(&x).unwrap()) < 1e-6);
    }
}

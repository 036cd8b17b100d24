//! The network's training step on CPU, differentiated by hand: a forward pass
//! that keeps what the backward pass needs, and the backward pass to every
//! trainable tensor's gradient, in a few passes per block over buffers kept
//! from one step to the next.
//!
//! candle's autograd of [`Cnn::forward`] computes the same figures (a test
//! holds the two together), but it starts every node's gradient from a
//! zero-filled tensor, adds into it, and allocates each intermediate anew;
//! on two cores that was more than half of a training step. Here a block
//! is unfolded once, multiplied once, normalised, pooled and rectified in
//! one pass, and its backward pass is two passes plus two products.
//!
//! This module computes losses and gradients only: it knows nothing of
//! data, optimisers or schedules, and runs on CPU (other devices train
//! through candle's autograd).

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::conv::{TAPS, fold_add, unfold, weight_matrix};
use super::{BN_EPS, Block, Cnn};

/// One batch as the training step takes it.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// NHWC pictures, normalised, `batch * side * side * channels` values.
    pub pixels: &'a [f32],
    /// Label index of each picture.
    pub targets: &'a [u32],
    /// Dropout multipliers of the pooled features (`batch * features`,
    /// already scaled by `1 / (1 - p)`); `None`: no dropout.
    pub dropout: Option<&'a [f32]>,
    /// Share of the target spread evenly over every label.
    pub smoothing: f32,
}

/// What one training step computed.
pub struct StepOutput {
    /// Mean loss over the batch.
    pub loss: f32,
    /// Logits, `batch * labels`, row by row.
    pub logits: Vec<f32>,
    /// The gradient of every trainable tensor, keyed by that tensor.
    pub grads: GradStore,
}

/// Buffers of the training step, kept between steps so that a step neither
/// allocates nor zero-fills its large arrays.
#[derive(Default)]
pub struct Workspace {
    blocks: Vec<BlockBuffers>,
}

/// One block's buffers.
#[derive(Default)]
struct BlockBuffers {
    /// `(h, w, cin)` the unfolded rows were laid out for.
    geometry: (usize, usize, usize),
    /// The unfolded input, `[B*H*W, 9*Cin]`. Taps outside the picture are
    /// never written and stay zero, so the buffer is only ever resized.
    col: Vec<f32>,
    /// The convolution's output; the backward pass turns it into its gradient.
    y: Vec<f32>,
    /// Pooled and rectified: the next block's input.
    out: Vec<f32>,
    /// Per pooled value: the window tap holding the maximum (bits 0-1), and
    /// bit 2 when the maximum is not negative (the gradient passes ReLU).
    taps: Vec<u8>,
    /// Gradient of the unfolded input.
    dcol: Vec<f32>,
    /// Gradient of the block's input.
    dx: Vec<f32>,
    /// Batch mean and `1 / sqrt(var + eps)` per channel.
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

/// A block's parameters as plain values.
struct Params {
    cin: usize,
    cout: usize,
    /// The convolution as the `[9*Cin, Cout]` matrix that multiplies
    /// unfolded rows.
    wmat: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl Params {
    fn of(block: &Block) -> Result<Self> {
        let (cout, cin, _, _) = block.conv.dims4()?;
        Ok(Self {
            cin,
            cout,
            wmat: weight_matrix(&block.conv)?.flatten_all()?.to_vec1()?,
            gamma: block.gamma.to_vec1()?,
            beta: block.beta.to_vec1()?,
        })
    }

    /// The `[9*Cin, Cout]` gradient back in the weight's `[Cout, Cin, 3, 3]`
    /// order (the inverse of [`weight_matrix`]).
    fn weight_grad(&self, dwmat: &[f32]) -> Vec<f32> {
        let (cin, cout) = (self.cin, self.cout);
        let mut dw = vec![0f32; dwmat.len()];
        for (r, row) in dwmat.chunks_exact(cout).enumerate() {
            let (t, ci) = (r / cin, r % cin);
            for (o, v) in row.iter().enumerate() {
                dw[(o * cin + ci) * TAPS + t] = *v;
            }
        }
        dw
    }
}

impl Cnn {
    /// One training step's forward and backward pass on CPU: the loss of
    /// `batch` (label-smoothed cross-entropy, averaged), its logits, and the
    /// gradient of every trainable tensor. Batch norm normalises with the
    /// batch statistics and updates the running averages, as
    /// [`Cnn::forward`] does in training mode.
    pub fn train_step(&self, ws: &mut Workspace, batch: &Batch) -> Result<StepOutput> {
        let b = batch.targets.len();
        let (side, channels) = (self.meta.input_size, self.meta.input_channels);
        if b == 0 || batch.pixels.len() != b * side * side * channels {
            candle_core::bail!(
                "training step: {} values for {b} pictures of {side}x{side}x{channels}",
                batch.pixels.len()
            );
        }
        let (labels, features) = self.fc_w.dims2()?;
        if let Some(t) = batch.targets.iter().find(|&&t| t as usize >= labels) {
            candle_core::bail!("training step: target {t} for {labels} labels");
        }
        if let Some(mask) = batch.dropout
            && mask.len() != b * features
        {
            candle_core::bail!(
                "training step: {} dropout multipliers for {b} x {features} features",
                mask.len()
            );
        }
        let params = self
            .blocks
            .iter()
            .map(Params::of)
            .collect::<Result<Vec<_>>>()?;
        ws.blocks.resize_with(params.len(), BlockBuffers::default);
        let sides: Vec<(usize, usize)> =
            (0..params.len()).map(|i| (side >> i, side >> i)).collect();

        // Forward, each block reading the previous one's output.
        for (i, (p, &(h, w))) in params.iter().zip(&sides).enumerate() {
            let (done, rest) = ws.blocks.split_at_mut(i);
            let x = done.last().map_or(batch.pixels, |prev| prev.out.as_slice());
            let (mean, var) = forward_block(p, &mut rest[0], x, (b, h, w));
            let dev = self.fc_b.device();
            self.blocks[i].update_running(
                Tensor::new(mean, dev)?,
                Tensor::new(var, dev)?,
                (b * h * w) as f64,
            )?;
        }
        let head = Head {
            weight: self.fc_w.flatten_all()?.to_vec1::<f32>()?,
            bias: self.fc_b.to_vec1::<f32>()?,
        };
        let last = ws
            .blocks
            .last()
            .map_or(batch.pixels, |bb| bb.out.as_slice());
        let (h, w) = sides.last().map_or((side, side), |&(h, w)| (h / 2, w / 2));
        let (loss, logits, head_grads) = head.step(last, h * w, batch)?;

        // Backward, last block first, each taking the gradient of its output
        // from the block above (or the head).
        let mut grads = GradStore::default();
        let dev = self.fc_w.device();
        grads.insert(
            &self.fc_w,
            Tensor::from_vec(head_grads.weight, (labels, features), dev)?,
        );
        grads.insert(&self.fc_b, Tensor::from_vec(head_grads.bias, labels, dev)?);
        for i in (0..params.len()).rev() {
            let (below, above) = ws.blocks.split_at_mut(i + 1);
            let dout = above
                .first()
                .map_or(head_grads.input.as_slice(), |a| a.dx.as_slice());
            let p = &params[i];
            let g = backward_block(p, &mut below[i], dout, b, i > 0);
            let block = &self.blocks[i];
            grads.insert(
                &block.conv,
                Tensor::from_vec(p.weight_grad(&g.wmat), (p.cout, p.cin, 3, 3), dev)?,
            );
            grads.insert(&block.gamma, Tensor::from_vec(g.gamma, p.cout, dev)?);
            grads.insert(&block.beta, Tensor::from_vec(g.beta, p.cout, dev)?);
        }
        Ok(StepOutput {
            loss,
            logits,
            grads,
        })
    }
}

/// `dst = lhs * rhs` for matrices given by their strides.
fn matmul(dst: &mut [f32], lhs: Mat, rhs: Mat) {
    assert!(
        lhs.cols == rhs.rows && dst.len() == lhs.rows * rhs.cols,
        "matmul: {}x{} by {}x{} into {}",
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols,
        dst.len()
    );
    if dst.is_empty() {
        return;
    }
    if lhs.cols == 0 {
        dst.fill(0.0);
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `Mat::new` and `Mat::t` keep every element of a view inside
    // its slice, and `dst` holds exactly `lhs.rows * rhs.cols` values,
    // written row by row; `dst` is borrowed mutably, so it overlaps neither
    // operand.
    unsafe {
        gemm::gemm(
            lhs.rows,
            rhs.cols,
            lhs.cols,
            dst.as_mut_ptr(),
            1,
            rhs.cols as isize,
            false,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A read-only matrix view: element `(r, c)` at `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows x cols` matrix; panics when `data` is shorter.
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix view past its slice");
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (the same values).
    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// Per-channel sums of the rows of one picture's `[rows, c]` values and of
/// their squares, in f32 over 256 rows at a time and f64 across.
fn channel_sums(values: &[f32], c: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut sum, mut sq) = (vec![0f64; c], vec![0f64; c]);
    let (mut s, mut q) = (vec![0f32; c], vec![0f32; c]);
    for rows in values.chunks(c * 256) {
        s.fill(0.0);
        q.fill(0.0);
        for row in rows.chunks_exact(c) {
            for ((s, q), v) in s.iter_mut().zip(q.iter_mut()).zip(row) {
                *s += v;
                *q += v * v;
            }
        }
        for i in 0..c {
            sum[i] += f64::from(s[i]);
            sq[i] += f64::from(q[i]);
        }
    }
    (sum, sq)
}

/// One block forward: unfold, multiply, batch statistics, then normalise,
/// pool and rectify in one pass. Returns the batch mean and biased variance.
fn forward_block(
    p: &Params,
    buf: &mut BlockBuffers,
    x: &[f32],
    (b, h, w): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let (cin, cout) = (p.cin, p.cout);
    let (pixels, row) = (h * w, TAPS * cin);
    if buf.geometry != (h, w, cin) {
        buf.geometry = (h, w, cin);
        buf.col.clear();
    }
    buf.col.resize(b * pixels * row, 0.0);
    buf.col
        .par_chunks_mut(pixels * row)
        .zip(x.par_chunks(pixels * cin))
        .for_each(|(rows, img)| unfold(img, rows, (h, w, cin)));
    buf.y.resize(b * pixels * cout, 0.0);
    matmul(
        &mut buf.y,
        Mat::new(&buf.col, b * pixels, row),
        Mat::new(&p.wmat, row, cout),
    );

    let partial: Vec<(Vec<f64>, Vec<f64>)> = buf
        .y
        .par_chunks(pixels * cout)
        .map(|img| channel_sums(img, cout))
        .collect();
    let n = (b * pixels) as f64;
    let (sum, sq) = sum_in_order(&partial, cout);
    let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
    let var: Vec<f32> = sq
        .iter()
        .zip(&sum)
        .map(|(q, s)| ((q / n) - (s / n).powi(2)).max(0.0) as f32)
        .collect();
    buf.invstd = var
        .iter()
        .map(|v| 1.0 / (v + BN_EPS as f32).sqrt())
        .collect();
    buf.mean.clone_from(&mean);
    let scale: Vec<f32> = (0..cout).map(|i| p.gamma[i] * buf.invstd[i]).collect();
    let shift: Vec<f32> = (0..cout).map(|i| p.beta[i] - mean[i] * scale[i]).collect();

    let (oh, ow) = (h / 2, w / 2);
    let pooled = oh * ow * cout;
    buf.out.resize(b * pooled, 0.0);
    buf.taps.resize(b * pooled, 0);
    buf.out
        .par_chunks_mut(pooled)
        .zip(buf.taps.par_chunks_mut(pooled))
        .zip(buf.y.par_chunks(pixels * cout))
        .for_each(|((out, taps), y)| {
            for py in 0..oh {
                for px in 0..ow {
                    let at = (py * ow + px) * cout;
                    let first = (2 * py * w + 2 * px) * cout;
                    let window = [
                        first,
                        first + cout,
                        first + w * cout,
                        first + (w + 1) * cout,
                    ];
                    for ch in 0..cout {
                        let z = |t: usize| y[window[t] + ch] * scale[ch] + shift[ch];
                        let (mut best, mut tap) = (z(0), 0u8);
                        for t in 1..4 {
                            let v = z(t);
                            if v > best {
                                (best, tap) = (v, t as u8);
                            }
                        }
                        out[at + ch] = best.max(0.0);
                        taps[at + ch] = tap | if best >= 0.0 { PASSES } else { 0 };
                    }
                }
            }
        });
    (mean, var)
}

/// Bit of a pooled value's tap byte set when ReLU lets its gradient through.
const PASSES: u8 = 4;

/// Calls `f(at, channel, gradient)` for every pooled value of one picture
/// whose gradient passes ReLU, `at` being where its maximum lies in the
/// pool's input (`w` wide; `oh x ow x c` pooled values).
fn each_passing_max(
    taps: &[u8],
    dout: &[f32],
    (w, oh, ow, c): (usize, usize, usize, usize),
    mut f: impl FnMut(usize, usize, f32),
) {
    for py in 0..oh {
        for px in 0..ow {
            let at = (py * ow + px) * c;
            for ch in 0..c {
                let tap = taps[at + ch];
                if tap & PASSES != 0 {
                    let (dy, dx) = (usize::from((tap >> 1) & 1), usize::from(tap & 1));
                    f(
                        ((2 * py + dy) * w + 2 * px + dx) * c + ch,
                        ch,
                        dout[at + ch],
                    );
                }
            }
        }
    }
}

/// Per-picture pairs of per-channel sums, added up picture by picture (the
/// same order on any number of cores).
fn sum_in_order(partial: &[(Vec<f64>, Vec<f64>)], c: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut a, mut b) = (vec![0f64; c], vec![0f64; c]);
    for (pa, pb) in partial {
        for i in 0..c {
            a[i] += pa[i];
            b[i] += pb[i];
        }
    }
    (a, b)
}

/// A block's parameter gradients.
struct BlockGrads {
    /// Of the `[9*Cin, Cout]` matrix.
    wmat: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

/// One block backward from the gradient of its output: through ReLU and the
/// pool to the arg-max taps, through batch norm (turning `buf.y` into the
/// convolution's output gradient), then the two products; with `input_grad`,
/// folds the unfolded rows' gradient back into `buf.dx`.
fn backward_block(
    p: &Params,
    buf: &mut BlockBuffers,
    dout: &[f32],
    b: usize,
    input_grad: bool,
) -> BlockGrads {
    let (cin, cout) = (p.cin, p.cout);
    let (h, w, _) = buf.geometry;
    let (oh, ow) = (h / 2, w / 2);
    let (pixels, pooled, row) = (h * w, oh * ow * cout, TAPS * cin);
    let n = (b * pixels) as f64;
    let geometry = (w, oh, ow, cout);
    let (mean, invstd) = (&buf.mean, &buf.invstd);

    // Pass 1: per picture, sum(dz) and sum(dz * xhat) over the maxima (the
    // only places the gradient of the normalised values is not zero).
    let partial: Vec<(Vec<f64>, Vec<f64>)> = buf
        .y
        .par_chunks(pixels * cout)
        .zip(buf.taps.par_chunks(pooled))
        .zip(dout.par_chunks(pooled))
        .map(|((y, taps), d)| {
            let (mut s, mut sx) = (vec![0f32; cout], vec![0f32; cout]);
            each_passing_max(taps, d, geometry, |at, ch, g| {
                let xhat = (y[at] - mean[ch]) * invstd[ch];
                s[ch] += g;
                sx[ch] += g * xhat;
            });
            (
                s.into_iter().map(f64::from).collect(),
                sx.into_iter().map(f64::from).collect(),
            )
        })
        .collect();
    let (dbeta, dgamma) = sum_in_order(&partial, cout);
    // dy = gamma * invstd * (dz - mean(dz) - xhat * mean(dz * xhat))
    let k: Vec<f32> = (0..cout).map(|i| p.gamma[i] * invstd[i]).collect();
    let a: Vec<f32> = dbeta.iter().map(|s| (s / n) as f32).collect();
    let c: Vec<f32> = dgamma.iter().map(|s| (s / n) as f32).collect();

    // Pass 2: the convolution's output gradient, in place of its output.
    buf.y
        .par_chunks_mut(pixels * cout)
        .zip(buf.taps.par_chunks(pooled))
        .zip(dout.par_chunks(pooled))
        .for_each(|((y, taps), d)| {
            for spot in y.chunks_exact_mut(cout) {
                for ch in 0..cout {
                    let xhat = (spot[ch] - mean[ch]) * invstd[ch];
                    spot[ch] = -k[ch] * (a[ch] + xhat * c[ch]);
                }
            }
            each_passing_max(taps, d, geometry, |at, ch, g| y[at] += k[ch] * g);
        });

    let dy = Mat::new(&buf.y, b * pixels, cout);
    let mut wmat = vec![0f32; row * cout];
    matmul(&mut wmat, Mat::new(&buf.col, b * pixels, row).t(), dy);
    if input_grad {
        buf.dcol.resize(b * pixels * row, 0.0);
        matmul(&mut buf.dcol, dy, Mat::new(&p.wmat, row, cout).t());
        buf.dx.resize(b * pixels * cin, 0.0);
        buf.dx
            .par_chunks_mut(pixels * cin)
            .zip(buf.dcol.par_chunks(pixels * row))
            .for_each(|(img, rows)| {
                img.fill(0.0);
                fold_add(rows, img, (h, w, cin));
            });
    }
    BlockGrads {
        wmat,
        gamma: dgamma.into_iter().map(|v| v as f32).collect(),
        beta: dbeta.into_iter().map(|v| v as f32).collect(),
    }
}

/// The network's head as plain values: `[labels, features]` weight and bias.
struct Head {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// The head's gradients.
struct HeadGrads {
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// Of the last block's output.
    input: Vec<f32>,
}

impl Head {
    /// Global average over `spots` positions of `x`, dropout, the linear
    /// layer and the loss, forward and backward: loss, logits, gradients.
    fn step(&self, x: &[f32], spots: usize, batch: &Batch) -> Result<(f32, Vec<f32>, HeadGrads)> {
        let (labels, b) = (self.bias.len(), batch.targets.len());
        let features = self.weight.len() / labels.max(1);
        if x.len() != b * spots * features {
            candle_core::bail!("head: {} values for {b} x {spots} x {features}", x.len());
        }
        let mut pooled = vec![0f32; b * features];
        for (g, img) in pooled
            .chunks_exact_mut(features)
            .zip(x.chunks_exact(spots * features))
        {
            for spot in img.chunks_exact(features) {
                for (s, v) in g.iter_mut().zip(spot) {
                    *s += v;
                }
            }
            for s in g.iter_mut() {
                *s /= spots as f32;
            }
        }
        if let Some(mask) = batch.dropout {
            for (g, m) in pooled.iter_mut().zip(mask) {
                *g *= m;
            }
        }
        let mut logits = vec![0f32; b * labels];
        for (row, g) in logits
            .chunks_exact_mut(labels)
            .zip(pooled.chunks_exact(features))
        {
            for (k, l) in row.iter_mut().enumerate() {
                let w = &self.weight[k * features..][..features];
                *l = self.bias[k] + w.iter().zip(g).map(|(w, g)| w * g).sum::<f32>();
            }
        }
        let (loss, dlogits) = loss_and_grad(&logits, batch.targets, labels, batch.smoothing);

        let mut grads = HeadGrads {
            weight: vec![0f32; labels * features],
            bias: vec![0f32; labels],
            input: Vec::with_capacity(x.len()),
        };
        let mut dpooled = vec![0f32; features];
        for (i, (d, g)) in dlogits
            .chunks_exact(labels)
            .zip(pooled.chunks_exact(features))
            .enumerate()
        {
            dpooled.fill(0.0);
            for (k, &dk) in d.iter().enumerate() {
                grads.bias[k] += dk;
                let w = &self.weight[k * features..][..features];
                let dw = &mut grads.weight[k * features..][..features];
                for j in 0..features {
                    dw[j] += dk * g[j];
                    dpooled[j] += dk * w[j];
                }
            }
            if let Some(mask) = batch.dropout {
                let m = &mask[i * features..][..features];
                for (v, m) in dpooled.iter_mut().zip(m) {
                    *v *= m;
                }
            }
            for _ in 0..spots {
                grads.input.extend(dpooled.iter().map(|v| v / spots as f32));
            }
        }
        Ok((loss, logits, grads))
    }
}

/// Mean over the batch of `(1 - s) * -log p[target] + s * mean_k -log p[k]`,
/// and its gradient with respect to the logits. Targets are below `labels`.
fn loss_and_grad(
    logits: &[f32],
    targets: &[u32],
    labels: usize,
    smoothing: f32,
) -> (f32, Vec<f32>) {
    let b = targets.len();
    let mut grad = vec![0f32; logits.len()];
    let mut loss = 0f64;
    for ((row, g), &t) in logits
        .chunks_exact(labels)
        .zip(grad.chunks_exact_mut(labels))
        .zip(targets)
    {
        let t = t as usize;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = row.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
        let mean_logit = row.iter().sum::<f32>() / labels as f32;
        loss +=
            f64::from((1.0 - smoothing) * (log_sum - row[t]) + smoothing * (log_sum - mean_logit));
        for (k, (l, gk)) in row.iter().zip(g.iter_mut()).enumerate() {
            let target = if k == t { 1.0 - smoothing } else { 0.0 } + smoothing / labels as f32;
            *gk = ((l - log_sum).exp() - target) / b as f32;
        }
    }
    ((loss / b as f64) as f32, grad)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use candle_core::{Device, Var};

    use super::*;
    use crate::model::tests::{max_abs, numbers, random_tensors};
    use crate::model::{ConvImpl, ModelMeta, max_diff, smoothed_cross_entropy};

    /// A network whose trainable tensors are variables, and those variables.
    fn trainable(meta: &ModelMeta, conv_impl: ConvImpl) -> (Cnn, BTreeMap<String, Tensor>) {
        let mut tensors = random_tensors(meta);
        let mut vars = BTreeMap::new();
        for (name, t) in tensors.iter_mut() {
            if name.ends_with("bn.weight") {
                *t = (&*t + 1.0).unwrap();
            }
            if !name.contains("running_") {
                *t = Var::from_tensor(t).unwrap().as_tensor().clone();
                vars.insert(name.clone(), t.clone());
            }
        }
        (Cnn::new(meta.clone(), &tensors, conv_impl).unwrap(), vars)
    }

    fn running(cnn: &Cnn) -> HashMap<String, Tensor> {
        cnn.tensors()
            .into_iter()
            .filter(|(name, _)| name.contains("running_"))
            .collect()
    }

    #[test]
    fn step_matches_candle_autograd() {
        let meta = ModelMeta::sketch(16, &[8, 16, 12]);
        let features = 12;
        let mut ws = Workspace::default();
        let (hand, hand_vars) = trainable(&meta, ConvImpl::Fast);
        let references = [ConvImpl::Fast, ConvImpl::Candle].map(|imp| (imp, trainable(&meta, imp)));
        // Two steps through one workspace, the second with fewer pictures;
        // the running statistics move with every step.
        for (step, b) in [(0u64, 5usize), (1, 3)] {
            let pixels = numbers(b * 16 * 16 * 3, 10 + step);
            let targets: Vec<u32> = (0..b as u32).map(|i| (i + step as u32) % 2).collect();
            let mask: Vec<f32> = numbers(b * features, 20 + step)
                .iter()
                .map(|v| if *v < -0.6 { 0.0 } else { 1.0 / 0.8 })
                .collect();
            let batch = Batch {
                pixels: &pixels,
                targets: &targets,
                dropout: Some(&mask),
                smoothing: 0.1,
            };
            let got = hand.train_step(&mut ws, &batch).unwrap();
            for (conv_impl, (reference, vars)) in &references {
                let x = Tensor::from_slice(&pixels, (b, 16, 16, 3), &Device::Cpu).unwrap();
                let y = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
                let m = Tensor::from_slice(&mask, (b, features), &Device::Cpu).unwrap();
                let logits = reference.forward(&x, true, Some(&m)).unwrap();
                let loss = smoothed_cross_entropy(&logits, &y, 0.1).unwrap();
                let want = loss.backward().unwrap();
                let loss = loss.to_scalar::<f32>().unwrap();
                assert!(
                    (got.loss - loss).abs() < 1e-5,
                    "loss {} against {loss}",
                    got.loss
                );
                let got_logits = Tensor::from_slice(&got.logits, (b, 2), &Device::Cpu).unwrap();
                assert!(max_diff(&got_logits, &logits) < 1e-4);
                for (name, r) in vars {
                    let (g, w) = (
                        got.grads.get(&hand_vars[name]).unwrap(),
                        want.get(r).unwrap(),
                    );
                    let scale = max_abs(w);
                    let d = max_diff(g, w);
                    assert!(
                        d <= 1e-3 * scale.max(1e-3),
                        "{conv_impl:?} step {step}: gradient of {name} off by {d} (largest {scale})"
                    );
                }
                for (name, t) in running(reference) {
                    let d = max_diff(&running(&hand)[&name], &t);
                    assert!(d < 1e-5, "{name} off by {d}");
                }
            }
        }
    }

    #[test]
    fn refuses_a_batch_of_the_wrong_size() {
        let meta = ModelMeta::sketch(16, &[8]);
        let (cnn, _) = trainable(&meta, ConvImpl::Fast);
        let batch = Batch {
            pixels: &[0.0; 100],
            targets: &[0],
            dropout: None,
            smoothing: 0.0,
        };
        assert!(cnn.train_step(&mut Workspace::default(), &batch).is_err());
    }
}

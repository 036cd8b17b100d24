//! The network, defined once and shared by the trainer and the worker.
//!
//! A stack of conv blocks (3x3 conv without bias, batch norm, 2x2 max-pool,
//! ReLU), global average pooling, dropout (training only) and a linear layer
//! with one output per label. Inputs are NHWC `[B, H, W, 3]` tensors already
//! normalised as the metadata says (see [`crate::preprocess`]).
//!
//! [`Cnn`] is the trainable form (batch statistics, running averages),
//! differentiated by candle's autograd or, on CPU, by hand ([`backprop`]);
//! [`Classifier`] is the inference form with batch norm folded into the conv
//! weights. Both run either the fast NHWC im2col convolution of [`conv`] or
//! candle's own `conv2d` ([`ConvImpl`]), which must agree to 1e-4.
//!
//! This module knows nothing of files (see [`weights`]), NATS or images.

pub mod aligned;
pub mod amx;
pub mod backprop;
pub mod conv;
pub mod direct;
pub mod simd;
pub mod weights;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
pub use direct::Precision;
pub use weights::{ModelMeta, WeightsError};

/// Batch-norm epsilon.
const BN_EPS: f64 = 1e-5;
/// Weight of the newest batch in the running statistics.
const BN_MOMENTUM: f64 = 0.1;
/// Number of pictures in the probe batch stored in the metadata.
pub const PROBE_BATCH: usize = 4;
/// Largest difference allowed between stored and recomputed probe outputs.
pub const PROBE_TOLERANCE: f32 = 1e-3;
/// The same with the bfloat16 kernels, whose logits move by about 1e-2.
pub const PROBE_TOLERANCE_BF16: f32 = 1e-2;

/// Which convolution the network runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvImpl {
    /// NHWC im2col + matmul custom ops (CPU only); the default on CPU.
    #[default]
    Fast,
    /// candle's `conv2d` and max reductions in NCHW: the reference, and the path
    /// used on CUDA.
    Candle,
    /// Inference through the AVX-512 or AVX2 kernels of [`direct`] where the
    /// CPU and the shapes allow, else as `Fast`; training always runs as
    /// `Fast`.
    Direct,
    /// `Direct` with the Winograd products in bfloat16 where the CPU has
    /// AVX512-BF16, else as `Direct`.
    DirectBf16,
}

impl ConvImpl {
    /// The implementation to use on `device`: the direct kernels on a CPU that
    /// has them (with bfloat16 products when `precision` asks for them and
    /// the CPU has AVX512-BF16), the im2col path on other CPUs, candle's
    /// elsewhere.
    pub fn for_device(device: &Device, precision: Precision) -> Self {
        if !device.is_cpu() {
            Self::Candle
        } else if precision == Precision::Bf16 && Precision::Bf16.available() {
            Self::DirectBf16
        } else if direct::available() {
            Self::Direct
        } else {
            Self::Fast
        }
    }

    /// The tensor path behind this choice (`Direct` falls back to `Fast`).
    fn tensor_path(self) -> Self {
        match self {
            Self::Direct | Self::DirectBf16 => Self::Fast,
            other => other,
        }
    }
}

/// Errors raised when building a model from a weights file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file itself could not be read.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The tensors do not fit the architecture in the metadata, or the probe
    /// batch does not reproduce.
    #[error("{0}")]
    Invalid(String),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Index of the highest of a picture's scores (the first of equals); 0 for
/// an empty slice. The one place a label is chosen from scores.
pub fn argmax(scores: &[f32]) -> usize {
    scores
        .iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
        )
        .0
}

/// Floating-point operations of one forward pass per picture (multiply-adds
/// count two), convolutions and the linear layer only.
pub fn forward_flops(meta: &ModelMeta) -> f64 {
    let mut side = meta.input_size;
    let mut cin = meta.input_channels;
    let mut flops = 0.0;
    for &cout in &meta.channels {
        flops += 2.0 * (side * side * cout * cin * 9) as f64;
        side /= 2;
        cin = cout;
    }
    flops + 2.0 * (cin * meta.labels.len()) as f64
}

/// The names and shapes of every tensor the architecture in `meta` needs.
pub fn tensor_shapes(meta: &ModelMeta) -> BTreeMap<String, Vec<usize>> {
    let mut shapes = BTreeMap::new();
    let mut cin = meta.input_channels;
    for (i, &cout) in meta.channels.iter().enumerate() {
        shapes.insert(format!("blocks.{i}.conv.weight"), vec![cout, cin, 3, 3]);
        for p in ["weight", "bias", "running_mean", "running_var"] {
            shapes.insert(format!("blocks.{i}.bn.{p}"), vec![cout]);
        }
        cin = cout;
    }
    shapes.insert("fc.weight".into(), vec![meta.labels.len(), cin]);
    shapes.insert("fc.bias".into(), vec![meta.labels.len()]);
    shapes
}

/// A deterministic synthetic batch `[PROBE_BATCH, S, S, 3]` whose outputs the
/// trainer stores in the metadata, so a loader can check the tensors it read
/// compute what the trainer computed.
pub fn probe_input(meta: &ModelMeta, device: &Device) -> candle_core::Result<Tensor> {
    let s = meta.input_size;
    let c = meta.input_channels;
    let mut v = Vec::with_capacity(PROBE_BATCH * s * s * c);
    for n in 0..PROBE_BATCH {
        for y in 0..s {
            for x in 0..s {
                for ch in 0..c {
                    let t =
                        0.37 * ((y + 1) * (n + 1)) as f32 / s as f32 + 0.11 * (x * (ch + 1)) as f32;
                    v.push(t.sin() * 1.5);
                }
            }
        }
    }
    Tensor::from_vec(v, (PROBE_BATCH, s, s, c), device)
}

/// One conv block's parameters in the trainable form.
struct Block {
    conv: Tensor,
    gamma: Tensor,
    beta: Tensor,
    running_mean: Var,
    running_var: Var,
}

impl Block {
    /// Batch norm with the running statistics, as `x * scale + shift`.
    fn running_affine(&self) -> candle_core::Result<(Tensor, Tensor)> {
        bn_affine(
            &self.gamma,
            &self.beta,
            self.running_mean.as_tensor(),
            self.running_var.as_tensor(),
        )
    }

    /// Moves the running statistics towards a batch's mean and biased
    /// variance over `n` values.
    fn update_running(&self, mean: Tensor, var: Tensor, n: f64) -> candle_core::Result<()> {
        let unbiased = (var * (n / (n - 1.0).max(1.0)))?;
        self.running_mean.set(
            &((self.running_mean.as_tensor() * (1.0 - BN_MOMENTUM))? + (mean * BN_MOMENTUM)?)?,
        )?;
        self.running_var.set(
            &((self.running_var.as_tensor() * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?,
        )
    }

    /// The conv weight with the running batch norm folded in, and the
    /// per-channel bias that remains; both detached.
    fn folded(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let (scale, shift) = self.running_affine()?;
        let scale = scale.detach().reshape((scale.dim(0)?, 1, 1, 1))?;
        Ok((self.conv.detach().broadcast_mul(&scale)?, shift.detach()))
    }
}

/// The trainable network: parameters as tensors (variables when training)
/// and batch-norm running statistics.
pub struct Cnn {
    meta: ModelMeta,
    blocks: Vec<Block>,
    fc_w: Tensor,
    fc_b: Tensor,
    conv_impl: ConvImpl,
}

fn check_shapes(meta: &ModelMeta, tensors: &HashMap<String, Tensor>) -> Result<(), ModelError> {
    for (name, shape) in tensor_shapes(meta) {
        let t = tensors
            .get(&name)
            .ok_or_else(|| ModelError::Invalid(format!("missing tensor `{name}`")))?;
        if t.dims() != shape.as_slice() {
            return Err(ModelError::Invalid(format!(
                "tensor `{name}` has shape {:?}, the architecture needs {shape:?}",
                t.dims()
            )));
        }
    }
    Ok(())
}

impl Cnn {
    /// Builds the network from named tensors (as read by [`weights::load`] or
    /// made by the trainer). Tensors that are [`Var`]s stay trainable.
    pub fn new(
        meta: ModelMeta,
        tensors: &HashMap<String, Tensor>,
        conv_impl: ConvImpl,
    ) -> Result<Self, ModelError> {
        meta.validate().map_err(ModelError::Invalid)?;
        check_shapes(&meta, tensors)?;
        let get = |n: &str| tensors[n].clone();
        let blocks = (0..meta.channels.len())
            .map(|i| {
                Ok(Block {
                    conv: get(&format!("blocks.{i}.conv.weight")),
                    gamma: get(&format!("blocks.{i}.bn.weight")),
                    beta: get(&format!("blocks.{i}.bn.bias")),
                    running_mean: Var::from_tensor(&get(&format!("blocks.{i}.bn.running_mean")))?,
                    running_var: Var::from_tensor(&get(&format!("blocks.{i}.bn.running_var")))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            fc_w: get("fc.weight"),
            fc_b: get("fc.bias"),
            meta,
            blocks,
            conv_impl: conv_impl.tensor_path(),
        })
    }

    /// The metadata this network was built from.
    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    /// Replaces the metadata (the trainer fills in version, training summary
    /// and probe once training ends).
    pub fn set_meta(&mut self, meta: ModelMeta) {
        self.meta = meta;
    }

    /// Every tensor under its file name, running statistics included.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, b) in self.blocks.iter().enumerate() {
            out.insert(format!("blocks.{i}.conv.weight"), b.conv.clone());
            out.insert(format!("blocks.{i}.bn.weight"), b.gamma.clone());
            out.insert(format!("blocks.{i}.bn.bias"), b.beta.clone());
            out.insert(
                format!("blocks.{i}.bn.running_mean"),
                b.running_mean.as_tensor().clone(),
            );
            out.insert(
                format!("blocks.{i}.bn.running_var"),
                b.running_var.as_tensor().clone(),
            );
        }
        out.insert("fc.weight".into(), self.fc_w.clone());
        out.insert("fc.bias".into(), self.fc_b.clone());
        out
    }

    /// Logits `[B, labels]` for an NHWC batch. With `train`, batch norm uses
    /// (and updates the running averages from) the batch statistics, and
    /// `dropout_mask` (already scaled by 1/(1-p)) multiplies the pooled features.
    pub fn forward(
        &self,
        x: &Tensor,
        train: bool,
        dropout_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut x = match self.conv_impl {
            ConvImpl::Fast | ConvImpl::Direct | ConvImpl::DirectBf16 => x.clone(),
            ConvImpl::Candle => x.permute((0, 3, 1, 2))?,
        };
        for block in &self.blocks {
            x = self.block(&x, block, train)?;
        }
        let pooled = match self.conv_impl {
            ConvImpl::Fast | ConvImpl::Direct | ConvImpl::DirectBf16 => x.mean(1)?.mean(1)?,
            ConvImpl::Candle => x.mean(D::Minus1)?.mean(D::Minus1)?,
        };
        let pooled = match dropout_mask {
            Some(mask) if train => pooled.mul(mask)?,
            _ => pooled,
        };
        pooled.matmul(&self.fc_w.t()?)?.broadcast_add(&self.fc_b)
    }

    fn block(&self, x: &Tensor, b: &Block, train: bool) -> candle_core::Result<Tensor> {
        let cout = b.conv.dim(0)?;
        let y = match self.conv_impl {
            ConvImpl::Fast | ConvImpl::Direct | ConvImpl::DirectBf16 => {
                conv::conv3x3_nhwc(x, &conv::weight_matrix(&b.conv)?)?
            }
            ConvImpl::Candle => x.conv2d(&b.conv, 1, 1, 1, 1)?,
        };
        let n = (y.elem_count() / cout) as f64;
        let (scale, shift, batch_stats) = if train {
            let (mean, var) = match self.conv_impl {
                ConvImpl::Fast | ConvImpl::Direct | ConvImpl::DirectBf16 => {
                    let rows = y.reshape((n as usize, cout))?;
                    let mean = rows.mean_keepdim(0)?;
                    let var = rows.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
                    (mean.flatten_all()?, var.flatten_all()?)
                }
                ConvImpl::Candle => {
                    let mean = y.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
                    let var = y
                        .broadcast_sub(&mean)?
                        .sqr()?
                        .mean_keepdim(0)?
                        .mean_keepdim(2)?
                        .mean_keepdim(3)?;
                    (mean.flatten_all()?, var.flatten_all()?)
                }
            };
            let (scale, shift) = bn_affine(&b.gamma, &b.beta, &mean, &var)?;
            (scale, shift, Some((mean.detach(), var.detach())))
        } else {
            let (scale, shift) = b.running_affine()?;
            (scale, shift, None)
        };
        let y = match self.conv_impl {
            ConvImpl::Fast | ConvImpl::Direct | ConvImpl::DirectBf16 => {
                y.broadcast_mul(&scale)?.broadcast_add(&shift)?
            }
            ConvImpl::Candle => affine_nchw(&y, &scale, &shift)?,
        };
        if let Some((mean, var)) = batch_stats {
            b.update_running(mean, var, n)?;
        }
        match self.conv_impl {
            ConvImpl::Fast | ConvImpl::Direct | ConvImpl::DirectBf16 => {
                conv::max_pool2x2_nhwc(&y)?.relu()
            }
            ConvImpl::Candle => max_pool2x2_nchw(&y)?.relu(),
        }
    }

    /// The inference form of this network, batch norm folded into the convs.
    pub fn classifier(&self, conv_impl: ConvImpl) -> candle_core::Result<Classifier> {
        let folded = self
            .blocks
            .iter()
            .map(Block::folded)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let direct = match conv_impl {
            ConvImpl::Direct => self.direct_net(&folded, direct::Precision::F32)?,
            ConvImpl::DirectBf16 => match self.direct_net(&folded, direct::Precision::Bf16)? {
                Some(net) => Some(net),
                None => self.direct_net(&folded, direct::Precision::F32)?,
            },
            ConvImpl::Fast | ConvImpl::Candle => None,
        };
        let conv_impl = conv_impl.tensor_path();
        let convs = folded
            .into_iter()
            .map(|(w, shift)| {
                let weight = match conv_impl {
                    ConvImpl::Fast | ConvImpl::Direct | ConvImpl::DirectBf16 => {
                        conv::weight_matrix(&w)?.contiguous()?
                    }
                    ConvImpl::Candle => w.contiguous()?,
                };
                Ok((weight, shift))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Classifier {
            meta: self.meta.clone(),
            convs,
            fc_w: self.fc_w.detach().t()?.contiguous()?,
            fc_b: self.fc_b.detach(),
            conv_impl,
            direct,
        })
    }

    /// The direct kernels' network from the folded blocks, if the device,
    /// the CPU and the shapes suit them.
    fn direct_net(
        &self,
        folded: &[(Tensor, Tensor)],
        precision: direct::Precision,
    ) -> candle_core::Result<Option<direct::DirectNet>> {
        if !self.fc_b.device().is_cpu() {
            return Ok(None);
        }
        let convs = folded
            .iter()
            .map(|(w, shift)| Ok((w.flatten_all()?.to_vec1::<f32>()?, shift.to_vec1::<f32>()?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(direct::DirectNet::new(
            self.meta.input_size,
            self.meta.input_channels,
            &convs,
            self.fc_w.t()?.flatten_all()?.to_vec1::<f32>()?,
            self.fc_b.to_vec1::<f32>()?,
            precision,
        ))
    }
}

/// Cross-entropy against targets with `smoothing` of their weight spread
/// evenly over every label.
pub fn smoothed_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    smoothing: f32,
) -> candle_core::Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, 1)?;
    let nll = candle_nn::loss::nll(&log_p, targets)?;
    if smoothing <= 0.0 {
        return Ok(nll);
    }
    // Mean over the batch and the labels of -log p: the loss against a
    // uniform target.
    let uniform = log_p.mean_all()?.neg()?;
    (nll * f64::from(1.0 - smoothing))? + (uniform * f64::from(smoothing))?
}

/// `x * scale + shift` per channel of an NCHW tensor.
fn affine_nchw(x: &Tensor, scale: &Tensor, shift: &Tensor) -> candle_core::Result<Tensor> {
    let shape = (1, scale.dim(0)?, 1, 1);
    x.broadcast_mul(&scale.reshape(shape)?)?
        .broadcast_add(&shift.reshape(shape)?)
}

/// 2x2 max-pool of an NCHW tensor with even sides, as two max reductions.
/// (candle's `max_pool2d` backward scales each gradient by the window's
/// share of maxima, 1/4 for a unique maximum, so training cannot use it.)
fn max_pool2x2_nchw(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
}

/// Batch norm as a per-channel affine map `y = x * scale + shift`.
fn bn_affine(
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
    let shift = (beta - (mean * &scale)?)?;
    Ok((scale, shift))
}

/// The inference network: folded weights, no gradients, one forward pass per
/// batch, probabilities out.
pub struct Classifier {
    meta: ModelMeta,
    /// Per block: weight (matrix for the fast path, OIHW for candle's) and bias.
    convs: Vec<(Tensor, Tensor)>,
    fc_w: Tensor,
    fc_b: Tensor,
    conv_impl: ConvImpl,
    /// The direct kernels, when chosen and usable; they take precedence.
    direct: Option<direct::DirectNet>,
}

impl Classifier {
    /// Loads a weights file, builds the network for `device` at `precision`
    /// and checks that the probe batch in the metadata reproduces.
    pub fn load(path: &Path, device: &Device, precision: Precision) -> Result<Self, ModelError> {
        let (meta, tensors) = weights::load(path, device)?;
        Self::from_parts(meta, &tensors, ConvImpl::for_device(device, precision))
    }

    /// Builds and validates a classifier from metadata and tensors.
    pub fn from_parts(
        meta: ModelMeta,
        tensors: &HashMap<String, Tensor>,
        conv_impl: ConvImpl,
    ) -> Result<Self, ModelError> {
        let classifier = Cnn::new(meta, tensors, conv_impl)?.classifier(conv_impl)?;
        classifier.check_probe()?;
        Ok(classifier)
    }

    /// Recomputes the probe batch and compares it with the stored outputs.
    pub fn check_probe(&self) -> Result<(), ModelError> {
        let device = self.fc_b.device();
        let got = self.probabilities(&probe_input(&self.meta, device)?)?;
        if self.meta.probe.len() != got.len() {
            return Err(ModelError::Invalid(format!(
                "probe: metadata holds {} rows, expected {}",
                self.meta.probe.len(),
                got.len()
            )));
        }
        for (row, (want, got)) in self.meta.probe.iter().zip(&got).enumerate() {
            let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(
                if want.len() == got.len() {
                    0.0
                } else {
                    f32::INFINITY
                },
                f32::max,
            );
            let tolerance = match self.conv_impl() {
                ConvImpl::DirectBf16 => PROBE_TOLERANCE_BF16,
                _ => PROBE_TOLERANCE,
            };
            if worst.is_nan() || worst > tolerance {
                return Err(ModelError::Invalid(format!(
                    "probe row {row}: outputs {got:?} differ from the stored {want:?}"
                )));
            }
        }
        Ok(())
    }

    /// The metadata of the loaded weights.
    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    /// The device the tensors live on.
    pub fn device(&self) -> &Device {
        self.fc_b.device()
    }

    /// The convolution that actually runs (`Direct` only where its kernels
    /// are in use).
    pub fn conv_impl(&self) -> ConvImpl {
        match &self.direct {
            Some(net) if net.precision() == direct::Precision::Bf16 => ConvImpl::DirectBf16,
            Some(_) => ConvImpl::Direct,
            None => self.conv_impl,
        }
    }

    /// Whether the serving kernels' products run on AMX tiles.
    pub fn uses_amx(&self) -> bool {
        self.direct.as_ref().is_some_and(|net| net.uses_amx())
    }

    /// Logits `[B, labels]` for a normalised NHWC batch `[B, S, S, 3]`.
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(net) = &self.direct {
            let (b, h, w, c) = x.dims4()?;
            if h * w * c != net.input_len() {
                candle_core::bail!("input {h}x{w}x{c} does not fit the network");
            }
            let input = x.flatten_all()?.to_vec1::<f32>()?;
            return Tensor::from_vec(net.logits(&input, 1), (b, net.labels()), x.device());
        }
        let mut x = match self.conv_impl {
            ConvImpl::Fast | ConvImpl::Direct | ConvImpl::DirectBf16 => x.clone(),
            ConvImpl::Candle => x.permute((0, 3, 1, 2))?,
        };
        for (w, bias) in &self.convs {
            x = match self.conv_impl {
                ConvImpl::Fast | ConvImpl::Direct | ConvImpl::DirectBf16 => {
                    // Max-pool before the bias: the bias is per channel, so it
                    // commutes with the max, and the add runs on 4x less data.
                    let y = conv::conv3x3_nhwc(&x, w)?;
                    conv::max_pool2x2_nhwc(&y)?.broadcast_add(bias)?.relu()?
                }
                ConvImpl::Candle => {
                    let y = x.conv2d(w, 1, 1, 1, 1)?;
                    max_pool2x2_nchw(&y)?
                        .broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)?
                        .relu()?
                }
            };
        }
        let pooled = match self.conv_impl {
            ConvImpl::Fast | ConvImpl::Direct | ConvImpl::DirectBf16 => x.mean(1)?.mean(1)?,
            ConvImpl::Candle => x.mean(D::Minus1)?.mean(D::Minus1)?,
        };
        pooled.matmul(&self.fc_w)?.broadcast_add(&self.fc_b)
    }

    /// Per-picture label probabilities for a normalised NHWC batch.
    pub fn probabilities(&self, x: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
        candle_nn::ops::softmax_last_dim(&self.logits(x)?)?
            .to_dtype(DType::F32)?
            .to_vec2()
    }

    /// Per-picture label probabilities for normalised NHWC pictures laid end
    /// to end in `input`; the direct kernels read the slice without copying
    /// and split a batch over up to `threads` threads (the tensor paths use
    /// candle's own threading and ignore it).
    pub fn probabilities_of(
        &self,
        input: &[f32],
        threads: usize,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let s = self.meta.input_size;
        let len = s * s * self.meta.input_channels;
        if len == 0 || !input.len().is_multiple_of(len) {
            candle_core::bail!("{} values are not a whole number of pictures", input.len());
        }
        let n = input.len() / len;
        let Some(net) = &self.direct else {
            let x = Tensor::from_slice(input, (n, s, s, self.meta.input_channels), self.device())?;
            return self.probabilities(&x);
        };
        let logits = net.logits(input, threads);
        Ok(logits.chunks_exact(net.labels()).map(softmax).collect())
    }
}

/// Softmax of one row of logits.
fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// Largest absolute difference between two tensors (for tests).
#[cfg(test)]
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar())
        .expect("comparable tensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny_meta() -> ModelMeta {
        ModelMeta::sketch(16, &[8, 16])
    }

    /// Numbers in -1..1 from a fixed seed.
    pub(crate) fn numbers(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The largest absolute value of a tensor.
    pub(crate) fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    pub(crate) fn random_tensors(meta: &ModelMeta) -> HashMap<String, Tensor> {
        let mut seed = 7u64;
        tensor_shapes(meta)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        let u = (seed >> 40) as f32 / (1u64 << 24) as f32;
                        if name.ends_with("running_var") {
                            0.5 + u
                        } else {
                            u - 0.5
                        }
                    })
                    .collect();
                (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
            })
            .collect()
    }

    #[test]
    fn fast_and_candle_paths_agree() {
        let meta = tiny_meta();
        let t = random_tensors(&meta);
        let x = probe_input(&meta, &Device::Cpu).unwrap();
        let fast = Cnn::new(meta.clone(), &t, ConvImpl::Fast).unwrap();
        let slow = Cnn::new(meta.clone(), &t, ConvImpl::Candle).unwrap();
        // Eval mode, unfolded.
        assert!(
            max_diff(
                &fast.forward(&x, false, None).unwrap(),
                &slow.forward(&x, false, None).unwrap()
            ) < 1e-4
        );
        // Folded classifiers against the unfolded network.
        let reference = slow.forward(&x, false, None).unwrap();
        for imp in [ConvImpl::Fast, ConvImpl::Candle] {
            let c = slow.classifier(imp).unwrap();
            assert!(max_diff(&c.logits(&x).unwrap(), &reference) < 1e-4);
        }
        // Train mode (batch statistics) too.
        assert!(
            max_diff(
                &fast.forward(&x, true, None).unwrap(),
                &slow.forward(&x, true, None).unwrap()
            ) < 1e-4
        );
    }

    #[test]
    fn direct_kernels_match_candle() {
        // Between them these run every register tile: the first (direct)
        // block as 16 pixels x 16 channels (32/[16..]), 8 x 32 (64/[32..]) and
        // 8 x 16 (24/[16]); the Winograd blocks with 16, 32 and 48 output
        // channels, in one chunk of tiles and in several (side 32: 4 chunks
        // of 64; side 24: 64 + 64 + 16).
        for (size, channels) in [
            (32, vec![16, 32, 16]),
            (64, vec![32, 48]),
            (24, vec![16]),
            (48, vec![16, 32]),
        ] {
            direct_kernels_match_candle_on(ModelMeta {
                input_size: size,
                channels,
                ..tiny_meta()
            });
        }
    }

    fn direct_kernels_match_candle_on(meta: ModelMeta) {
        let t = random_tensors(&meta);
        let x = Tensor::cat(
            &[
                probe_input(&meta, &Device::Cpu).unwrap(),
                probe_input(&meta, &Device::Cpu)
                    .unwrap()
                    .affine(-0.7, 0.2)
                    .unwrap(),
            ],
            0,
        )
        .unwrap();
        let cnn = Cnn::new(meta, &t, ConvImpl::Candle).unwrap();
        let reference = cnn.forward(&x, false, None).unwrap();
        let direct = cnn.classifier(ConvImpl::Direct).unwrap();
        if !direct::available() {
            eprintln!(
                "this CPU has neither AVX-512F nor AVX2: the direct kernels fall back to im2col"
            );
        } else {
            assert_eq!(direct.conv_impl(), ConvImpl::Direct);
        }
        assert!(max_diff(&direct.logits(&x).unwrap(), &reference) < 1e-4);
        let flat = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let by_slice = direct.probabilities_of(&flat, 1).unwrap();
        let by_tensor = cnn
            .classifier(ConvImpl::Candle)
            .unwrap()
            .probabilities(&x)
            .unwrap();
        for (a, b) in by_slice.iter().flatten().zip(by_tensor.iter().flatten()) {
            assert!((a - b).abs() < 1e-5);
        }
        assert!(direct.probabilities_of(&flat[1..], 1).is_err());
        // Split over threads: the same numbers.
        let many: Vec<f32> = flat.iter().cycle().take(flat.len() * 9).copied().collect();
        let split = direct.probabilities_of(&many, 3).unwrap();
        assert_eq!(split.len(), 9 * by_slice.len());
        for (i, row) in split.iter().enumerate() {
            assert_eq!(row, &by_slice[i % by_slice.len()]);
        }
    }

    #[test]
    fn bf16_kernels_stay_close_to_f32() {
        // The Winograd products in bfloat16: logits within a few hundredths
        // of candle's, with random weights, on the shipped channels and on
        // geometries whose F(4x4, 3x3) tiles take every register tile shape
        // (4 or 8 tiles by 1, 2 or 3 registers) and a short last chunk.
        for (input_size, channels) in [
            (32, vec![16, 48, 96]),
            (64, vec![16, 16, 32, 16]),
            (80, vec![16, 32]),
        ] {
            bf16_stays_close_to_f32(ModelMeta {
                input_size,
                channels,
                ..tiny_meta()
            });
        }
    }

    fn bf16_stays_close_to_f32(meta: ModelMeta) {
        let cnn = Cnn::new(meta.clone(), &random_tensors(&meta), ConvImpl::Candle).unwrap();
        let x = probe_input(&meta, &Device::Cpu).unwrap();
        let reference = cnn.forward(&x, false, None).unwrap();
        let bf16 = cnn.classifier(ConvImpl::DirectBf16).unwrap();
        if !direct::Precision::Bf16.available() {
            eprintln!("this CPU has no AVX512-BF16: the bf16 kernels fall back");
            assert_ne!(bf16.conv_impl(), ConvImpl::DirectBf16);
        } else {
            assert_eq!(bf16.conv_impl(), ConvImpl::DirectBf16);
        }
        let diff = max_diff(&bf16.logits(&x).unwrap(), &reference);
        let scale = max_abs(&reference);
        eprintln!("bf16: largest logit difference {diff} (largest logit {scale})");
        assert!(diff < 0.02 * scale.max(1.0), "{diff} against {scale}");
    }

    #[test]
    fn direct_kernels_switch_networks_on_one_thread() {
        // Two networks of different geometry, alternated on this thread (as
        // after a reload): each still matches candle's.
        let a = ModelMeta {
            input_size: 32,
            channels: vec![16, 32, 16],
            ..tiny_meta()
        };
        let b = ModelMeta {
            input_size: 16,
            channels: vec![32, 16],
            ..tiny_meta()
        };
        for meta in [&a, &b, &a, &b] {
            let cnn = Cnn::new(meta.clone(), &random_tensors(meta), ConvImpl::Candle).unwrap();
            let x = probe_input(meta, &Device::Cpu).unwrap();
            let reference = cnn.forward(&x, false, None).unwrap();
            let direct = cnn.classifier(ConvImpl::Direct).unwrap();
            assert!(max_diff(&direct.logits(&x).unwrap(), &reference) < 1e-4);
        }
    }

    #[test]
    fn unsuitable_shapes_fall_back_from_direct() {
        let meta = tiny_meta(); // 8 output channels: not a multiple of 16
        let t = random_tensors(&meta);
        let c = Cnn::new(meta, &t, ConvImpl::Direct)
            .unwrap()
            .classifier(ConvImpl::Direct)
            .unwrap();
        assert_eq!(c.conv_impl(), ConvImpl::Fast);
    }

    #[test]
    fn wrong_shapes_and_missing_tensors_are_errors() {
        let meta = tiny_meta();
        let mut t = random_tensors(&meta);
        t.insert(
            "fc.bias".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = Cnn::new(meta.clone(), &t, ConvImpl::Fast)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("fc.bias"), "{err}");
        t.remove("blocks.1.conv.weight");
        let err = Cnn::new(meta, &t, ConvImpl::Fast)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("missing tensor `blocks.1.conv.weight`"),
            "{err}"
        );
    }

    #[test]
    fn probe_mismatch_is_refused() {
        let mut meta = tiny_meta();
        let t = random_tensors(&meta);
        let good = Cnn::new(meta.clone(), &t, ConvImpl::Fast)
            .unwrap()
            .classifier(ConvImpl::Fast)
            .unwrap()
            .probabilities(&probe_input(&meta, &Device::Cpu).unwrap())
            .unwrap();
        meta.probe = good.clone();
        assert!(Classifier::from_parts(meta.clone(), &t, ConvImpl::Fast).is_ok());
        meta.probe[0][0] += 0.1;
        assert!(Classifier::from_parts(meta, &t, ConvImpl::Fast).is_err());
    }
}

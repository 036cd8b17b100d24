//! Training-mode batch norm over the rows of a `[N, C]` CPU tensor (NHWC
//! activations flattened), as one custom op with a hand-written backward.
//!
//! Built from candle's elementwise ops, batch norm costs several full passes
//! forward and two strided reductions backward (candle sums over leading
//! dimensions element by element); here each direction is two passes over
//! the rows. The batch statistics are kept for the running averages.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::conv::contiguous_f32;

/// Batch mean and biased variance per channel of the last forward pass.
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel biased variance.
    pub var: Vec<f32>,
}

struct BatchNorm {
    eps: f32,
    stats: Arc<Mutex<BatchStats>>,
}

fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(contiguous_f32(cpu, layout)?)),
        _ => candle_core::bail!("batch norm runs on CPU tensors only"),
    }
}

impl CustomOp3 for BatchNorm {
    fn name(&self) -> &'static str {
        "batchnorm_rows"
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
        let (n, c) = l1.shape().dims2()?;
        let (x, gamma, beta) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let mut sum = vec![0f64; c];
        let mut sq = vec![0f64; c];
        // Accumulate each block of rows in f32, then in f64 across blocks.
        for block in x.chunks(c * 256) {
            let mut s = vec![0f32; c];
            let mut q = vec![0f32; c];
            for row in block.chunks_exact(c) {
                for i in 0..c {
                    s[i] += row[i];
                    q[i] += row[i] * row[i];
                }
            }
            for i in 0..c {
                sum[i] += f64::from(s[i]);
                sq[i] += f64::from(q[i]);
            }
        }
        let mean: Vec<f32> = sum.iter().map(|s| (s / n as f64) as f32).collect();
        let var: Vec<f32> = sq
            .iter()
            .zip(&sum)
            .map(|(q, s)| ((q / n as f64) - (s / n as f64).powi(2)).max(0.0) as f32)
            .collect();
        let scale: Vec<f32> = (0..c)
            .map(|i| gamma[i] / (var[i] + self.eps).sqrt())
            .collect();
        let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
        let mut y = vec![0f32; n * c];
        for (out, row) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for i in 0..c {
                out[i] = row[i] * scale[i] + shift[i];
            }
        }
        if let Ok(mut stats) = self.stats.lock() {
            *stats = BatchStats { mean, var };
        }
        Ok((CpuStorage::F32(y), Shape::from((n, c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c) = x.dims2()?;
        let stats = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        let invstd: Vec<f32> = stats
            .var
            .iter()
            .map(|v| 1.0 / (v + self.eps).sqrt())
            .collect();
        let gamma = gamma.to_vec1::<f32>()?;
        let (dx, dgamma, dbeta) = with_slice(x, |x| {
            with_slice(grad, |dy| {
                // Pass 1: sum(dy) and sum(dy * xhat) per channel.
                let mut dbeta = vec![0f64; c];
                let mut dgamma = vec![0f64; c];
                for (xb, gb) in x.chunks(c * 256).zip(dy.chunks(c * 256)) {
                    let mut b = vec![0f32; c];
                    let mut g = vec![0f32; c];
                    for (xr, gr) in xb.chunks_exact(c).zip(gb.chunks_exact(c)) {
                        for i in 0..c {
                            b[i] += gr[i];
                            g[i] += gr[i] * (xr[i] - stats.mean[i]) * invstd[i];
                        }
                    }
                    for i in 0..c {
                        dbeta[i] += f64::from(b[i]);
                        dgamma[i] += f64::from(g[i]);
                    }
                }
                let dbeta: Vec<f32> = dbeta.into_iter().map(|v| v as f32).collect();
                let dgamma: Vec<f32> = dgamma.into_iter().map(|v| v as f32).collect();
                // Pass 2: dx = gamma * invstd / N * (N dy - sum(dy) - xhat sum(dy xhat)).
                let k: Vec<f32> = (0..c).map(|i| gamma[i] * invstd[i]).collect();
                let inv_n = 1.0 / n as f32;
                let mut dx = vec![0f32; n * c];
                for ((out, xr), gr) in dx
                    .chunks_exact_mut(c)
                    .zip(x.chunks_exact(c))
                    .zip(dy.chunks_exact(c))
                {
                    for i in 0..c {
                        let xhat = (xr[i] - stats.mean[i]) * invstd[i];
                        out[i] = k[i] * (gr[i] - (dbeta[i] + xhat * dgamma[i]) * inv_n);
                    }
                }
                (dx, dgamma, dbeta)
            })
        })??;
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (n, c), device)?),
            Some(Tensor::from_vec(dgamma, c, device)?),
            Some(Tensor::from_vec(dbeta, c, device)?),
        ))
    }
}

/// Normalises each column of `x` `[N, C]` by its batch mean and variance,
/// then scales by `gamma` and shifts by `beta`. Differentiable in all three.
/// Returns the output and the batch statistics (for the running averages).
pub fn batch_norm_rows(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    let stats = Arc::new(Mutex::new(BatchStats::default()));
    let op = BatchNorm {
        eps: eps as f32,
        stats: stats.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let s = stats.lock().map(|s| s.clone()).unwrap_or_default();
    Ok((y, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 1.5)
            .collect()
    }

    fn reference(x: &Tensor, g: &Tensor, b: &Tensor) -> Tensor {
        let mean = x.mean_keepdim(0).unwrap();
        let centred = x.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(0).unwrap();
        let xhat = centred
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        xhat.broadcast_mul(g).unwrap().broadcast_add(b).unwrap()
    }

    #[test]
    fn forward_and_gradients_match_plain_ops() {
        let dev = Device::Cpu;
        let x = Var::from_vec(values(600 * 5, 1), (600, 5), &dev).unwrap();
        let g = Var::from_vec(vec![0.5f32, 1.0, 1.5, -2.0, 0.1], 5, &dev).unwrap();
        let b = Var::from_vec(vec![0.0f32, 0.2, -0.3, 1.0, 0.0], 5, &dev).unwrap();
        let up = Tensor::from_vec(values(600 * 5, 7), (600, 5), &dev).unwrap();
        let (fast, stats) = batch_norm_rows(&x, &g, &b, 1e-5).unwrap();
        let slow = reference(&x, &g, &b);
        let diff = crate::model::max_diff;
        assert!(diff(&fast, &slow) < 1e-4);
        let mean = x.mean(0).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            mean.iter()
                .zip(&stats.mean)
                .all(|(a, b)| (a - b).abs() < 1e-5)
        );
        let gf = (fast * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [x.as_tensor(), g.as_tensor(), b.as_tensor()] {
            let d = diff(gf.get(v).unwrap(), gs.get(v).unwrap());
            assert!(d < 1e-3, "gradient differs by {d}");
        }
    }
}

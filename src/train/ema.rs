//! An exponential moving average of a model's tensors, updated after every
//! optimiser step. Averaged weights usually generalise better than the last
//! step's; the trainer validates both. Holds copies only: it never changes
//! the model it follows.

use std::collections::BTreeMap;

use candle_core::Tensor;

/// The running average of every tensor of a model, by file name.
pub struct Ema {
    decay: f64,
    updates: usize,
    tensors: BTreeMap<String, Tensor>,
}

impl Ema {
    /// Starts the average at a copy of `tensors`. `decay` is the weight of the
    /// old average at each update, in (0, 1).
    pub fn new(decay: f64, tensors: &BTreeMap<String, Tensor>) -> candle_core::Result<Self> {
        Ok(Self {
            decay,
            updates: 0,
            tensors: snapshot(tensors)?,
        })
    }

    /// The decay of the next update: smaller at first, so that the average
    /// does not remember the random initialisation for long.
    fn next_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// Moves the average towards `current` (the same names, the same shapes).
    pub fn update(&mut self, current: &BTreeMap<String, Tensor>) -> candle_core::Result<()> {
        let d = self.next_decay();
        for (name, avg) in &mut self.tensors {
            let Some(now) = current.get(name) else {
                candle_core::bail!("moving average: the model has no tensor {name}");
            };
            // Detached: a model's tensors record the operations made with
            // them for back-propagation, which would keep every earlier
            // average alive.
            *avg = ((&*avg * d)? + (now.detach() * (1.0 - d))?)?.detach();
        }
        self.updates += 1;
        Ok(())
    }

    /// The averaged tensors.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }
}

/// A copy of `tensors` that later optimiser steps do not change and that
/// records no operations for back-propagation.
pub fn snapshot(
    tensors: &BTreeMap<String, Tensor>,
) -> candle_core::Result<BTreeMap<String, Tensor>> {
    tensors
        .iter()
        .map(|(k, t)| t.copy().map(|t| (k.clone(), t.detach())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn one(v: f32) -> BTreeMap<String, Tensor> {
        BTreeMap::from([("w".to_string(), Tensor::new(&[v], &Device::Cpu).unwrap())])
    }

    fn value(ema: &Ema) -> f32 {
        ema.tensors()["w"].to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn follows_a_constant_and_lags_a_step() {
        let mut ema = Ema::new(0.9, &one(0.0)).unwrap();
        // The first updates move quickly (decay 1/10, 2/11, ...).
        ema.update(&one(1.0)).unwrap();
        assert!((value(&ema) - 0.9).abs() < 1e-6, "{}", value(&ema));
        for _ in 0..200 {
            ema.update(&one(1.0)).unwrap();
        }
        assert!((value(&ema) - 1.0).abs() < 1e-5);
        // Then at most 10% of a jump per step.
        ema.update(&one(2.0)).unwrap();
        assert!((value(&ema) - 1.1).abs() < 1e-5, "{}", value(&ema));
    }

    #[test]
    fn a_missing_tensor_is_an_error() {
        let mut ema = Ema::new(0.9, &one(0.0)).unwrap();
        assert!(ema.update(&BTreeMap::new()).is_err());
    }
}

//! The inference thread: takes batches of decoded pictures from the
//! [`Batcher`], runs one forward pass per batch on the current model, and
//! hands every answer to the publisher.
//!
//! A plain OS thread (candle's forward pass blocks); it never touches NATS.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::answer::{Answer, Envelope, seen};
use super::lifecycle::{Fault, StageGuard};
use super::model_slot::ModelSlot;
use crate::batcher::Batcher;
use crate::metrics::Metrics;
use crate::preprocess::Framing;
use crate::protocol::{ErrorCode, Seen};

/// A picture ready for the model.
pub struct Decoded {
    /// Who asked, and where to answer.
    pub env: Envelope,
    /// The encoded picture, kept to decode again if the model's input size
    /// changed by a reload since.
    pub image: bytes::Bytes,
    /// Normalised input for a model of this input length.
    pub input: Vec<f32>,
    /// What the input shows: the whole picture or a face.
    pub seen: Seen,
}

/// Input buffers passed back from the inference thread to the decoders, so
/// that decoding a picture does not allocate its model input.
#[derive(Clone, Default)]
pub struct InputPool(Arc<Mutex<Vec<Vec<f32>>>>);

impl InputPool {
    /// Buffers kept at most; more are dropped.
    const KEEP: usize = 512;

    /// A buffer of `len` values (contents unspecified: the caller overwrites
    /// all of them).
    pub fn take(&self, len: usize) -> Vec<f32> {
        let mut v = self
            .0
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        if v.len() != len {
            v.clear();
            v.resize(len, 0.0);
        }
        v
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, v: Vec<f32>) {
        if let Ok(mut pool) = self.0.lock()
            && pool.len() < Self::KEEP
        {
            pool.push(v);
        }
    }
}

/// Runs until every sender of the batcher's channel is gone; `_alive`
/// reports the stage dead if it ends before the worker stops.
pub fn run(
    mut batcher: Batcher<Decoded>,
    slot: ModelSlot,
    answers: UnboundedSender<Answer>,
    metrics: Metrics,
    pool: InputPool,
    threads: usize,
    _alive: StageGuard,
) {
    let mut batch = Vec::new();
    let mut buffer: Vec<f32> = Vec::new();
    while batcher.next_batch(&mut batch) {
        Fault::InferencePanic.trigger();
        let model = slot.current();
        let len = model.pre.input_len();
        buffer.clear();
        let mut items = Vec::with_capacity(batch.len());
        for mut item in batch.drain(..) {
            if item.input.len() != len {
                // Decoded for a previous model with another input size.
                item.input.resize(len, 0.0);
                match model.pre.run(&item.image, &mut item.input) {
                    Ok(Framing::NoFace) => {
                        let _ = answers.send(Answer::NoFace {
                            env: item.env,
                            model: model.id.clone(),
                        });
                        continue;
                    }
                    Ok(framing) => item.seen = seen(&framing),
                    Err(e) => {
                        let _ = answers.send(Answer::Failure {
                            env: item.env,
                            code: e.code,
                            detail: e.detail,
                        });
                        continue;
                    }
                }
            }
            buffer.extend_from_slice(&item.input);
            pool.give(item.input);
            items.push((item.env, item.seen));
        }
        if items.is_empty() {
            continue;
        }
        let n = items.len();
        let started = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            model.classifier.probabilities_of(&buffer, threads)
        }));
        metrics
            .inference_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.batch_size.observe(n as f64);
        match result {
            Ok(Ok(probs)) if probs.len() == n => {
                for ((env, seen), scores) in items.into_iter().zip(probs) {
                    let _ = answers.send(Answer::Label {
                        env,
                        scores,
                        labels: model.labels.clone(),
                        seen,
                        model: model.id.clone(),
                    });
                }
            }
            other => {
                let detail = match other {
                    Ok(Err(e)) => format!("inference failed: {e}"),
                    Err(_) => "inference panicked".to_string(),
                    Ok(Ok(p)) => format!("inference returned {} rows for {n} pictures", p.len()),
                };
                tracing::error!("{detail}");
                for (env, _) in items {
                    let _ = answers.send(Answer::Failure {
                        env,
                        code: ErrorCode::Internal,
                        detail: detail.clone(),
                    });
                }
            }
        }
    }
}

//! The decode stage: parsed requests are decoded and framed on blocking
//! threads, at most `threads` at a time, in arrival order. A framed picture
//! goes on to the batcher; a picture without a face, or one that cannot be
//! decoded, is answered from here.
//!
//! Runs the current model's [`crate::preprocess::Preprocessor`]; it does not
//! classify and does not touch NATS.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc};

use super::answer::{Answer, Envelope, seen};
use super::infer::{Decoded, InputPool};
use super::model_slot::ModelSlot;
use crate::batcher::Inflow;
use crate::metrics::Metrics;
use crate::preprocess::Framing;
use crate::protocol::{ErrorCode, Request};

/// A request whose envelope and picture were read, waiting to be decoded.
pub struct Parsed {
    /// Who asked.
    pub env: Envelope,
    /// The request.
    pub request: Request,
}

/// What the decode stage hands its results to.
pub struct DecodeStage {
    /// The model whose preprocessing applies.
    pub slot: ModelSlot,
    /// Framed pictures, to the batcher.
    pub decoded: std::sync::mpsc::SyncSender<Decoded>,
    /// Answers, to the publisher.
    pub answers: mpsc::UnboundedSender<Answer>,
    /// Tells the batcher how many pictures are being decoded.
    pub inflow: Inflow,
    /// Reused model-input buffers.
    pub pool: InputPool,
    /// Counters.
    pub metrics: Metrics,
    /// Pictures decoded at the same time.
    pub threads: usize,
}

impl DecodeStage {
    /// Decodes every request that arrives until the channel closes, then
    /// waits for the decodes still running.
    pub async fn run(self, mut parsed: mpsc::UnboundedReceiver<Parsed>) {
        let threads = self.threads.max(1);
        let permits = Arc::new(Semaphore::new(threads));
        let stage = Arc::new(self);
        while let Some(item) = parsed.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let guard = stage.inflow.enter();
            let stage = stage.clone();
            tokio::task::spawn_blocking(move || {
                stage.decode(item);
                drop(guard);
                drop(permit);
            });
        }
        let _ = permits.acquire_many(threads as u32).await;
    }

    fn decode(&self, Parsed { env, request }: Parsed) {
        let model = self.slot.current();
        let started = Instant::now();
        let mut input = self.pool.take(model.pre.input_len());
        let outcome = model.pre.run(&request.image, &mut input);
        self.metrics
            .decode_seconds
            .observe(started.elapsed().as_secs_f64());
        let model_id = model.id.clone();
        drop(model);
        let answer = match outcome {
            Ok(Framing::NoFace) => {
                self.pool.give(input);
                Answer::NoFace {
                    env,
                    model: model_id,
                }
            }
            Ok(framing) => {
                let item = Decoded {
                    env,
                    image: request.image,
                    input,
                    seen: seen(&framing),
                };
                match self.decoded.send(item) {
                    Ok(()) => return,
                    Err(std::sync::mpsc::SendError(item)) => Answer::Failure {
                        env: item.env,
                        code: ErrorCode::Internal,
                        detail: "the inference thread has stopped".into(),
                    },
                }
            }
            Err(e) => Answer::Failure {
                env,
                code: e.code,
                detail: e.detail,
            },
        };
        let _ = self.answers.send(answer);
    }
}

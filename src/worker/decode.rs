//! The decode stage: parsed requests are decoded and framed on `threads`
//! threads of its own, which take the next request as soon as they are
//! done with one (no hand-off through the async runtime per picture). A
//! framed picture goes on to the batcher; a picture without a face, or one
//! that cannot be decoded, is answered from here.
//!
//! Runs the current model's [`crate::preprocess::Preprocessor`]; it does not
//! classify and does not touch NATS.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc;

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
    /// Starts `threads` decoding threads that decode every request from
    /// `parsed` until all its senders are gone; join them to wait for the
    /// decodes still running.
    pub fn start(self, parsed: Receiver<Parsed>) -> std::io::Result<Vec<JoinHandle<()>>> {
        let stage = Arc::new(self);
        let parsed = Arc::new(Mutex::new(parsed));
        (0..stage.threads.max(1))
            .map(|i| {
                let (stage, parsed) = (stage.clone(), parsed.clone());
                std::thread::Builder::new()
                    .name(format!("decode-{i}"))
                    .spawn(move || stage.serve(&parsed))
            })
            .collect()
    }

    /// One decoding thread: the next request, whichever thread is free
    /// first, until the channel closes.
    fn serve(&self, parsed: &Mutex<Receiver<Parsed>>) {
        loop {
            // The lock is held while waiting, so one idle thread waits on
            // the channel and the others on the lock.
            let next = match parsed.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok(item) = next else { return };
            let guard = self.inflow.enter();
            // Decoders catch their own panics (`internal` answers); this
            // keeps the thread serving should anything else here panic.
            if std::panic::catch_unwind(AssertUnwindSafe(|| self.decode(item))).is_err() {
                tracing::error!("a decode panicked outside the decoder; its request has no answer");
            }
            drop(guard);
        }
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

//! The parse stage: takes requests from the [`Source`] until the worker
//! stops (draining within the shutdown timeout), counts each one in, reads
//! who asked and sends it on to decoding, or answers at once when it cannot
//! be parsed. It decodes nothing and never waits on a later stage.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use tokio::sync::mpsc;

use super::WorkerConfig;
use super::answer::{Answer, Envelope};
use super::decode::Parsed;
use super::settle::Tracker;
use super::source::{Source, Taken};
use crate::metrics::{Health, Metrics};
use crate::protocol::{Request, USERID_HEADER};

/// The intake loop's view of the pipeline: where parsed requests and
/// immediate answers go.
pub struct Taker<'a> {
    /// The worker's settings (shutdown timeout, JetStream stream).
    pub cfg: &'a WorkerConfig,
    /// Request counters.
    pub metrics: &'a Metrics,
    /// Where draining is reported.
    pub health: &'a Health,
    /// JetStream deliveries in progress.
    pub tracker: &'a Tracker,
    /// To the decode stage.
    pub parsed: std::sync::mpsc::Sender<Parsed>,
    /// To the publisher, for requests answered at once.
    pub answers: mpsc::UnboundedSender<Answer>,
}

impl Taker<'_> {
    /// Takes requests until the source ends or the worker is stopped and
    /// the source is drained (at most the shutdown timeout).
    pub async fn take_requests(
        self,
        source: &mut Source,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut draining = false;
        // Once draining, how long the subscription may take to end (it
        // cannot end while the server is unreachable).
        let drain_deadline = tokio::time::sleep(Duration::MAX);
        tokio::pin!(drain_deadline);
        loop {
            let taken = tokio::select! {
                next = source.next() => match next {
                    Some(t) => t,
                    None => break,
                },
                _ = &mut drain_deadline, if draining => {
                    tracing::warn!("shutdown timeout: the subscription did not finish draining");
                    break;
                }
                _ = stop.changed(), if !draining => {
                    draining = true;
                    // Not ready from now on, before the subscription closes.
                    self.health.draining.store(true, Ordering::SeqCst);
                    drain_deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + self.cfg.shutdown_timeout);
                    if source.stop_taking().await {
                        continue;
                    }
                    break;
                }
            };
            self.take(taken);
        }
        self.health.draining.store(true, Ordering::SeqCst);
    }

    /// Counts a request in, reads who asked, and sends it on to decoding
    /// (or answers it at once when it cannot be parsed).
    fn take(&self, Taken { msg, js, held }: Taken) {
        if let Some(ack) = &js {
            self.tracker.start(ack);
        }
        self.metrics.requests.inc();
        self.metrics.in_flight.inc();
        let msg_id = header(&msg.headers, "Nats-Msg-Id")
            .map(str::to_owned)
            .or_else(|| {
                // Derived from the stream sequence, so redeliveries share it.
                let stream = self
                    .cfg
                    .jetstream
                    .as_ref()
                    .map_or("", |j| j.stream.as_str());
                js.as_ref()
                    .map(|a| format!("{stream}:{}", a.stream_sequence))
            });
        let env = Envelope {
            userid: None,
            reply: msg.reply.clone(),
            msg_id,
            received: Instant::now(),
            js,
            held,
        };
        let userid = header(&msg.headers, USERID_HEADER).map(|s| s.as_bytes().to_vec());
        match Request::parse(msg.payload, userid.as_deref()) {
            Ok(request) => {
                let env = Envelope {
                    userid: Some(request.userid.clone()),
                    ..env
                };
                if let Err(std::sync::mpsc::SendError(p)) =
                    self.parsed.send(Parsed { env, request })
                {
                    let _ = self.answers.send(Answer::Failure {
                        env: p.env,
                        code: crate::protocol::ErrorCode::Internal,
                        detail: "the decode stage has stopped".into(),
                    });
                }
            }
            Err(e) => {
                let env = Envelope {
                    userid: e.userid.clone(),
                    ..env
                };
                let _ = self.answers.send(Answer::Failure {
                    env,
                    code: e.code,
                    detail: e.detail,
                });
            }
        }
    }
}

fn header<'a>(headers: &'a Option<HeaderMap>, name: &str) -> Option<&'a str> {
    headers.as_ref()?.get(name).map(|v| v.as_str())
}

//! JetStream mode, the settling side: an answer is confirmed (published
//! through JetStream with a publish ack when a stream captures its subject,
//! else published and flushed) before its request is settled.
//!
//! Settling: a result is acked; a bad-input error is terminated (never
//! redelivered) after its error was published; a transient failure (the
//! answer could not be published, an internal error) is naked with a delay,
//! and on its last allowed delivery is published to the dead-letter subject
//! with its original headers and payload, then terminated. Work that outlives
//! half the ack wait gets in-progress acks ([`Tracker`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};

use super::source::jetstream::{JsAck, JsConfig};
use crate::metrics::Metrics;

/// Requests being worked on, for in-progress acks.
#[derive(Clone, Default)]
pub struct Tracker(Arc<Mutex<HashMap<String, Instant>>>);

impl Tracker {
    /// Starts tracking a delivery.
    pub fn start(&self, ack: &JsAck) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(ack.ack_subject.to_string(), Instant::now());
        }
    }

    /// Stops tracking a delivery.
    pub fn finish(&self, ack: &JsAck) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(ack.ack_subject.as_str());
        }
    }

    /// Sends `+WPI` for work older than half the ack wait, forever.
    pub async fn keep_alive(self, client: async_nats::Client, ack_wait: Duration) {
        let half = ack_wait / 2;
        let mut tick = tokio::time::interval((ack_wait / 4).max(Duration::from_millis(100)));
        loop {
            tick.tick().await;
            let due: Vec<String> = match self.0.lock() {
                Ok(mut m) => m
                    .iter_mut()
                    .filter(|(_, t)| t.elapsed() >= half)
                    .map(|(s, t)| {
                        *t = Instant::now();
                        s.clone()
                    })
                    .collect(),
                Err(_) => continue,
            };
            for subject in due {
                let _ = client.publish(subject, AckKind::Progress.into()).await;
            }
        }
    }
}

/// Publishes answers so that, in JetStream mode, they are confirmed before
/// the request is settled: through JetStream (publish ack) when a stream
/// captures the subject, else a core publish followed by a flush.
#[derive(Clone)]
pub struct ConfirmedPublisher {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Per subject: captured by a stream?, and when that was looked up.
    captured: Arc<Mutex<HashMap<String, (bool, Instant)>>>,
}

/// How long a lookup of "which stream captures this subject" is trusted.
const CAPTURE_TTL: Duration = Duration::from_secs(5);

impl ConfirmedPublisher {
    /// A publisher over `client`.
    pub fn new(client: async_nats::Client) -> Self {
        Self {
            js: jetstream::new(client.clone()),
            client,
            captured: Arc::default(),
        }
    }

    async fn is_captured(&self, subject: &str) -> bool {
        let cached = self
            .captured
            .lock()
            .ok()
            .and_then(|m| m.get(subject).copied());
        if let Some((known, at)) = cached
            && at.elapsed() < CAPTURE_TTL
        {
            return known;
        }
        // Looked up again every few seconds: streams come and go, and a
        // lookup made while disconnected says nothing.
        let captured = self.js.stream_by_subject(subject).await.is_ok();
        if let Ok(mut m) = self.captured.lock() {
            m.insert(subject.to_string(), (captured, Instant::now()));
        }
        captured
    }

    /// Publishes and waits for the confirmation.
    pub async fn publish(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> anyhow::Result<()> {
        if self.is_captured(subject).await {
            let confirmed = async {
                self.js
                    .publish_with_headers(subject.to_string(), headers, payload)
                    .await?
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            }
            .await;
            if confirmed.is_err() {
                // The stream may have gone; look again next time.
                if let Ok(mut m) = self.captured.lock() {
                    m.remove(subject);
                }
            }
            confirmed.with_context(|| format!("publishing to {subject} (stream)"))
        } else {
            self.client
                .publish_with_headers(subject.to_string(), headers, payload)
                .await
                .with_context(|| format!("publishing to {subject}"))?;
            self.client.flush().await.context("flushing")
        }
    }
}

/// How a request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Answered with a result.
    Done,
    /// Answered with a bad-input error: never redeliver.
    Poison,
    /// Could not be answered now: redeliver later (or dead-letter).
    Retry,
}

/// Acks, terminates or naks a delivery; a retry on the last allowed
/// delivery goes to the dead-letter subject first.
pub async fn settle(
    client: &async_nats::Client,
    publisher: &ConfirmedPublisher,
    cfg: &JsConfig,
    metrics: &Metrics,
    ack: &JsAck,
    how: Settle,
) {
    let kind = match how {
        Settle::Done => AckKind::Ack,
        Settle::Poison => AckKind::Term,
        Settle::Retry if cfg.max_deliver > 0 && ack.delivered >= cfg.max_deliver => {
            let mut headers = ack.headers.clone().unwrap_or_default();
            headers.insert("Profile-Deliveries", ack.delivered.to_string().as_str());
            headers.insert(
                "Profile-Stream-Sequence",
                ack.stream_sequence.to_string().as_str(),
            );
            match publisher
                .publish(&cfg.deadletter_subject, headers, ack.payload.clone())
                .await
            {
                Ok(()) => {
                    metrics.dead_letters.inc();
                    tracing::error!(
                        sequence = ack.stream_sequence,
                        "request dead-lettered after {} deliveries",
                        ack.delivered
                    );
                    AckKind::Term
                }
                Err(e) => {
                    tracing::error!(
                        "dead-letter publish failed ({e}); leaving the request to the server"
                    );
                    AckKind::Nak(Some(cfg.nak_delay))
                }
            }
        }
        Settle::Retry => AckKind::Nak(Some(cfg.nak_delay)),
    };
    if let Err(e) = client.publish(ack.ack_subject.clone(), kind.into()).await {
        tracing::warn!("settling request {} failed: {e}", ack.stream_sequence);
    }
}

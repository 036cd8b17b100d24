//! JetStream mode (PROTOCOL §4), the source side: requests come from a
//! work-queue stream through a durable pull consumer shared by every
//! worker, each taken once the intake bound has room (the stream holds the
//! rest). Settling each request after its answer is confirmed is
//! [`crate::worker::settle`]'s job, not this module's.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::{HeaderMap, Subject};
use futures::StreamExt;

use super::Taken;
use super::intake::Intake;

/// JetStream settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsConfig {
    /// Stream capturing the request subject.
    pub stream: String,
    /// Durable pull consumer shared by the workers.
    pub consumer: String,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Deliveries before a request is dead-lettered.
    pub max_deliver: i64,
    /// Unacknowledged requests the server lets the consumer hold.
    pub max_ack_pending: i64,
    /// Where requests that used up their deliveries go.
    pub deadletter_subject: String,
    /// Delay before a naked request is redelivered.
    pub nak_delay: Duration,
}

impl Default for JsConfig {
    fn default() -> Self {
        Self {
            stream: "PROFILES".into(),
            consumer: "profile-workers".into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            max_ack_pending: 1024,
            deadletter_subject: "profiles.deadletter".into(),
            nak_delay: Duration::from_millis(500),
        }
    }
}

/// What travels with a JetStream request until it is settled.
#[derive(Debug, Clone)]
pub struct JsAck {
    /// The ack subject of this delivery.
    pub ack_subject: Subject,
    /// Stream sequence (identifies the request across redeliveries).
    pub stream_sequence: u64,
    /// Which delivery this is (1-based).
    pub delivered: i64,
    /// Original headers, for the dead-letter copy.
    pub headers: Option<HeaderMap>,
    /// Original payload, for the dead-letter copy.
    pub payload: bytes::Bytes,
}

/// Creates (if absent) or binds the stream and the durable consumer.
pub async fn setup(
    js: &jetstream::Context,
    cfg: &JsConfig,
    request_subject: &str,
) -> anyhow::Result<consumer::Consumer<consumer::pull::Config>> {
    let stream = js
        .get_or_create_stream(stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![request_subject.to_string()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating or binding the stream {}", cfg.stream))?;
    let consumer = stream
        .get_or_create_consumer(
            &cfg.consumer,
            consumer::pull::Config {
                durable_name: Some(cfg.consumer.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: cfg.ack_wait,
                max_deliver: cfg.max_deliver,
                max_ack_pending: cfg.max_ack_pending,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("creating or binding the consumer {}", cfg.consumer))?;
    Ok(consumer)
}

/// Pulls requests from the consumer, re-opening the pull stream after
/// errors (server restarts, missed heartbeats) so the worker never needs a
/// restart.
pub struct JsSource {
    consumer: consumer::Consumer<consumer::pull::Config>,
    batch: usize,
    messages: Option<consumer::pull::Stream>,
    intake: Intake,
}

impl JsSource {
    /// A source fetching `batch` requests at a time, taking each within `intake`.
    pub fn new(
        consumer: consumer::Consumer<consumer::pull::Config>,
        batch: usize,
        intake: Intake,
    ) -> Self {
        Self {
            consumer,
            batch: batch.max(1),
            messages: None,
            intake,
        }
    }

    /// The next request, once the bound has room: the plain message (reply
    /// subject cleared: in a stream it is the ack subject) and its ack handle.
    pub async fn next(&mut self) -> Taken {
        let (msg, ack) = self.pull().await;
        let held = self.intake.admit(msg.payload.len()).await;
        Taken {
            msg,
            js: Some(ack),
            held,
        }
    }

    async fn pull(&mut self) -> (async_nats::Message, JsAck) {
        loop {
            if self.messages.is_none() {
                match self
                    .consumer
                    .stream()
                    .max_messages_per_batch(self.batch)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                {
                    Ok(s) => self.messages = Some(s),
                    Err(e) => {
                        tracing::warn!("jetstream: cannot pull yet ({e}); retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            let Some(stream) = self.messages.as_mut() else {
                continue;
            };
            match stream.next().await {
                Some(Ok(msg)) => {
                    let (stream_sequence, delivered) = match msg.info() {
                        Ok(info) => (info.stream_sequence, info.delivered),
                        Err(_) => (0, 1),
                    };
                    let mut inner = msg.message;
                    let Some(ack_subject) = inner.reply.take() else {
                        continue;
                    };
                    let ack = JsAck {
                        ack_subject,
                        stream_sequence,
                        delivered,
                        headers: inner.headers.clone(),
                        payload: inner.payload.clone(),
                    };
                    return (inner, ack);
                }
                Some(Err(e)) => {
                    tracing::warn!("jetstream: pull error ({e}); re-opening the pull");
                    self.messages = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => {
                    self.messages = None;
                }
            }
        }
    }
}

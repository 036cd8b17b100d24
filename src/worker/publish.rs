//! The publish stage: answers go out in the order they come, with their
//! headers, to the result or error subject and to the reply subject when
//! there is one. In JetStream mode each answer is confirmed, then its
//! request settled ([`super::settle`]). Counters of answers move only once
//! the answer is out.
//!
//! It never decodes or classifies.

use async_nats::HeaderMap;
use tokio::sync::mpsc;

use super::Subjects;
use super::answer::{Answer, Envelope};
use super::settle::{self, ConfirmedPublisher, Settle, Tracker};
use super::source::jetstream::JsConfig;
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, ErrorReply, ProfileResult, USERID_HEADER, UserId};

/// The `label` of `results_total` for an answer without a face.
pub const NO_FACE_LABEL: &str = "none";

/// What the publish stage needs.
pub struct Publisher {
    /// The connection answers leave by.
    pub client: async_nats::Client,
    /// Result and error subjects.
    pub subjects: Subjects,
    /// JetStream settings, in JetStream mode.
    pub jetstream: Option<JsConfig>,
    /// Counters.
    pub metrics: Metrics,
    /// Deliveries being worked on (JetStream mode).
    pub tracker: Tracker,
}

/// An answer ready to leave: where, what, how to settle, what to count.
struct Outgoing {
    env: Envelope,
    subject: String,
    payload: Vec<u8>,
    settle: Settle,
    counted: Counted,
}

impl Publisher {
    /// Publishes every answer until the channel closes.
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Answer>) {
        let confirmed = ConfirmedPublisher::new(self.client.clone());
        while let Some(answer) = rx.recv().await {
            let out = self.outgoing(answer);
            let env = self.send(out, &confirmed).await;
            self.metrics
                .latency_seconds
                .observe(env.received.elapsed().as_secs_f64());
            self.metrics.in_flight.dec();
        }
    }

    /// The payload and subject of an answer.
    fn outgoing(&self, answer: Answer) -> Outgoing {
        match answer {
            Answer::Label {
                env,
                scores,
                labels,
                seen,
                model,
            } => {
                let latency = env.received.elapsed().as_secs_f64() * 1e3;
                let userid = answered_userid(&env);
                let result = ProfileResult::new(&userid, &labels, &scores, seen, &model, latency);
                self.result(env, &result)
            }
            Answer::NoFace { env, model } => {
                let latency = env.received.elapsed().as_secs_f64() * 1e3;
                let result = ProfileResult::no_face(&answered_userid(&env), &model, latency);
                self.result(env, &result)
            }
            Answer::Failure { env, code, detail } => {
                if code == ErrorCode::Internal {
                    tracing::error!(userid = ?env.userid, "internal error: {detail}");
                }
                let reply = ErrorReply::new(env.userid.as_ref(), code, detail);
                Outgoing {
                    env,
                    subject: self.subjects.errors.clone(),
                    payload: serde_json::to_vec(&reply).unwrap_or_default(),
                    settle: if code.is_bad_input() {
                        Settle::Poison
                    } else {
                        Settle::Retry
                    },
                    counted: Counted::Error(code),
                }
            }
        }
    }

    fn result(&self, env: Envelope, result: &ProfileResult) -> Outgoing {
        let label = result
            .gender
            .clone()
            .unwrap_or_else(|| NO_FACE_LABEL.into());
        Outgoing {
            env,
            subject: self.subjects.results.clone(),
            payload: serde_json::to_vec(result).unwrap_or_default(),
            settle: Settle::Done,
            counted: Counted::Result(label, result.faces),
        }
    }

    /// Sends one answer (and settles its request in JetStream mode); gives
    /// the envelope back for the latency figure.
    async fn send(&self, out: Outgoing, confirmed: &ConfirmedPublisher) -> Envelope {
        let Outgoing {
            mut env,
            subject,
            payload,
            settle,
            counted,
        } = out;
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        if let Some(u) = &env.userid {
            headers.insert(USERID_HEADER, u.as_str());
        }
        if let Some(id) = &env.msg_id {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        let payload = bytes::Bytes::from(payload);
        match (&env.js, &self.jetstream) {
            (Some(ack), Some(cfg)) => {
                // An internal error is retried, not answered, until the last delivery.
                let last = cfg.max_deliver > 0 && ack.delivered >= cfg.max_deliver;
                let outcome = if settle == Settle::Retry && !last {
                    Settle::Retry
                } else {
                    match confirmed.publish(&subject, headers, payload).await {
                        Ok(()) => {
                            counted.record(&self.metrics);
                            settle
                        }
                        Err(e) => {
                            tracing::warn!(
                                "answer not confirmed, request will be redelivered: {e:#}"
                            );
                            Settle::Retry
                        }
                    }
                };
                settle::settle(&self.client, confirmed, cfg, &self.metrics, ack, outcome).await;
                self.tracker.finish(ack);
            }
            _ => {
                // Answered from here on: the request's share of the intake
                // bound goes back before the answer leaves, so a client that
                // sends its next request as it reads this answer never finds
                // the bound still full (a window of exactly --max-pending
                // requests lost one now and then under load).
                env.held.give_back();
                match self
                    .client
                    .publish_with_headers(subject, headers.clone(), payload.clone())
                    .await
                {
                    Ok(()) => counted.record(&self.metrics),
                    Err(e) => tracing::error!("publishing an answer failed: {e}"),
                }
                if let Some(reply) = env.reply.clone()
                    && let Err(e) = self
                        .client
                        .publish_with_headers(reply, headers, payload)
                        .await
                {
                    tracing::error!("publishing to the reply subject failed: {e}");
                }
            }
        }
        env
    }
}

/// The user id an answer carries (every request that reaches the model has one).
fn answered_userid(env: &Envelope) -> UserId {
    env.userid
        .clone()
        .unwrap_or_else(|| UserId::parse(b"?").expect("valid id"))
}

/// What an answer adds to the counters once it is out.
enum Counted {
    /// A result: its label and the faces found (`None`: detection off).
    Result(String, Option<usize>),
    Error(ErrorCode),
}

impl Counted {
    fn record(&self, metrics: &Metrics) {
        match self {
            Self::Result(label, faces) => {
                metrics.results.with_label_values(&[label.as_str()]).inc();
                if let Some(n) = faces {
                    metrics.faces(*n);
                }
            }
            Self::Error(code) => metrics.error(*code),
        }
    }
}

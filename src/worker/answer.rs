//! What travels between the stages: the [`Envelope`] of a request (who
//! asked, where to answer, what it holds of the worker's intake) and the
//! [`Answer`] the publisher sends.
//!
//! Plain data; no stage logic here.

use std::sync::Arc;
use std::time::Instant;

use async_nats::Subject;

use super::source::intake::Held;
use super::source::jetstream::JsAck;
use crate::preprocess::Framing;
use crate::protocol::{ErrorCode, Seen, UserId};

/// Who asked and where to answer; travels with a request through the stages.
#[derive(Debug)]
pub struct Envelope {
    /// The user id, once it was read.
    pub userid: Option<UserId>,
    /// Reply subject of a request/reply call.
    pub reply: Option<Subject>,
    /// `Nats-Msg-Id` of the request, copied to the answer.
    pub msg_id: Option<String>,
    /// When the worker received the request.
    pub received: Instant,
    /// JetStream delivery to settle once answered (JetStream mode only).
    pub js: Option<JsAck>,
    /// The request's share of the intake bound, given back when the
    /// envelope is dropped (after its answer is out).
    pub held: Held,
}

/// An answer on its way to the publisher.
pub enum Answer {
    /// Probabilities for a picture.
    Label {
        /// The request.
        env: Envelope,
        /// One probability per label.
        scores: Vec<f32>,
        /// Label names.
        labels: Arc<[String]>,
        /// What was classified: the whole picture or one of its faces.
        seen: Seen,
        /// The model that produced the scores.
        model: Arc<str>,
    },
    /// A picture without a face: answered, not classified.
    NoFace {
        /// The request.
        env: Envelope,
        /// The model (and so the detector settings) that looked.
        model: Arc<str>,
    },
    /// An error reply.
    Failure {
        /// The request.
        env: Envelope,
        /// PROTOCOL §3 code.
        code: ErrorCode,
        /// What went wrong.
        detail: String,
    },
}

/// What §2 reports of a framing that was classified.
pub fn seen(framing: &Framing) -> Seen {
    match framing {
        Framing::Face { faces, face } => Seen::Face {
            faces: *faces,
            face: face.into(),
        },
        Framing::Whole | Framing::NoFace => Seen::Whole,
    }
}

//! Where requests come from (PROTOCOL §4): a core NATS queue subscription
//! ([`core`]) or a JetStream pull consumer ([`jetstream`]), each taking a
//! request only within the worker's [`intake`] bound.
//!
//! Sources hand out raw messages with their share of the bound; they do not
//! parse, decode or answer.

pub mod core;
pub mod intake;
pub mod jetstream;

use intake::Held;
use jetstream::{JsAck, JsSource};

/// A request taken from a source.
pub struct Taken {
    /// The message as it arrived (for JetStream, its reply subject cleared).
    pub msg: async_nats::Message,
    /// The delivery to settle, in JetStream mode.
    pub js: Option<JsAck>,
    /// Its share of the intake bound.
    pub held: Held,
}

/// Where requests come from.
pub enum Source {
    /// A core NATS queue subscription, bounded by dropping.
    Core(core::CoreSource),
    /// A JetStream pull consumer, bounded by waiting.
    Js(Box<JsSource>),
}

impl Source {
    /// The next request; `None` once a core subscription has ended.
    pub async fn next(&mut self) -> Option<Taken> {
        match self {
            Self::Core(core) => core.next().await,
            Self::Js(js) => Some(js.next().await),
        }
    }

    /// Stops taking new requests. A core subscription drains: everything
    /// the server sent before it took the unsubscription still comes out
    /// of [`Source::next`], then it ends; returns whether to keep reading.
    /// A JetStream source stops at once: anything pulled but not taken is
    /// redelivered by the server.
    pub async fn stop_taking(&mut self) -> bool {
        match self {
            Self::Core(core) => core.drain().await,
            Self::Js(_) => {
                tracing::info!("shutting down: no more pulls");
                false
            }
        }
    }
}

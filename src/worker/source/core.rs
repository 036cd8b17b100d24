//! Core NATS mode: a queue-group subscription read as fast as the server
//! sends, each request taken only if the intake bound has room and dropped
//! (counted, logged at warn at most once a second) otherwise, so a burst
//! never grows the worker's memory. The NATS client's own buffer is sized to
//! the same bound; what it drops when full is counted from its
//! slow-consumer events.

use std::time::{Duration, Instant};

use futures::StreamExt;

use super::Taken;
use super::intake::Intake;
use crate::metrics::{DropReason, Metrics};

/// How often a warning about drops may be logged.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// A bounded core NATS subscription.
pub struct CoreSource {
    sub: async_nats::Subscriber,
    intake: Intake,
    metrics: Metrics,
    drops: DropLog,
}

impl CoreSource {
    /// Reads `sub`, taking requests within `intake`.
    pub fn new(sub: async_nats::Subscriber, intake: Intake, metrics: Metrics) -> Self {
        Self {
            sub,
            intake,
            metrics,
            drops: DropLog::default(),
        }
    }

    /// The next request that fits in the bound; `None` once the
    /// subscription has ended.
    pub async fn next(&mut self) -> Option<Taken> {
        loop {
            // Out of tokio's cooperative budget: while messages are queued
            // this loop keeps reading, so the client's buffer does not fill
            // behind it during a burst.
            let msg = tokio::task::unconstrained(self.sub.next()).await?;
            match self.intake.try_admit(msg.payload.len()) {
                Some(held) => {
                    return Some(Taken {
                        msg,
                        js: None,
                        held,
                    });
                }
                None => {
                    self.metrics.dropped(DropReason::IntakeFull, 1);
                    self.drops.add(DropReason::IntakeFull, 1);
                }
            }
        }
    }

    /// Unsubscribes gracefully: the subscription ends once the server has
    /// confirmed the unsubscription, after every message it sent before
    /// (the vendored client's fix, vendor/README.md); returns whether
    /// messages may still come.
    pub async fn drain(&mut self) -> bool {
        tracing::info!("shutting down: draining the subscription");
        match self.sub.drain().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("drain failed ({e}); unsubscribing");
                let _ = self.sub.unsubscribe().await;
                false
            }
        }
    }
}

/// Counts drops and logs them at warn, at most once per `WARN_EVERY`.
#[derive(Debug)]
pub struct DropLog {
    since: Instant,
    unlogged: u64,
}

impl Default for DropLog {
    fn default() -> Self {
        Self {
            since: Instant::now() - WARN_EVERY,
            unlogged: 0,
        }
    }
}

impl DropLog {
    /// Notes `n` drops and logs them if the last warning is old enough.
    pub fn add(&mut self, reason: DropReason, n: u64) {
        self.unlogged += n;
        if self.since.elapsed() >= WARN_EVERY {
            tracing::warn!(
                reason = reason.as_str(),
                "{} requests dropped in the last {:.1} s: the worker holds as many \
                 unanswered requests as it may (--max-pending, --max-pending-bytes); \
                 add workers, or use --jetstream to hold bursts in a stream",
                self.unlogged,
                self.since.elapsed().as_secs_f64().min(3600.0)
            );
            self.unlogged = 0;
            self.since = Instant::now();
        }
    }
}

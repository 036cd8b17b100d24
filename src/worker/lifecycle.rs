//! How the worker's stages live and end: a guard that reports a stage dead
//! to `/healthz` when it ends before the worker stops, the bounded steps of
//! a shutdown, and the test-only fault hook that kills a stage on purpose.
//!
//! No request handling here.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::metrics::Health;

/// Held by a pipeline stage for as long as it runs. Dropped (returned,
/// panicked) while the worker is not draining, it marks the stage dead:
/// `/healthz` and `/readyz` answer 503 and an orchestrator restarts the
/// worker.
pub struct StageGuard {
    name: &'static str,
    health: Arc<Health>,
}

impl StageGuard {
    /// A guard for the stage `name`.
    pub fn new(name: &'static str, health: Arc<Health>) -> Self {
        Self { name, health }
    }
}

impl Drop for StageGuard {
    fn drop(&mut self) {
        if !self.health.draining.load(Ordering::SeqCst) {
            tracing::error!(
                stage = self.name,
                "a pipeline stage has died; /healthz reports it"
            );
            self.health.stage_died(self.name);
        }
    }
}

/// Runs one shutdown step for at most `limit`; says so when it did not finish.
pub async fn bounded<T>(step: &str, limit: Duration, work: impl Future<Output = T>) -> Option<T> {
    match tokio::time::timeout(limit, work).await {
        Ok(done) => Some(done),
        Err(_) => {
            tracing::warn!("shutdown timeout: {step} did not finish within {limit:?}");
            None
        }
    }
}

/// Faults the tests provoke through `PROFILE_WORKER_TEST_FAULT` (a
/// comma-separated list of names); never set in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The inference thread panics when its first batch arrives.
    InferencePanic,
}

impl Fault {
    /// The environment variable listing the faults to provoke.
    pub const ENV: &'static str = "PROFILE_WORKER_TEST_FAULT";

    fn name(self) -> &'static str {
        match self {
            Self::InferencePanic => "inference-panic",
        }
    }

    /// Panics if this fault was asked for. The variable is read once per
    /// process, so the check costs nothing on the hot path.
    pub fn trigger(self) {
        static ASKED: OnceLock<String> = OnceLock::new();
        let asked = ASKED.get_or_init(|| std::env::var(Self::ENV).unwrap_or_default());
        if asked.split(',').any(|f| f.trim() == self.name()) {
            panic!("{}: provoked fault {}", Self::ENV, self.name());
        }
    }
}

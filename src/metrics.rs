//! The Prometheus metric set of PROTOCOL §6, registered in one registry that
//! is handed to the stages that record into it, and the HTTP endpoints
//! `/metrics`, `/healthz` and `/readyz`.
//!
//! No global counters: whoever records holds a [`Metrics`] (cheap to clone).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::protocol::ErrorCode;

/// Every metric the worker exports, prefix `profile_worker_`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests received (parsed or not).
    pub requests: IntCounter,
    /// Results published, by label.
    pub results: IntCounterVec,
    /// Error replies published, by PROTOCOL §3 code.
    pub errors: IntCounterVec,
    /// Pictures per forward pass.
    pub batch_size: Histogram,
    /// Seconds per forward pass (one observation per batch).
    pub inference_seconds: Histogram,
    /// Seconds to decode and preprocess one picture.
    pub decode_seconds: Histogram,
    /// Seconds from receipt to publication of the answer.
    pub latency_seconds: Histogram,
    /// Requests received and not yet answered.
    pub in_flight: IntGauge,
    /// Always 1, labelled with the model version and device in use.
    pub model_info: IntGaugeVec,
    /// Weight reloads by outcome (`ok`, `rejected`).
    pub model_reloads: IntCounterVec,
    /// JetStream requests given up after their last delivery.
    pub dead_letters: IntCounter,
    /// Pictures answered, by faces found (`0`, `1`, `2+`; detection on only).
    pub faces_total: IntCounterVec,
    /// Requests lost before the worker could answer them, by reason.
    pub dropped: IntCounterVec,
}

fn buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, factor, count).unwrap_or_default()
}

impl Metrics {
    /// Creates and registers the metric set.
    pub fn new() -> Self {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace("profile_worker");
        let hist = |name: &str, help: &str, b: Vec<f64>| {
            Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .namespace("profile_worker")
                    .buckets(b),
            )
            .expect("valid histogram")
        };
        let m = Self {
            requests: IntCounter::with_opts(opts("requests_total", "Requests received."))
                .expect("valid"),
            results: IntCounterVec::new(
                opts("results_total", "Results published, by label."),
                &["label"],
            )
            .expect("valid"),
            errors: IntCounterVec::new(
                opts("errors_total", "Error replies published, by code."),
                &["error"],
            )
            .expect("valid"),
            batch_size: hist(
                "batch_size",
                "Pictures per forward pass.",
                vec![
                    1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0,
                ],
            ),
            inference_seconds: hist(
                "inference_seconds",
                "Seconds per forward pass, one observation per batch.",
                buckets(0.0005, 2.0, 14),
            ),
            decode_seconds: hist(
                "decode_seconds",
                "Seconds to decode and preprocess one picture.",
                buckets(0.0001, 2.0, 14),
            ),
            latency_seconds: hist(
                "latency_seconds",
                "Seconds from receiving a request to publishing its answer.",
                buckets(0.0005, 2.0, 16),
            ),
            in_flight: IntGauge::with_opts(opts(
                "in_flight",
                "Requests received and not yet answered.",
            ))
            .expect("valid"),
            model_info: IntGaugeVec::new(
                opts("model_info", "The model in use (always 1)."),
                &["model", "device"],
            )
            .expect("valid"),
            model_reloads: IntCounterVec::new(
                opts("model_reloads_total", "Weight reloads, by outcome."),
                &["outcome"],
            )
            .expect("valid"),
            dead_letters: IntCounter::with_opts(opts(
                "dead_letters_total",
                "JetStream requests published to the dead-letter subject.",
            ))
            .expect("valid"),
            faces_total: IntCounterVec::new(
                opts(
                    "faces_total",
                    "Pictures answered, by number of faces found (face detection on).",
                ),
                &["faces"],
            )
            .expect("valid"),
            dropped: IntCounterVec::new(
                opts(
                    "dropped_total",
                    "Requests lost before the worker could answer them, by reason.",
                ),
                &["reason"],
            )
            .expect("valid"),
            registry,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 13] = [
            Box::new(m.requests.clone()),
            Box::new(m.results.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.inference_seconds.clone()),
            Box::new(m.decode_seconds.clone()),
            Box::new(m.latency_seconds.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.model_info.clone()),
            Box::new(m.model_reloads.clone()),
            Box::new(m.dead_letters.clone()),
            Box::new(m.faces_total.clone()),
            Box::new(m.dropped.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        // Export every error code and reload outcome from the start, at zero.
        for code in ErrorCode::ALL {
            m.errors.with_label_values(&[code.as_str()]);
        }
        for outcome in ["ok", "rejected"] {
            m.model_reloads.with_label_values(&[outcome]);
        }
        for faces in ["0", "1", "2+"] {
            m.faces_total.with_label_values(&[faces]);
        }
        for reason in DropReason::ALL {
            m.dropped.with_label_values(&[reason.as_str()]);
        }
        m
    }

    /// Counts a picture answered with `n` faces found.
    pub fn faces(&self, n: usize) {
        let label = match n {
            0 => "0",
            1 => "1",
            _ => "2+",
        };
        self.faces_total.with_label_values(&[label]).inc();
    }

    /// Counts `n` requests lost for `reason`.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped.with_label_values(&[reason.as_str()]).inc_by(n);
    }

    /// Counts an error reply.
    pub fn error(&self, code: ErrorCode) {
        self.errors.with_label_values(&[code.as_str()]).inc();
    }

    /// Points `model_info` at a new model (and drops the old series).
    pub fn set_model(&self, model: &str, device: &str) {
        self.model_info.reset();
        self.model_info.with_label_values(&[model, device]).set(1);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a request was lost before it could be answered (`dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The worker already held its bound of unanswered requests or bytes.
    IntakeFull,
    /// The NATS client's buffer for the subscription was full.
    SlowConsumer,
}

impl DropReason {
    /// Every reason, exported at zero from the start.
    pub const ALL: [Self; 2] = [Self::IntakeFull, Self::SlowConsumer];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IntakeFull => "intake_full",
            Self::SlowConsumer => "slow_consumer",
        }
    }
}

/// What `/healthz` and `/readyz` report. Ready: connected to NATS, a model
/// loaded, requests subscribed, not draining. Healthy: no pipeline stage
/// has died.
#[derive(Debug, Default)]
pub struct Health {
    /// The NATS connection is up.
    pub connected: AtomicBool,
    /// A model is loaded and serving.
    pub model_loaded: AtomicBool,
    /// The request subscription (or JetStream consumer) is set up.
    pub subscribed: AtomicBool,
    /// Shutting down: no new requests are taken.
    pub draining: AtomicBool,
    /// Pipeline stages that ended while the worker was not stopping.
    dead: Mutex<Vec<&'static str>>,
}

impl Health {
    fn ready(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
            && self.model_loaded.load(Ordering::Relaxed)
            && self.subscribed.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && self.dead_stages().is_empty()
    }

    /// Records that the stage `name` has died.
    pub fn stage_died(&self, name: &'static str) {
        if let Ok(mut dead) = self.dead.lock() {
            dead.push(name);
        }
    }

    /// The stages that have died, empty while healthy.
    pub fn dead_stages(&self) -> Vec<&'static str> {
        self.dead.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    health: Arc<Health>,
}

/// The router serving `/metrics`, `/healthz` and `/readyz`.
pub fn router(metrics: Metrics, health: Arc<Health>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<HttpState>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    s.metrics.render(),
                )
            }),
        )
        .route(
            "/healthz",
            get(|State(s): State<HttpState>| async move {
                let dead = s.health.dead_stages();
                if dead.is_empty() {
                    (StatusCode::OK, "ok\n".to_string()).into_response()
                } else {
                    let text = format!("dead pipeline stage: {}\n", dead.join(", "));
                    (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(s): State<HttpState>| async move {
                if s.health.ready() {
                    (StatusCode::OK, "ready\n").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
                }
            }),
        )
        .with_state(HttpState { metrics, health })
}

/// Binds `addr` and serves the endpoints until the task is dropped. Returns
/// the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(metrics, health);
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    Ok((bound, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_protocol_metric_is_exported() {
        let m = Metrics::new();
        m.set_model("m/1", "cpu");
        m.results.with_label_values(&["female"]).inc();
        m.batch_size.observe(3.0);
        let text = m.render();
        for name in [
            "profile_worker_requests_total",
            "profile_worker_results_total{label=\"female\"}",
            "profile_worker_errors_total{error=\"bad_json\"} 0",
            "profile_worker_batch_size_bucket",
            "profile_worker_inference_seconds_bucket",
            "profile_worker_decode_seconds_bucket",
            "profile_worker_latency_seconds_bucket",
            "profile_worker_in_flight",
            "profile_worker_model_info{device=\"cpu\",model=\"m/1\"} 1",
            "profile_worker_model_reloads_total{outcome=\"rejected\"} 0",
            "profile_worker_faces_total{faces=\"0\"} 0",
            "profile_worker_dropped_total{reason=\"slow_consumer\"} 0",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}

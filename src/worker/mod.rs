//! The streaming worker: NATS in, micro-batched inference, NATS out. One
//! file per stage of the pipeline:
//!
//! ```text
//! source ──parse──► decode ──► batcher ──► infer ──► publish
//! (core: bounded,    (blocking     (std       (one forward   (results, errors,
//!  or JetStream)      threads)      channel)   pass/batch)    replies, JetStream settle)
//!    └────────── bad requests and pictures without a face ──────────┘
//! reload: control subject and weights file ──► model_slot (read by decode and infer)
//! lifecycle: stage liveness for /healthz, bounded shutdown steps
//! ```
//!
//! Every request taken yields exactly one answer (a result or an error),
//! counted by `in_flight` and holding its share of the intake bound until
//! its answer is handed to the connection. Shutdown stops taking requests, lets every taken
//! request finish, flushes and returns, each step bounded in time.
//!
//! This file holds the configuration, start-up and the wiring of the
//! stages; it does no stage's work itself.

pub mod answer;
pub mod decode;
pub mod infer;
pub mod lifecycle;
pub mod model_slot;
pub mod parse;
pub mod publish;
pub mod reload;
pub mod settle;
pub mod source;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use tokio::sync::mpsc;

use crate::batcher::{BatchConfig, Batcher, Inflow};
use crate::face::FaceFinder;
use crate::metrics::{DropReason, Health, Metrics};
use crate::model::Precision;
use crate::preprocess::{DecodeBudget, Limits, Preparation};
use decode::DecodeStage;
use infer::InputPool;
use lifecycle::{StageGuard, bounded};
use model_slot::ModelSlot;
use parse::Taker;
use publish::Publisher;
use settle::Tracker;
use source::Source;
use source::core::{CoreSource, DropLog};
use source::intake::{Intake, IntakeLimits};
use source::jetstream::{JsConfig, JsSource};

/// The subjects of PROTOCOL §1-5, all configurable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    /// Requests (`profiles.images`).
    pub requests: String,
    /// Results (`profiles.gender`).
    pub results: String,
    /// Errors (`profiles.errors`).
    pub errors: String,
    /// Reload triggers (`profiles.control.reload`).
    pub reload: String,
    /// Queue group shared by the workers (`profile-workers`).
    pub queue_group: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self {
            requests: "profiles.images".into(),
            results: "profiles.gender".into(),
            errors: "profiles.errors".into(),
            reload: "profiles.control.reload".into(),
            queue_group: "profile-workers".into(),
        }
    }
}

/// Everything the worker needs to run.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Servers, credentials and TLS.
    pub nats: crate::connect::NatsArgs,
    /// Connection name shown by the server.
    pub connection_name: String,
    /// Subjects and queue group.
    pub subjects: Subjects,
    /// Weights file (watched for changes).
    pub weights: PathBuf,
    /// Inference device.
    pub device: Device,
    /// Micro-batching knobs.
    pub batch: BatchConfig,
    /// PROTOCOL §3 size limits.
    pub limits: Limits,
    /// Requests and payload bytes held unanswered at most (PROTOCOL §4).
    pub intake: IntakeLimits,
    /// Bytes of decoded pixels all decodes together may hold.
    pub decode_memory: usize,
    /// Face detection (PROTOCOL §2); `None` classifies whole pictures.
    pub faces: Option<FaceConfig>,
    /// Arithmetic of the CPU kernels (classifier and detector).
    pub precision: Precision,
    /// Pictures decoded at the same time.
    pub decode_threads: usize,
    /// Threads one forward pass may split a batch over (CPU direct kernels).
    pub infer_threads: usize,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: SocketAddr,
    /// Longest wait for each shutdown step: draining the subscription,
    /// answering what was taken, closing the connection.
    pub shutdown_timeout: Duration,
    /// How often the weights file is checked for changes (zero: never).
    pub watch_interval: Duration,
    /// JetStream mode settings; `None` runs in core NATS mode.
    pub jetstream: Option<JsConfig>,
}

/// Where the face detector comes from and how sure it must be.
#[derive(Debug, Clone)]
pub struct FaceConfig {
    /// The detector's weights file.
    pub detector: PathBuf,
    /// Detector score a face needs, instead of the model's metadata.
    pub threshold: Option<f32>,
}

/// A running worker's handles, for tests and the binary.
pub struct Running {
    /// Address the HTTP endpoints are bound to.
    pub metrics_addr: SocketAddr,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Running {
    /// Asks the worker to drain and stop.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the worker has stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("worker task panicked")?
    }
}

/// Loads the model, connects, binds the HTTP endpoints, and runs the
/// pipeline in the background until [`Running::stop`].
pub async fn start(cfg: WorkerConfig) -> anyhow::Result<Running> {
    let metrics = Metrics::new();
    let health = Arc::new(Health::default());
    let slot = load_model(&cfg, &metrics).await?;
    let model = slot.current();
    tracing::info!(
        model = %model.id,
        kernels = ?model.classifier.conv_impl(),
        amx = model.classifier.uses_amx(),
        "model loaded"
    );
    health.model_loaded.store(true, Ordering::SeqCst);

    let closed = Arc::new(tokio::sync::Notify::new());
    let client = connect(&cfg, health.clone(), metrics.clone(), closed.clone()).await?;
    let (metrics_addr, _http) =
        crate::metrics::serve(cfg.metrics_addr, metrics.clone(), health.clone())
            .await
            .with_context(|| {
                format!(
                    "binding the metrics address {} (each worker on a host needs its own \
                     --metrics-addr)",
                    cfg.metrics_addr
                )
            })?;
    tracing::info!(%metrics_addr, "serving /metrics, /healthz, /readyz");

    let intake = Intake::new(cfg.intake);
    let source = match &cfg.jetstream {
        None => {
            let sub = client
                .queue_subscribe(
                    cfg.subjects.requests.clone(),
                    cfg.subjects.queue_group.clone(),
                )
                .await
                .context("subscribing to the request subject")?;
            Source::Core(CoreSource::new(sub, intake, metrics.clone()))
        }
        Some(js_cfg) => {
            let js = async_nats::jetstream::new(client.clone());
            let consumer = source::jetstream::setup(&js, js_cfg, &cfg.subjects.requests).await?;
            Source::Js(Box::new(JsSource::new(
                consumer,
                cfg.batch.max_batch * 2,
                intake,
            )))
        }
    };
    let reloads = client
        .subscribe(cfg.subjects.reload.clone())
        .await
        .context("subscribing to the reload subject")?;
    client.flush().await.context("flushing subscriptions")?;
    health.subscribed.store(true, Ordering::SeqCst);
    match &cfg.jetstream {
        None => tracing::info!(
            subject = %cfg.subjects.requests,
            group = %cfg.subjects.queue_group,
            max_pending = cfg.intake.max_requests,
            max_pending_bytes = cfg.intake.max_bytes,
            "taking requests (core NATS)"
        ),
        Some(j) => {
            tracing::info!(stream = %j.stream, consumer = %j.consumer, "taking requests (JetStream)")
        }
    }

    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(pipeline(
        cfg, client, closed, source, reloads, slot, metrics, health, stop_rx,
    ));
    Ok(Running {
        metrics_addr,
        task,
        stop,
    })
}

/// Loads the detector (when detection is on) and the classifier.
async fn load_model(cfg: &WorkerConfig, metrics: &Metrics) -> anyhow::Result<ModelSlot> {
    let detector = match &cfg.faces {
        Some(f) => Some(Arc::new(FaceFinder::load(&f.detector, cfg.precision).with_context(|| {
            "loading the face detector (--detector; --face-detection off classifies whole pictures)"
        })?)),
        None => None,
    };
    let prep = Preparation {
        limits: cfg.limits,
        detector,
        face_threshold: cfg.faces.as_ref().and_then(|f| f.threshold),
        budget: Some(DecodeBudget::new(cfg.decode_memory)),
    };
    let (weights, device, m) = (cfg.weights.clone(), cfg.device.clone(), metrics.clone());
    let precision = cfg.precision;
    tokio::task::spawn_blocking(move || ModelSlot::open(weights, device, precision, prep, m))
        .await?
        .with_context(|| format!("loading weights {}", cfg.weights.display()))
}

/// Connects with the worker's options: its name, a subscription buffer
/// sized from the intake bound, readiness, slow-consumer drops and the end
/// of the connection (`closed`) from the client's events.
async fn connect(
    cfg: &WorkerConfig,
    health: Arc<Health>,
    metrics: Metrics,
    closed: Arc<tokio::sync::Notify>,
) -> anyhow::Result<async_nats::Client> {
    let events = health.clone();
    let drops = Arc::new(Mutex::new(DropLog::default()));
    let options = cfg
        .nats
        .options()
        .await?
        .name(&cfg.connection_name)
        .subscription_capacity(cfg.intake.client_buffer())
        .event_callback(move |event| {
            let (health, metrics, drops) = (events.clone(), metrics.clone(), drops.clone());
            let closed = closed.clone();
            async move {
                match event {
                    async_nats::Event::Connected => health.connected.store(true, Ordering::SeqCst),
                    async_nats::Event::Disconnected => {
                        health.connected.store(false, Ordering::SeqCst)
                    }
                    async_nats::Event::Closed => {
                        health.connected.store(false, Ordering::SeqCst);
                        closed.notify_one();
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        metrics.dropped(DropReason::SlowConsumer, 1);
                        if let Ok(mut log) = drops.lock() {
                            log.add(DropReason::SlowConsumer, 1);
                        }
                        return;
                    }
                    _ => {}
                }
                tracing::info!("nats: {event}");
            }
        });
    let client = cfg.nats.connect(options).await?;
    health.connected.store(true, Ordering::SeqCst);
    Ok(client)
}

/// Wires the stages together, takes requests until stopped, then shuts
/// the stages down in order:
///
/// source ─► parse ─► decode ─► batcher ─► infer ─► publish
#[allow(clippy::too_many_arguments)]
async fn pipeline(
    cfg: WorkerConfig,
    client: async_nats::Client,
    closed: Arc<tokio::sync::Notify>,
    mut source: Source,
    reloads: async_nats::Subscriber,
    slot: ModelSlot,
    metrics: Metrics,
    health: Arc<Health>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let alive = |name| StageGuard::new(name, health.clone());
    let tracker = Tracker::default();

    let (answer_tx, answer_rx) = mpsc::unbounded_channel();
    let publisher = Publisher {
        client: client.clone(),
        subjects: cfg.subjects.clone(),
        jetstream: cfg.jetstream.clone(),
        metrics: metrics.clone(),
        tracker: tracker.clone(),
    };
    let publish = tokio::spawn(guarded(alive("publisher"), publisher.run(answer_rx)));

    let inflow = Inflow::default();
    let pool = InputPool::default();
    let (decoded_tx, decoded_rx) = std::sync::mpsc::sync_channel(cfg.batch.max_batch.max(1) * 4);
    let batcher = Batcher::new(decoded_rx, inflow.clone(), cfg.batch);
    let infer = {
        let (slot, answers, metrics, pool) = (
            slot.clone(),
            answer_tx.clone(),
            metrics.clone(),
            pool.clone(),
        );
        let (threads, guard) = (cfg.infer_threads.max(1), alive("inference"));
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || infer::run(batcher, slot, answers, metrics, pool, threads, guard))
            .context("starting the inference thread")?
    };

    let (parsed_tx, parsed_rx) = std::sync::mpsc::channel();
    let decode_stage = DecodeStage {
        slot: slot.clone(),
        decoded: decoded_tx,
        answers: answer_tx.clone(),
        inflow,
        pool,
        metrics: metrics.clone(),
        threads: cfg.decode_threads,
    };
    let decoders = decode_stage
        .start(parsed_rx)
        .context("starting the decoding threads")?;
    let decode = tokio::spawn(guarded(alive("decode"), async move {
        let _ = tokio::task::spawn_blocking(move || {
            for decoder in decoders {
                let _ = decoder.join();
            }
        })
        .await;
    }));

    let reloader = tokio::spawn(reload::watch(slot, reloads, cfg.watch_interval));
    let keep_alive = cfg
        .jetstream
        .as_ref()
        .map(|j| tokio::spawn(tracker.clone().keep_alive(client.clone(), j.ack_wait)));

    let taker = Taker {
        cfg: &cfg,
        metrics: &metrics,
        health: &health,
        tracker: &tracker,
        parsed: parsed_tx,
        answers: answer_tx,
    };
    taker.take_requests(&mut source, stop).await;

    // Every taken request is answered before we return: the stages end in
    // order as their inputs close (decode, then inference, then publish).
    let limit = cfg.shutdown_timeout;
    reloader.abort();
    let answered = bounded("answering the requests taken", limit, async {
        let _ = decode.await;
        let _ = tokio::task::spawn_blocking(move || infer.join()).await;
        let _ = publish.await;
    })
    .await;
    if answered.is_none() {
        tracing::warn!("{} requests left unanswered", metrics.in_flight.get());
    }
    if let Some(k) = keep_alive {
        k.abort();
    }
    // The connection drains and closes once the server has answered the
    // PING written after every answer: it has them all. Bounded: with the
    // server gone, it would wait for a reconnect forever.
    client
        .drain()
        .await
        .context("closing the connection after the answers")?;
    bounded("closing the connection", limit, closed.notified()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Runs `work` holding `guard`, so the stage is reported dead if it panics
/// or returns before the worker stops.
async fn guarded(guard: StageGuard, work: impl std::future::Future<Output = ()>) {
    work.await;
    drop(guard);
}

//! The streaming worker: NATS in, micro-batched inference, NATS out.
//!
//! ```text
//! subscriber ──parse──► decode pool ──► batcher ──► inference thread ──► publisher
//!  (queue group)   │     (spawn_blocking,  (std        (one forward        (results, errors,
//!                  │      N permits)        channel)    pass per batch)     reply subjects)
//!                  └──────────── bad requests go straight to the publisher ───┘
//! ```
//!
//! Every request received yields exactly one answer (a result or an error),
//! counted by `in_flight` until it is published. Shutdown stops the
//! subscription, lets every taken request finish, flushes and returns.

pub mod infer;
pub mod jetstream;
pub mod model_slot;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::{HeaderMap, Subject};
use candle_core::Device;
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};

use crate::batcher::{BatchConfig, Batcher, Inflow};
use crate::face::FaceFinder;
use crate::metrics::{Metrics, Readiness};
use crate::preprocess::{Framing, Limits, Preparation};
use crate::protocol::{ErrorCode, ErrorReply, ProfileResult, Request, Seen, USERID_HEADER, UserId};
use infer::{Decoded, InputPool};
use jetstream::{ConfirmedPublisher, JsAck, JsConfig, JsSource, Settle, Tracker};
use model_slot::{ModelSlot, ReloadOutcome, file_stamp};

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
    /// Face detection (PROTOCOL §2); `None` classifies whole pictures.
    pub faces: Option<FaceConfig>,
    /// Pictures decoded at the same time.
    pub decode_threads: usize,
    /// Threads one forward pass may split a batch over (CPU direct kernels).
    pub infer_threads: usize,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: SocketAddr,
    /// Longest wait for each shutdown step: draining, in-flight requests, the last flush.
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
    let ready = Arc::new(Readiness::default());
    let weights = cfg.weights.clone();
    let detector = match &cfg.faces {
        Some(f) => Some(Arc::new(FaceFinder::load(&f.detector).with_context(|| {
            "loading the face detector (--detector; --face-detection off classifies whole pictures)"
        })?)),
        None => None,
    };
    let prep = Preparation {
        limits: cfg.limits,
        detector,
        face_threshold: cfg.faces.as_ref().and_then(|f| f.threshold),
    };
    let (device, m) = (cfg.device.clone(), metrics.clone());
    let slot = tokio::task::spawn_blocking(move || ModelSlot::open(weights, device, prep, m))
        .await?
        .with_context(|| format!("loading weights {}", cfg.weights.display()))?;
    tracing::info!(model = %slot.current().id, "model loaded");
    ready.model_loaded.store(true, Ordering::SeqCst);

    let client = connect(&cfg, ready.clone()).await?;
    let (metrics_addr, _http) =
        crate::metrics::serve(cfg.metrics_addr, metrics.clone(), ready.clone())
            .await
            .with_context(|| format!("binding the metrics address {}", cfg.metrics_addr))?;
    tracing::info!(%metrics_addr, "serving /metrics, /healthz, /readyz");

    let source = match &cfg.jetstream {
        None => Source::Core(
            client
                .queue_subscribe(
                    cfg.subjects.requests.clone(),
                    cfg.subjects.queue_group.clone(),
                )
                .await
                .context("subscribing to the request subject")?,
        ),
        Some(js_cfg) => {
            let js = async_nats::jetstream::new(client.clone());
            let consumer = jetstream::setup(&js, js_cfg, &cfg.subjects.requests).await?;
            Source::Js(Box::new(JsSource::new(consumer, cfg.batch.max_batch * 2)))
        }
    };
    let reloads = client
        .subscribe(cfg.subjects.reload.clone())
        .await
        .context("subscribing to the reload subject")?;
    client.flush().await.context("flushing subscriptions")?;
    ready.subscribed.store(true, Ordering::SeqCst);
    match &cfg.jetstream {
        None => {
            tracing::info!(subject = %cfg.subjects.requests, group = %cfg.subjects.queue_group, "taking requests (core NATS)")
        }
        Some(j) => {
            tracing::info!(stream = %j.stream, consumer = %j.consumer, "taking requests (JetStream)")
        }
    }

    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(pipeline(
        cfg, client, source, reloads, slot, metrics, stop_rx,
    ));
    Ok(Running {
        metrics_addr,
        task,
        stop,
    })
}

async fn connect(cfg: &WorkerConfig, ready: Arc<Readiness>) -> anyhow::Result<async_nats::Client> {
    let events = ready.clone();
    let options = cfg
        .nats
        .options()
        .await?
        .name(&cfg.connection_name)
        .event_callback(move |event| {
            let ready = events.clone();
            async move {
                match event {
                    async_nats::Event::Connected => ready.connected.store(true, Ordering::SeqCst),
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        ready.connected.store(false, Ordering::SeqCst)
                    }
                    _ => {}
                }
                tracing::info!("nats: {event}");
            }
        });
    let client = cfg.nats.connect(options).await?;
    ready.connected.store(true, Ordering::SeqCst);
    Ok(client)
}

async fn pipeline(
    cfg: WorkerConfig,
    client: async_nats::Client,
    mut source: Source,
    reloads: async_nats::Subscriber,
    slot: ModelSlot,
    metrics: Metrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (answer_tx, answer_rx) = mpsc::unbounded_channel();
    let tracker = Tracker::default();
    let keep_alive = cfg
        .jetstream
        .as_ref()
        .map(|j| tokio::spawn(tracker.clone().keep_alive(client.clone(), j.ack_wait)));
    let publisher = tokio::spawn(publish_answers(
        client.clone(),
        cfg.subjects.clone(),
        cfg.jetstream.clone(),
        answer_rx,
        metrics.clone(),
        tracker.clone(),
    ));

    let inflow = Inflow::default();
    let (decoded_tx, decoded_rx) =
        std::sync::mpsc::sync_channel::<Decoded>(cfg.batch.max_batch.max(1) * 4);
    let batcher = Batcher::new(decoded_rx, inflow.clone(), cfg.batch);
    let pool = InputPool::default();
    let infer = {
        let (slot, answers, metrics, pool, threads) = (
            slot.clone(),
            answer_tx.clone(),
            metrics.clone(),
            pool.clone(),
            cfg.infer_threads.max(1),
        );
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || infer::run(batcher, slot, answers, metrics, pool, threads))
            .context("starting the inference thread")?
    };

    let reloader = tokio::spawn(watch_reloads(slot.clone(), reloads, cfg.watch_interval));
    let decode_permits = Arc::new(Semaphore::new(cfg.decode_threads.max(1)));
    let mut draining = false;
    // Once draining, how long the subscription may take to end (it cannot
    // end while the server is unreachable).
    let drain_deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain_deadline);
    loop {
        let (msg, js) = tokio::select! {
            next = source.next() => match next {
                Some(m) => m,
                None => break,
            },
            _ = &mut drain_deadline, if draining => {
                tracing::warn!("shutdown timeout: the subscription did not finish draining");
                break;
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                drain_deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + cfg.shutdown_timeout);
                match &mut source {
                    Source::Core(sub) => {
                        // Stop taking requests; messages the client already
                        // holds still come out of the stream, then it ends.
                        tracing::info!("shutting down: draining the subscription");
                        if let Err(e) = sub.drain().await {
                            tracing::warn!("drain failed ({e}); unsubscribing");
                            let _ = sub.unsubscribe().await;
                            break;
                        }
                        continue;
                    }
                    // Stop pulling; anything pulled but not taken is
                    // redelivered by the server after the ack wait.
                    Source::Js(_) => {
                        tracing::info!("shutting down: no more pulls");
                        break;
                    }
                }
            }
        };
        if let Some(ack) = &js {
            tracker.start(ack);
        }
        metrics.requests.inc();
        metrics.in_flight.inc();
        let msg_id = header(&msg.headers, "Nats-Msg-Id")
            .map(str::to_owned)
            .or_else(|| {
                // Derived from the stream sequence, so redeliveries share it.
                let stream = cfg
                    .jetstream
                    .as_ref()
                    .map(|j| j.stream.as_str())
                    .unwrap_or("");
                js.as_ref()
                    .map(|a| format!("{stream}:{}", a.stream_sequence))
            });
        let env = Envelope {
            userid: None,
            reply: msg.reply.clone(),
            msg_id,
            received: Instant::now(),
            js,
        };
        let userid = header(&msg.headers, USERID_HEADER).map(|s| s.as_bytes().to_vec());
        let request = match Request::parse(msg.payload, userid.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                let env = Envelope {
                    userid: e.userid.clone(),
                    ..env
                };
                let _ = answer_tx.send(Answer::Failure {
                    env,
                    code: e.code,
                    detail: e.detail,
                });
                continue;
            }
        };
        let env = Envelope {
            userid: Some(request.userid),
            ..env
        };
        let permit = decode_permits.clone().acquire_owned().await?;
        let guard = inflow.enter();
        let (model, tx, answers, metrics, pool) = (
            slot.current(),
            decoded_tx.clone(),
            answer_tx.clone(),
            metrics.clone(),
            pool.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut input = pool.take(model.pre.input_len());
            let outcome = model.pre.run(&request.image, &mut input);
            metrics
                .decode_seconds
                .observe(started.elapsed().as_secs_f64());
            let model_id = model.id.clone();
            drop(model);
            match outcome {
                Ok(Framing::NoFace) => {
                    pool.give(input);
                    let _ = answers.send(Answer::NoFace {
                        env,
                        model: model_id,
                    });
                }
                Ok(framing) => {
                    let item = Decoded {
                        env,
                        image: request.image,
                        input,
                        seen: seen(&framing),
                    };
                    if let Err(std::sync::mpsc::SendError(item)) = tx.send(item) {
                        let _ = answers.send(Answer::Failure {
                            env: item.env,
                            code: ErrorCode::Internal,
                            detail: "the inference thread has stopped".into(),
                        });
                    }
                }
                Err(e) => {
                    let _ = answers.send(Answer::Failure {
                        env,
                        code: e.code,
                        detail: e.detail,
                    });
                }
            }
            drop(guard);
            drop(permit);
        });
    }

    // Every taken request is answered before we return.
    let deadline = Instant::now() + cfg.shutdown_timeout;
    while metrics.in_flight.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let left = metrics.in_flight.get();
    if left > 0 {
        tracing::warn!("shutdown timeout: {left} requests still in flight");
    }
    reloader.abort();
    if let Some(k) = keep_alive {
        k.abort();
    }
    drop(decoded_tx);
    drop(answer_tx);
    let _ = tokio::task::spawn_blocking(move || infer.join()).await;
    let _ = publisher.await;
    // Bounded: with the server gone, a flush would wait for a reconnect forever.
    match tokio::time::timeout(cfg.shutdown_timeout, client.flush()).await {
        Ok(flushed) => flushed.context("flushing answers")?,
        Err(_) => tracing::warn!("shutdown timeout: answers not flushed (server unreachable)"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Where requests come from.
pub enum Source {
    /// A core NATS queue subscription.
    Core(async_nats::Subscriber),
    /// A JetStream pull consumer.
    Js(Box<JsSource>),
}

impl Source {
    async fn next(&mut self) -> Option<(async_nats::Message, Option<JsAck>)> {
        match self {
            Self::Core(sub) => sub.next().await.map(|m| (m, None)),
            Self::Js(js) => {
                let (m, ack) = js.next().await;
                Some((m, Some(ack)))
            }
        }
    }
}

fn header<'a>(headers: &'a Option<HeaderMap>, name: &str) -> Option<&'a str> {
    headers.as_ref()?.get(name).map(|v| v.as_str())
}

/// Reloads on any message on the reload subject and on changes of the
/// weights file (atomic renames included), polled every `interval`.
async fn watch_reloads(slot: ModelSlot, mut control: async_nats::Subscriber, interval: Duration) {
    let mut last = file_stamp(slot.path());
    let mut ticker = tokio::time::interval(if interval.is_zero() {
        Duration::from_secs(3600)
    } else {
        interval
    });
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = control.next() => {
                if msg.is_none() {
                    return;
                }
                tracing::info!("reload requested on the control subject");
                let _ = slot.reload().await;
                last = file_stamp(slot.path());
            }
            _ = ticker.tick(), if !interval.is_zero() => {
                let now = file_stamp(slot.path());
                if now.is_some() && now != last {
                    // Let a writer that writes in place finish first.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    last = file_stamp(slot.path());
                    if let ReloadOutcome::Rejected(_) = slot.reload().await {
                        // Keep `last`: the same bad file is not retried until it changes.
                    }
                }
            }
        }
    }
}

/// Publishes answers in the order they come, with their headers, to the
/// result or error subject and to the reply subject when there is one. In
/// JetStream mode each answer is confirmed, then its request settled.
async fn publish_answers(
    client: async_nats::Client,
    subjects: Subjects,
    js_cfg: Option<JsConfig>,
    mut rx: mpsc::UnboundedReceiver<Answer>,
    metrics: Metrics,
    tracker: Tracker,
) {
    let confirmed = ConfirmedPublisher::new(client.clone());
    while let Some(answer) = rx.recv().await {
        let (env, subject, payload, settle, counted) = match answer {
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
                result_answer(env, &result, &subjects)
            }
            Answer::NoFace { env, model } => {
                let latency = env.received.elapsed().as_secs_f64() * 1e3;
                let result = ProfileResult::no_face(&answered_userid(&env), &model, latency);
                result_answer(env, &result, &subjects)
            }
            Answer::Failure { env, code, detail } => {
                if code == ErrorCode::Internal {
                    tracing::error!(userid = ?env.userid, "internal error: {detail}");
                }
                let reply = ErrorReply::new(env.userid.as_ref(), code, detail);
                let settle = if code.is_bad_input() {
                    Settle::Poison
                } else {
                    Settle::Retry
                };
                let payload = serde_json::to_vec(&reply).unwrap_or_default();
                (
                    env,
                    subjects.errors.clone(),
                    payload,
                    settle,
                    Counted::Error(code),
                )
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        if let Some(u) = &env.userid {
            headers.insert(USERID_HEADER, u.as_str());
        }
        if let Some(id) = &env.msg_id {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        let payload = bytes::Bytes::from(payload);
        match (&env.js, &js_cfg) {
            (Some(ack), Some(cfg)) => {
                // An internal error is retried, not answered, until the last delivery.
                let last = cfg.max_deliver > 0 && ack.delivered >= cfg.max_deliver;
                let outcome = if settle == Settle::Retry && !last {
                    Settle::Retry
                } else {
                    match confirmed.publish(&subject, headers, payload).await {
                        Ok(()) => {
                            counted.record(&metrics);
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
                jetstream::settle(&client, &confirmed, cfg, &metrics, ack, outcome).await;
                tracker.finish(ack);
            }
            _ => {
                counted.record(&metrics);
                if let Err(e) = client
                    .publish_with_headers(subject, headers.clone(), payload.clone())
                    .await
                {
                    tracing::error!("publishing an answer failed: {e}");
                }
                if let Some(reply) = env.reply.clone()
                    && let Err(e) = client.publish_with_headers(reply, headers, payload).await
                {
                    tracing::error!("publishing to the reply subject failed: {e}");
                }
            }
        }
        metrics
            .latency_seconds
            .observe(env.received.elapsed().as_secs_f64());
        metrics.in_flight.dec();
    }
}

/// The `label` of `results_total` for an answer without a face.
pub const NO_FACE_LABEL: &str = "none";

/// A result on its way out: its subject, payload, settling and counters.
fn result_answer(
    env: Envelope,
    result: &ProfileResult,
    subjects: &Subjects,
) -> (Envelope, String, Vec<u8>, Settle, Counted) {
    let payload = serde_json::to_vec(result).unwrap_or_default();
    let label = result
        .gender
        .clone()
        .unwrap_or_else(|| NO_FACE_LABEL.into());
    (
        env,
        subjects.results.clone(),
        payload,
        Settle::Done,
        Counted::Result(label, result.faces),
    )
}

/// The user id an answer carries (every request that reaches the model has one).
fn answered_userid(env: &Envelope) -> UserId {
    env.userid
        .clone()
        .unwrap_or_else(|| UserId::parse(b"?").expect("valid id"))
}

/// What §2 reports of a framing that was classified.
fn seen(framing: &Framing) -> Seen {
    match framing {
        Framing::Face { faces, face } => Seen::Face {
            faces: *faces,
            face: face.into(),
        },
        Framing::Whole | Framing::NoFace => Seen::Whole,
    }
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

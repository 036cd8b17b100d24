//! `profile-worker`: classify profile pictures from NATS. Flags and env vars
//! only; the work is in `profile_classifier::worker`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use profile_classifier::batcher::{BatchConfig, Policy};
use profile_classifier::config::{
    FaceArgs, SubjectArgs, error_line, parse_bytes, parse_count, parse_device, parse_millis,
    parse_seconds,
};
use profile_classifier::connect::NatsArgs;
use profile_classifier::face::Kernels;
use profile_classifier::model::ConvImpl;
use profile_classifier::preprocess::Limits;
use profile_classifier::worker::source::intake::IntakeLimits;
use profile_classifier::worker::source::jetstream::JsConfig;
use profile_classifier::worker::{self, FaceConfig, Subjects, WorkerConfig};

#[derive(Parser)]
#[command(version, about = "Classify profile pictures streaming through NATS")]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    /// Connection name shown by the NATS server (default: profile-worker-<pid>).
    #[arg(long, env = "PROFILE_CONNECTION_NAME")]
    connection_name: Option<String>,
    #[command(flatten)]
    subjects: SubjectArgs,
    /// Subject whose messages trigger a weights reload.
    #[arg(
        long,
        env = "PROFILE_RELOAD_SUBJECT",
        default_value = "profiles.control.reload"
    )]
    reload_subject: String,
    /// Queue group shared by the workers.
    #[arg(long, env = "PROFILE_QUEUE_GROUP", default_value = "profile-workers")]
    queue_group: String,
    /// Weights file (safetensors with metadata); watched for changes.
    #[arg(
        long,
        env = "PROFILE_WEIGHTS",
        default_value = "weights/gender-cnn.safetensors"
    )]
    weights: PathBuf,
    #[command(flatten)]
    faces: FaceArgs,
    /// Inference device: cpu, cuda or cuda:N (CUDA needs --features cuda).
    #[arg(long, env = "PROFILE_DEVICE", default_value = "cpu")]
    device: String,
    /// Print the kernels this CPU serves with at --precision (the
    /// classifier's, then the detector's; the names of the criterion
    /// benchmarks), then exit.
    #[arg(long)]
    print_kernels: bool,
    /// Largest batch per forward pass.
    #[arg(long, env = "PROFILE_MAX_BATCH", default_value_t = 32, value_parser = parse_count, allow_hyphen_values = true)]
    max_batch: usize,
    /// Longest wait, in ms, after a batch's first picture.
    #[arg(
        long,
        env = "PROFILE_MAX_WAIT_MS",
        default_value_t = 5,
        allow_hyphen_values = true,
        value_parser = parse_millis
    )]
    max_wait_ms: u64,
    /// Batch policy: adaptive waits only while more pictures are being decoded; fixed always waits.
    #[arg(long, env = "PROFILE_BATCH_POLICY", value_enum, default_value_t = Policy::Adaptive)]
    batch_policy: Policy,
    /// Pictures decoded in parallel (default: number of cores).
    #[arg(long, env = "PROFILE_DECODE_THREADS", value_parser = parse_count, allow_hyphen_values = true)]
    decode_threads: Option<usize>,
    /// Threads a forward pass splits a batch over, at least 4 pictures each (default: number of cores).
    #[arg(long, env = "PROFILE_INFER_THREADS", value_parser = parse_count, allow_hyphen_values = true)]
    infer_threads: Option<usize>,
    /// Largest encoded picture, in bytes (K, M, G suffixes: KiB, MiB, GiB).
    #[arg(long, env = "PROFILE_MAX_IMAGE_BYTES", default_value = "8M", value_parser = parse_bytes, allow_hyphen_values = true)]
    max_image_bytes: usize,
    /// Largest decoded picture, in pixels.
    #[arg(long, env = "PROFILE_MAX_PIXELS", default_value_t = 40_000_000, value_parser = clap::value_parser!(u64).range(1..), allow_hyphen_values = true)]
    max_pixels: u64,
    /// Core mode: requests held unanswered at most; more are dropped and counted (default: 8 x --max-batch).
    #[arg(long, env = "PROFILE_MAX_PENDING", value_parser = parse_count, allow_hyphen_values = true)]
    max_pending: Option<usize>,
    /// Core mode: payload bytes of the requests held unanswered at most (K, M, G suffixes).
    #[arg(long, env = "PROFILE_MAX_PENDING_BYTES", default_value = "64M", value_parser = parse_bytes, allow_hyphen_values = true)]
    max_pending_bytes: usize,
    /// Memory all decodes together may hold for pixels (K, M, G suffixes); larger pictures wait, a picture needing more is image_too_large.
    #[arg(long, env = "PROFILE_DECODE_MEMORY", default_value = "256M", value_parser = parse_bytes, allow_hyphen_values = true)]
    decode_memory: usize,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "PROFILE_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    metrics_addr: SocketAddr,
    /// After SIGTERM/SIGINT, seconds each step may take (drain, in-flight requests, closing the connection).
    #[arg(long, env = "PROFILE_SHUTDOWN_TIMEOUT", default_value_t = 30.0, allow_hyphen_values = true, value_parser = parse_seconds)]
    shutdown_timeout: f64,
    /// Seconds between checks of the weights file for changes (0: off).
    #[arg(long, env = "PROFILE_WATCH_INTERVAL", default_value_t = 1.0, allow_hyphen_values = true, value_parser = parse_seconds)]
    watch_interval: f64,
    /// Read requests from a JetStream stream through a durable pull consumer (at least once).
    #[arg(long, env = "PROFILE_JETSTREAM")]
    jetstream: bool,
    /// JetStream stream capturing the request subject (created if absent).
    #[arg(long, env = "PROFILE_STREAM", default_value = "PROFILES")]
    stream: String,
    /// Durable pull consumer shared by the workers (created if absent).
    #[arg(long, env = "PROFILE_CONSUMER", default_value = "profile-workers")]
    consumer: String,
    /// Seconds the server waits for an ack before redelivering.
    #[arg(long, env = "PROFILE_ACK_WAIT", default_value_t = 30.0, allow_hyphen_values = true, value_parser = parse_seconds)]
    ack_wait: f64,
    /// Deliveries before a request goes to the dead-letter subject.
    #[arg(long, env = "PROFILE_MAX_DELIVER", default_value_t = 5)]
    max_deliver: i64,
    /// Unacknowledged requests the consumer may hold.
    #[arg(long, env = "PROFILE_MAX_ACK_PENDING", default_value_t = 1024)]
    max_ack_pending: i64,
    /// Subject for requests that used up their deliveries.
    #[arg(
        long,
        env = "PROFILE_DEADLETTER_SUBJECT",
        default_value = "profiles.deadletter"
    )]
    deadletter_subject: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let outcome = if cli.print_kernels {
        print_kernels(&cli)
    } else {
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: starting the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        runtime.block_on(run(cli))
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// `--print-kernels`: what the worker would serve with, one line each.
fn print_kernels(cli: &Cli) -> anyhow::Result<()> {
    let device = parse_device(&cli.device)?;
    let precision = cli.faces.precision;
    println!("classifier {:?}", ConvImpl::for_device(&device, precision));
    println!("detector {:?}", Kernels::for_precision(precision));
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cfg = WorkerConfig {
        nats: cli.nats,
        connection_name: cli
            .connection_name
            .unwrap_or_else(|| format!("profile-worker-{}", std::process::id())),
        subjects: Subjects {
            requests: cli.subjects.request_subject,
            results: cli.subjects.result_subject,
            errors: cli.subjects.error_subject,
            reload: cli.reload_subject,
            queue_group: cli.queue_group,
        },
        weights: cli.weights,
        device: parse_device(&cli.device)?,
        batch: BatchConfig {
            max_batch: cli.max_batch,
            max_wait: Duration::from_millis(cli.max_wait_ms),
            policy: cli.batch_policy,
        },
        limits: Limits {
            max_bytes: cli.max_image_bytes,
            max_pixels: cli.max_pixels,
        },
        intake: IntakeLimits {
            max_requests: cli
                .max_pending
                .unwrap_or(IntakeLimits::for_batch(cli.max_batch).max_requests),
            max_bytes: cli.max_pending_bytes,
        },
        decode_memory: cli.decode_memory,
        faces: cli.faces.detector().map(|detector| FaceConfig {
            detector: detector.clone(),
            threshold: cli.faces.face_threshold,
        }),
        precision: cli.faces.precision,
        decode_threads: cli.decode_threads.unwrap_or(cores),
        infer_threads: cli.infer_threads.unwrap_or(cores),
        metrics_addr: cli.metrics_addr,
        shutdown_timeout: Duration::from_secs_f64(cli.shutdown_timeout),
        watch_interval: Duration::from_secs_f64(cli.watch_interval),
        jetstream: cli.jetstream.then(|| JsConfig {
            stream: cli.stream,
            consumer: cli.consumer,
            ack_wait: Duration::from_secs_f64(cli.ack_wait.max(1.0)),
            max_deliver: cli.max_deliver,
            max_ack_pending: cli.max_ack_pending,
            deadletter_subject: cli.deadletter_subject,
            ..JsConfig::default()
        }),
    };
    let running = worker::start(cfg).await?;
    shutdown_signal().await;
    running.stop();
    running.wait().await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

//! `profile-trainer`: train, evaluate and try the gender CNN. Flags only; the
//! work is in `profile_classifier::train`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use profile_classifier::config::{FaceArgs, error_line, parse_device};
use profile_classifier::connect::{NatsArgs, notify_reload};
use profile_classifier::face::{FaceFinder, Look};
use profile_classifier::model::Classifier;
use profile_classifier::preprocess::{Framing, Limits, Preparation, Preprocessor};
use profile_classifier::train::{self, TrainConfig, Validation};

#[derive(Parser)]
#[command(
    version,
    about = "Train, evaluate and try the profile-picture gender CNN"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train on a folder of <userid>.jpg plus profile.csv and write a weights file.
    Train(Box<TrainArgs>),
    /// Evaluate a weights file on a labelled folder, through the worker's own
    /// preprocessing (face detection and alignment included).
    Eval {
        /// Weights file to evaluate.
        #[arg(
            long,
            env = "PROFILE_WEIGHTS",
            default_value = "weights/gender-cnn.safetensors"
        )]
        weights: PathBuf,
        /// Folder of pictures (any supported format) plus profile.csv
        /// (userid,gender[,age,race]); gender `none` marks a picture without a face.
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        faces: FaceArgs,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
        /// Also write the report (JSON) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Publish a reload message: every worker loads its weights file again
    /// (after weights were copied into place by other means).
    Notify {
        #[command(flatten)]
        nats: NatsArgs,
        /// Subject of the reload message.
        #[arg(
            long,
            env = "PROFILE_RELOAD_SUBJECT",
            default_value = "profiles.control.reload"
        )]
        reload_subject: String,
    },
    /// Print the label and confidence of each picture.
    Predict {
        /// Weights file to use.
        #[arg(
            long,
            env = "PROFILE_WEIGHTS",
            default_value = "weights/gender-cnn.safetensors"
        )]
        weights: PathBuf,
        #[command(flatten)]
        faces: FaceArgs,
        /// Pictures to classify.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
}

/// `--first-look`: one of the detector input sides the worker knows.
fn parse_first_look(s: &str) -> Result<Look, String> {
    s.parse::<u32>()
        .map_err(|e| format!("{s}: {e}"))
        .and_then(Look::try_from)
}

/// `--closer-look`: the score a face found by the closer look needs, or
/// none (`off`).
#[derive(Debug, Clone, Copy)]
struct CloserLook(Option<f32>);

/// `--closer-look`: a score in (0, 1), or `off`.
fn parse_closer_look(s: &str) -> Result<CloserLook, String> {
    if s == "off" {
        return Ok(CloserLook(None));
    }
    match s.parse::<f32>() {
        Ok(t) if t > 0.0 && t < 1.0 => Ok(CloserLook(Some(t))),
        _ => Err(format!("{s}: a detector score in (0, 1), or off")),
    }
}

/// Publishes one reload message and says so.
fn notify(nats: &NatsArgs, subject: &str, body: &str) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(notify_reload(nats, subject, body))?;
    eprintln!(
        "published a reload message on {subject} via {}",
        nats.nats_url
    );
    Ok(())
}

/// The preprocessing of `cls`, as the worker would run it.
fn preprocessor(faces: &FaceArgs, cls: &Classifier) -> anyhow::Result<Preprocessor> {
    let detector = match faces.detector() {
        Some(path) => Some(Arc::new(FaceFinder::load(path, faces.precision)?)),
        None => None,
    };
    let prep = Preparation {
        limits: Limits::default(),
        detector,
        face_threshold: faces.face_threshold,
        budget: None,
    };
    Preprocessor::for_model(cls.meta(), &prep).map_err(anyhow::Error::msg)
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Training folder: <userid>.jpg files plus profile.csv (userid,gender[,...]);
    /// repeat to train on several folders together.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Face detector weights: every training picture is framed around its face.
    #[arg(long, default_value = "weights/blazeface-front.safetensors")]
    detector: PathBuf,
    /// Detector score a face needs (default: the detector file's own, 0.75).
    #[arg(long)]
    face_threshold: Option<f32>,
    /// Detector input side of the first look for a face: 64 (a quarter of
    /// the work; the full 128 only when it finds nothing) or 128. Stored in
    /// the weights, with the crop geometry measured by it; the worker looks
    /// the same way.
    #[arg(long, default_value = "64", value_parser = parse_first_look)]
    first_look: Look,
    /// Detector score (0-1) a face found by the closer look needs, or `off`:
    /// when the whole-picture looks find nothing, the detector looks at four
    /// overlapping tiles of the picture for a smaller face. Stored in the
    /// weights; the worker looks the same way.
    #[arg(long, default_value = "0.98", value_parser = parse_closer_look)]
    closer_look: CloserLook,
    /// Validation folder in the same layout.
    #[arg(long, conflicts_with = "val_fraction")]
    val: Option<PathBuf>,
    /// Share of the training folder held out for validation (when no --val).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Weights file to write (atomically); required, so the shipped weights
    /// are replaced only when named.
    #[arg(long)]
    out: PathBuf,
    /// Passes over the training data.
    #[arg(long, default_value_t = 28)]
    epochs: usize,
    /// Pictures per optimiser step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate (AdamW, one warm-up epoch, then cosine decay).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 2e-2)]
    weight_decay: f64,
    /// Side of the square model input, in pixels.
    #[arg(long, default_value_t = 64)]
    input_size: usize,
    /// Output channels of the conv blocks, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "16,48,96,192")]
    channels: Vec<usize>,
    /// Label names in output order, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "female,male")]
    labels: Vec<String>,
    /// Dropout before the linear layer.
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
    /// Share of each target spread over every label (0: plain cross-entropy).
    #[arg(long, default_value_t = 0.1)]
    label_smoothing: f32,
    /// Chance of cutting a training picture down to 62-90% of its sides, as
    /// a tight upload is (0: never, the shipped recipe).
    #[arg(long, default_value_t = 0.0)]
    tight: f64,
    /// Per-step decay of the weights' moving average, validated beside the
    /// raw weights every epoch (0: none).
    #[arg(long, default_value_t = 0.998)]
    ema_decay: f64,
    /// Seed of every random choice; equal seeds give equal weights on CPU.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also write the training report (JSON) to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// After writing the weights, publish a reload message so the workers load
    /// them: through the server given here, or --nats-url when no value is given
    /// (with the same authentication and TLS flags as the worker).
    #[arg(long, num_args = 0..=1, value_name = "URL")]
    notify_nats: Option<Option<String>>,
    #[command(flatten)]
    nats: NatsArgs,
    /// Subject of the reload message.
    #[arg(long, default_value = "profiles.control.reload")]
    reload_subject: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(a) => {
            let cfg = TrainConfig {
                data: a.data,
                detector: a.detector,
                face_threshold: a.face_threshold,
                first_look: a.first_look,
                closer_look: a.closer_look.0,
                validation: a
                    .val
                    .map_or(Validation::Fraction(a.val_fraction), Validation::Dir),
                out: a.out,
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                weight_decay: a.weight_decay,
                input_size: a.input_size,
                channels: a.channels,
                labels: a.labels,
                dropout: a.dropout,
                tight: a.tight,
                label_smoothing: a.label_smoothing,
                ema_decay: a.ema_decay,
                seed: a.seed,
                device: parse_device(&a.device)?,
                progress: true,
            };
            if !train::memory::keep_freed_memory() {
                eprintln!("note: the allocator keeps its defaults (training runs slower)");
            }
            let report = train::trainer::run(&cfg)?;
            if let Some(path) = a.report {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some(url) = a.notify_nats {
                let nats = match url {
                    Some(url) => NatsArgs {
                        nats_url: url,
                        ..a.nats
                    },
                    None => a.nats,
                };
                let body = serde_json::json!({"weights": cfg.out.display().to_string(), "version": report.version});
                notify(&nats, &a.reload_subject, &body.to_string())?;
            }
        }
        Command::Notify {
            nats,
            reload_subject,
        } => notify(&nats, &reload_subject, "{}")?,
        Command::Eval {
            weights,
            data,
            faces,
            json,
            out,
            device,
        } => {
            let device = parse_device(&device)?;
            let cls = Classifier::load(&weights, &device, faces.precision)?;
            let pre = preprocessor(&faces, &cls)?;
            let set = train::dataset::load(&data, &cls.meta().labels, &pre)?;
            for s in &set.skipped {
                eprintln!("skipped {}: {}", s.userid, s.reason);
            }
            anyhow::ensure!(!set.is_empty(), "no usable pictures in {}", data.display());
            let probs = train::eval::predict_all(&cls, &set, 256)?;
            let report = train::eval::evaluate(&cls.meta().labels, &set, &probs);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("model: {}  ({})", cls.meta().version, weights.display());
                print!("{report}");
            }
            if let Some(path) = out {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Command::Predict {
            weights,
            faces,
            images,
        } => {
            let cls = Classifier::load(&weights, &candle_core::Device::Cpu, faces.precision)?;
            let pre = preprocessor(&faces, &cls)?;
            let size = cls.meta().input_size;
            let mut failed = false;
            for path in images {
                let mut input = vec![0f32; pre.input_len()];
                let outcome = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| pre.run(&bytes, &mut input).map_err(|e| e.to_string()));
                match outcome {
                    Ok(Framing::NoFace) => println!("{}\tno face", path.display()),
                    Ok(framing) => {
                        let x =
                            candle_core::Tensor::from_vec(input, (1, size, size, 3), cls.device())?;
                        let probs = cls.probabilities(&x)?.remove(0);
                        let best = profile_classifier::model::argmax(&probs);
                        let face = match framing {
                            Framing::Face { faces, face } => format!(
                                "\t{faces} face(s), classified at x {:.0} y {:.0} w {:.0} h {:.0}",
                                face.x, face.y, face.w, face.h
                            ),
                            _ => String::new(),
                        };
                        println!(
                            "{}\t{}\t{:.4}{face}",
                            path.display(),
                            cls.meta().labels[best],
                            probs[best]
                        );
                    }
                    Err(e) => {
                        failed = true;
                        println!("{}\terror\t{e}", path.display());
                    }
                }
            }
            anyhow::ensure!(!failed, "some pictures could not be classified");
        }
    }
    Ok(())
}

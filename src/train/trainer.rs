//! The training loop: the pictures decoded and their faces found once, the
//! crop geometry measured from them, seeded initialisation, shuffled batches
//! of faces cut out anew each epoch by [`fn@crate::face::align`] with
//! upload-like augmentation, AdamW with linear warm-up then cosine decay,
//! validation (through the worker's own framing) after every epoch, the best
//! epoch kept and written atomically with its metadata.
//!
//! The network itself lives in [`crate::model`]; this module only drives it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::augment::Augment;
use super::dataset::{self, Dataset};
use super::ema::{Ema, snapshot};
use super::eval;
use super::pictures::Pictures;
use crate::face::{FaceCrop, FaceFinder, Look};
use crate::model::backprop::{Batch, Workspace};
use crate::model::{self, Cnn, ConvImpl, ModelMeta, Precision};
use crate::preprocess::{DEBLOCK, FaceStage, Limits, Preprocessor, rgb_view};

/// Where the validation pictures come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Validation {
    /// A separate folder in the same layout.
    Dir(PathBuf),
    /// A share of the training folder, chosen by a hash of the user id.
    Fraction(f64),
}

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Folders of `<userid>.jpg` plus `profile.csv`, read together.
    pub data: Vec<PathBuf>,
    /// The face detector's weights.
    pub detector: PathBuf,
    /// Detector score a face needs (default: the detector file's own).
    pub face_threshold: Option<f32>,
    /// Where the detector first looks for a face (quick: 64x64, then the
    /// full 128x128 when that takes no face; full: 128x128 only).
    pub first_look: Look,
    /// Detector score a face found by the closer look needs (`None`: no
    /// closer look); stored in the weights.
    pub closer_look: Option<f32>,
    /// Validation source.
    pub validation: Validation,
    /// Weights file to write.
    pub out: PathBuf,
    /// Passes over the training data.
    pub epochs: usize,
    /// Pictures per optimiser step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Side of the square model input.
    pub input_size: usize,
    /// Output channels of each conv block.
    pub channels: Vec<usize>,
    /// Label names, in output order.
    pub labels: Vec<String>,
    /// Dropout probability before the linear layer.
    pub dropout: f32,
    /// Chance of a picture cut down to a tight upload ([`Augment::tight`]).
    pub tight: f64,
    /// Share of the target moved evenly onto every label (0: plain
    /// cross-entropy); the source labels are partly wrong.
    pub label_smoothing: f32,
    /// Decay of the weights' exponential moving average, per step (0: off);
    /// each epoch is validated with both the raw and the averaged weights.
    pub ema_decay: f64,
    /// Seed of every random choice (initialisation, order, augmentation).
    pub seed: u64,
    /// Where to train.
    pub device: Device,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// One epoch's figures.
#[derive(Debug, Clone, Serialize)]
pub struct EpochStats {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Training accuracy (augmented batches, dropout on).
    pub train_accuracy: f64,
    /// Validation accuracy of the weights as trained.
    pub val_accuracy: f64,
    /// Validation accuracy of their moving average (when kept).
    pub ema_val_accuracy: Option<f64>,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Wall time of the epoch, evaluation included.
    pub seconds: f64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Per-epoch figures.
    pub epochs: Vec<EpochStats>,
    /// The epoch whose weights were written.
    pub best_epoch: usize,
    /// Whether they were the moving average.
    pub best_is_ema: bool,
    /// Its validation accuracy.
    pub val_accuracy: f64,
    /// Training and validation pictures used.
    pub train_pictures: usize,
    /// Validation pictures used.
    pub val_pictures: usize,
    /// Rows and files left out (both folders).
    pub skipped: usize,
    /// Wall time of the whole run, loading included.
    pub seconds: f64,
    /// The version string written to the metadata.
    pub version: String,
}

/// Default normalisation: pixel values in [0, 1] mapped to [-1, 1].
const MEAN: [f32; 3] = [0.5; 3];
const STD: [f32; 3] = [0.5; 3];

fn base_meta(cfg: &TrainConfig) -> ModelMeta {
    ModelMeta {
        labels: cfg.labels.clone(),
        input_size: cfg.input_size,
        input_channels: 3,
        mean: MEAN.to_vec(),
        std: STD.to_vec(),
        channels: cfg.channels.clone(),
        version: "untrained".into(),
        training: serde_json::Value::Null,
        probe: Vec::new(),
        face: None,
    }
}

fn folders(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ")
}

/// Seeded He-normal conv weights, unit batch norm, small linear layer.
fn init_tensors(
    meta: &ModelMeta,
    rng: &mut StdRng,
    device: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut normal = || {
        // Box-Muller from two uniforms.
        let u1: f32 = rng.random_range(f32::EPSILON..1.0);
        let u2: f32 = rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    };
    let mut out = HashMap::new();
    for (name, shape) in model::tensor_shapes(meta) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("conv.weight") {
            let fan_in = (shape[1] * 9) as f32;
            (0..n).map(|_| normal() * (2.0 / fan_in).sqrt()).collect()
        } else if name == "fc.weight" {
            let bound = 1.0 / (shape[1] as f32).sqrt();
            (0..n).map(|_| normal() * bound * 0.5).collect()
        } else if name.ends_with("bn.weight") || name.ends_with("running_var") {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        out.insert(name, Tensor::from_vec(values, shape, device)?);
    }
    Ok(out)
}

fn learning_rate(cfg: &TrainConfig, step: usize, total: usize) -> f64 {
    let warmup = (total / cfg.epochs.max(1)).max(1); // one epoch
    if step < warmup {
        cfg.lr * (step + 1) as f64 / warmup as f64
    } else {
        let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        cfg.lr * (0.01 + 0.99 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
    }
}

fn report_skipped(what: &str, data: &Dataset) {
    for s in &data.skipped {
        tracing::warn!(userid = %s.userid, "{what}: skipped: {}", s.reason);
    }
    if !data.skipped.is_empty() {
        eprintln!(
            "{what}: {} pictures usable, {} skipped (listed above)",
            data.len(),
            data.skipped.len()
        );
    }
}

/// Loads the data, trains, and writes the best epoch's weights to `cfg.out`.
pub fn run(cfg: &TrainConfig) -> anyhow::Result<TrainReport> {
    let started = Instant::now();
    anyhow::ensure!(
        cfg.epochs > 0 && cfg.batch_size > 0,
        "epochs and batch size must be positive"
    );
    anyhow::ensure!(!cfg.data.is_empty(), "no training folder given");
    anyhow::ensure!(
        (0.0..1.0).contains(&cfg.label_smoothing),
        "label smoothing must be in [0, 1), not {}",
        cfg.label_smoothing
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&cfg.tight),
        "the chance of a tight cut must be in [0, 1], not {}",
        cfg.tight
    );
    anyhow::ensure!(
        (0.0..1.0).contains(&cfg.ema_decay),
        "the moving average's decay must be in [0, 1) (0: none), not {}",
        cfg.ema_decay
    );
    let mut meta = base_meta(cfg);
    meta.validate().map_err(anyhow::Error::msg)?;
    let finder = Arc::new(
        // The serving default, so training crops are cut as the worker cuts.
        FaceFinder::load(&cfg.detector, Precision::fastest())
            .with_context(|| format!("loading the face detector {}", cfg.detector.display()))?,
    );
    let threshold = cfg
        .face_threshold
        .unwrap_or_else(|| finder.net().default_threshold());
    // Faces are looked for as the worker looks for them in uploads (small
    // blocky pictures softened for the detector).
    let decoder = Preprocessor::new(&meta, Limits::default()).with_deblock(Some(DEBLOCK));
    let pictures = Pictures::load(
        &cfg.data,
        &cfg.labels,
        &decoder,
        &finder,
        threshold,
        (cfg.first_look, cfg.closer_look),
    )
    .with_context(|| format!("reading {}", folders(&cfg.data)))?;
    for s in &pictures.skipped {
        tracing::warn!(userid = %s.userid, "training data: skipped: {}", s.reason);
    }
    anyhow::ensure!(
        !pictures.is_empty(),
        "no usable training pictures in {}",
        folders(&cfg.data)
    );
    let crop = pictures
        .measure_crop(threshold, (cfg.first_look, cfg.closer_look))
        .with_context(|| {
            format!(
                "the face detector found no face in the {} training pictures",
                pictures.len()
            )
        })?;
    eprintln!(
        "faces found in {} of {} training pictures; crop: side {:.3}, offset ({:.3}, {:.3}) face sizes; threshold {threshold}; first look at {} px",
        pictures.with_face(),
        pictures.len(),
        crop.side,
        crop.dx,
        crop.dy,
        crop.first_look.side()
    );
    crop.validate().map_err(anyhow::Error::msg)?;
    meta.face = Some(crop);
    let pre = Preprocessor::new(&meta, Limits::default()).with_faces(FaceStage {
        finder,
        crop,
        threshold,
    });
    let (train, val) = match &cfg.validation {
        Validation::Dir(dir) => {
            let val = dataset::load(dir, &cfg.labels, &pre)
                .with_context(|| format!("reading {}", dir.display()))?;
            report_skipped("validation data", &val);
            (pictures, val)
        }
        Validation::Fraction(f) => {
            let (train, val) = pictures.split(*f);
            let val = val.to_dataset(&pre);
            (train, val)
        }
    };
    anyhow::ensure!(!train.is_empty(), "no usable training pictures");
    anyhow::ensure!(!val.is_empty(), "no usable validation pictures");
    let skipped = train.skipped.len() + val.skipped.len();
    eprintln!(
        "training on {} pictures {:?}, validating on {} {:?}, loaded in {:.1} s",
        train.len(),
        train.label_counts(cfg.labels.len()),
        val.len(),
        val.label_counts(cfg.labels.len()),
        started.elapsed().as_secs_f64()
    );

    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let tensors = init_tensors(&meta, &mut rng, &cfg.device)?;
    let mut vars = Vec::new();
    let mut model_tensors = HashMap::new();
    for (name, t) in tensors {
        if name.contains("running_") {
            model_tensors.insert(name, t);
        } else {
            let v = Var::from_tensor(&t)?;
            model_tensors.insert(name, v.as_tensor().clone());
            vars.push(v);
        }
    }
    // f32 throughout: the probe stored with the weights is the reference
    // every CPU checks against.
    let conv_impl = ConvImpl::for_device(&cfg.device, Precision::F32);
    let cnn = Cnn::new(meta.clone(), &model_tensors, conv_impl)?;
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;

    let size = cfg.input_size;
    let len = pre.input_len();
    let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * cfg.epochs;
    let augment = Augment {
        tight: cfg.tight,
        ..Augment::default()
    };
    let feature_dim = *cfg.channels.last().unwrap_or(&1);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut batch = vec![0f32; cfg.batch_size * len];
    let mut step = 0;
    let mut history = Vec::new();
    let mut ema = if cfg.ema_decay > 0.0 {
        Some(Ema::new(cfg.ema_decay, &cnn.tensors())?)
    } else {
        None
    };
    let mut best: Option<Best> = None;
    let mut workspace = Workspace::default();

    for epoch in 1..=cfg.epochs {
        let epoch_start = Instant::now();
        order.shuffle(&mut rng);
        let bar = if cfg.progress {
            ProgressBar::new(steps_per_epoch as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{}", cfg.epochs));
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        let mut lr = cfg.lr;
        for chunk in order.chunks(cfg.batch_size) {
            let n = chunk.len();
            let seeds: Vec<u64> = chunk.iter().map(|_| rng.random()).collect();
            prepare_batch(
                &train,
                chunk,
                &seeds,
                &augment,
                &crop,
                &pre,
                &mut batch[..n * len],
            );
            let targets: Vec<u32> = chunk
                .iter()
                .map(|&i| train.samples[i].label.unwrap_or(0) as u32)
                .collect();
            let mask = dropout_mask(cfg.dropout, n * feature_dim, &mut rng);
            lr = learning_rate(cfg, step, total_steps);
            opt.set_learning_rate(lr);
            let pictures = Batch {
                pixels: &batch[..n * len],
                targets: &targets,
                dropout: mask.as_deref(),
                smoothing: cfg.label_smoothing,
            };
            let (loss, preds) = if cfg.device.is_cpu() {
                hand_step(&cnn, &mut opt, &mut workspace, &pictures)?
            } else {
                autograd_step(&cnn, &mut opt, &pictures, size, &cfg.device)?
            };
            if let Some(ema) = &mut ema {
                ema.update(&cnn.tensors())?;
            }
            step += 1;
            correct += preds.iter().zip(&targets).filter(|(p, t)| p == t).count();
            seen += n;
            loss_sum += f64::from(loss) * n as f64;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} acc {:.4}",
                loss_sum / seen as f64,
                correct as f64 / seen as f64
            ));
        }
        bar.finish_and_clear();
        let val_accuracy = validate(&cnn, &val, &cfg.labels, conv_impl)?;
        let ema_val_accuracy = match &ema {
            Some(ema) => {
                let averaged = to_map(ema.tensors());
                let averaged = Cnn::new(meta.clone(), &averaged, conv_impl)?;
                Some(validate(&averaged, &val, &cfg.labels, conv_impl)?)
            }
            None => None,
        };
        let stats = EpochStats {
            epoch,
            loss: loss_sum / seen as f64,
            train_accuracy: correct as f64 / seen as f64,
            val_accuracy,
            ema_val_accuracy,
            lr,
            seconds: epoch_start.elapsed().as_secs_f64(),
        };
        eprintln!(
            "epoch {epoch}/{}: loss {:.4}  train acc {:.4}  val acc {:.4}{}  lr {:.2e}  {:.1} s",
            cfg.epochs,
            stats.loss,
            stats.train_accuracy,
            stats.val_accuracy,
            ema_val_accuracy.map_or(String::new(), |a| format!(" (average {a:.4})")),
            stats.lr,
            stats.seconds
        );
        history.push(stats);
        // The average first: on a tie it is kept.
        if let (Some(ema), Some(acc)) = (&ema, ema_val_accuracy)
            && best.as_ref().is_none_or(|b| acc > b.accuracy)
        {
            best = Some(Best::of(epoch, acc, true, ema.tensors())?);
        }
        if best.as_ref().is_none_or(|b| val_accuracy > b.accuracy) {
            best = Some(Best::of(epoch, val_accuracy, false, &cnn.tensors())?);
        }
    }

    let Best {
        epoch: best_epoch,
        accuracy: val_accuracy,
        ema: best_is_ema,
        tensors: best_tensors,
    } = best.context("no epoch ran")?;
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let stamp = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into());
    meta.version = format!("gender-cnn/{stamp}");
    meta.training = serde_json::json!({
        "data": folders(&cfg.data),
        "faces_found": train.with_face(),
        "validation": match &cfg.validation {
            Validation::Dir(d) => d.display().to_string(),
            Validation::Fraction(f) => format!("{f} of the training folder"),
        },
        "train_pictures": train.len(),
        "train_label_counts": train.label_counts(cfg.labels.len()),
        "val_pictures": val.len(),
        "skipped": skipped,
        "epochs": cfg.epochs,
        "best_epoch": best_epoch,
        "val_accuracy": val_accuracy,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "dropout": cfg.dropout,
        "label_smoothing": cfg.label_smoothing,
        "tight": cfg.tight,
        "ema_decay": cfg.ema_decay,
        "best_is_ema": best_is_ema,
        "seed": cfg.seed,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let mut best_cnn = Cnn::new(meta.clone(), &to_map(&best_tensors), conv_impl)?;
    meta.probe = best_cnn
        .classifier(conv_impl)?
        .probabilities(&model::probe_input(&meta, &cfg.device)?)?;
    best_cnn.set_meta(meta.clone());
    model::weights::save(&cfg.out, &meta, &best_cnn.tensors())?;
    eprintln!(
        "wrote {} (epoch {best_epoch}{}, val acc {val_accuracy:.4}) in {:.1} s",
        cfg.out.display(),
        if best_is_ema { ", moving average" } else { "" },
        started.elapsed().as_secs_f64()
    );
    Ok(TrainReport {
        epochs: history,
        best_epoch,
        best_is_ema,
        val_accuracy,
        train_pictures: train.len(),
        val_pictures: val.len(),
        skipped,
        seconds: started.elapsed().as_secs_f64(),
        version: meta.version,
    })
}

/// The weights worth keeping so far.
struct Best {
    epoch: usize,
    accuracy: f64,
    ema: bool,
    tensors: BTreeMap<String, Tensor>,
}

impl Best {
    fn of(
        epoch: usize,
        accuracy: f64,
        ema: bool,
        tensors: &BTreeMap<String, Tensor>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            epoch,
            accuracy,
            ema,
            tensors: snapshot(tensors)?,
        })
    }
}

/// `tensors` in the form [`Cnn::new`] takes (the tensors are shared, not copied).
fn to_map(tensors: &BTreeMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect()
}

/// Accuracy of `cnn`'s serving form on the validation set.
fn validate(
    cnn: &Cnn,
    val: &Dataset,
    labels: &[String],
    conv_impl: ConvImpl,
) -> anyhow::Result<f64> {
    let classifier = cnn.classifier(conv_impl)?;
    let probs = eval::predict_all(&classifier, val, 256)?;
    Ok(eval::evaluate(labels, val, &probs).accuracy)
}

/// Dropout multipliers for `len` features: 0 with probability `p`, else
/// `1 / (1 - p)`; `None` when `p` is 0.
fn dropout_mask(p: f32, len: usize, rng: &mut StdRng) -> Option<Vec<f32>> {
    if p <= 0.0 {
        return None;
    }
    let keep = 1.0 / (1.0 - p);
    Some(
        (0..len)
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
            .collect(),
    )
}

/// One optimiser step differentiated by hand (CPU): the loss and each
/// picture's predicted label.
fn hand_step(
    cnn: &Cnn,
    opt: &mut candle_nn::AdamW,
    workspace: &mut Workspace,
    batch: &Batch,
) -> candle_core::Result<(f32, Vec<u32>)> {
    let out = cnn.train_step(workspace, batch)?;
    opt.step(&out.grads)?;
    let labels = out.logits.len() / batch.targets.len();
    let preds = out
        .logits
        .chunks(labels)
        .map(|row| model::argmax(row) as u32)
        .collect();
    Ok((out.loss, preds))
}

/// One optimiser step through candle's autograd (devices other than the
/// CPU): the loss and each picture's predicted label.
fn autograd_step(
    cnn: &Cnn,
    opt: &mut candle_nn::AdamW,
    batch: &Batch,
    size: usize,
    device: &Device,
) -> candle_core::Result<(f32, Vec<u32>)> {
    let n = batch.targets.len();
    let x = Tensor::from_slice(batch.pixels, (n, size, size, 3), device)?;
    let y = Tensor::new(batch.targets, device)?;
    let mask = match batch.dropout {
        Some(m) => Some(Tensor::from_slice(m, (n, m.len() / n), device)?),
        None => None,
    };
    let logits = cnn.forward(&x, true, mask.as_ref())?;
    let loss = model::smoothed_cross_entropy(&logits, &y, batch.smoothing)?;
    opt.backward_step(&loss)?;
    Ok((loss.to_scalar::<f32>()?, logits.argmax(1)?.to_vec1()?))
}

/// Cuts out and augments the pictures `chunk` of `train` into `out`, one
/// seed per picture, on every core.
fn prepare_batch(
    train: &Pictures,
    chunk: &[usize],
    seeds: &[u64],
    augment: &Augment,
    crop: &FaceCrop,
    pre: &Preprocessor,
    out: &mut [f32],
) {
    let len = pre.input_len();
    let n = pre.size() as usize;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per = chunk.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for ((part, seeds), out) in chunk
            .chunks(per)
            .zip(seeds.chunks(per))
            .zip(out.chunks_mut(per * len))
        {
            scope.spawn(move || {
                let mut rgb = vec![0u8; n * n * 3];
                for ((&i, &seed), out) in part.iter().zip(seeds).zip(out.chunks_exact_mut(len)) {
                    let mut rng = StdRng::seed_from_u64(seed);
                    let face = train.face_or_whole(i, crop);
                    let placed = augment
                        .backdrop(&train.images[i], &face, &mut rng)
                        .or_else(|| augment.tighten(&train.images[i], &face, &mut rng));
                    let (img, face) = match &placed {
                        Some((img, face)) => (img, *face),
                        None => (&train.images[i], face),
                    };
                    let face = augment.face(&face, &mut rng);
                    crate::face::align(rgb_view(img), &face, crop, n, &mut rgb);
                    augment.pixels(&mut rgb, n, &mut rng);
                    pre.normalise(&rgb, out);
                }
            });
        }
    });
}

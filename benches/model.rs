//! Criterion benchmarks of the network: forward pass at batch 1, 8 and 32 with
//! the direct AVX-512 kernels (`Direct`, the worker's path), the NHWC im2col
//! convolution (`Fast`) and candle's `conv2d` (`Candle`), one training step,
//! preprocessing of a real 200x200 JPEG, and the BlazeFace face detector's
//! forward pass at batch 1, 8 and 32 (its own kernels: AVX-512 where the CPU
//! has it, and the portable loops), at its full 128x128 input and at the
//! quick look's 64x64.
//!
//! Throughput is reported in pictures per second; effective GFLOP/s is that
//! rate times `forward_flops` (printed first), and a short summary table with
//! both is printed at the end. Run: `cargo bench --bench model`; set
//! `BENCH_WEIGHTS=FILE` to measure another weights file than the shipped one.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use criterion::{BenchmarkId, Criterion, Throughput};
use profile_classifier::face::{BlazeFace, Kernels, Look};
use profile_classifier::model::backprop::{Batch, Workspace};
use profile_classifier::model::{self, Cnn, ConvImpl, ModelMeta};
use profile_classifier::preprocess::{Limits, Preprocessor};

const SHIPPED: &str = "weights/gender-cnn.safetensors";

/// The model in `BENCH_WEIGHTS` or the shipped one, or the default
/// architecture with deterministic weights when no weights file is there.
fn network() -> (ModelMeta, HashMap<String, Tensor>) {
    let path = std::env::var("BENCH_WEIGHTS").unwrap_or_else(|_| SHIPPED.into());
    if Path::new(&path).exists() {
        return model::weights::load(Path::new(&path), &Device::Cpu).expect("weights load");
    }
    let meta = ModelMeta {
        labels: vec!["female".into(), "male".into()],
        input_size: 64,
        input_channels: 3,
        mean: vec![0.5; 3],
        std: vec![0.5; 3],
        channels: vec![32, 64, 128, 128],
        version: "bench".into(),
        training: serde_json::Value::Null,
        probe: vec![],
        face: None,
    };
    let tensors = model::tensor_shapes(&meta)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| {
                    ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1
                        + if name.ends_with("var") { 1.0 } else { 0.0 }
                })
                .collect();
            (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        })
        .collect();
    (meta, tensors)
}

fn input(meta: &ModelMeta, batch: usize) -> Tensor {
    let s = meta.input_size;
    let v: Vec<f32> = (0..batch * s * s * 3)
        .map(|i| ((i % 251) as f32 / 125.0) - 1.0)
        .collect();
    Tensor::from_vec(v, (batch, s, s, 3), &Device::Cpu).unwrap()
}

/// The shipped network through each classifier implementation.
fn classifiers(
    meta: &ModelMeta,
    tensors: &HashMap<String, Tensor>,
) -> Vec<(ConvImpl, model::Classifier)> {
    [
        ConvImpl::DirectBf16,
        ConvImpl::Direct,
        ConvImpl::Fast,
        ConvImpl::Candle,
    ]
    .into_iter()
    .map(|imp| {
        let cnn = Cnn::new(meta.clone(), tensors, imp).unwrap();
        (imp, cnn.classifier(imp).unwrap())
    })
    .collect()
}

fn forward(c: &mut Criterion) {
    let (meta, tensors) = network();
    eprintln!(
        "network: channels {:?}, input {}x{}, {:.1} MFLOP per picture",
        meta.channels,
        meta.input_size,
        meta.input_size,
        model::forward_flops(&meta) / 1e6
    );
    let mut group = c.benchmark_group("forward");
    for (imp, cls) in classifiers(&meta, &tensors) {
        for batch in [1, 8, 32] {
            let x = input(&meta, batch);
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(BenchmarkId::new(format!("{imp:?}"), batch), &x, |b, x| {
                b.iter(|| black_box(cls.logits(x).unwrap()))
            });
        }
    }
    group.finish();
}

fn train_step(c: &mut Criterion) {
    // As the trainer runs.
    profile_classifier::train::memory::keep_freed_memory();
    let (meta, tensors) = network();
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    for imp in [ConvImpl::Fast, ConvImpl::Candle] {
        let vars: Vec<Var> = tensors
            .iter()
            .filter(|(k, _)| !k.contains("running"))
            .map(|(_, t)| Var::from_tensor(t).unwrap())
            .collect();
        let mut named = tensors.clone();
        let trainable: Vec<_> = tensors
            .keys()
            .filter(|k| !k.contains("running"))
            .cloned()
            .collect();
        for (k, v) in trainable.iter().zip(&vars) {
            named.insert(k.clone(), v.as_tensor().clone());
        }
        let cnn = Cnn::new(meta.clone(), &named, imp).unwrap();
        let mut opt = candle_nn::AdamW::new_lr(vars, 1e-4).unwrap();
        let batch = 64;
        let x = input(&meta, batch);
        let y = Tensor::from_vec(
            (0..batch as u32).map(|i| i % 2).collect::<Vec<_>>(),
            batch,
            &Device::Cpu,
        )
        .unwrap();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new(format!("{imp:?}"), batch), |b| {
            b.iter(|| {
                let loss =
                    candle_nn::loss::cross_entropy(&cnn.forward(&x, true, None).unwrap(), &y)
                        .unwrap();
                opt.backward_step(&loss).unwrap();
            })
        });
        if imp == ConvImpl::Fast {
            // The same step differentiated by hand, as the trainer runs it on CPU.
            let pixels = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let targets = y.to_vec1::<u32>().unwrap();
            let mut workspace = Workspace::default();
            group.bench_function(BenchmarkId::new("ByHand", batch), |b| {
                b.iter(|| {
                    let batch = Batch {
                        pixels: &pixels,
                        targets: &targets,
                        dropout: None,
                        smoothing: 0.0,
                    };
                    let out = cnn.train_step(&mut workspace, &batch).unwrap();
                    opt.step(&out.grads).unwrap();
                })
            });
        }
    }
    group.finish();
}

fn preprocess(c: &mut Criterion) {
    let dir = Path::new("tests/fixtures/faces");
    let path = std::fs::read_dir(dir)
        .expect("tests/fixtures/faces is missing")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "jpg"))
        .expect("a JPEG in tests/fixtures/faces");
    let bytes = std::fs::read(path).unwrap();
    let (meta, _) = network();
    let pre = Preprocessor::new(&meta, Limits::default());
    let mut out = vec![0f32; pre.input_len()];
    let mut group = c.benchmark_group("preprocess");
    group.throughput(Throughput::Elements(1));
    group.bench_function("jpeg_200x200", |b| {
        b.iter(|| pre.run(black_box(&bytes), &mut out).unwrap())
    });
    // The general path (through `image`), which `run` takes for grey or
    // EXIF-rotated JPEGs and for the other formats.
    group.bench_function("jpeg_200x200_general", |b| {
        b.iter(|| {
            let rgb = pre.decode(black_box(&bytes)).unwrap();
            pre.resize_normalise(&rgb, &mut out)
        })
    });
    // What the worker does by default: decode, find the face (detector
    // included), align and cut it out, normalise.
    if let Some(crop) = meta.face {
        let finder = std::sync::Arc::new(profile_classifier::face::FaceFinder::new(detector(
            Kernels::best(),
        )));
        let faces = Preprocessor::new(&meta, Limits::default()).with_faces(
            profile_classifier::preprocess::FaceStage {
                finder: finder.clone(),
                crop,
                threshold: crop.threshold,
            },
        );
        group.bench_function("jpeg_200x200_face", |b| {
            b.iter(|| faces.run(black_box(&bytes), &mut out).unwrap())
        });
        // The alignment alone: the face's square, turned level, sampled
        // into the model's input (the SIMD bilinear sampler's loop).
        let rgb = pre.decode(&bytes).unwrap();
        let picture = profile_classifier::preprocess::rgb_view(&rgb);
        let face = *finder
            .find(picture, crop.threshold, crop.first_look, None)
            .first()
            .expect("a face in the fixture picture");
        let n = meta.input_size;
        let mut crop_rgb = vec![0u8; n * n * 3];
        group.bench_function("align_200x200", |b| {
            b.iter(|| {
                profile_classifier::face::align(picture, black_box(&face), &crop, n, &mut crop_rgb)
            })
        });
    }
    group.finish();
}

const DETECTOR: &str = "weights/blazeface-front.safetensors";

fn detector(kernels: Kernels) -> BlazeFace {
    let bytes = std::fs::read(DETECTOR).expect("detector weights");
    BlazeFace::from_bytes(&bytes, kernels).expect("detector")
}

/// The detector kernels this CPU runs, fastest first.
fn detector_kernels() -> Vec<Kernels> {
    let mut all = vec![Kernels::best()];
    let bf16 = profile_classifier::model::Precision::Bf16
        .available()
        .then_some(Kernels::Avx512Bf16);
    for k in bf16
        .into_iter()
        .chain([Kernels::best_f32(), Kernels::Avx2, Kernels::Portable])
    {
        if k.runs_here() && !all.contains(&k) {
            all.push(k);
        }
    }
    all
}

/// Pictures for the detector: a smooth pattern of 0..255 values.
fn detector_input(net: &BlazeFace, batch: usize) -> Vec<f32> {
    let s = net.input_side();
    (0..batch * s * s * 3)
        .map(|i| ((i * 37 % 256) as f32 * 0.7 + (i / (s * 3) % 64) as f32).min(255.0))
        .collect()
}

/// The detector at its full 128x128 input (`detector/`) and at the quick
/// look's 64x64 (`detector_quick/`).
fn detect(c: &mut Criterion) {
    for (name, look) in [("detector", Look::Full), ("detector_quick", Look::Quick)] {
        let side = look.side();
        let mut group = c.benchmark_group(name);
        for kernels in detector_kernels() {
            let net = detector(kernels).at_side(side as usize).expect("side");
            for batch in [1usize, 8, 32] {
                let x = detector_input(&net, batch);
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_with_input(
                    BenchmarkId::new(format!("{kernels:?}"), batch),
                    &x,
                    |b, x| b.iter(|| black_box(net.raw(x))),
                );
            }
        }
        group.finish();
    }
}

/// The detector's rows of the summary.
fn detector_summary() {
    println!(
        "\n| detector kernels | input | batch | pictures/s | GFLOP/s |\n| --- | ---: | ---: | ---: | ---: |"
    );
    for (kernels, look) in detector_kernels()
        .into_iter()
        .flat_map(|k| [(k, Look::Full), (k, Look::Quick)])
    {
        let side = look.side();
        let net = detector(kernels).at_side(side as usize).expect("side");
        let flops = net.flops() as f64;
        for batch in [1usize, 8, 32] {
            let x = detector_input(&net, batch);
            net.raw(&x);
            let runs = (512 / batch).max(8);
            let start = Instant::now();
            for _ in 0..runs {
                black_box(net.raw(&x));
            }
            let rate = (runs * batch) as f64 / start.elapsed().as_secs_f64();
            println!(
                "| {kernels:?} | {side} | {batch} | {rate:.0} | {:.1} |",
                rate * flops / 1e9
            );
        }
    }
}

/// A plain summary with both units, after criterion's own report.
fn summary() {
    let (meta, tensors) = network();
    let flops = model::forward_flops(&meta);
    println!("\n| conv | batch | pictures/s | GFLOP/s |\n| --- | ---: | ---: | ---: |");
    for (imp, cls) in classifiers(&meta, &tensors) {
        for batch in [1, 8, 32] {
            let x = input(&meta, batch);
            cls.logits(&x).unwrap();
            let runs = (256 / batch).max(4);
            let start = Instant::now();
            for _ in 0..runs {
                black_box(cls.logits(&x).unwrap());
            }
            let rate = (runs * batch) as f64 / start.elapsed().as_secs_f64();
            println!(
                "| {imp:?} | {batch} | {rate:.0} | {:.1} |",
                rate * flops / 1e9
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    forward(&mut c);
    train_step(&mut c);
    preprocess(&mut c);
    detect(&mut c);
    c.final_summary();
    // Profiling one benchmark (`--profile-time`) wants nothing else running.
    if !std::env::args().any(|a| a == "--profile-time") {
        summary();
        detector_summary();
    }
}

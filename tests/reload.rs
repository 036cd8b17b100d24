//! Hot reload: weights replaced under load (atomic renames seen by the file
//! watcher, one corrupt file among them) with no failed or missing request,
//! and a reload by control message with the watcher off.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use common::{NatsServer, Worker};
use profile_classifier::loadgen;
use profile_classifier::model::{Cnn, ConvImpl, probe_input, weights};

/// Writes a variant of the shipped weights (shifted output bias, its own
/// version and probe) atomically to `path`; returns its version string.
fn write_variant(path: &Path, k: usize) -> String {
    let (mut meta, mut tensors) = weights::load(&common::weights(), &Device::Cpu).unwrap();
    let bias = tensors["fc.bias"].clone();
    let shift =
        candle_core::Tensor::new(&[0.01f32 * k as f32, -0.01 * k as f32], &Device::Cpu).unwrap();
    tensors.insert("fc.bias".into(), (bias + shift).unwrap());
    meta.version = format!("gender-cnn/variant-{k}");
    let cnn = Cnn::new(meta.clone(), &tensors, ConvImpl::Fast).unwrap();
    meta.probe = cnn
        .classifier(ConvImpl::Fast)
        .unwrap()
        .probabilities(&probe_input(&meta, &Device::Cpu).unwrap())
        .unwrap();
    weights::save(path, &meta, &cnn.tensors()).unwrap();
    meta.version
}

fn reloads(w: &Worker, outcome: &str) -> f64 {
    w.metric(&format!(
        "profile_worker_model_reloads_total{{outcome=\"{outcome}\"}}"
    ))
}

fn results(w: &Worker) -> f64 {
    w.metric("profile_worker_results_total{label=\"female\"}")
        + w.metric("profile_worker_results_total{label=\"male\"}")
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_replaced_under_load_lose_nothing() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("model.safetensors");
    std::fs::copy(common::weights(), &live).unwrap();
    let worker = Worker::start(
        &server.url(),
        &[
            "--weights",
            live.to_str().unwrap(),
            "--watch-interval",
            "0.1",
            // Above the paced load's backlog on a slow machine: this test is
            // about reloads, not about the intake bound dropping requests.
            "--max-pending",
            "4000",
        ],
    );
    let load = tokio::spawn({
        // Paced (3 s in all) so that the last swap, at 2,400 results, still
        // has load after it: unpaced, the worker now answers the last 600
        // requests faster than a 0.1 s file poll notices the new weights.
        let cfg = common::fixture_load(&server.url(), 3000, 32, Some(1000.0));
        async move { loadgen::run(&cfg).await.unwrap() }
    });
    let worker = tokio::task::spawn_blocking(move || {
        let mut expected = Vec::new();
        let (mut ok, mut rejected) = (0.0, 0.0);
        for (i, at) in [400.0, 900.0, 1400.0, 1900.0, 2400.0]
            .into_iter()
            .enumerate()
        {
            wait_until("load to progress", Duration::from_secs(120), || {
                results(&worker) >= at
            });
            let staged = dir.path().join(format!(".staged-{i}"));
            if i == 2 {
                // A corrupt file: refused, counted, never served.
                std::fs::write(&staged, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}garbage")
                    .unwrap();
                rejected += 1.0;
            } else {
                expected.push(write_variant(&staged, i + 1));
                ok += 1.0;
            }
            std::fs::rename(&staged, &live).unwrap();
            wait_until("the reload", Duration::from_secs(20), || {
                reloads(&worker, "ok") >= ok && reloads(&worker, "rejected") >= rejected
            });
        }
        (worker, expected)
    });
    let (worker, expected) = worker.await.unwrap();
    let report = load.await.unwrap();
    assert_eq!(report.missing, 0, "{report}");
    assert_eq!(report.errors, 0, "{report}");
    assert_eq!(report.results, 3000);
    assert_eq!(reloads(&worker, "ok"), 4.0);
    assert_eq!(reloads(&worker, "rejected"), 1.0);
    // Every good swap shows in the results; nothing else was ever served.
    let served: HashMap<String, usize> = report
        .models
        .iter()
        .map(|(k, v)| (k.split('#').next().unwrap().to_owned(), *v))
        .collect();
    for version in &expected {
        assert!(
            served.contains_key(version),
            "{version} never served: {served:?}"
        );
    }
    assert_eq!(
        served.len(),
        expected.len() + 1,
        "unexpected models served: {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn control_message_reloads_with_the_watcher_off() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("model.safetensors");
    std::fs::copy(common::weights(), &live).unwrap();
    let worker = Worker::start(
        &server.url(),
        &["--weights", live.to_str().unwrap(), "--watch-interval", "0"],
    );
    let version = write_variant(&live, 9);
    let c = async_nats::connect(server.url()).await.unwrap();
    c.publish("profiles.control.reload", "".into())
        .await
        .unwrap();
    c.flush().await.unwrap();
    let w = tokio::task::spawn_blocking(move || {
        wait_until("the reload", Duration::from_secs(20), || {
            reloads(&worker, "ok") >= 1.0
        });
        worker
    })
    .await
    .unwrap();
    let (_, body) = w.get("/metrics").unwrap();
    assert!(
        body.contains(&format!("model=\"{version}#")),
        "model_info not updated"
    );
    let mut h = async_nats::HeaderMap::new();
    h.insert("userid", "after-reload");
    let r = c
        .request_with_headers(
            "profiles.images",
            h,
            common::fixture_pictures()[0].1.clone().into(),
        )
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert!(v["model"].as_str().unwrap().starts_with(&version));
}

//! The worker's bounds and lifecycle as an operator sees them, through real
//! processes: a burst beyond the intake bound is dropped and counted, the
//! decode memory budget refuses what would not fit, `/readyz` says 503
//! while draining, `/healthz` says 503 when a pipeline stage has died, and
//! shutdown is bounded even with the server gone.

mod common;

use std::time::{Duration, Instant};

use common::{NatsServer, Worker, answers, binary, fixture_pictures, publish_faces as send};
use futures::StreamExt;
use serde_json::Value;

/// Answers until none has come for `quiet`.
async fn drain_answers(
    sub: &mut (impl futures::Stream<Item = async_nats::Message> + Unpin),
    quiet: Duration,
) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(quiet, sub.next()).await {
        out.push(serde_json::from_slice(&m.payload).expect("answers are JSON"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_beyond_the_bound_is_dropped_and_counted() {
    let monitor = common::free_port();
    let server = NatsServer::start_with(false, &["-m", &monitor.to_string()]);
    let worker = Worker::start(
        &server.url(),
        &[
            "--max-pending",
            "16",
            "--max-batch",
            "8",
            "--watch-interval=0",
        ],
    );
    let c = async_nats::connect(server.url()).await.unwrap();
    let mut all = answers(&c).await;
    let sent = 3000;
    send(&c, sent, "burst").await;
    let got = drain_answers(&mut all, Duration::from_secs(3)).await;
    let dropped = worker.metric("profile_worker_dropped_total{reason=\"intake_full\"}")
        + worker.metric("profile_worker_dropped_total{reason=\"slow_consumer\"}");
    let requests = worker.metric("profile_worker_requests_total");
    assert!(got.len() < sent, "the bound of 16 must have dropped some");
    assert_eq!(
        requests as usize,
        got.len(),
        "every request taken is answered"
    );
    let accounted = got.len() as f64 + dropped;
    eprintln!(
        "intake_full {} slow_consumer {} varz {:?}",
        worker.metric("profile_worker_dropped_total{reason=\"intake_full\"}"),
        worker.metric("profile_worker_dropped_total{reason=\"slow_consumer\"}"),
        common::http_get(monitor, "/varz").map(|(_, b)| b
            .lines()
            .filter(|l| l.contains("slow"))
            .collect::<Vec<_>>()
            .join(" "))
    );
    assert!(
        accounted >= 0.99 * sent as f64 && accounted <= sent as f64,
        "answered {} + dropped {dropped} should account for the {sent} sent",
        got.len()
    );
    // After the burst the worker answers everything again.
    send(&c, 10, "after").await;
    let after = drain_answers(&mut all, Duration::from_secs(3)).await;
    assert_eq!(after.len(), 10, "{after:?}");
}

/// A PNG of `side` x `side` 16-bit RGBA pixels, all zero.
fn png_rgba16(side: u32) -> Vec<u8> {
    let img = image::ImageBuffer::<image::Rgba<u16>, Vec<u16>>::new(side, side);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn pictures_beyond_the_decode_budget_are_too_large() {
    let server = NatsServer::start();
    // 1500 x 1500 at 16-bit RGBA is 18 MB decoded (+ 6.75 MB of RGB): over 16 MiB.
    let _worker = Worker::start(&server.url(), &["--decode-memory", "16M"]);
    let c = async_nats::connect(server.url()).await.unwrap();
    let mut all = answers(&c).await;
    let big = png_rgba16(1500);
    c.publish_with_headers("profiles.images", binary("big"), big.into())
        .await
        .unwrap();
    send(&c, 5, "face").await;
    let got = drain_answers(&mut all, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 6, "{got:?}");
    let refused = got.iter().find(|v| v["userid"] == "big").expect("answered");
    assert_eq!(refused["error"], "image_too_large", "{refused}");
    let detail = refused["detail"].as_str().unwrap();
    assert!(
        detail.contains("1500x1500") && detail.contains("--decode-memory"),
        "{detail}"
    );
    let faces = got.iter().filter(|v| v["gender"].is_string()).count();
    assert_eq!(faces, 5, "{got:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_while_draining_and_every_taken_request_is_answered() {
    let server = NatsServer::start();
    let mut worker = Worker::start(
        &server.url(),
        &[
            "--max-pending",
            "100000",
            "--decode-threads",
            "1",
            "--infer-threads",
            "1",
        ],
    );
    let c = async_nats::connect(server.url()).await.unwrap();
    let mut all = answers(&c).await;
    send(&c, 2000, "drain").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.metric("profile_worker_in_flight") < 100.0 {
        assert!(Instant::now() < deadline, "the worker never got busy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(worker.get("/readyz").map(|r| r.0), Some(200));
    worker.signal_term();
    let mut seen_draining = false;
    while worker.running() {
        if let Some((code, _)) = worker.get("/readyz") {
            if code == 503 {
                seen_draining = true;
                assert_eq!(worker.get("/healthz").map(|r| r.0), Some(200));
                break;
            }
            assert!(!seen_draining, "ready again after draining began");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        seen_draining,
        "/readyz never said 503 while the worker drained"
    );
    let taken = worker.metric("profile_worker_requests_total") as usize;
    assert_eq!(worker.terminate(), Some(0));
    let got = drain_answers(&mut all, Duration::from_secs(2)).await;
    assert!(
        got.len() >= taken,
        "{} answers for {taken} taken",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_inference_thread_fails_healthz() {
    let server = NatsServer::start();
    let worker = Worker::start_env(
        &server.url(),
        &[],
        &[("PROFILE_WORKER_TEST_FAULT", "inference-panic")],
    );
    assert_eq!(worker.get("/healthz").map(|r| r.0), Some(200));
    let c = async_nats::connect(server.url()).await.unwrap();
    let mut all = answers(&c).await;
    send(&c, 1, "first").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = worker.get("/healthz").expect("healthz answers");
        if code == 503 {
            assert!(body.contains("inference"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "healthz stayed {code}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(worker.get("/readyz").map(|r| r.0), Some(503));
    // Requests still get an answer, an error saying why.
    send(&c, 3, "later").await;
    let got = drain_answers(&mut all, Duration::from_secs(2)).await;
    let later: Vec<_> = got
        .iter()
        .filter(|v| v["userid"].as_str().is_some_and(|u| u.starts_with("later")))
        .collect();
    assert_eq!(later.len(), 3, "{got:?}");
    for v in later {
        assert_eq!(v["error"], "internal", "{v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jetstream_shutdown_is_bounded_when_the_server_is_gone() {
    let mut server = NatsServer::start_js();
    let mut worker = Worker::start(
        &server.url(),
        &[
            "--jetstream",
            "--shutdown-timeout",
            "5",
            "--watch-interval=0",
        ],
    );
    let c = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(c.clone());
    let pics = fixture_pictures();
    for i in 0..600 {
        let _ = js
            .publish_with_headers(
                "profiles.images",
                binary(&format!("js-{i}")),
                pics[i % pics.len()].1.clone().into(),
            )
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.metric("profile_worker_requests_total") < 50.0 {
        assert!(Instant::now() < deadline, "the worker never took a request");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    let started = Instant::now();
    let code = tokio::task::spawn_blocking(move || worker.terminate())
        .await
        .unwrap();
    let took = started.elapsed();
    eprintln!("JetStream worker exited {code:?} {took:?} after SIGTERM, server gone");
    assert!(code.is_some(), "the worker did not exit");
    assert!(took < Duration::from_secs(16), "took {took:?}");
}

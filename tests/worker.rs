//! The streaming worker against a real nats-server (started by each test on
//! a free port): both encodings, reply subjects, concurrency, every error
//! code, broker restarts and graceful shutdown.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{NatsServer, Worker, answers, binary, fixture_pictures, publish_faces};
use futures::StreamExt;
use serde_json::Value;

async fn client(url: &str) -> async_nats::Client {
    async_nats::connect(url)
        .await
        .expect("connect to the test server")
}

/// Collects answers (results and errors) until `n` arrived or `timeout`.
async fn collect(
    sub: &mut (impl futures::Stream<Item = async_nats::Message> + Unpin),
    n: usize,
    timeout: Duration,
) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(m)) => out.push(serde_json::from_slice(&m.payload).expect("answers are JSON")),
            _ => break,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn both_encodings_and_reply_subject() {
    let server = NatsServer::start();
    let _worker = Worker::start(&server.url(), &[]);
    let c = client(&server.url()).await;
    let mut all = answers(&c).await;
    let pics = fixture_pictures();

    // Binary form, with Nats-Msg-Id copied to the result.
    let mut h = binary(&pics[0].0);
    h.insert("Nats-Msg-Id", "req-1");
    let mut results = c.subscribe("profiles.gender").await.unwrap();
    c.flush().await.unwrap();
    c.publish_with_headers("profiles.images", h, pics[0].1.clone().into())
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(20), results.next())
        .await
        .unwrap()
        .unwrap();
    let headers = msg.headers.clone().expect("result headers");
    assert_eq!(headers.get("userid").unwrap().as_str(), pics[0].0);
    assert_eq!(headers.get("Nats-Msg-Id").unwrap().as_str(), "req-1");
    assert_eq!(
        headers.get("Content-Type").unwrap().as_str(),
        "application/json"
    );
    let r: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(r["userid"], pics[0].0.as_str());
    assert!(["female", "male"].contains(&r["gender"].as_str().unwrap()));
    let conf = r["confidence"].as_f64().unwrap();
    assert!((0.5..=1.0).contains(&conf));
    let sum: f64 = r["scores"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((sum - 1.0).abs() < 1e-4);
    assert!(r["model"].as_str().unwrap().starts_with("gender-cnn/"));
    assert!(r["latency_ms"].as_f64().unwrap() >= 0.0);

    // JSON form through request/reply: the answer also comes to the inbox.
    let json = serde_json::json!({
        "userid": pics[1].0,
        "image": base64::engine::general_purpose::STANDARD.encode(&pics[1].1),
        "ignored": true,
    });
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        c.request("profiles.images", serde_json::to_vec(&json).unwrap().into()),
    )
    .await
    .unwrap()
    .unwrap();
    let r: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(r["userid"], pics[1].0.as_str());

    // A bad request over request/reply gets its error on the inbox too.
    let reply = c
        .request("profiles.images", "{\"userid\": 5}".into())
        .await
        .unwrap();
    let e: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(e["error"], "invalid_userid");

    // Exactly one answer each on the shared subjects.
    let got = collect(&mut all, 4, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 3, "{got:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_publishers_get_every_answer_once() {
    let server = NatsServer::start();
    let worker = Worker::start(&server.url(), &[]);
    let c = client(&server.url()).await;
    let mut all = answers(&c).await;
    let pics = fixture_pictures();
    let mut tasks = Vec::new();
    for p in 0..8 {
        let (url, pics) = (server.url(), pics.clone());
        tasks.push(tokio::spawn(async move {
            let c = client(&url).await;
            for i in 0..25 {
                let (id, bytes) = &pics[(p * 25 + i) % pics.len()];
                c.publish_with_headers(
                    "profiles.images",
                    binary(&format!("{id}-{p}-{i}")),
                    bytes.clone().into(),
                )
                .await
                .unwrap();
            }
            c.flush().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = collect(&mut all, 200, Duration::from_secs(60)).await;
    let mut seen = HashMap::new();
    for v in &got {
        assert!(v.get("gender").is_some(), "unexpected error {v}");
        *seen
            .entry(v["userid"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(got.len(), 200);
    assert_eq!(seen.len(), 200, "duplicated or missing answers");
    // Under load, batches of more than one picture.
    assert_eq!(worker.metric("profile_worker_requests_total"), 200.0);
    let singles = worker.metric("profile_worker_batch_size_bucket{le=\"1\"}");
    let batches = worker.metric("profile_worker_batch_size_count");
    assert!(
        batches > singles,
        "no batch larger than 1: {batches} batches, {singles} of size 1"
    );
    assert_eq!(worker.metric("profile_worker_batch_size_sum"), 200.0);
}

/// CRC-32 (IEEE) for hand-made PNG chunks.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A tiny PNG whose header claims 100,000 x 100,000 pixels.
fn png_bomb() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    png
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_code_and_the_worker_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 16MB\n").unwrap();
    let server = NatsServer::start_with(false, &["-c", conf.to_str().unwrap()]);
    let worker = Worker::start(&server.url(), &[]);
    let c = client(&server.url()).await;
    let pics = fixture_pictures();
    let jpeg = &pics[0].1;

    let long_id = "u".repeat(300);
    let cases: Vec<(&str, Option<&str>, Vec<u8>, &str)> = vec![
        ("missing header", None, jpeg.clone(), "missing_userid"),
        (
            "json without userid",
            None,
            br#"{"image":"aGk="}"#.to_vec(),
            "missing_userid",
        ),
        (
            "userid too long",
            Some(long_id.as_str()),
            jpeg.clone(),
            "invalid_userid",
        ),
        (
            "bad base64",
            None,
            br#"{"userid":"j1","image":"@@not base64@@"}"#.to_vec(),
            "bad_json",
        ),
        ("not json", None, b"{oops".to_vec(), "bad_json"),
        ("zero bytes", Some("e1"), Vec::new(), "empty_image"),
        (
            "random bytes",
            Some("e2"),
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
            "unsupported_format",
        ),
        (
            "truncated jpeg",
            Some("e3"),
            jpeg[..jpeg.len() / 3].to_vec(),
            "undecodable_image",
        ),
        (
            "decompression bomb",
            Some("e4"),
            png_bomb(),
            "image_too_large",
        ),
        (
            "9 MiB payload",
            Some("e5"),
            {
                let mut v = jpeg.clone();
                v.resize(9 * 1024 * 1024, 0);
                v
            },
            "image_too_large",
        ),
    ];
    for (name, userid, payload, code) in cases {
        let headers = userid.map(binary).unwrap_or_default();
        let reply = tokio::time::timeout(
            Duration::from_secs(20),
            c.request_with_headers("profiles.images", headers, payload.into()),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: no answer"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let v: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(v["error"], code, "{name}: {v}");
        assert!(!v["detail"].as_str().unwrap().is_empty());
        match userid {
            Some(u) if code != "invalid_userid" => assert_eq!(v["userid"], u, "{name}"),
            _ if code == "bad_json" && name == "bad base64" => assert_eq!(v["userid"], "j1"),
            _ => assert!(v["userid"].is_null(), "{name}: {v}"),
        }
        // And a good request right after is still answered.
        let ok = c
            .request_with_headers("profiles.images", binary("after"), jpeg.clone().into())
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&ok.payload).unwrap();
        assert_eq!(v["userid"], "after", "{name}: worker stopped answering");
    }
    for code in ["missing_userid", "bad_json", "image_too_large"] {
        assert_eq!(
            worker.metric(&format!("profile_worker_errors_total{{error=\"{code}\"}}")),
            2.0,
            "{code}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnects_after_the_server_restarts() {
    let mut server = NatsServer::start();
    let _worker = Worker::start(&server.url(), &[]);
    let pics = fixture_pictures();
    {
        let c = client(&server.url()).await;
        let r = c
            .request_with_headers(
                "profiles.images",
                binary("before"),
                pics[0].1.clone().into(),
            )
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&r.payload).contains("before"));
    }
    server.restart();
    let c = client(&server.url()).await;
    // The worker reconnects with back-off; keep asking until it answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ask =
            c.request_with_headers("profiles.images", binary("after"), pics[1].1.clone().into());
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), ask).await {
            let v: Value = serde_json::from_slice(&r.payload).unwrap();
            assert_eq!(v["userid"], "after");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker did not come back after the restart"
        );
    }
}

/// A server with its monitoring port, and a worker connected to it under
/// `name` with an intake bound above any burst here (every request
/// delivered is taken, none dropped).
fn watched_worker(name: &str) -> (NatsServer, u16, Worker) {
    let monitor = common::free_port();
    let server = NatsServer::start_with(false, &["-m", &monitor.to_string()]);
    let worker = Worker::start(
        &server.url(),
        &[
            "--connection-name",
            name,
            "--max-pending",
            "100000",
            "--max-pending-bytes",
            "1000000000",
        ],
    );
    (server, monitor, worker)
}

/// How many messages the server delivered to the closed connection `name`.
fn delivered_to(monitor: u16, name: &str) -> usize {
    let (_, body) = common::http_get(monitor, "/connz?state=closed").expect("monitoring endpoint");
    let connz: Value = serde_json::from_str(&body).unwrap();
    connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .expect("the worker's closed connection")["out_msgs"]
        .as_u64()
        .unwrap() as usize
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_answers_every_taken_request() {
    let (server, monitor, mut worker) = watched_worker("sigterm-worker");
    let c = client(&server.url()).await;
    let mut all = answers(&c).await;
    let total = 1500;
    publish_faces(&c, total, "burst").await;
    // Wait until the worker is busy, then ask it to stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.metric("profile_worker_results_total{label=\"female\"}")
        + worker.metric("profile_worker_results_total{label=\"male\"}")
        < 50.0
    {
        assert!(Instant::now() < deadline, "worker never got going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let code = tokio::task::spawn_blocking(move || worker.terminate())
        .await
        .unwrap();
    assert_eq!(code, Some(0), "worker must exit 0 after draining");
    let got = collect(&mut all, total, Duration::from_secs(3)).await;
    // The server says how many requests it delivered to the worker.
    let delivered = delivered_to(monitor, "sigterm-worker");
    assert!(delivered > 50);
    assert_eq!(
        got.len(),
        delivered,
        "every request delivered to the worker is answered"
    );
    let ids: std::collections::HashSet<_> = got
        .iter()
        .map(|v| v["userid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), got.len(), "no duplicates");
}

/// SIGTERM while the server still holds requests for the worker (queued
/// for it, not yet written to its socket): everything the server counts as
/// delivered before it took the unsubscription is answered. The worker is
/// paused while the burst arrives, so the server's queue for it fills.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_requests_queued_at_the_server_answers_them() {
    let (server, monitor, mut worker) = watched_worker("queued-worker");
    let c = client(&server.url()).await;
    let mut all = answers(&c).await;
    worker.signal("STOP");
    let total = 4000;
    publish_faces(&c, total, "queued").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.signal("TERM");
    worker.signal("CONT");
    let code = tokio::task::spawn_blocking(move || worker.terminate())
        .await
        .unwrap();
    assert_eq!(code, Some(0), "worker must exit 0 after draining");
    let got = collect(&mut all, total, Duration::from_secs(3)).await;
    let delivered = delivered_to(monitor, "queued-worker");
    assert!(delivered > 0);
    assert_eq!(
        got.len(),
        delivered,
        "every request the server delivered before the worker unsubscribed is answered"
    );
}

/// SIGTERM after the server has died: the worker cannot flush, but it still
/// exits (cleanly, within its shutdown timeout) instead of waiting for a
/// server that is not coming back.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_without_a_server_still_exits() {
    let mut server = NatsServer::start();
    let mut worker = Worker::start(&server.url(), &["--shutdown-timeout", "2"]);
    server.kill();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(worker.terminate(), Some(0), "the worker did not exit");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

/// A JPEG of `faces` fixture faces side by side on grey, each `sides[i]`
/// pixels square, left to right; returns the bytes and each face's left edge.
fn faces_side_by_side(sides: &[u32]) -> (Vec<u8>, Vec<u32>) {
    let pics = fixture_pictures();
    let width: u32 = sides.iter().sum::<u32>() + 40 * sides.len() as u32;
    let height = sides.iter().max().copied().unwrap_or(1) + 40;
    let mut canvas = image::RgbImage::from_pixel(width, height, image::Rgb([128, 128, 128]));
    let (mut x, mut lefts) = (20, Vec::new());
    for (i, &side) in sides.iter().enumerate() {
        let face = image::load_from_memory(&pics[i].1).unwrap().to_rgb8();
        let face =
            image::imageops::resize(&face, side, side, image::imageops::FilterType::Triangle);
        image::imageops::overlay(&mut canvas, &face, i64::from(x), 20);
        lefts.push(x);
        x += side + 40;
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92)
        .encode_image(&canvas)
        .unwrap();
    (out, lefts)
}

#[tokio::test(flavor = "multi_thread")]
async fn faces_are_counted_and_no_face_gets_no_label() {
    let server = NatsServer::start();
    let worker = Worker::start(&server.url(), &[]);
    let c = client(&server.url()).await;
    let ask = |userid: &'static str, picture: Vec<u8>| {
        let c = c.clone();
        async move {
            let reply = tokio::time::timeout(
                Duration::from_secs(20),
                c.request_with_headers("profiles.images", binary(userid), picture.into()),
            )
            .await
            .expect("answered in time")
            .expect("answered");
            serde_json::from_slice::<Value>(&reply.payload).unwrap()
        }
    };

    // One aligned face: a label, one face, a box inside the 200x200 picture.
    let one = ask("one", fixture_pictures()[0].1.clone()).await;
    assert!(one["gender"].is_string(), "{one}");
    assert_eq!(one["faces"], 1, "{one}");
    let face = &one["face"];
    for key in ["x", "y", "w", "h"] {
        assert!(face[key].is_i64(), "{one}");
    }
    assert!(face["w"].as_i64().unwrap() > 100 && face["score"].as_f64().unwrap() >= 0.75);

    // A flat default avatar: answered on the result subject, nothing guessed.
    let mut flat = Vec::new();
    image::RgbImage::from_pixel(160, 160, image::Rgb([200, 200, 205]))
        .write_to(
            &mut std::io::Cursor::new(&mut flat),
            image::ImageFormat::Png,
        )
        .unwrap();
    let none = ask("flat", flat).await;
    assert_eq!(none["faces"], 0, "{none}");
    for key in ["gender", "confidence", "scores", "face"] {
        assert!(none[key].is_null(), "{key} should be null: {none}");
    }
    assert!(none["model"].as_str().unwrap().starts_with("gender-cnn/"));

    // Two faces: both counted, the larger classified, its box where it was pasted.
    let (two, lefts) = faces_side_by_side(&[150, 200]);
    let both = ask("two", two).await;
    assert_eq!(both["faces"], 2, "{both}");
    assert!(both["gender"].is_string(), "{both}");
    let x = both["face"]["x"].as_i64().unwrap();
    let larger = i64::from(lefts[1]);
    assert!(
        (x - larger).abs() < 40,
        "classified the face at x {x}, the larger is at {larger}: {both}"
    );

    assert_eq!(
        worker.metric("profile_worker_faces_total{faces=\"0\"}"),
        1.0
    );
    assert_eq!(
        worker.metric("profile_worker_faces_total{faces=\"1\"}"),
        1.0
    );
    assert_eq!(
        worker.metric("profile_worker_faces_total{faces=\"2+\"}"),
        1.0
    );
    assert_eq!(
        worker.metric("profile_worker_results_total{label=\"none\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn detection_off_classifies_the_whole_picture() {
    let server = NatsServer::start();
    let _worker = Worker::start(&server.url(), &["--face-detection", "off"]);
    let c = client(&server.url()).await;
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        c.request_with_headers(
            "profiles.images",
            binary("whole"),
            fixture_pictures()[0].1.clone().into(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let r: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(r["gender"].is_string(), "{r}");
    let obj = r.as_object().unwrap();
    assert!(obj.contains_key("faces") && r["faces"].is_null(), "{r}");
    assert!(obj.contains_key("face") && r["face"].is_null(), "{r}");
}

#[test]
fn meaningless_flag_values_are_refused_at_start() {
    for (flag, value, says) in [
        ("--max-batch", "0", "at least 1"),
        ("--max-wait-ms", "-5", "negative"),
        ("--watch-interval", "inf", "finite"),
        ("--ack-wait", "NaN", "finite"),
        ("--decode-threads", "0", "at least 1"),
        ("--face-threshold", "1.5", "between 0 and 1"),
        ("--face-detection", "maybe", "possible values"),
        ("--max-pending", "0", "at least 1"),
        ("--max-pending-bytes", "0", "at least one byte"),
        ("--decode-memory", "12X", "unknown unit"),
        ("--max-image-bytes", "-1", "whole number"),
        ("--shutdown-timeout", "inf", "finite"),
        ("--max-pixels", "0", "0"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_profile-worker"))
            .args([flag, value])
            .output()
            .expect("run profile-worker");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(
            err.contains(flag) && err.contains(says),
            "{flag} {value}: {err}"
        );
    }
}

/// A client that keeps exactly `--max-pending` requests in flight, sending
/// the next one as it reads each answer, never finds the bound full: a
/// request's share of the bound is given back before its answer leaves.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_of_max_pending_requests_loses_none() {
    let server = NatsServer::start();
    let worker = Worker::start(
        &server.url(),
        &["--max-pending", "2", "--face-detection", "off"],
    );
    let url = server.url();
    let total = 4000;
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_profile-loadgen"))
            .args(["--nats-url", &url, "--json", "--timeout", "5"])
            .args(["--requests", &total.to_string(), "--window", "2"])
            .arg("--dir")
            .arg(common::fixtures())
            .output()
            .expect("runs the load generator")
    })
    .await
    .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
    });
    assert_eq!(
        worker.metric("profile_worker_dropped_total{reason=\"intake_full\"}"),
        0.0,
        "dropped with the bound full"
    );
    assert_eq!(report["results"], total, "{report}");
    assert_eq!(report["missing"], 0, "{report}");
}

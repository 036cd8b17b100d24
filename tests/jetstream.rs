//! JetStream mode against a real nats-server with a store dir: workers and
//! the server killed mid-stream lose nothing, poison requests are not
//! redelivered, transient publish failures are retried, dead letters.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use common::{NatsServer, Worker, fixture_pictures};
use futures::StreamExt;
use serde_json::Value;

const JS_FLAGS: [&str; 4] = ["--jetstream", "--ack-wait", "2", "--watch-interval=0"];

async fn js_client(url: &str) -> (async_nats::Client, jetstream::Context) {
    let c = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .expect("connect");
    let js = jetstream::new(c.clone());
    (c, js)
}

/// Publishes `n` requests through JetStream (each stored before the next).
async fn publish(js: &jetstream::Context, n: usize, prefix: &str) -> Vec<String> {
    let pics = fixture_pictures();
    let mut ids = Vec::with_capacity(n);
    let mut acks = Vec::new();
    for i in 0..n {
        let (id, bytes) = &pics[i % pics.len()];
        let userid = format!("{prefix}{id}-{i}");
        let mut h = HeaderMap::new();
        h.insert("userid", userid.as_str());
        acks.push(
            js.publish_with_headers("profiles.images", h, bytes.clone().into())
                .await
                .unwrap(),
        );
        ids.push(userid);
        if acks.len() >= 256 {
            for a in acks.drain(..) {
                a.await.expect("request stored");
            }
        }
    }
    for a in acks {
        a.await.expect("request stored");
    }
    ids
}

/// Creates the output stream that captures results and errors, with a
/// duplicate window so redelivered answers are dropped.
async fn output_stream(js: &jetstream::Context) -> stream::Stream {
    js.get_or_create_stream(stream::Config {
        name: "ANSWERS".into(),
        subjects: vec!["profiles.gender".into(), "profiles.errors".into()],
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Reads every answer stored in the output stream: userid -> answers.
async fn stored_answers(js: &jetstream::Context) -> HashMap<String, Vec<Value>> {
    let mut stream = js.get_stream("ANSWERS").await.unwrap();
    let total = stream.info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let mut out: HashMap<String, Vec<Value>> = HashMap::new();
    for _ in 0..total {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        out.entry(v["userid"].as_str().unwrap_or("").to_owned())
            .or_default()
            .push(v);
    }
    out
}

/// An output stream for results that holds one filler message and refuses
/// new ones (max one message, discard new): publishing an answer fails until
/// it is purged.
async fn full_output_stream(js: &jetstream::Context) -> stream::Stream {
    let answers = js
        .get_or_create_stream(stream::Config {
            name: "ANSWERS".into(),
            subjects: vec!["profiles.gender".into()],
            max_messages: 1,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    js.publish("profiles.gender", "{\"filler\":true}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    answers
}

async fn wait_for_answers(js: &jetstream::Context, n: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let count = match js.get_stream("ANSWERS").await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        };
        if count >= n || Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn answered(worker: &Worker) -> f64 {
    worker.metric("profile_worker_results_total{label=\"female\"}")
        + worker.metric("profile_worker_results_total{label=\"male\"}")
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_worker_loses_nothing_three_times() {
    for round in 0..3 {
        let server = NatsServer::start_js();
        let (_c, js) = js_client(&server.url()).await;
        output_stream(&js).await;
        let mut a = Worker::start(&server.url(), &JS_FLAGS);
        let b = Worker::start(&server.url(), &JS_FLAGS);
        let ids = publish(&js, 2000, &format!("k{round}-")).await;
        // Kill worker A with SIGKILL while it holds work, then bring it back.
        let deadline = Instant::now() + Duration::from_secs(60);
        while answered(&a) < 100.0 {
            assert!(Instant::now() < deadline, "worker A never got going");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        a.kill();
        let _a2 = Worker::start(&server.url(), &JS_FLAGS);
        let got = wait_for_answers(&js, 2000, Duration::from_secs(120)).await;
        assert!(got >= 2000, "round {round}: only {got} answers stored");
        let answers = stored_answers(&js).await;
        let missing: Vec<_> = ids.iter().filter(|id| !answers.contains_key(*id)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} requests lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
        assert!(
            answers
                .values()
                .flatten()
                .all(|v| v.get("gender").is_some())
        );
        drop(b);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restarted_server_loses_nothing() {
    for round in 0..3 {
        let mut server = NatsServer::start_js();
        let (_c, js) = js_client(&server.url()).await;
        output_stream(&js).await;
        let worker = Worker::start(&server.url(), &JS_FLAGS);
        let ids = publish(&js, 1000, &format!("s{round}-")).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while answered(&worker) < 100.0 {
            assert!(Instant::now() < deadline, "worker never got going");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.restart();
        let got = wait_for_answers(&js, 1000, Duration::from_secs(120)).await;
        assert!(
            got >= 1000,
            "round {round}: only {got} answers after the restart"
        );
        let answers = stored_answers(&js).await;
        let missing = ids.iter().filter(|id| !answers.contains_key(*id)).count();
        assert_eq!(
            missing, 0,
            "round {round}: requests lost across the server restart"
        );
        // The same worker process served before and after.
        assert!(worker.get("/healthz").is_some());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_request_is_answered_once_and_not_redelivered() {
    let server = NatsServer::start_js();
    let (c, js) = js_client(&server.url()).await;
    let worker = Worker::start(&server.url(), &JS_FLAGS);
    let mut errors = c.subscribe("profiles.errors").await.unwrap();
    let mut results = c.subscribe("profiles.gender").await.unwrap();
    c.flush().await.unwrap();
    let mut h = HeaderMap::new();
    h.insert("userid", "poison");
    js.publish_with_headers("profiles.images", h, "not a picture".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), errors.next())
        .await
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_slice(&e.payload).unwrap();
    assert_eq!(
        (v["userid"].as_str(), v["error"].as_str()),
        (Some("poison"), Some("unsupported_format"))
    );
    // The stream moves on: a good request after it is answered.
    publish(&js, 1, "after-").await;
    let r = tokio::time::timeout(Duration::from_secs(20), results.next())
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&r.payload).contains("after-"));
    // Longer than the ack wait: no second error, nothing left in the stream.
    assert!(
        tokio::time::timeout(Duration::from_secs(4), errors.next())
            .await
            .is_err(),
        "poison redelivered"
    );
    let mut s = js.get_stream("PROFILES").await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 0);
    assert_eq!(worker.metric("profile_worker_requests_total"), 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_publish_failure_is_naked_and_retried() {
    let server = NatsServer::start_js();
    let (_c, js) = js_client(&server.url()).await;
    // An output stream that refuses new answers while full.
    let answers = full_output_stream(&js).await;
    let worker = Worker::start(
        &server.url(),
        &["--jetstream", "--ack-wait", "2", "--max-deliver", "100"],
    );
    publish(&js, 1, "retry-").await;
    // While the output stream refuses, the request keeps coming back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.metric("profile_worker_requests_total") < 3.0 {
        assert!(Instant::now() < deadline, "request was not redelivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut answers = answers;
    assert_eq!(
        answers.info().await.unwrap().state.messages,
        1,
        "only the filler is stored"
    );
    // Make room: the next delivery is answered and stored.
    answers.purge().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while answers.info().await.unwrap().state.messages == 0 {
        assert!(
            Instant::now() < deadline,
            "never answered after the stream had room"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = answers
        .get_last_raw_message_by_subject("profiles.gender")
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&stored.payload).contains("retry-"));
    assert_eq!(worker.metric("profile_worker_dead_letters_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn exhausted_request_goes_to_dead_letter() {
    let server = NatsServer::start_js();
    let (c, js) = js_client(&server.url()).await;
    full_output_stream(&js).await;
    let mut dead = c.subscribe("profiles.deadletter").await.unwrap();
    c.flush().await.unwrap();
    let worker = Worker::start(
        &server.url(),
        &["--jetstream", "--ack-wait", "2", "--max-deliver", "3"],
    );
    let ids = publish(&js, 1, "dead-").await;
    let m = tokio::time::timeout(Duration::from_secs(30), dead.next())
        .await
        .unwrap()
        .unwrap();
    let headers = m.headers.clone().unwrap();
    assert_eq!(headers.get("userid").unwrap().as_str(), ids[0]);
    assert_eq!(headers.get("Profile-Deliveries").unwrap().as_str(), "3");
    assert_eq!(
        &m.payload[..],
        &fixture_pictures()[0].1[..],
        "original payload kept for replay"
    );
    assert_eq!(worker.metric("profile_worker_dead_letters_total"), 1.0);
    let seen: HashSet<_> = [ids[0].clone()].into();
    assert_eq!(seen.len(), 1);
}

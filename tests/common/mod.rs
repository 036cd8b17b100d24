//! Test helpers: a private nats-server on a free port, the worker binary as
//! a child process, and paths to the shipped weights and fixtures.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shipped face detector.
pub fn detector() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/blazeface-front.safetensors")
}

/// The shipped weights file.
pub fn weights() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/gender-cnn.safetensors")
}

/// The 48 sample faces with profile.csv.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/faces")
}

/// A load over the fixture faces on the default subjects, binary encoding.
pub fn fixture_load(
    url: &str,
    requests: usize,
    window: usize,
    rate: Option<f64>,
) -> profile_classifier::loadgen::LoadConfig {
    profile_classifier::loadgen::LoadConfig {
        nats: profile_classifier::connect::NatsArgs::url(url),
        dir: fixtures(),
        request_subject: "profiles.images".into(),
        result_subject: "profiles.gender".into(),
        error_subject: "profiles.errors".into(),
        requests: Some(requests),
        window,
        rate,
        encoding: profile_classifier::loadgen::Encoding::Binary,
        timeout: Duration::from_secs(30),
        progress: false,
        show: false,
    }
}

/// The fixture pictures' bytes with their user ids.
pub fn fixture_pictures() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(fixtures())
        .expect("tests/fixtures/faces must exist")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .map(|p| {
            let id = p.file_stem().unwrap().to_string_lossy().into_owned();
            (id, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(
        out.len() >= 40,
        "expected the fixture faces, found {}",
        out.len()
    );
    out
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A nats-server child process, killed on drop.
pub struct NatsServer {
    /// Its client port.
    pub port: u16,
    child: Option<Child>,
    store: Option<tempfile::TempDir>,
    extra: Vec<String>,
}

fn nats_binary() -> String {
    for candidate in [
        "nats-server",
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
    ] {
        if Command::new(candidate).arg("--version").output().is_ok() {
            return candidate.to_string();
        }
    }
    panic!("nats-server is not installed: run .ci/run or `apt-get install nats-server`");
}

impl NatsServer {
    /// Core NATS only.
    pub fn start() -> Self {
        Self::start_with(false, &[])
    }

    /// With JetStream in a temporary store dir.
    pub fn start_js() -> Self {
        Self::start_with(true, &[])
    }

    /// With extra command-line arguments.
    pub fn start_with(jetstream: bool, extra: &[&str]) -> Self {
        let store = jetstream.then(|| tempfile::tempdir().unwrap());
        let mut server = Self {
            port: free_port(),
            child: None,
            store,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(nats_binary());
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(dir) = &self.store {
            cmd.args(["-js", "-sd", dir.path().to_str().unwrap()]);
        }
        cmd.args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("start nats-server"));
        assert!(
            wait_for_port(self.port, Duration::from_secs(10)),
            "nats-server did not start"
        );
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (and store dir).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The worker binary as a child process, killed on drop.
pub struct Worker {
    child: Option<Child>,
    /// Its metrics port.
    pub metrics_port: u16,
}

impl Worker {
    /// Starts `profile-worker` against `url` with extra flags, and waits
    /// until `/readyz` answers 200.
    pub fn start(url: &str, extra: &[&str]) -> Self {
        Self::start_env(url, extra, &[])
    }

    /// [`Worker::start`] with extra environment variables.
    pub fn start_env(url: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let metrics_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_profile-worker"));
        cmd.args(["--nats-url", url])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("PROFILE_WEIGHTS", weights())
            .env("PROFILE_DETECTOR", detector())
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("start profile-worker");
        let mut w = Self {
            child: Some(child),
            metrics_port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = w.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("profile-worker exited at start: {status}");
            }
            if w.get("/readyz").is_some_and(|(code, _)| code == 200) {
                return w;
            }
            assert!(Instant::now() < deadline, "worker not ready in time");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A plain HTTP GET on the metrics port: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics_port, path)
    }

    /// The value of one metric line (exact series text before the value).
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.get("/metrics").expect("metrics answer");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Sends SIGTERM (without waiting).
    pub fn signal_term(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`), without waiting.
    pub fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status();
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal_term();
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the worker with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Minimal HTTP/1.0 GET against 127.0.0.1.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Headers of a binary request from `userid`.
pub fn binary(userid: &str) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("userid", userid);
    h
}

/// Every answer (results and errors) as one stream, subscribed before return.
pub async fn answers(
    c: &async_nats::Client,
) -> impl futures::Stream<Item = async_nats::Message> + Unpin {
    let results = c.subscribe("profiles.gender").await.unwrap();
    let errors = c.subscribe("profiles.errors").await.unwrap();
    c.flush().await.unwrap();
    futures::stream::select(results, errors)
}

/// Publishes `n` fixture faces as binary requests with user ids
/// `{prefix}-{i}`, as fast as the client goes, and flushes.
pub async fn publish_faces(c: &async_nats::Client, n: usize, prefix: &str) {
    let pics = fixture_pictures();
    for i in 0..n {
        let bytes = &pics[i % pics.len()].1;
        c.publish_with_headers(
            "profiles.images",
            binary(&format!("{prefix}-{i}")),
            bytes.clone().into(),
        )
        .await
        .unwrap();
    }
    c.flush().await.unwrap();
}

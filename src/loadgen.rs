//! Load generator: publishes the pictures of a folder in the seed layout as
//! requests, collects the answers, and reports counts, throughput, latency
//! percentiles and accuracy.
//!
//! Closed loop by default (at most `window` requests unanswered), or open
//! loop at a fixed `rate`. Each request gets a unique user id (the picture's,
//! with `~N` appended on later rounds) so answers are matched exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::HeaderMap;
use base64::Engine;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::protocol::USERID_HEADER;

/// How requests are encoded (PROTOCOL §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Encoding {
    /// Raw bytes with a `userid` header.
    #[default]
    Binary,
    /// JSON with base64.
    Json,
}

/// What to send and how.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Servers, credentials and TLS.
    pub nats: crate::connect::NatsArgs,
    /// Folder of pictures, optionally with `profile.csv` (userid,gender),
    /// or one picture file.
    pub dir: PathBuf,
    /// Request subject.
    pub request_subject: String,
    /// Result subject.
    pub result_subject: String,
    /// Error subject.
    pub error_subject: String,
    /// Requests to send (default: one per picture); pictures repeat as needed.
    pub requests: Option<usize>,
    /// Most requests unanswered at once (closed loop).
    pub window: usize,
    /// Requests per second (open loop); `None` sends as fast as the window allows.
    pub rate: Option<f64>,
    /// Request encoding.
    pub encoding: Encoding,
    /// How long to wait for the last answers after the last request.
    pub timeout: Duration,
    /// Show a progress bar (only drawn on a terminal).
    pub progress: bool,
    /// Print every answer (its JSON, one line each) to stdout.
    pub show: bool,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// How long without a single answer before the run says so.
const SILENCE: Duration = Duration::from_secs(3);

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Requests published.
    pub sent: usize,
    /// Results received.
    pub results: usize,
    /// Error replies received.
    pub errors: usize,
    /// Error replies by code.
    pub errors_by_code: BTreeMap<String, usize>,
    /// Requests without any answer at the end.
    pub missing: usize,
    /// Answers received more than once for the same request.
    pub duplicates: usize,
    /// Seconds from the first request to the last answer.
    pub seconds: f64,
    /// Results per second over that time.
    pub throughput: f64,
    /// Request published to answer received, client side.
    pub latency_ms: Latency,
    /// Results saying the picture has no face (`faces: 0`).
    pub no_face: usize,
    /// Share of results matching `profile.csv`, when it has labels (a
    /// `none` row expects a "no face" answer).
    pub accuracy: Option<f64>,
    /// Results by the `model` field.
    pub models: BTreeMap<String, usize>,
}

struct Picture {
    userid: String,
    bytes: bytes::Bytes,
    truth: Option<String>,
}

fn read_pictures(dir: &Path) -> anyhow::Result<Vec<Picture>> {
    if dir.is_file() {
        let bytes = std::fs::read(dir).with_context(|| format!("reading {}", dir.display()))?;
        let userid = dir
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .unwrap_or("picture")
            .to_owned();
        return Ok(vec![Picture {
            userid,
            bytes: bytes.into(),
            truth: None,
        }]);
    }
    let mut truth = HashMap::new();
    let csv_path = dir.join("profile.csv");
    if csv_path.exists() {
        let mut reader = csv::Reader::from_path(&csv_path)
            .with_context(|| format!("reading {}", csv_path.display()))?;
        let headers = reader.headers()?.clone();
        let u = headers.iter().position(|h| h == "userid");
        let g = headers.iter().position(|h| h == "gender");
        if let (Some(u), Some(g)) = (u, g) {
            for r in reader.records() {
                let r = r?;
                truth.insert(
                    r.get(u).unwrap_or("").to_owned(),
                    r.get(g).unwrap_or("").to_owned(),
                );
            }
        }
    }
    let mut pictures = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !["jpg", "jpeg", "png", "webp", "gif", "bmp"].contains(&ext.as_str()) {
            continue;
        }
        let userid = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_owned();
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        pictures.push(Picture {
            truth: truth.get(&userid).cloned(),
            userid,
            bytes: bytes.into(),
        });
    }
    pictures.sort_by(|a, b| a.userid.cmp(&b.userid));
    anyhow::ensure!(!pictures.is_empty(), "no pictures in {}", dir.display());
    Ok(pictures)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises latencies (milliseconds).
pub fn latency_summary(mut ms: Vec<f64>) -> Latency {
    ms.sort_by(f64::total_cmp);
    Latency {
        p50: percentile(&ms, 50.0),
        p90: percentile(&ms, 90.0),
        p99: percentile(&ms, 99.0),
        max: ms.last().copied().unwrap_or(0.0),
        mean: if ms.is_empty() {
            0.0
        } else {
            ms.iter().sum::<f64>() / ms.len() as f64
        },
    }
}

/// Runs the load and returns the report.
pub async fn run(cfg: &LoadConfig) -> anyhow::Result<LoadReport> {
    let pictures = read_pictures(&cfg.dir)?;
    let total = cfg.requests.unwrap_or(pictures.len());
    let client = cfg.nats.connect(cfg.nats.options().await?).await?;
    let mut results = client.subscribe(cfg.result_subject.clone()).await?;
    let mut errors = client.subscribe(cfg.error_subject.clone()).await?;
    client.flush().await?;

    let ids: Vec<String> = (0..total)
        .map(|i| {
            let p = &pictures[i % pictures.len()];
            match i / pictures.len() {
                0 => p.userid.clone(),
                round => format!("{}~{round}", p.userid),
            }
        })
        .collect();
    let index: Arc<HashMap<String, usize>> = Arc::new(
        ids.iter()
            .cloned()
            .enumerate()
            .map(|(i, id)| (id, i))
            .collect(),
    );
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let window = Arc::new(Semaphore::new(cfg.window.max(1)));
    let start = Instant::now();

    let bar = if cfg.progress {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} answers {per_sec} ({elapsed}<{eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let sender = {
        let (client, window, sent_at) = (client.clone(), window.clone(), sent_at.clone());
        let subject = cfg.request_subject.clone();
        let (encoding, rate) = (cfg.encoding, cfg.rate);
        let payloads: Vec<bytes::Bytes> = pictures.iter().map(|p| p.bytes.clone()).collect();
        let n = pictures.len();
        let ids = ids.clone();
        tokio::spawn(async move {
            for (i, id) in ids.iter().enumerate() {
                match rate {
                    Some(r) if r > 0.0 => {
                        tokio::time::sleep_until(
                            (start + Duration::from_secs_f64(i as f64 / r)).into(),
                        )
                        .await;
                    }
                    _ => window.acquire().await.map(|p| p.forget()).unwrap_or(()),
                }
                let raw = &payloads[i % n];
                let mut headers = HeaderMap::new();
                let payload = match encoding {
                    Encoding::Binary => {
                        headers.insert(USERID_HEADER, id.as_str());
                        raw.clone()
                    }
                    Encoding::Json => {
                        let json = serde_json::json!({
                            "userid": id,
                            "image": base64::engine::general_purpose::STANDARD.encode(raw),
                        });
                        serde_json::to_vec(&json).unwrap_or_default().into()
                    }
                };
                sent_at[i].store(start.elapsed().as_nanos() as u64 + 1, Ordering::SeqCst);
                if client
                    .publish_with_headers(subject.clone(), headers, payload)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = client.flush().await;
        })
    };

    let mut answered = vec![false; total];
    let (mut n_results, mut n_errors, mut duplicates, mut correct, mut labelled) = (0, 0, 0, 0, 0);
    let mut no_face = 0;
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let mut models: BTreeMap<String, usize> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(total);
    let mut last_answer = start;
    let mut sender_done_at: Option<Instant> = None;
    let mut sender = Some(sender);
    let mut warned = false;
    while n_results + n_errors < total {
        if sender.as_ref().is_some_and(|s| s.is_finished()) {
            sender = None;
            sender_done_at = Some(Instant::now());
        }
        if !warned && n_results + n_errors == 0 && start.elapsed() >= SILENCE {
            warned = true;
            eprintln!(
                "no answer after {} s: is a profile-worker running, connected to {} and \
                 subscribed to {}? (waiting up to --timeout {} s after the last request)",
                SILENCE.as_secs(),
                cfg.nats.nats_url,
                cfg.request_subject,
                cfg.timeout.as_secs()
            );
        }
        let wait = match sender_done_at {
            Some(t) => {
                let left = cfg.timeout.saturating_sub(t.elapsed());
                if left.is_zero() {
                    break;
                }
                left.min(Duration::from_millis(500))
            }
            None => Duration::from_millis(100),
        };
        let (msg, is_error) = tokio::select! {
            m = results.next() => (m, false),
            m = errors.next() => (m, true),
            _ = tokio::time::sleep(wait) => continue,
        };
        let Some(msg) = msg else { break };
        let now = Instant::now();
        let value: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
        let Some(&i) = value["userid"].as_str().and_then(|u| index.get(u)) else {
            continue;
        };
        if cfg.show {
            println!("{value}");
        }
        if answered[i] {
            duplicates += 1;
            continue;
        }
        answered[i] = true;
        last_answer = now;
        let sent = sent_at[i].load(Ordering::SeqCst).saturating_sub(1);
        latencies.push((now - start).as_nanos().saturating_sub(u128::from(sent)) as f64 / 1e6);
        if is_error {
            n_errors += 1;
            *by_code
                .entry(value["error"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        } else {
            n_results += 1;
            *models
                .entry(value["model"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
            let answered_none = value["faces"].as_u64() == Some(0);
            no_face += usize::from(answered_none);
            if let Some(truth) = &pictures[i % pictures.len()].truth {
                labelled += 1;
                let said = value["gender"]
                    .as_str()
                    .unwrap_or(crate::train::dataset::NO_FACE);
                if said == truth.as_str() {
                    correct += 1;
                }
            }
        }
        if cfg.rate.is_none() {
            window.add_permits(1);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(s) = sender {
        s.abort();
    }
    let seconds = (last_answer - start).as_secs_f64();
    let sent = sent_at
        .iter()
        .filter(|t| t.load(Ordering::SeqCst) > 0)
        .count();
    Ok(LoadReport {
        sent,
        results: n_results,
        errors: n_errors,
        errors_by_code: by_code,
        missing: total - (n_results + n_errors),
        duplicates,
        seconds,
        throughput: if seconds > 0.0 {
            n_results as f64 / seconds
        } else {
            0.0
        },
        latency_ms: latency_summary(latencies),
        no_face,
        accuracy: (labelled > 0).then(|| correct as f64 / labelled as f64),
        models,
    })
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "requests sent:    {}", self.sent)?;
        writeln!(f, "results:          {}", self.results)?;
        writeln!(
            f,
            "errors:           {} {:?}",
            self.errors, self.errors_by_code
        )?;
        writeln!(f, "no face found:    {}", self.no_face)?;
        writeln!(f, "missing answers:  {}", self.missing)?;
        writeln!(f, "duplicates:       {}", self.duplicates)?;
        writeln!(
            f,
            "throughput:       {:.1} results/s over {:.2} s",
            self.throughput, self.seconds
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "latency (ms):     p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  mean {:.2}",
            l.p50, l.p90, l.p99, l.max, l.mean
        )?;
        if let Some(a) = self.accuracy {
            writeln!(f, "accuracy:         {a:.4}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let l = latency_summary((1..=100).map(f64::from).collect());
        assert_eq!((l.p50, l.p90, l.p99, l.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(latency_summary(vec![]).p99, 0.0);
    }
}

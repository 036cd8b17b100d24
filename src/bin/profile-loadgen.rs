//! `profile-loadgen`: publish a folder of pictures to the worker and report
//! what came back. Flags only; the work is in `profile_classifier::loadgen`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use profile_classifier::config::{SubjectArgs, error_line, parse_count, parse_seconds};
use profile_classifier::connect::NatsArgs;
use profile_classifier::loadgen::{self, Encoding, LoadConfig};

#[derive(Parser)]
#[command(
    version,
    about = "Publish a folder of profile pictures and measure the answers"
)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    /// Folder of <userid>.jpg files, optionally with profile.csv (userid,gender), or one picture file.
    #[arg(long, default_value = "tests/fixtures/faces")]
    dir: PathBuf,
    /// Requests to send (default: one per picture; pictures repeat as needed).
    #[arg(long, value_parser = parse_count)]
    requests: Option<usize>,
    /// Most requests unanswered at once (closed loop).
    #[arg(long, default_value_t = 256, value_parser = parse_count)]
    window: usize,
    /// Requests per second, open loop (default: as fast as the window allows).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Request encoding.
    #[arg(long, value_enum, default_value_t = Encoding::Binary)]
    encoding: Encoding,
    /// Seconds to wait for the last answers after the last request.
    #[arg(long, default_value_t = 30.0, value_parser = parse_seconds)]
    timeout: f64,
    #[command(flatten)]
    subjects: SubjectArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Print every answer's JSON as it arrives (stdout).
    #[arg(long)]
    show: bool,
}

/// A rate above zero.
fn parse_rate(s: &str) -> Result<f64, String> {
    match parse_seconds(s) {
        Ok(r) if r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s}: a rate is a finite number of requests per second above 0"
        )),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = LoadConfig {
        nats: cli.nats,
        dir: cli.dir,
        request_subject: cli.subjects.request_subject,
        result_subject: cli.subjects.result_subject,
        error_subject: cli.subjects.error_subject,
        requests: cli.requests,
        window: cli.window,
        rate: cli.rate,
        encoding: cli.encoding,
        timeout: Duration::from_secs_f64(cli.timeout),
        progress: std::io::stderr().is_terminal(),
        show: cli.show,
    };
    match loadgen::run(&cfg).await {
        Ok(report) => {
            if cli.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print!("{report}");
            }
            if report.missing > 0 {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

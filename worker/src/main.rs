//! `ballast-worker`: the data-plane binary. One subcommand per role; `probe`
//! checks one dependency once, for pod start-up checks and people on call.
#![forbid(unsafe_code)]

use ballast_worker::probe;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Command-line interface of the worker.
#[derive(Debug, Parser)]
#[command(name = "ballast-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks one dependency once with its real client; exit 0 when it answers.
    Probe {
        /// Which kind of server `url` is.
        kind: probe::Kind,
        /// Its address: `host:port` for Kafka, a URL for the others.
        url: String,
        /// How long to wait for an answer.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}`: expected a number followed by ms or s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        _ => Err(format!("`{text}`: unit must be ms or s")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Probe { kind, url, timeout } => match probe::once(kind, &url, timeout).await {
            Ok(detail) => {
                println!("{kind}: {url}: healthy ({detail})");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{kind}: {url}: {error}");
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_ms_and_s() {
        let cases = [
            ("250ms", Some(250)),
            ("5s", Some(5000)),
            ("7", Some(7000)),
            ("5m", None),
            ("s", None),
        ];
        for (text, want) in cases {
            let got = parse_duration(text).ok().map(|d| d.as_millis() as u64);
            assert_eq!(got, want, "{text}");
        }
    }
}

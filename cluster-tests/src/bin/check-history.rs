//! `check-history HISTORY.jsonl [--overlap-tolerance-ms N] [--liveness-deadline-ms N]`:
//! runs the checker on a saved history, prints its report, and exits 0 only
//! if every invariant holds (1 if one is violated, 2 on bad usage or input).

use std::process::ExitCode;
use std::time::Duration;

use cluster_tests::checker::{CheckerConfig, check};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut config = CheckerConfig::default();
    let mut path = None;
    let mut idx = 0;
    while idx < args.len() {
        let value_ms = |idx: usize| args.get(idx + 1).and_then(|value| value.parse::<u64>().ok());
        match args[idx].as_str() {
            "--overlap-tolerance-ms" | "--liveness-deadline-ms" => {
                let Some(ms) = value_ms(idx) else {
                    eprintln!("error: {} takes a number of milliseconds", args[idx]);
                    return ExitCode::from(2);
                };
                if args[idx] == "--overlap-tolerance-ms" {
                    config.overlap_tolerance = Duration::from_millis(ms);
                } else {
                    config.liveness_deadline = Duration::from_millis(ms);
                }
                idx += 2;
            }
            other if path.is_none() && !other.starts_with("--") => {
                path = Some(other.to_owned());
                idx += 1;
            }
            other => {
                eprintln!("error: unexpected argument {other:?}");
                eprintln!(
                    "usage: check-history HISTORY.jsonl [--overlap-tolerance-ms N] [--liveness-deadline-ms N]"
                );
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = path else {
        eprintln!(
            "usage: check-history HISTORY.jsonl [--overlap-tolerance-ms N] [--liveness-deadline-ms N]"
        );
        return ExitCode::from(2);
    };
    let events = match cluster_tests::history::read(std::path::Path::new(&path)) {
        Ok(events) => events,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::from(2);
        }
    };
    let report = check(&events, &config);
    println!("{report}");
    if report.valid() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

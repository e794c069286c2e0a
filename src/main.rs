//! The `taskraft` binary: `taskraft node` runs a node; every other command is
//! a client of a running cluster. See `taskraft --help`.
//!
//! Exit codes: 0 success; 1 an error from the cluster or the network;
//! 2 bad usage or a request the cluster refused as invalid; 3 `wait` saw the
//! task end in a state other than SUCCEEDED; 4 not found.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let first_arg = std::env::args_os().nth(1);
    if first_arg.as_ref().is_some_and(|arg| arg == taskraft::executor::warden::WARDEN_ARG) {
        return taskraft::executor::warden::run();
    }
    let job = match cli::prepare(cli::Cli::parse()) {
        Ok(job) => job,
        Err(failure) => return report(failure),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = job.runtime_worker_threads() {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(job)) {
        Ok(code) => code,
        Err(failure) => report(failure),
    }
}

fn report(failure: cli::Failure) -> ExitCode {
    eprintln!("error: {:#}", failure.error);
    ExitCode::from(failure.exit_code)
}

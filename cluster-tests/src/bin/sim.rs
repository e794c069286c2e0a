//! `sim`: the deterministic simulation of a three-node cluster
//! (`cluster_tests::sim`), one seed per process.
//!
//! - `sim --seed N` runs seed N, prints the faults and the checker's report,
//!   and exits 1 if a promise was broken or the run failed.
//! - `sim --seeds COUNT [--first F] [--jobs J]` runs seeds F..F+COUNT, each in
//!   a process of its own (J at a time), prints a line per seed as it ends,
//!   and for each failure the command that reproduces it.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use cluster_tests::sim::{SimOptions, run_seed};

#[derive(Parser)]
#[command(about = "Deterministic simulation of a taskraft cluster under faults")]
struct Args {
    /// Run this one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many seeds, each in its own process.
    #[arg(long)]
    seeds: Option<u64>,
    /// The first seed of `--seeds`.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// How many seeds run at once.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Simulated seconds of faults before the heal.
    #[arg(long, default_value_t = 30)]
    fault_seconds: u64,
    /// Where histories go (kept for failed seeds).
    #[arg(long, default_value = "target/sim")]
    dir: PathBuf,
    /// Keep the history of a seed that passed too.
    #[arg(long)]
    keep_history: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match (args.seed, args.seeds) {
        (Some(seed), _) => one_seed(seed, &args),
        (None, Some(count)) => sweep(count, &args),
        (None, None) => Err(anyhow::anyhow!("give --seed N or --seeds COUNT")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn reproduce_command(seed: u64, args: &Args) -> String {
    format!(
        "cargo run --release -p cluster-tests --bin sim -- --seed {seed} --fault-seconds {}",
        args.fault_seconds
    )
}

/// Runs one seed in this process; true when every promise held.
fn one_seed(seed: u64, args: &Args) -> anyhow::Result<bool> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    }
    let options = SimOptions {
        fault_phase: Duration::from_secs(args.fault_seconds),
        // Long tasks (4.5 s), a lease and its grace (4 s) and a retry fit
        // well inside; before peers dropped dead connections within 2 s,
        // some seeds took 17 to 32 s to converge after the heal.
        liveness_deadline: Duration::from_secs(20),
        dir: args.dir.clone(),
    };
    let started = Instant::now();
    let outcome = match run_seed(seed, &options) {
        Ok(outcome) => outcome,
        Err(err) => {
            println!("SEED={seed}: the run failed: {err:#}");
            println!("reproduce: {}", reproduce_command(seed, args));
            return Ok(false);
        }
    };
    println!("SEED={seed}: {} faults", outcome.faults.len());
    for fault in &outcome.faults {
        println!("  {fault}");
    }
    println!("{}", outcome.report);
    println!(
        "simulated {:.1} s in {:.1} s; history: {}",
        outcome.simulated.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        outcome.history_path.display()
    );
    let valid = outcome.report.valid() && outcome.report.n_acknowledged > 0;
    if !valid {
        if outcome.report.n_acknowledged == 0 {
            println!("no submission was acknowledged: the cluster never served");
        }
        println!("reproduce: {}", reproduce_command(seed, args));
    } else if !args.keep_history {
        let _ = std::fs::remove_file(&outcome.history_path);
    }
    Ok(valid)
}

/// Runs `count` seeds, `jobs` processes at a time; true when all passed.
fn sweep(count: u64, args: &Args) -> anyhow::Result<bool> {
    let exe = std::env::current_exe().context("cannot find this program")?;
    std::fs::create_dir_all(&args.dir)?;
    let seeds: Vec<u64> = (args.first..args.first + count).collect();
    let mut next = 0;
    let mut running: Vec<(u64, Instant, std::process::Child)> = Vec::new();
    let mut failed = Vec::new();
    let mut n_done = 0;
    let started = Instant::now();
    while n_done < seeds.len() {
        while running.len() < args.jobs.max(1) && next < seeds.len() {
            let seed = seeds[next];
            next += 1;
            let log = std::fs::File::create(args.dir.join(format!("sim-{seed}.out")))?;
            let child = Command::new(&exe)
                .arg("--seed")
                .arg(seed.to_string())
                .arg("--fault-seconds")
                .arg(args.fault_seconds.to_string())
                .arg("--dir")
                .arg(&args.dir)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot start seed {seed}"))?;
            running.push((seed, Instant::now(), child));
        }
        let mut idx = 0;
        let mut any_ended = false;
        while idx < running.len() {
            if running[idx].2.try_wait()?.is_none() {
                idx += 1;
                continue;
            }
            let (seed, seed_started, child) = running.swap_remove(idx);
            let succeeded = child.wait_with_output()?.status.success();
            let log_path = args.dir.join(format!("sim-{seed}.out"));
            let output = std::fs::read_to_string(&log_path).unwrap_or_default();
            n_done += 1;
            any_ended = true;
            let took = seed_started.elapsed().as_secs_f64();
            if succeeded {
                println!("[{n_done}/{}] seed {seed}: ok ({took:.1} s)", seeds.len());
                let _ = std::fs::remove_file(&log_path);
            } else {
                println!("[{n_done}/{}] seed {seed}: FAILED ({took:.1} s)", seeds.len());
                let tail: Vec<&str> = output.lines().rev().take(40).collect();
                for line in tail.iter().rev() {
                    println!("  | {line}");
                }
                println!("  (all of its output: {})", log_path.display());
                failed.push(seed);
            }
        }
        if !any_ended {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    println!(
        "{} seeds in {:.0} s: {} passed, {} failed",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        seeds.len() - failed.len(),
        failed.len()
    );
    for seed in &failed {
        println!("reproduce: {}", reproduce_command(*seed, args));
    }
    Ok(failed.is_empty())
}

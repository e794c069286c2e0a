//! The simulation (`sim`) itself: a seed replays exactly, byte for byte, in
//! a fresh process, and a run that passes says so. The 100-seed sweep runs
//! in `scripts/test.sh` on the release build.

use std::path::Path;
use std::process::Command;

fn run_seed(seed: u64, dir: &Path) -> anyhow::Result<(bool, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_sim"))
        .args(["--seed", &seed.to_string(), "--fault-seconds", "10", "--keep-history"])
        .arg("--dir")
        .arg(dir)
        .output()?;
    let history = std::fs::read_to_string(dir.join(format!("sim-{seed}.jsonl")))?;
    if !output.status.success() {
        println!("{}", String::from_utf8_lossy(&output.stdout));
    }
    Ok((output.status.success(), history))
}

#[test]
fn a_seed_replays_the_same_history_in_a_new_process() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (first_passed, first) = run_seed(5, &dir.path().join("a"))?;
    let (second_passed, second) = run_seed(5, &dir.path().join("b"))?;
    assert!(first_passed && second_passed, "seed 5 broke a promise");
    assert!(first.lines().count() > 100, "the run did little: {} events", first.lines().count());
    assert!(first == second, "seed 5 gave two different histories");
    let (_, other) = run_seed(6, &dir.path().join("c"))?;
    assert!(first != other, "seeds 5 and 6 gave the same history");
    Ok(())
}

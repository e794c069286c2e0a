//! Sees from outside when the last process of a task's attempt is gone, and
//! records it in the history as `exec-gone`.
//!
//! A task killed with SIGKILL cannot log its own end, and its ticks only say
//! it died within about one tick of the last: too coarse when an executor
//! fences an attempt, reports it lost at once, and the retry starts 150 ms
//! later. So each logged task first takes an exclusive `flock` on a file of
//! its own (the descriptor is inherited by every process the task starts)
//! and only then renames the file to `<task>_<token>_<node>.held`, where
//! [`ExitWitness`] finds it. The witness waits for that lock in a thread of
//! its own: the kernel releases it only when the last process holding the
//! descriptor has exited, so the time the witness records is never before
//! the attempt's end and, since it is already waiting, only a wake-up later.
//!
//! The rename comes after the lock is taken, so the witness never takes a
//! lock before its task does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::history::{self, Event, HistoryWriter};

/// How often the witness looks for new held files.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Attempts watched at once (a thread each); beyond this the witness fails
/// the run rather than start more threads.
const WATCHED_MAX: usize = 512;
/// The suffix of a file a task holds locked while any of its processes runs.
const HELD_SUFFIX: &str = ".held";

/// Watches one directory of held files for the length of a test.
pub struct ExitWitness {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    poller: Mutex<Option<JoinHandle<anyhow::Result<()>>>>,
    /// The held files whose lock is not yet released.
    waiting: Arc<Mutex<BTreeSet<String>>>,
}

impl ExitWitness {
    /// Creates `dir` and starts watching it, recording into `history`.
    pub fn start(dir: &Path, history: HistoryWriter) -> anyhow::Result<ExitWitness> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let waiting = Arc::new(Mutex::new(BTreeSet::new()));
        let poller = {
            let (dir, stop, waiting) = (dir.to_owned(), stop.clone(), waiting.clone());
            std::thread::Builder::new()
                .name("exit-witness".into())
                .spawn(move || poll(&dir, &stop, &waiting, &history))?
        };
        let poller = Mutex::new(Some(poller));
        Ok(ExitWitness { dir: dir.to_owned(), stop, poller, waiting })
    }

    /// The shell commands a task runs first: take the lock, then show it.
    pub fn hold_script(&self) -> String {
        format!(
            r#"held="{}/${{TASKRAFT_TASK_ID}}_${{TASKRAFT_FENCING_TOKEN}}_${{TASKRAFT_NODE_ID}}"; exec 9>"$held.taking" && flock 9 && mv "$held.taking" "$held{HELD_SUFFIX}""#,
            self.dir.display()
        )
    }

    /// Stops looking for new files after one last look, waits up to
    /// `timeout` for every lock seen to be released, and checks that the
    /// history at `history_path` has every attempt that logged its start
    /// seen gone. Names the attempts whose processes outlived the wait, or
    /// that the witness missed.
    pub fn finish(&self, history_path: &Path, timeout: Duration) -> anyhow::Result<()> {
        self.wait_released(timeout)?;
        let events = history::read(history_path)?;
        let gone: BTreeSet<(&String, u64)> = events
            .iter()
            .filter_map(|event| match event {
                Event::ExecGone { task_id, token, .. } => Some((task_id, *token)),
                _ => None,
            })
            .collect();
        let unseen: Vec<String> = events
            .iter()
            .filter_map(|event| match event {
                Event::ExecStart { task_id, token, .. } if !gone.contains(&(task_id, *token)) => {
                    Some(format!("task {task_id} token {token}"))
                }
                _ => None,
            })
            .collect();
        if !unseen.is_empty() {
            bail!("the exit witness never saw these started attempts end: {unseen:?}");
        }
        Ok(())
    }

    fn wait_released(&self, timeout: Duration) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let poller = self.poller.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(poller) = poller {
            match poller.join() {
                Ok(result) => result?,
                Err(_) => bail!("the exit witness panicked"),
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let waiting = self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("processes of these attempts still ran {timeout:?} later: {waiting:?}");
            }
            drop(waiting);
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for ExitWitness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The poller: finds each new held file and starts a thread waiting for it.
fn poll(
    dir: &Path,
    stop: &AtomicBool,
    waiting: &Arc<Mutex<BTreeSet<String>>>,
    history: &HistoryWriter,
) -> anyhow::Result<()> {
    // The held files found so far that are still there; a waiter removes
    // its file once it has recorded the attempt gone.
    let mut seen = BTreeSet::new();
    loop {
        // Read the flag first, so that the last look comes after it was set.
        let stopping = stop.load(Ordering::Relaxed);
        let mut present = BTreeSet::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if !name.ends_with(HELD_SUFFIX) {
                continue;
            }
            present.insert(name.clone());
            if seen.contains(&name) {
                continue;
            }
            let Some(attempt) = Attempt::parse(&name) else {
                bail!("{}: not a held file the witness knows", dir.join(&name).display());
            };
            let mut watched = waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if watched.len() >= WATCHED_MAX {
                bail!("more than {WATCHED_MAX} attempts to watch at once");
            }
            watched.insert(name.clone());
            drop(watched);
            seen.insert(name.clone());
            let (path, waiting, history) = (dir.join(&name), waiting.clone(), history.clone());
            std::thread::Builder::new().name("exit-witness-wait".into()).spawn(move || {
                wait_until_released(&path, &attempt, &history);
                waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&name);
            })?;
        }
        seen.retain(|name| present.contains(name));
        if stopping {
            return Ok(());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Blocks until no process holds the lock on `path`, then records the
/// attempt gone and removes the file. A file that cannot be locked records
/// nothing, and [`ExitWitness::finish`] names its attempt.
fn wait_until_released(path: &Path, attempt: &Attempt, history: &HistoryWriter) {
    let Ok(file) = std::fs::File::open(path) else { return };
    loop {
        // `flock(LOCK_EX)` on Linux, the lock the task's `flock 9` holds.
        match file.lock() {
            Ok(()) => break,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
    history.record(&Event::ExecGone {
        task_id: attempt.task_id.clone(),
        token: attempt.token,
        node: attempt.node,
        time_ns: history.now_ns(),
    });
    let _ = std::fs::remove_file(path);
}

/// The attempt a held file stands for.
#[derive(Debug, PartialEq)]
struct Attempt {
    task_id: String,
    token: u64,
    node: u64,
}

impl Attempt {
    /// Parses `<task>_<token>_<node>.held`.
    fn parse(name: &str) -> Option<Attempt> {
        let stem = name.strip_suffix(HELD_SUFFIX)?;
        let mut parts = stem.split('_');
        let (task_id, token, node) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || task_id.is_empty() {
            return None;
        }
        Some(Attempt {
            task_id: task_id.into(),
            token: token.parse().ok()?,
            node: node.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A history in `dir`, and a witness of `dir/held` recording into it.
    fn witness_in(dir: &Path) -> anyhow::Result<(PathBuf, HistoryWriter, ExitWitness)> {
        let path = dir.join("history.jsonl");
        let history = HistoryWriter::create(&path)?;
        let witness = ExitWitness::start(&dir.join("held"), history.clone())?;
        Ok((path, history, witness))
    }

    #[test]
    fn held_file_names_parse_and_bad_ones_do_not() {
        let parsed = Attempt::parse("14_45_1.held");
        assert_eq!(parsed, Some(Attempt { task_id: "14".into(), token: 45, node: 1 }));
        for bad in ["14_45.held", "14_45_1_2.held", "_45_1.held", "14_x_1.held", "14_45_1"] {
            assert_eq!(Attempt::parse(bad), None, "{bad}");
        }
    }

    /// A shell that takes the hold, starts a child that keeps it, and exits:
    /// the attempt is gone only when the child is, and the witness says so
    /// no earlier than that.
    #[test]
    fn an_attempt_is_gone_only_when_its_last_process_is() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (path, _, witness) = witness_in(dir.path())?;
        let held_dir = dir.path().join("held");
        let child_end = dir.path().join("child-end");
        let script = format!(
            "{}; (sleep 0.4; date +%s%N > {}) & exit 0",
            witness.hold_script(),
            child_end.display()
        );
        let status = std::process::Command::new("sh")
            .args(["-c", &script])
            .env("TASKRAFT_TASK_ID", "7")
            .env("TASKRAFT_FENCING_TOKEN", "12")
            .env("TASKRAFT_NODE_ID", "3")
            .status()?;
        assert!(status.success());
        witness.finish(&path, Duration::from_secs(10))?;
        let child_ended_ns: u64 = std::fs::read_to_string(&child_end)?.trim().parse()?;
        let gone: Vec<Event> = history::read(&path)?;
        match &gone[..] {
            [Event::ExecGone { task_id, token: 12, node: 3, time_ns }] => {
                assert_eq!(task_id, "7");
                assert!(*time_ns >= child_ended_ns, "gone before the child had ended");
                assert!(*time_ns < child_ended_ns + 250_000_000, "gone long after the child ended");
            }
            other => panic!("expected one exec-gone, got {other:?}"),
        }
        assert!(std::fs::read_dir(&held_dir)?.next().is_none(), "the held file was removed");
        Ok(())
    }

    #[test]
    fn a_started_attempt_the_witness_never_saw_is_named() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (path, history, witness) = witness_in(dir.path())?;
        // A task that logged its start without taking the hold.
        history.record(&Event::ExecStart {
            task_id: "5".into(),
            attempt: 1,
            token: 3,
            node: 1,
            time_ns: history.now_ns(),
        });
        let err = witness.finish(&path, Duration::from_secs(1)).expect_err("never seen gone");
        assert!(err.to_string().contains("task 5 token 3"), "{err}");
        Ok(())
    }

    #[test]
    fn a_process_that_outlives_the_wait_is_named() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (path, _, witness) = witness_in(dir.path())?;
        let mut child = std::process::Command::new("sh")
            .args(["-c", &format!("{}; exec sleep 30", witness.hold_script())])
            .env("TASKRAFT_TASK_ID", "8")
            .env("TASKRAFT_FENCING_TOKEN", "1")
            .env("TASKRAFT_NODE_ID", "2")
            .spawn()?;
        // Until the file is held and seen.
        std::thread::sleep(Duration::from_millis(300));
        let result = witness.finish(&path, Duration::from_millis(100));
        child.kill()?;
        child.wait()?;
        let err = result.expect_err("the sleeping process outlived the wait");
        assert!(err.to_string().contains("8_1_2.held"), "{err}");
        Ok(())
    }
}

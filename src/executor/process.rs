//! Running one attempt as an operating-system process.
//!
//! The program runs without a shell, in a process group of its own, so that
//! a timeout, a cancellation or a lost lease kills it and everything it
//! started. It also asks the kernel to kill it if the node process dies
//! (`PR_SET_PDEATHSIG`), so a node killed with SIGKILL leaves no attempt
//! running behind it. stdout and stderr are captured, each keeping only its
//! last `output_tail_bytes_max` bytes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::oneshot;

use crate::executor::launch::{LAUNCH_ARG, LAUNCH_BINARY, resolve_program};
use crate::scheduler::{CommandSpec, Outcome};

/// Why an attempt is being stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    /// The executor's lease ran out, or the attempt is no longer current.
    Fenced,
    /// The node is shutting down.
    Shutdown,
}

/// What became of a process.
#[derive(Debug)]
pub struct ProcessResult {
    pub outcome: Outcome,
    pub stdout_tail: String,
    pub stderr_tail: String,
}

/// One attempt for a [`TaskRunner`] to run.
pub struct RunRequest {
    pub command: CommandSpec,
    pub env: AttemptEnv,
    pub timeout: Duration,
    pub output_tail_bytes_max: usize,
}

/// Runs attempts: as processes in production, simulated in a simulation.
pub trait TaskRunner: Send + Sync + 'static {
    /// Runs `request` until it ends, its timeout passes, or `stop` fires.
    fn run(
        &self,
        request: RunRequest,
        stop: oneshot::Receiver<StopReason>,
    ) -> BoxFuture<'static, ProcessResult>;
}

/// How a process comes to die with its node.
#[derive(Debug, Clone)]
pub enum Launcher {
    /// Through the launch trampoline `taskraft-launch` (see
    /// [`crate::executor::launch`]): the node is never forked.
    Trampoline(PathBuf),
    /// Through the node's own binary as `taskraft __launch`: the same
    /// trampoline, where `taskraft-launch` is not beside the node's binary.
    NodeBinary(PathBuf),
    /// In the child between `fork` and `exec`: for unit tests, whose binary
    /// is not `taskraft`, and a node that cannot find its own binary.
    PreExec,
}

/// Runs each attempt as an operating-system process (see [`run`]).
pub struct ProcessRunner {
    pub launcher: Launcher,
}

impl ProcessRunner {
    /// Launches through `taskraft-launch` beside this binary, or else
    /// through this binary's own trampoline.
    pub fn production() -> ProcessRunner {
        let launcher = match std::env::current_exe() {
            Ok(binary) => {
                let trampoline = binary.with_file_name(LAUNCH_BINARY);
                if trampoline.is_file() {
                    tracing::info!(trampoline = %trampoline.display(), "tasks are launched through {LAUNCH_BINARY}");
                    Launcher::Trampoline(trampoline)
                } else {
                    tracing::info!(
                        missing = %trampoline.display(),
                        "{LAUNCH_BINARY} is not beside this binary; tasks are launched through this binary, which costs more CPU per task"
                    );
                    Launcher::NodeBinary(binary)
                }
            }
            Err(err) => {
                tracing::warn!(cause = %err, "cannot find this binary; tasks are started by forking the node");
                Launcher::PreExec
            }
        };
        ProcessRunner { launcher }
    }
}

impl TaskRunner for ProcessRunner {
    fn run(
        &self,
        request: RunRequest,
        stop: oneshot::Receiver<StopReason>,
    ) -> BoxFuture<'static, ProcessResult> {
        let launcher = self.launcher.clone();
        Box::pin(async move {
            run(
                &launcher,
                &request.command,
                &request.env,
                request.timeout,
                request.output_tail_bytes_max,
                stop,
            )
            .await
        })
    }
}

/// What the process is told about itself.
pub struct AttemptEnv {
    pub task_id: u64,
    pub attempt_number: u32,
    pub fencing_token: u64,
    pub node_id: u64,
}

fn start_failed(message: String) -> ProcessResult {
    ProcessResult {
        outcome: Outcome::StartFailed { message },
        stdout_tail: String::new(),
        stderr_tail: String::new(),
    }
}

/// The command that starts `command`'s program through `launcher`.
fn process_for(launcher: &Launcher, command: &CommandSpec) -> Result<Command, String> {
    let (binary, marker) = match launcher {
        Launcher::Trampoline(binary) => (binary, None),
        Launcher::NodeBinary(binary) => (binary, Some(LAUNCH_ARG)),
        Launcher::PreExec => return Ok(pre_exec_process(command)),
    };
    let working_dir = command.working_dir.as_deref().unwrap_or("");
    if !working_dir.is_empty() && !std::path::Path::new(working_dir).is_dir() {
        return Err(format!("the working directory {working_dir:?} is not a directory"));
    }
    let task_path = command.env.get("PATH").map(String::as_str);
    let working_dir_path = (!working_dir.is_empty()).then(|| std::path::Path::new(working_dir));
    let program = resolve_program(&command.program, task_path, working_dir_path)
        .map_err(|reason| format!("cannot run {:?}: {reason}", command.program))?;
    let mut process = Command::new(binary);
    process
        .args(marker)
        .arg(std::process::id().to_string())
        .arg(working_dir)
        .arg(program)
        .args(&command.args);
    Ok(process)
}

/// The command that starts `command`'s program by forking the node.
fn pre_exec_process(command: &CommandSpec) -> Command {
    let mut process = Command::new(&*command.program);
    process.args(&command.args);
    if let Some(dir) = &command.working_dir {
        process.current_dir(&**dir);
    }
    set_parent_death_signal(&mut process);
    process
}

/// Runs `command` until it exits, `timeout` passes, or `stop` fires.
pub async fn run(
    launcher: &Launcher,
    command: &CommandSpec,
    attempt: &AttemptEnv,
    timeout: Duration,
    output_tail_bytes_max: usize,
    stop: oneshot::Receiver<StopReason>,
) -> ProcessResult {
    let mut process = match process_for(launcher, command) {
        Ok(process) => process,
        Err(message) => return start_failed(message),
    };
    process
        .envs(command.env.iter())
        .envs(attempt_vars(attempt))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match process.spawn() {
        Ok(child) => child,
        Err(err) => return start_failed(format!("cannot run {:?}: {err}", command.program)),
    };
    let pgid = child.id().map(|pid| Pid::from_raw(pid as i32));
    let stdout = tokio::spawn(read_tail(child.stdout.take(), output_tail_bytes_max));
    let stderr = tokio::spawn(read_tail(child.stderr.take(), output_tail_bytes_max));

    let outcome = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => exit_outcome(status),
            Err(err) => Outcome::StartFailed { message: format!("cannot wait for the process: {err}") },
        },
        _ = tokio::time::sleep(timeout) => {
            kill_group(pgid, &mut child).await;
            Outcome::TimedOut
        }
        reason = stop => {
            kill_group(pgid, &mut child).await;
            match reason {
                Ok(StopReason::Cancelled) => Outcome::Cancelled,
                Ok(StopReason::Fenced | StopReason::Shutdown) | Err(_) => Outcome::Lost,
            }
        }
    };
    // The group is gone or exited; its pipes close, so the readers end.
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    ProcessResult {
        outcome,
        stdout_tail: stdout.await.unwrap_or_default(),
        stderr_tail: stderr.await.unwrap_or_default(),
    }
}

fn attempt_vars(attempt: &AttemptEnv) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("TASKRAFT_TASK_ID", attempt.task_id.to_string()),
        ("TASKRAFT_ATTEMPT", attempt.attempt_number.to_string()),
        ("TASKRAFT_FENCING_TOKEN", attempt.fencing_token.to_string()),
        ("TASKRAFT_NODE_ID", attempt.node_id.to_string()),
    ])
}

/// Kills the whole process group, then reaps the child.
async fn kill_group(pgid: Option<Pid>, child: &mut tokio::process::Child) {
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let _ = child.kill().await;
}

fn exit_outcome(status: std::process::ExitStatus) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Outcome::Exited { code },
        (None, Some(signal)) => Outcome::Signalled { signal },
        (None, None) => Outcome::Exited { code: -1 },
    }
}

/// Reads a stream to its end, keeping the last `bytes_max` bytes.
async fn read_tail<R: AsyncRead + Unpin>(stream: Option<R>, bytes_max: usize) -> String {
    let Some(mut stream) = stream else { return String::new() };
    let mut tail: Vec<u8> = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n_read) => {
                tail.extend_from_slice(&buffer[..n_read]);
                if tail.len() > bytes_max {
                    tail.drain(..tail.len() - bytes_max);
                }
            }
        }
    }
    // The cut may split a character; lossy decoding keeps it readable.
    String::from_utf8_lossy(&tail).into_owned()
}

/// Makes the kernel send SIGKILL to the child when the thread that spawned
/// it dies: tokio spawns from its worker threads, which live as long as the
/// node's runtime, so in effect when the node dies.
#[allow(
    unsafe_code,
    reason = "pre_exec is unsafe; the closure only calls prctl, which is async-signal-safe"
)]
fn set_parent_death_signal(process: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl(2), which allocates nothing and takes no locks.
    unsafe {
        process.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::task::StringMap;

    fn sh(script: &str) -> CommandSpec {
        CommandSpec {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()].into(),
            env: StringMap::default(),
            working_dir: None,
        }
    }

    fn env() -> AttemptEnv {
        AttemptEnv { task_id: 42, attempt_number: 2, fencing_token: 1234, node_id: 3 }
    }

    async fn run_for(command: &CommandSpec, timeout_ms: u64) -> ProcessResult {
        let (_stop_tx, stop_rx) = oneshot::channel();
        run(&Launcher::PreExec, command, &env(), Duration::from_millis(timeout_ms), 64, stop_rx)
            .await
    }

    #[tokio::test]
    async fn exit_codes_output_and_variables() {
        let result = run_for(&sh("echo $TASKRAFT_TASK_ID $TASKRAFT_ATTEMPT $TASKRAFT_FENCING_TOKEN $TASKRAFT_NODE_ID; echo oops >&2; exit 3"), 10_000).await;
        assert_eq!(result.outcome, Outcome::Exited { code: 3 });
        assert_eq!(result.stdout_tail, "42 2 1234 3\n");
        assert_eq!(result.stderr_tail, "oops\n");
    }

    #[tokio::test]
    async fn output_keeps_only_its_tail() {
        let result = run_for(&sh("seq 1 1000"), 10_000).await;
        assert_eq!(result.stdout_tail.len(), 64);
        assert!(result.stdout_tail.ends_with("999\n1000\n"), "{:?}", result.stdout_tail);
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        // The grandchild would write the marker after the timeout if it survived.
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let started = std::time::Instant::now();
        let result = run_for(&sh(&script), 200).await;
        assert_eq!(result.outcome, Outcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(!marker.exists(), "the background grandchild was killed with its group");
    }

    #[tokio::test]
    async fn a_stop_kills_the_process_and_says_why() {
        let (stop_tx, stop_rx) = oneshot::channel();
        let running = tokio::spawn(async move {
            run(&Launcher::PreExec, &sh("sleep 30"), &env(), Duration::from_secs(60), 64, stop_rx)
                .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop_tx.send(StopReason::Cancelled).unwrap();
        assert_eq!(running.await.unwrap().outcome, Outcome::Cancelled);
    }

    #[tokio::test]
    async fn a_missing_program_fails_to_start() {
        let command = CommandSpec {
            program: "/no/such/program".into(),
            args: Box::default(),
            env: StringMap::default(),
            working_dir: None,
        };
        assert!(matches!(run_for(&command, 1_000).await.outcome, Outcome::StartFailed { .. }));
    }
}

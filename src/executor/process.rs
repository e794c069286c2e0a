//! Running one attempt as an operating-system process.
//!
//! The program runs without a shell, in a process group of its own, so that
//! a timeout, a cancellation or a lost lease kills it and everything it
//! started. It also asks the kernel to kill it if the node process dies
//! (`PR_SET_PDEATHSIG`), so a node killed with SIGKILL leaves no attempt
//! running behind it. stdout and stderr are captured, each keeping only its
//! last `output_tail_bytes_max` bytes.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;

use crate::executor::launch::{self, EnvVar, LaunchSpec, LaunchedProcess};
use crate::executor::programs::ProgramFinder;
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

/// Runs each attempt as an operating-system process (see [`run`]).
pub struct ProcessRunner {
    node: Arc<NodeDefaults>,
}

impl ProcessRunner {
    /// Tasks inherit the environment the node has now.
    pub fn production() -> ProcessRunner {
        ProcessRunner { node: Arc::new(NodeDefaults::now()) }
    }
}

/// What every task of a node starts from: the node's environment when it
/// started, which every task's inherits, and the finder of programs on the
/// node's `PATH` of then.
pub struct NodeDefaults {
    env: Vec<EnvVar>,
    programs: ProgramFinder,
}

impl NodeDefaults {
    /// The node's environment as it is now.
    pub fn now() -> NodeDefaults {
        NodeDefaults { env: node_env(), programs: ProgramFinder::for_this_node() }
    }
}

/// The node's environment, in the form every task's starts from. A
/// variable `exec` could not pass on (one with a NUL byte cannot come from
/// the kernel, but the process may have set one) is left out.
fn node_env() -> Vec<EnvVar> {
    std::env::vars_os()
        .filter_map(|(name, value)| match EnvVar::new(&name, &value) {
            Ok(var) => Some(var),
            Err(err) => {
                tracing::warn!(%err, "a variable of the node's environment is not passed to tasks");
                None
            }
        })
        .collect()
}

impl TaskRunner for ProcessRunner {
    fn run(
        &self,
        request: RunRequest,
        stop: oneshot::Receiver<StopReason>,
    ) -> BoxFuture<'static, ProcessResult> {
        let node = self.node.clone();
        Box::pin(async move {
            run(
                &node,
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

/// What starts `command`'s program: the program found on `PATH`, the
/// node's environment with the task's variables and then the attempt's
/// over it, and the task's working directory.
fn launch_spec(
    node: &NodeDefaults,
    command: &CommandSpec,
    attempt: &AttemptEnv,
) -> Result<LaunchSpec, String> {
    let working_dir = command.working_dir.as_deref().filter(|dir| !dir.is_empty()).map(Path::new);
    if let Some(dir) = working_dir
        && !dir.is_dir()
    {
        return Err(format!("the working directory {dir:?} is not a directory"));
    }
    let task_path = command.env.get("PATH").map(String::as_str);
    let program = node
        .programs
        .find(&command.program, task_path, working_dir)
        .map_err(|reason| format!("cannot run {:?}: {reason}", command.program))?;
    let attempt_vars = attempt_vars(attempt);
    let overridden = |var: &EnvVar| {
        std::str::from_utf8(var.name())
            .is_ok_and(|name| command.env.contains_key(name) || attempt_vars.contains_key(name))
    };
    let bad_variable = |err| format!("cannot run {:?}: {err}", command.program);
    let mut env: Vec<EnvVar> = Vec::with_capacity(node.env.len() + command.env.len() + 4);
    env.extend(node.env.iter().filter(|var| !overridden(var)).cloned());
    for (name, value) in command.env.iter() {
        if !attempt_vars.contains_key(name.as_str()) {
            env.push(EnvVar::new(name.as_ref(), value.as_ref()).map_err(bad_variable)?);
        }
    }
    for (name, value) in &attempt_vars {
        env.push(EnvVar::new(name.as_ref(), value.as_ref()).map_err(bad_variable)?);
    }
    let args = std::iter::once(&*command.program).chain(command.args.iter().map(|arg| &**arg));
    Ok(LaunchSpec {
        program,
        args: args.map(OsString::from).collect(),
        env,
        working_dir: working_dir.map(Path::to_path_buf),
    })
}

/// Runs `command` until it exits, `timeout` passes, or `stop` fires.
pub async fn run(
    node: &NodeDefaults,
    command: &CommandSpec,
    attempt: &AttemptEnv,
    timeout: Duration,
    output_tail_bytes_max: usize,
    stop: oneshot::Receiver<StopReason>,
) -> ProcessResult {
    let spec = match launch_spec(node, command, attempt) {
        Ok(spec) => spec,
        Err(message) => return start_failed(message),
    };
    let mut process = match launch::spawn(&spec) {
        Ok(process) => process,
        Err(err) => return start_failed(format!("cannot run {:?}: {err}", command.program)),
    };
    let stdout = tokio::spawn(read_tail(process.stdout.take(), output_tail_bytes_max));
    let stderr = tokio::spawn(read_tail(process.stderr.take(), output_tail_bytes_max));

    let outcome = tokio::select! {
        status = process.wait() => match status {
            Ok(status) => exit_outcome(status),
            Err(err) => Outcome::StartFailed { message: format!("cannot wait for the process: {err}") },
        },
        _ = tokio::time::sleep(timeout) => {
            kill_group(&mut process).await;
            Outcome::TimedOut
        }
        reason = stop => {
            kill_group(&mut process).await;
            match reason {
                Ok(StopReason::Cancelled) => Outcome::Cancelled,
                Ok(StopReason::Fenced | StopReason::Shutdown) | Err(_) => Outcome::Lost,
            }
        }
    };
    // `wait` killed what was left of the group, so the pipes have closed
    // and the readers end.
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
async fn kill_group(process: &mut LaunchedProcess) {
    process.kill_group();
    let _ = process.wait().await;
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
        run(&NodeDefaults::now(), command, &env(), Duration::from_millis(timeout_ms), 64, stop_rx)
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
    async fn a_task_inherits_the_nodes_environment_under_its_own_and_the_attempts() {
        let var = |name: &str, value: &str| EnvVar::new(name.as_ref(), value.as_ref()).unwrap();
        let node = NodeDefaults {
            env: vec![
                var("PATH", &std::env::var("PATH").unwrap()),
                var("ONLY_THE_NODE", "node"),
                var("SET_BY_BOTH", "node"),
                var("TASKRAFT_NODE_ID", "node"),
            ],
            programs: ProgramFinder::for_this_node(),
        };
        // `env` prints its environment as it got it, a name set twice twice.
        let mut command = CommandSpec { program: "env".into(), ..sh("") };
        command.args = Box::default();
        command.env.insert("SET_BY_BOTH".into(), "task".into());
        command.env.insert("TASKRAFT_TASK_ID".into(), "task".into());
        let (_stop_tx, stop_rx) = oneshot::channel();
        let result = run(&node, &command, &env(), Duration::from_secs(10), 4096, stop_rx).await;
        assert_eq!(result.outcome, Outcome::Exited { code: 0 });
        let mut printed: Vec<&str> = result.stdout_tail.lines().collect();
        printed.retain(|line| !line.starts_with("PATH="));
        printed.sort_unstable();
        let expected = [
            "ONLY_THE_NODE=node",
            "SET_BY_BOTH=task",
            "TASKRAFT_ATTEMPT=2",
            "TASKRAFT_FENCING_TOKEN=1234",
            "TASKRAFT_NODE_ID=3",
            "TASKRAFT_TASK_ID=42",
        ];
        assert_eq!(printed, expected);
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
    async fn a_background_child_left_behind_dies_when_its_program_exits() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        // The child holds stdout open; left alive, it would hold up the result.
        let script = format!("(sleep 1; touch {}) & echo started", marker.display());
        let started = std::time::Instant::now();
        let result = run_for(&sh(&script), 30_000).await;
        assert_eq!(result.outcome, Outcome::Exited { code: 0 });
        assert_eq!(result.stdout_tail, "started\n");
        assert!(started.elapsed() < Duration::from_millis(900), "{:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(!marker.exists(), "the background child was killed with its group");
    }

    #[tokio::test]
    async fn a_stop_kills_the_process_and_says_why() {
        let (stop_tx, stop_rx) = oneshot::channel();
        let running = tokio::spawn(async move {
            run(&NodeDefaults::now(), &sh("sleep 30"), &env(), Duration::from_secs(60), 64, stop_rx)
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

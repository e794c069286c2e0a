//! The launch trampoline: how the executor starts a task's program without
//! copying the node's address space.
//!
//! A task must die with its node, so its process asks the kernel for
//! `PR_SET_PDEATHSIG`. That has to happen inside the child before `exec`,
//! and a `pre_exec` hook makes the standard library `fork` the node: copy
//! its page tables (hundreds of megabytes of mappings with a large queue),
//! take copy-on-write faults until the `exec`, then tear the copy down. On
//! two cores that took about 4 ms of CPU per task, more than the task's
//! Raft commits.
//!
//! Instead the node spawns a trampoline with no hook, which the standard
//! library does with `posix_spawn` (a `vfork`, no copy). The trampoline is
//! `taskraft-launch`, a binary of its own beside the node's: about a
//! megabyte, where the node's binary is seventy, whose `exec` alone (its
//! relocations and page faults) cost about 250 µs more CPU per task. Where
//! `taskraft-launch` is missing the node runs its own binary as
//! `taskraft __launch`, which does the same. The trampoline sets the parent-death signal, checks that the node
//! did not die before it could, moves to the task's working directory and
//! `exec`s the program in place: the task keeps the trampoline's PID and
//! process group, so nothing else changes. The executor resolves the program
//! on `PATH` itself first, so a program that does not exist is still a clear
//! `StartFailed` rather than an exit code.
//!
//! Arguments: `NODE_PID WORKING_DIR PROGRAM [ARGS...]` (after `__launch`
//! for the node's binary), where an empty `WORKING_DIR` keeps the node's and
//! `PROGRAM` is an absolute path.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::sys::signal::Signal;

/// The first argument that makes `taskraft` the trampoline.
pub const LAUNCH_ARG: &str = "__launch";

/// The trampoline's own binary, looked for beside the node's.
pub const LAUNCH_BINARY: &str = "taskraft-launch";

/// The exit code when the trampoline cannot start the program, as a shell's
/// for a command it cannot run.
pub const LAUNCH_FAILED_EXIT_CODE: u8 = 127;

/// The trampoline's `main`, given the arguments after the binary's name
/// (and after `__launch`). Returns only when it cannot run the program.
pub fn run(args: impl Iterator<Item = OsString>) -> ExitCode {
    let args: Vec<OsString> = args.collect();
    let err = match launch(&args) {
        Ok(never) => match never {},
        Err(err) => err,
    };
    eprintln!("taskraft: {err}");
    ExitCode::from(LAUNCH_FAILED_EXIT_CODE)
}

/// Why the trampoline could not become the program.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("usage: {LAUNCH_BINARY} NODE_PID WORKING_DIR PROGRAM [ARGS...]")]
    Usage,
    #[error("cannot ask to die with the node: {0}")]
    DeathSignal(nix::Error),
    #[error("the node exited before the task could start")]
    NodeGone,
    #[error("cannot enter the working directory {dir:?}: {source}")]
    WorkingDir { dir: PathBuf, source: std::io::Error },
    #[error("cannot run {program:?}: {source}")]
    Exec { program: PathBuf, source: std::io::Error },
}

/// Everything the trampoline does; on success the process is the program.
fn launch(args: &[OsString]) -> Result<std::convert::Infallible, LaunchError> {
    let [node_pid, working_dir, program, program_args @ ..] = args else {
        return Err(LaunchError::Usage);
    };
    let node_pid: i32 =
        node_pid.to_str().and_then(|pid| pid.parse().ok()).ok_or(LaunchError::Usage)?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(LaunchError::DeathSignal)?;
    // Had the node died before the line above, no signal would ever come.
    if nix::unistd::getppid().as_raw() != node_pid {
        return Err(LaunchError::NodeGone);
    }
    if !working_dir.is_empty() {
        std::env::set_current_dir(working_dir)
            .map_err(|source| LaunchError::WorkingDir { dir: working_dir.into(), source })?;
    }
    let source = std::process::Command::new(program).args(program_args).exec();
    Err(LaunchError::Exec { program: program.into(), source })
}

/// Where `execvp` looks when the environment has no `PATH` (glibc's).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Finds `program` as `execvp` in the task's working directory would: a
/// name with a slash as it is, any other on `PATH` (the task's own when its
/// environment sets one, else the node's); relative paths, in either, from
/// `working_dir` when the task has one. Returns an absolute path to an
/// executable file.
pub fn resolve_program(
    program: &str,
    task_path: Option<&str>,
    working_dir: Option<&Path>,
) -> Result<PathBuf, String> {
    if program.is_empty() {
        return Err("the program name is empty".into());
    }
    let absolute = |path: &Path| match working_dir {
        Some(dir) if path.is_relative() => std::path::absolute(dir.join(path)),
        _ => std::path::absolute(path),
    };
    if program.contains('/') {
        let path = absolute(Path::new(program)).map_err(|err| err.to_string())?;
        return check_executable(&path).map(|()| path);
    }
    // With no PATH at all, execvp searches glibc's default path.
    let node_path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    let search = task_path.unwrap_or(&node_path);
    let mut last_error = None;
    for dir in search.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = absolute(&Path::new(dir).join(program)).map_err(|err| err.to_string())?;
        match check_executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(err) if candidate.exists() => last_error = Some(err),
            Err(_) => {}
        }
    }
    Err(last_error.unwrap_or_else(|| format!("not found on PATH ({search})")))
}

fn check_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|err| err.to_string())?;
    if !metadata.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not executable", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_is_found_on_the_tasks_path_or_the_nodes() {
        let true_path = resolve_program("true", None, None).unwrap();
        assert!(true_path.is_absolute() && true_path.ends_with("true"), "{true_path:?}");
        let dir = tempfile::tempdir().unwrap();
        assert!(
            resolve_program("true", Some(dir.path().to_str().unwrap()), None)
                .unwrap_err()
                .contains("not found on PATH"),
            "the task's PATH replaces the node's"
        );
        assert_eq!(resolve_program(true_path.to_str().unwrap(), None, None).unwrap(), true_path);
    }

    #[test]
    fn what_cannot_run_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "not a program").unwrap();
        let err = resolve_program(plain.to_str().unwrap(), None, None).unwrap_err();
        assert!(err.contains("not executable"), "{err}");
        let err = resolve_program(dir.path().to_str().unwrap(), None, None).unwrap_err();
        assert!(err.contains("not a file"), "{err}");
        assert!(resolve_program("", None, None).unwrap_err().contains("empty"));
        let err = resolve_program("no-such-program-taskraft", None, None).unwrap_err();
        assert!(err.contains("not found"), "{err}");
    }

    #[test]
    fn a_relative_program_is_found_from_the_tasks_working_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("run.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let found = resolve_program("./run.sh", None, Some(dir.path())).unwrap();
        assert_eq!(found.canonicalize().unwrap(), script.canonicalize().unwrap());
        // A relative PATH entry too, as execvp after the chdir would.
        let found = resolve_program("run.sh", Some("."), Some(dir.path())).unwrap();
        assert_eq!(found.canonicalize().unwrap(), script.canonicalize().unwrap());
        assert!(resolve_program("./run.sh", None, None).is_err(), "not from the node's directory");
    }

    #[test]
    fn bad_trampoline_arguments_are_a_usage_error() {
        assert!(matches!(launch(&[]), Err(LaunchError::Usage)));
        let args: Vec<OsString> = ["not-a-pid", "", "/bin/true"].map(OsString::from).to_vec();
        assert!(matches!(launch(&args), Err(LaunchError::Usage)));
    }
}

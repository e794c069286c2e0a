//! Starting a task's program: a clone of the node that shares its memory,
//! asks the kernel to kill it when the node dies, and `exec`s the program.
//!
//! A task must die with its node, so its process asks the kernel for
//! `PR_SET_PDEATHSIG` before it becomes the program. That has to happen in
//! the child, between the clone and the `exec`, which the standard library
//! offers only through a `pre_exec` hook, and a hook makes it `fork` the
//! node: copy its page tables (hundreds of megabytes of mappings with a
//! large queue), take copy-on-write faults until the `exec`, then tear the
//! copy down, about 4 ms of CPU per task on two cores. Spawning a small
//! trampoline that sets the signal and then `exec`s the program avoided the
//! copy but cost a second `exec` per task: the kernel's work and the C
//! library's start-up (which asks the CPU for its cache sizes, slow in a
//! virtual machine), about a third of the CPU a no-op task cost.
//!
//! So [`spawn`] does what the C library's `posix_spawn` does, with the one
//! step more: `clone(CLONE_VM | CLONE_VFORK)` onto a stack of its own, so
//! nothing is copied and the calling thread waits until the child has
//! `exec`ed or failed. The child shares the node's memory, so it only makes
//! system calls on data prepared before the clone, and it runs with every
//! signal blocked and every handler reset to the default until its `exec`.
//! In order, it: resets the signal handlers (SIGPIPE to its default, as the
//! standard library does), moves to a process group of its own, sets
//! `PR_SET_PDEATHSIG` and checks that the node did not die before that,
//! connects stdin to `/dev/null` and stdout and stderr to pipes, moves to
//! the working directory, unblocks every signal and `exec`s. A step that
//! fails leaves its `errno` in memory the parent reads after the clone
//! returns, so a failure is a clear error rather than an exit code. The
//! clone also returns a pidfd (`CLONE_PIDFD`, Linux 5.2), which the
//! executor awaits for the exit.
//!
//! The executor finds the program on `PATH` itself first
//! ([`super::programs`]), so a program that does not exist is a clear
//! `StartFailed` too.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, OnceLock};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// The stack the child runs on until its `exec`: it makes a few system
/// calls and nothing else.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// What to start: an absolute program, its arguments (the first is the
/// program's name as the task gave it), its whole environment, and where.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<EnvVar>,
    pub working_dir: Option<PathBuf>,
}

/// One environment variable in the form `exec` takes, `NAME=VALUE`, checked
/// when it is made. A clone shares it: the node's own variables are made
/// once, when the node starts, and every task's environment refers to them
/// rather than copying them for each start.
#[derive(Debug, Clone)]
pub struct EnvVar {
    entry: Arc<CStr>,
    name_bytes: usize,
}

impl EnvVar {
    pub fn new(name: &OsStr, value: &OsStr) -> Result<EnvVar, LaunchError> {
        let name = name.as_bytes();
        if name.is_empty() || name.contains(&b'=') {
            return Err(LaunchError::BadVariableName(String::from_utf8_lossy(name).into_owned()));
        }
        let mut entry = Vec::with_capacity(name.len() + 1 + value.len() + 1);
        entry.extend_from_slice(name);
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        let entry = c_string(&entry, "an environment variable")?;
        Ok(EnvVar { entry: entry.into(), name_bytes: name.len() })
    }

    pub fn name(&self) -> &[u8] {
        &self.entry.to_bytes()[..self.name_bytes]
    }
}

/// Why a program could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{what} contains a NUL byte")]
    NulByte { what: &'static str },
    #[error("the environment variable name {0:?} is empty or contains '='")]
    BadVariableName(String),
    #[error("cannot prepare the process: {0}")]
    Prepare(io::Error),
    #[error("cannot clone the node: {0}")]
    Clone(io::Error),
    #[error("the child could not {step}: {source}")]
    Child { step: &'static str, source: io::Error },
    #[error("the node exited before the task could start")]
    NodeGone,
    #[error("cannot enter the working directory {dir:?}: {source}")]
    WorkingDir { dir: PathBuf, source: io::Error },
    #[error("cannot run {program:?}: {source}")]
    Exec { program: PathBuf, source: io::Error },
}

/// A started program: its process (the leader of its own process group),
/// and the read ends of its stdout and stderr.
pub struct LaunchedProcess {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    reaped: bool,
}

impl LaunchedProcess {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Waits until the process exits, kills what is left of its group (a
    /// background child would keep the output pipes open, and outlive the
    /// attempt), and reaps the process. The group is killed before the
    /// reap: until then the exited process keeps its number, so no group
    /// that a later process makes can have it and be signalled instead.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if self.has_exited()? {
                self.kill_group();
                if let Some(status) = self.try_reap()? {
                    return Ok(status);
                }
            }
            let mut ready = self.pidfd.readable().await?;
            ready.clear_ready();
        }
    }

    /// Whether the process has exited, leaving it unreaped.
    fn has_exited(&self) -> io::Result<bool> {
        if self.reaped {
            return Err(io::Error::other("the process was reaped already"));
        }
        // SAFETY: a zeroed siginfo_t is valid, and waitid only writes it.
        #[allow(unsafe_code, reason = "waitid(2) on a child this node started")]
        let info = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
            if libc::waitid(libc::P_PID, self.pid.as_raw() as libc::id_t, &mut info, flags) != 0 {
                return Err(io::Error::last_os_error());
            }
            info
        };
        // SAFETY: with WNOHANG, si_pid stays 0 until the child has exited.
        #[allow(unsafe_code, reason = "reading the siginfo_t that waitid filled")]
        Ok(unsafe { info.si_pid() } != 0)
    }

    /// The exit status if the process has exited (and is now reaped).
    fn try_reap(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.reaped {
            return Err(io::Error::other("the process was reaped already"));
        }
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid on our own child, with a valid pointer.
        #[allow(unsafe_code, reason = "waitpid(2) on a child this node started")]
        let reaped = unsafe { libc::waitpid(self.pid.as_raw(), &mut status, libc::WNOHANG) };
        match reaped {
            0 => Ok(None),
            pid if pid == self.pid.as_raw() => {
                self.reaped = true;
                Ok(Some(ExitStatus::from_raw(status)))
            }
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// Sends SIGKILL to the process's whole group.
    pub fn kill_group(&self) {
        if !self.reaped {
            let _ = killpg(self.pid, Signal::SIGKILL);
        }
    }
}

impl Drop for LaunchedProcess {
    /// A process dropped before it was reaped is killed with its group and
    /// reaped if it is already gone. One that takes longer to die stays a
    /// zombie until the node exits; only a node shutting down drops one.
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_group();
            let _ = self.try_reap();
        }
    }
}

/// Everything the child reads and writes. It lives on the parent's stack
/// for the clone: the parent is suspended until the child has `exec`ed or
/// exited (`CLONE_VFORK`).
#[repr(C)]
struct ChildSetup {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// Null to stay in the node's working directory.
    working_dir: *const libc::c_char,
    stdin: libc::c_int,
    stdout: libc::c_int,
    stderr: libc::c_int,
    node_pid: libc::pid_t,
    /// Set by the child when a step fails: the step, then its `errno`.
    failed_step: libc::c_int,
    errno: libc::c_int,
}

const STEP_PROCESS_GROUP: libc::c_int = 1;
const STEP_DEATH_SIGNAL: libc::c_int = 2;
const STEP_NODE_GONE: libc::c_int = 3;
const STEP_STDIO: libc::c_int = 4;
const STEP_WORKING_DIR: libc::c_int = 5;
const STEP_SIGNAL_MASK: libc::c_int = 6;
const STEP_EXEC: libc::c_int = 7;

/// The child's side, from the clone to the `exec`. It shares the node's
/// memory and runs on its own stack, with every signal blocked: it only
/// makes system calls through the C library's thin wrappers, on data the
/// parent prepared, and allocates nothing.
#[allow(unsafe_code, reason = "the child of a CLONE_VM clone makes raw system calls")]
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildSetup`, alive and untouched by the
    // parent until this child has exec'ed or exited (CLONE_VFORK).
    let setup = unsafe { &mut *arg.cast::<ChildSetup>() };
    let fail = |setup: &mut ChildSetup, step: libc::c_int| -> libc::c_int {
        setup.failed_step = step;
        setup.errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // SAFETY: _exit ends this child only; it runs no destructors or atexit handlers.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: each call below is a system call on valid pointers prepared
    // by the parent; none allocates or takes a lock of the node's.
    unsafe {
        // A handler of the node's must never run in this child, which
        // shares its memory; and SIGPIPE, which the node ignores, gets its
        // default back, as the standard library gives its children.
        for signal in 1..65 {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut old) != 0 {
                continue; // A signal the C library reserves.
            }
            let ignored_by_choice = old.sa_sigaction == libc::SIG_IGN && signal != libc::SIGPIPE;
            if old.sa_sigaction != libc::SIG_DFL && !ignored_by_choice {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(setup, STEP_PROCESS_GROUP);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            return fail(setup, STEP_DEATH_SIGNAL);
        }
        // Had the node died before the line above, no signal would ever come.
        if libc::getppid() != setup.node_pid {
            return fail(setup, STEP_NODE_GONE);
        }
        if libc::dup2(setup.stdin, 0) < 0
            || libc::dup2(setup.stdout, 1) < 0
            || libc::dup2(setup.stderr, 2) < 0
        {
            return fail(setup, STEP_STDIO);
        }
        if !setup.working_dir.is_null() && libc::chdir(setup.working_dir) != 0 {
            return fail(setup, STEP_WORKING_DIR);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
            return fail(setup, STEP_SIGNAL_MASK);
        }
        libc::execve(setup.program, setup.argv, setup.envp);
        fail(setup, STEP_EXEC)
    }
}

fn c_string(bytes: &[u8], what: &'static str) -> Result<CString, LaunchError> {
    CString::new(bytes).map_err(|_| LaunchError::NulByte { what })
}

/// `/dev/null`, opened once for every task's stdin (it closes on `exec`;
/// the child's `dup2` onto its stdin keeps a copy open).
fn dev_null() -> io::Result<RawFd> {
    static DEV_NULL: OnceLock<File> = OnceLock::new();
    if let Some(file) = DEV_NULL.get() {
        return Ok(file.as_raw_fd());
    }
    let file = File::open("/dev/null")?;
    Ok(DEV_NULL.get_or_init(|| file).as_raw_fd())
}

/// A pipe whose ends close on `exec`: (read, write).
#[allow(unsafe_code, reason = "pipe2(2) fills an array of two descriptors")]
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are open descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `spec` (see the module's documentation). Call it from within a
/// tokio runtime: the pidfd and the pipes register with its reactor.
#[allow(unsafe_code, reason = "a CLONE_VM | CLONE_VFORK clone, as posix_spawn makes")]
pub fn spawn(spec: &LaunchSpec) -> Result<LaunchedProcess, LaunchError> {
    let program = c_string(spec.program.as_os_str().as_bytes(), "the program's path")?;
    let args: Vec<CString> = spec
        .args
        .iter()
        .map(|arg| c_string(arg.as_bytes(), "an argument"))
        .collect::<Result<_, _>>()?;
    let working_dir = match &spec.working_dir {
        Some(dir) => Some(c_string(dir.as_os_str().as_bytes(), "the working directory")?),
        None => None,
    };
    let argv: Vec<*const libc::c_char> =
        args.iter().map(|arg| arg.as_ptr()).chain([std::ptr::null()]).collect();
    let envp: Vec<*const libc::c_char> =
        spec.env.iter().map(|var| var.entry.as_ptr()).chain([std::ptr::null()]).collect();
    let stdin = dev_null().map_err(LaunchError::Prepare)?;
    let (stdout_read, stdout_write) = pipe_pair().map_err(LaunchError::Prepare)?;
    let (stderr_read, stderr_write) = pipe_pair().map_err(LaunchError::Prepare)?;
    let mut setup = ChildSetup {
        program: program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        working_dir: working_dir.as_ref().map_or(std::ptr::null(), |dir| dir.as_ptr()),
        stdin,
        stdout: stdout_write.as_raw_fd(),
        stderr: stderr_write.as_raw_fd(),
        node_pid: std::process::id() as libc::pid_t,
        failed_step: 0,
        errno: 0,
    };
    // Left uninitialised: only the child writes it, before it reads it.
    let mut stack: Box<[MaybeUninit<u128>]> = Box::new_uninit_slice(CHILD_STACK_BYTES / 16);
    let mut pidfd: libc::c_int = -1;
    // SAFETY: every pointer in `setup` points into values that outlive the
    // clone; the stack is ours alone and 16-byte aligned at its top; the
    // calling thread is suspended until the child has exec'ed or exited.
    // Blocking every signal first keeps handlers out of the child until it
    // has reset them; the parent's mask comes back right after.
    let (pid, clone_error) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let stack_top = stack.as_mut_ptr().add(stack.len()).cast::<libc::c_void>();
        let pid = libc::clone(
            child_main,
            stack_top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            (&raw mut setup).cast::<libc::c_void>(),
            &raw mut pidfd,
        );
        let clone_error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        (pid, clone_error)
    };
    drop((stdout_write, stderr_write));
    if pid < 0 {
        return Err(LaunchError::Clone(clone_error));
    }
    // SAFETY: the clone succeeded, so the kernel wrote an open pidfd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: the child has exec'ed or exited: it no longer writes `setup`.
    let (failed_step, errno) = unsafe {
        (std::ptr::read_volatile(&setup.failed_step), std::ptr::read_volatile(&setup.errno))
    };
    let pid = Pid::from_raw(pid);
    if failed_step != 0 {
        // It has exited: reap it now.
        let _ = nix::sys::wait::waitpid(pid, None);
        let source = io::Error::from_raw_os_error(errno);
        return Err(match failed_step {
            STEP_NODE_GONE => LaunchError::NodeGone,
            STEP_WORKING_DIR => LaunchError::WorkingDir {
                dir: spec.working_dir.clone().unwrap_or_default(),
                source,
            },
            STEP_EXEC => LaunchError::Exec { program: spec.program.clone(), source },
            step => LaunchError::Child { step: step_name(step), source },
        });
    }
    // SAFETY: the AsyncFd owns the pidfd, which stays open and the same until it is dropped.
    let registered = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) };
    let registered = registered.map_err(|err| err.into_parts());
    let pipes = pipe::Receiver::from_owned_fd(stdout_read)
        .and_then(|stdout| Ok((stdout, pipe::Receiver::from_owned_fd(stderr_read)?)));
    match (registered, pipes) {
        (Ok(pidfd), Ok((stdout, stderr))) => Ok(LaunchedProcess {
            pid,
            pidfd,
            stdout: Some(stdout),
            stderr: Some(stderr),
            reaped: false,
        }),
        (Err((_, err)), _) | (_, Err(err)) => {
            // Started, but it cannot be watched: it must not run unseen.
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            Err(LaunchError::Prepare(err))
        }
    }
}

fn step_name(step: libc::c_int) -> &'static str {
    match step {
        STEP_PROCESS_GROUP => "start a process group",
        STEP_DEATH_SIGNAL => "ask to die with the node",
        STEP_STDIO => "connect stdin, stdout and stderr",
        STEP_SIGNAL_MASK => "unblock signals",
        _ => "start",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh_spec(script: &str) -> LaunchSpec {
        LaunchSpec {
            program: crate::executor::programs::ProgramFinder::for_this_node()
                .find("sh", None, None)
                .unwrap(),
            args: ["sh", "-c", script, "zero"].map(OsString::from).to_vec(),
            env: vec![
                EnvVar::new("X".as_ref(), "from the task".as_ref()).unwrap(),
                EnvVar::new("PATH".as_ref(), "/usr/bin:/bin".as_ref()).unwrap(),
            ],
            working_dir: None,
        }
    }

    /// A signal mask line of /proc/PID/status, as a number.
    fn signal_mask(status: &str, field: &str) -> u64 {
        let line = status.lines().find(|line| line.starts_with(field)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    }

    #[tokio::test]
    async fn a_program_gets_its_arguments_environment_directory_group_and_default_signals() {
        let dir = tempfile::tempdir().unwrap();
        // The shell prints its own status with builtins: `cat` would read
        // it while a shell that vforks `cat` still blocks every signal
        // (dash does, until the child has exec'ed).
        let mut spec = sh_spec(
            "echo \"$0 $X $(pwd)\"; echo oops >&2; cut -d' ' -f5 /proc/$$/stat; \
             while IFS= read -r line; do printf '%s\\n' \"$line\"; done < /proc/$$/status; exit 3",
        );
        spec.working_dir = Some(dir.path().to_path_buf());
        let mut process = spawn(&spec).unwrap();
        let pid = process.pid().as_raw();
        let (mut stdout, mut stderr) = (String::new(), String::new());
        use tokio::io::AsyncReadExt as _;
        process.stdout.take().unwrap().read_to_string(&mut stdout).await.unwrap();
        process.stderr.take().unwrap().read_to_string(&mut stderr).await.unwrap();
        let status = process.wait().await.unwrap();
        assert_eq!(status.code(), Some(3));
        let mut lines = stdout.lines();
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(lines.next().unwrap(), format!("zero from the task {}", cwd.display()));
        assert_eq!(stderr, "oops\n");
        assert_eq!(lines.next().unwrap(), pid.to_string(), "it leads a process group of its own");
        let child_status: String = lines.collect::<Vec<_>>().join("\n");
        assert_eq!(signal_mask(&child_status, "SigBlk:"), 0, "no signal stays blocked");
        // The test binary ignores SIGPIPE, as every Rust program does; the
        // task gets the default back and inherits any other choice.
        let ours = std::fs::read_to_string("/proc/self/status").unwrap();
        let sigpipe = 1 << (libc::SIGPIPE - 1);
        assert_ne!(signal_mask(&ours, "SigIgn:") & sigpipe, 0);
        assert_eq!(signal_mask(&child_status, "SigIgn:"), signal_mask(&ours, "SigIgn:") & !sigpipe);
    }

    #[test]
    fn a_program_dies_with_the_thread_that_started_it() {
        let pid = std::thread::spawn(|| {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let process = spawn(&sh_spec("exec sleep 30")).unwrap();
                let pid = process.pid();
                // Neither killed nor reaped here: only its death signal ends it.
                std::mem::forget(process);
                pid
            })
        })
        .join()
        .unwrap();
        let started = std::time::Instant::now();
        let status = nix::sys::wait::waitpid(pid, None).unwrap();
        assert_eq!(status, nix::sys::wait::WaitStatus::Signaled(pid, Signal::SIGKILL, false));
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_step_that_fails_in_the_child_is_a_clear_error() {
        let mut spec = sh_spec("true");
        spec.working_dir = Some("/no/such/directory".into());
        let err = spawn(&spec).err().unwrap();
        assert!(matches!(&err, LaunchError::WorkingDir { .. }), "{err}");
        assert!(err.to_string().contains("No such file or directory"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "not a program").unwrap();
        let spec = LaunchSpec { program: plain, ..sh_spec("true") };
        let err = spawn(&spec).err().unwrap();
        assert!(matches!(&err, LaunchError::Exec { .. }), "{err}");
        assert!(err.to_string().contains("Permission denied"), "{err}");
    }

    #[tokio::test]
    async fn what_cannot_be_passed_to_a_program_is_refused_before_it_starts() {
        let mut spec = sh_spec("true");
        spec.args.push("a\0b".into());
        assert!(matches!(spawn(&spec), Err(LaunchError::NulByte { what: "an argument" })));
        let refused = EnvVar::new("A=B".as_ref(), "c".as_ref());
        assert!(matches!(refused, Err(LaunchError::BadVariableName(name)) if name == "A=B"));
        let refused = EnvVar::new("".as_ref(), "c".as_ref());
        assert!(matches!(refused, Err(LaunchError::BadVariableName(name)) if name.is_empty()));
        let refused = EnvVar::new("A".as_ref(), "c\0d".as_ref());
        assert!(matches!(refused, Err(LaunchError::NulByte { what: "an environment variable" })));
        let accepted = EnvVar::new("A".as_ref(), "b=c".as_ref()).unwrap();
        assert_eq!(accepted.name(), b"A");
    }
}

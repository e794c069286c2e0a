//! Command-line parsing and the client commands.

mod output;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context as _, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use taskraft::client::{Client, ENDPOINTS_DEFAULT, MESSAGE_BYTES_MAX, WatchCursor, request};
use taskraft::config::NodeConfig;
use taskraft::proto::taskraft_v1 as pb;
use taskraft::proto::taskraft_v1::cluster_client::ClusterClient;
use taskraft::proto::taskraft_v1::tasks_client::TasksClient;
use taskraft::scheduler::TaskState;
use tracing_subscriber::EnvFilter;

use crate::cli::output::Printer;

#[derive(Parser, Debug)]
#[command(name = "taskraft", version, about = "A highly available task scheduler on Raft")]
pub struct Cli {
    /// Client API addresses of the cluster's nodes, tried in turn.
    #[arg(long, global = true, env = "TASKRAFT_ENDPOINTS", value_delimiter = ',', default_value = ENDPOINTS_DEFAULT)]
    endpoints: Vec<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// How long a command keeps retrying while no leader answers.
    #[arg(long, global = true, value_parser = parse_duration, default_value = "15s")]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a node of the cluster until SIGTERM or Ctrl-C.
    Node(Box<NodeArgs>),
    /// Submits a task: `taskraft submit [OPTIONS] -- PROGRAM [ARGS...]`.
    Submit(SubmitArgs),
    /// Shows one task, with its attempts.
    Get {
        id: String,
        /// Read this node's state without confirming leadership.
        #[arg(long)]
        stale: bool,
    },
    /// Lists tasks, in id order.
    List(ListArgs),
    /// Cancels a task that has not finished.
    Cancel { id: String },
    /// Streams task changes: of one task, or of all tasks.
    Watch {
        id: Option<String>,
        /// Start after this revision (0: only new changes).
        #[arg(long, default_value_t = 0)]
        after_revision: u64,
    },
    /// Waits until a task is finished; exits 0 only if it SUCCEEDED.
    Wait {
        id: String,
        /// Give up after this long (default: wait forever).
        #[arg(long = "for", value_parser = parse_duration)]
        wait_for: Option<Duration>,
    },
    /// Periodic tasks: a task submitted again on a cron expression or an interval.
    #[command(subcommand)]
    Periodic(PeriodicCommand),
    /// Queues: their limits, and their ready and active tasks.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Inspects and changes the cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Subcommand, Debug)]
enum PeriodicCommand {
    /// Creates a periodic task, or replaces the one of that name:
    /// `taskraft periodic put NAME (--cron EXPR | --every D) [OPTIONS] -- PROGRAM [ARGS...]`.
    Put(PeriodicPutArgs),
    /// Lists the periodic tasks, by name.
    List {
        #[arg(long)]
        stale: bool,
    },
    /// Removes a periodic task; the tasks it fired stay.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
enum QueueCommand {
    /// Limits how many tasks of a queue are ASSIGNED or RUNNING at once,
    /// across the cluster (0 pauses it), or lifts the limit.
    Limit {
        queue: String,
        #[arg(long, required_unless_present = "unlimited", conflicts_with = "unlimited")]
        running_max: Option<u32>,
        /// Lift the limit.
        #[arg(long)]
        unlimited: bool,
    },
    /// Lists the queues that have a limit, ready tasks or active tasks.
    List {
        #[arg(long)]
        stale: bool,
    },
}

#[derive(Args, Debug)]
struct PeriodicPutArgs {
    /// 1 to 128 letters, digits, '-', '_' and '.'.
    name: String,
    /// A cron expression in UTC: minute hour day-of-month month day-of-week
    /// ('*/5 * * * *', '0 9 * * MON-FRI'), or @hourly, @daily, @weekly, @monthly, @yearly.
    #[arg(long, required_unless_present = "every", conflicts_with = "every")]
    cron: Option<String>,
    /// A fixed interval from now, at least 1s: 30s, 5m, 1h.
    #[arg(long, value_parser = parse_duration)]
    every: Option<Duration>,
    /// Skip a fire while the task of the fire before has not finished.
    #[arg(long)]
    forbid_overlap: bool,
    #[command(flatten)]
    task: TaskArgs,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Every node's role and Raft progress.
    Status,
    /// Adds a node, first as a learner, then as a voter.
    AddNode {
        id: u64,
        #[arg(long)]
        api_addr: String,
        #[arg(long)]
        raft_addr: String,
    },
    /// Removes a node from the cluster.
    RemoveNode { id: u64 },
    /// Hands leadership to another voter.
    TransferLeader { to: u64 },
    /// Stops new assignments to a node; its running attempts finish.
    Drain { id: u64 },
    /// Resumes assignments to a drained node.
    Undrain { id: u64 },
    /// Builds a snapshot on the first node of --endpoints that answers, which
    /// also compacts its log; waits up to --timeout for it to be on disk.
    Snapshot,
}

#[derive(Args, Debug)]
struct NodeArgs {
    /// A TOML config file; flags and TASKRAFT_* variables override it.
    #[arg(long, env = "TASKRAFT_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "TASKRAFT_NODE_ID")]
    id: Option<u64>,
    #[arg(long, env = "TASKRAFT_API_ADDR")]
    api_addr: Option<String>,
    #[arg(long, env = "TASKRAFT_RAFT_ADDR")]
    raft_addr: Option<String>,
    /// Serve Prometheus metrics over HTTP at /metrics on this IP:PORT.
    #[arg(long, env = "TASKRAFT_METRICS_ADDR")]
    metrics_addr: Option<String>,
    #[arg(long, env = "TASKRAFT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Members of a new cluster: ID=API_ADDR/RAFT_ADDR,...
    #[arg(long, env = "TASKRAFT_INITIAL_CLUSTER")]
    initial_cluster: Option<String>,
    /// Executor slots (0: the number of CPUs).
    #[arg(long, env = "TASKRAFT_SLOTS")]
    slots: Option<u32>,
    /// Worker threads of the node's async runtime (0: the number of CPUs).
    #[arg(long, env = "TASKRAFT_WORKER_THREADS")]
    worker_threads: Option<u32>,
    /// A label of this node, KEY=VALUE; repeatable.
    #[arg(long = "label", env = "TASKRAFT_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    #[arg(long, env = "TASKRAFT_HEARTBEAT_INTERVAL_MS")]
    heartbeat_interval_ms: Option<u64>,
    /// The leader lease; a silent leader is replaced after 1.5 to 2 times this.
    #[arg(long, env = "TASKRAFT_ELECTION_TIMEOUT_MS")]
    election_timeout_ms: Option<u64>,
    /// Build a snapshot after this many log entries.
    #[arg(long, env = "TASKRAFT_SNAPSHOT_AFTER_ENTRIES")]
    snapshot_after_entries: Option<u64>,
    /// Build a snapshot after this many bytes of log entries.
    #[arg(long, env = "TASKRAFT_SNAPSHOT_AFTER_LOG_BYTES")]
    snapshot_after_log_bytes: Option<u64>,
    /// Log entries kept behind a snapshot.
    #[arg(long, env = "TASKRAFT_SNAPSHOT_KEEP_ENTRIES")]
    snapshot_keep_entries: Option<u64>,
    /// The most bytes of log entries kept behind a snapshot.
    #[arg(long, env = "TASKRAFT_SNAPSHOT_KEEP_BYTES_MAX")]
    snapshot_keep_bytes_max: Option<u64>,
    /// Tasks not yet finished, across all queues.
    #[arg(long, env = "TASKRAFT_QUEUED_TASKS_MAX")]
    queued_tasks_max: Option<u64>,
    /// An executor that cannot renew its lease for this long kills its attempts.
    #[arg(long, env = "TASKRAFT_LEASE_MS")]
    lease_ms: Option<u64>,
    /// How long finished tasks are kept.
    #[arg(long, env = "TASKRAFT_RETENTION_MS")]
    retention_ms: Option<u64>,
    /// How often the leader purges finished tasks past their retention.
    #[arg(long, env = "TASKRAFT_PURGE_INTERVAL_MS")]
    purge_interval_ms: Option<u64>,
    /// The most attempts an executor queues per slot, to start when a slot frees (0: none).
    #[arg(long, env = "TASKRAFT_PREFETCH_PER_SLOT")]
    prefetch_per_slot: Option<u32>,
    /// An executor queues as much work as its slots run in this long, judged
    /// by its recent attempts (0: always prefetch-per-slot per slot).
    #[arg(long, env = "TASKRAFT_PREFETCH_WINDOW_MS")]
    prefetch_window_ms: Option<u64>,
    /// How long a program runs before its start is recorded (RUNNING); a
    /// shorter one is recorded once, when it ends (0: every start at once).
    #[arg(long, env = "TASKRAFT_START_REPORT_DELAY_MS")]
    start_report_delay_ms: Option<u64>,
}

#[derive(Args, Debug)]
struct SubmitArgs {
    /// Run after this delay, e.g. 30s, 5m.
    #[arg(long, value_parser = parse_duration, conflicts_with = "at")]
    delay: Option<Duration>,
    /// Run at this time: RFC 3339 (2026-11-24T21:00:00Z) or Unix milliseconds.
    #[arg(long)]
    at: Option<String>,
    /// Idempotency key: submitting it again returns the same task. The CLI
    /// makes up one when none is given, so its own retries never duplicate.
    #[arg(long)]
    key: Option<String>,
    /// Run only after this task has succeeded (WAITING until then; CANCELLED
    /// if it fails or is cancelled); repeatable, or IDs separated by commas.
    #[arg(long = "after", value_name = "ID", value_delimiter = ',')]
    after: Vec<String>,
    /// Print only the task id.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    task: TaskArgs,
}

/// What a task runs and how, for `submit` and `periodic put`.
#[derive(Args, Debug)]
struct TaskArgs {
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Per-attempt timeout, e.g. 10m (default: 1h).
    #[arg(long = "task-timeout", value_parser = parse_duration)]
    task_timeout: Option<Duration>,
    /// Attempts in all (default: 3).
    #[arg(long)]
    max_attempts: Option<u32>,
    #[arg(long, default_value = "default")]
    queue: String,
    /// A label the running node must have, KEY=VALUE; repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// An environment variable for the task, NAME=VALUE; repeatable.
    #[arg(long = "env")]
    env: Vec<String>,
    /// Working directory of the task.
    #[arg(long)]
    workdir: Option<String>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
struct ListArgs {
    /// Only tasks in this state; repeatable (PENDING, READY, ...).
    #[arg(long = "state")]
    states: Vec<String>,
    #[arg(long)]
    queue: Option<String>,
    /// Tasks per page.
    #[arg(long, default_value_t = 100)]
    page_size: u32,
    /// Follow the pages to the end.
    #[arg(long)]
    all: bool,
    /// Start after this page token.
    #[arg(long)]
    page_token: Option<String>,
    #[arg(long)]
    stale: bool,
}

/// An error with the exit code it should end the process with.
pub struct Failure {
    pub error: anyhow::Error,
    pub exit_code: u8,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        let exit_code = match error.downcast_ref::<StatusError>().map(|status| status.0.code()) {
            Some(tonic::Code::InvalidArgument) => 2,
            Some(tonic::Code::NotFound) => 4,
            _ => 1,
        };
        Failure { error, exit_code }
    }
}

fn usage(message: String) -> Failure {
    Failure { error: anyhow!(message), exit_code: 2 }
}

/// A gRPC status as a CLI error: prints as "kind: message".
#[derive(Debug)]
struct StatusError(tonic::Status);

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", code_name(self.0.code()), self.0.message())
    }
}

impl std::error::Error for StatusError {}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(StatusError(status))
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::ResourceExhausted => "resource exhausted",
        tonic::Code::OutOfRange => "out of range",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded => "deadline exceeded",
        tonic::Code::Aborted => "aborted",
        _ => "error",
    }
}

/// What the binary was asked to do, with a node's configuration resolved
/// before the async runtime starts, since it sizes the runtime.
pub enum Job {
    Node(Box<NodeConfig>),
    Client(Box<Cli>),
}

impl Job {
    /// The worker threads the async runtime gets; `None`: tokio's default.
    pub fn runtime_worker_threads(&self) -> Option<usize> {
        match self {
            Job::Node(config) => Some(config.runtime_worker_threads()),
            Job::Client(_) => None,
        }
    }
}

/// Resolves a node's configuration, or passes a client command on.
pub fn prepare(cli: Cli) -> Result<Job, Failure> {
    match cli.command {
        Command::Node(args) => {
            init_logging("info");
            Ok(Job::Node(Box::new(node_config(*args)?)))
        }
        _ => Ok(Job::Client(Box::new(cli))),
    }
}

pub async fn run(job: Job) -> Result<ExitCode, Failure> {
    let cli = match job {
        Job::Node(config) => return run_node(*config).await,
        Job::Client(cli) => *cli,
    };
    init_logging("warn");
    // A snapshot of a large state takes a while: it gets the whole --timeout.
    let attempt_timeout = match cli.command {
        Command::Cluster(ClusterCommand::Snapshot) => cli.timeout,
        _ => Duration::from_secs(8).min(cli.timeout),
    };
    let mut client = Client::new(&cli.endpoints, cli.timeout, attempt_timeout)
        .map_err(|err| usage(err.to_string()))?;
    let printer = Printer::new(cli.output);
    match cli.command {
        Command::Node(_) => unreachable!("handled above"),
        Command::Submit(args) => submit(&mut client, &printer, args).await,
        Command::Get { id, stale } => {
            let task = get(&mut client, &id, stale).await?;
            printer.task(&task);
            Ok(ExitCode::SUCCESS)
        }
        Command::List(args) => list(&mut client, &printer, args).await,
        Command::Cancel { id } => {
            let reply = client
                .call(|channel, timeout| {
                    let message = pb::CancelTaskRequest { id: id.clone() };
                    async move { tasks(channel).cancel_task(request(message, timeout)).await }
                })
                .await
                .map_err(status_error)?;
            printer.task(&reply.into_inner().task.unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { id, after_revision } => {
            watch(&mut client, &printer, id, after_revision, None).await
        }
        Command::Wait { id, wait_for } => wait(&mut client, &printer, id, wait_for).await,
        Command::Periodic(command) => periodic(&mut client, &printer, command).await,
        Command::Queue(command) => queue(&mut client, &printer, command).await,
        Command::Cluster(command) => cluster(&mut client, &printer, command).await,
    }
}

async fn queue(
    client: &mut Client,
    printer: &Printer,
    command: QueueCommand,
) -> Result<ExitCode, Failure> {
    match command {
        QueueCommand::Limit { queue, running_max, unlimited: _ } => {
            // Setting a limit is idempotent: the client's retries are harmless.
            let reply = client
                .call(|channel, timeout| {
                    let message = pb::SetQueueLimitRequest { queue: queue.clone(), running_max };
                    async move { tasks(channel).set_queue_limit(request(message, timeout)).await }
                })
                .await
                .map_err(status_error)?;
            printer.queue_rows(&[reply.into_inner().queue.unwrap_or_default()], true);
        }
        QueueCommand::List { stale } => {
            let mut page_token = String::new();
            let mut first_page = true;
            loop {
                let reply = client
                    .call(|channel, timeout| {
                        let message = pb::ListQueuesRequest {
                            page_size: 0,
                            page_token: page_token.clone(),
                            stale,
                        };
                        async move { tasks(channel).list_queues(request(message, timeout)).await }
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                printer.queue_rows(&reply.queues, first_page);
                first_page = false;
                if reply.next_page_token.is_empty() {
                    break;
                }
                page_token = reply.next_page_token;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn periodic(
    client: &mut Client,
    printer: &Printer,
    command: PeriodicCommand,
) -> Result<ExitCode, Failure> {
    match command {
        PeriodicCommand::Put(args) => {
            let cadence = match (&args.cron, args.every) {
                (Some(cron), _) => pb::periodic_task::Cadence::Cron(cron.clone()),
                (None, Some(every)) => {
                    pb::periodic_task::Cadence::EveryMs(every.as_millis() as u64)
                }
                (None, None) => return Err(usage("give --cron or --every".into())),
            };
            let overlap =
                if args.forbid_overlap { pb::Overlap::Forbid } else { pb::Overlap::Allow };
            let periodic = pb::PeriodicTask {
                name: args.name.clone(),
                cadence: Some(cadence),
                overlap: overlap as i32,
                spec: Some(spec_from_args(&args.task)?),
                ..pb::PeriodicTask::default()
            };
            // A put replaces by name, so the client's retries are harmless.
            let reply = client
                .call(|channel, timeout| {
                    let message = pb::PutPeriodicRequest { periodic: Some(periodic.clone()) };
                    async move { tasks(channel).put_periodic(request(message, timeout)).await }
                })
                .await
                .map_err(status_error)?;
            printer.periodic(&reply.into_inner().periodic.unwrap_or_default(), "put");
        }
        PeriodicCommand::Delete { name } => {
            let reply = client
                .call(|channel, timeout| {
                    let message = pb::DeletePeriodicRequest { name: name.clone() };
                    async move { tasks(channel).delete_periodic(request(message, timeout)).await }
                })
                .await
                .map_err(status_error)?;
            printer.periodic(&reply.into_inner().periodic.unwrap_or_default(), "deleted");
        }
        PeriodicCommand::List { stale } => {
            let mut page_token = String::new();
            let mut first_page = true;
            loop {
                let reply = client
                    .call(|channel, timeout| {
                        let message = pb::ListPeriodicRequest {
                            page_size: 0,
                            page_token: page_token.clone(),
                            stale,
                        };
                        async move { tasks(channel).list_periodic(request(message, timeout)).await }
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                printer.periodic_rows(&reply.periodics, first_page);
                first_page = false;
                if reply.next_page_token.is_empty() {
                    break;
                }
                page_token = reply.next_page_token;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn init_logging(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only for a terminal: a node's log usually goes to a file, where
    // escape codes get in the way of grep and of log shippers.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

fn tasks(channel: tonic::transport::Channel) -> TasksClient<tonic::transport::Channel> {
    TasksClient::new(channel)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX)
}

fn cluster_client(channel: tonic::transport::Channel) -> ClusterClient<tonic::transport::Channel> {
    ClusterClient::new(channel).max_decoding_message_size(MESSAGE_BYTES_MAX)
}

/// A node's configuration: defaults, then its file, then variables and flags.
fn node_config(args: NodeArgs) -> Result<NodeConfig, Failure> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::from_file(path).map_err(|err| usage(err.to_string()))?,
        None => NodeConfig::default(),
    };
    macro_rules! set {
        ($field:expr, $value:expr) => {
            if let Some(value) = $value {
                $field = value;
            }
        };
    }
    set!(config.node_id, args.id);
    set!(config.api_addr, args.api_addr);
    set!(config.raft_addr, args.raft_addr);
    set!(config.metrics_addr, args.metrics_addr);
    set!(config.data_dir, args.data_dir);
    set!(config.initial_cluster, args.initial_cluster);
    set!(config.slots, args.slots);
    set!(config.worker_threads, args.worker_threads);
    set!(config.raft.heartbeat_interval_ms, args.heartbeat_interval_ms);
    set!(config.raft.election_timeout_ms, args.election_timeout_ms);
    set!(config.raft.snapshot_after_entries, args.snapshot_after_entries);
    set!(config.raft.snapshot_after_log_bytes, args.snapshot_after_log_bytes);
    set!(config.raft.snapshot_keep_entries, args.snapshot_keep_entries);
    set!(config.raft.snapshot_keep_bytes_max, args.snapshot_keep_bytes_max);
    set!(config.limits.queued_tasks_max, args.queued_tasks_max);
    set!(config.execution.lease_ms, args.lease_ms);
    set!(config.execution.retention_ms, args.retention_ms);
    set!(config.execution.purge_interval_ms, args.purge_interval_ms);
    set!(config.execution.prefetch_per_slot, args.prefetch_per_slot);
    set!(config.execution.prefetch_window_ms, args.prefetch_window_ms);
    set!(config.execution.start_report_delay_ms, args.start_report_delay_ms);
    for label in &args.labels {
        let (key, value) = split_pair(label, "label").map_err(usage)?;
        config.labels.insert(key, value);
    }
    config.validate().map_err(|err| usage(err.to_string()))?;
    Ok(config)
}

async fn run_node(config: NodeConfig) -> Result<ExitCode, Failure> {
    taskraft::node::run(config, shutdown_signal()).await.context("the node failed")?;
    Ok(ExitCode::SUCCESS)
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(signal) => signal,
        Err(err) => {
            tracing::error!(cause = %err, "cannot listen for SIGTERM; only Ctrl-C stops the node");
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = sigterm.recv() => {}
    }
}

fn split_pair(text: &str, what: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{what} {text:?} is not KEY=VALUE")),
    }
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("{text:?} is not a duration like 500ms, 10s or 5m: {err}"))
}

fn parse_time_ms(text: &str) -> Result<u64, String> {
    if let Ok(unix_ms) = text.parse::<u64>() {
        return Ok(unix_ms);
    }
    let time = humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!("{text:?} is neither RFC 3339 (2026-11-24T21:00:00Z) nor Unix milliseconds")
    })?;
    time.duration_since(UNIX_EPOCH)
        .map(|since| since.as_millis() as u64)
        .map_err(|_| format!("{text:?} is before 1970"))
}

/// The spec of `args`, to run now, with no idempotency key.
fn spec_from_args(args: &TaskArgs) -> Result<pb::TaskSpec, Failure> {
    let (program, rest) =
        args.command.split_first().ok_or_else(|| usage("no program given after --".into()))?;
    let env: HashMap<String, String> = args
        .env
        .iter()
        .map(|pair| split_pair(pair, "environment variable"))
        .collect::<Result<_, _>>()
        .map_err(usage)?;
    let labels: HashMap<String, String> = args
        .labels
        .iter()
        .map(|pair| split_pair(pair, "label"))
        .collect::<Result<_, _>>()
        .map_err(usage)?;
    Ok(pb::TaskSpec {
        queue: args.queue.clone(),
        priority: args.priority,
        schedule: None,
        command: Some(pb::Command {
            program: program.clone(),
            args: rest.to_vec(),
            env,
            working_dir: args.workdir.clone().unwrap_or_default(),
        }),
        timeout_ms: args.task_timeout.map_or(0, |timeout| timeout.as_millis() as u64),
        max_attempts: args.max_attempts.unwrap_or(0),
        backoff: None,
        idempotency_key: String::new(),
        labels,
        after: Vec::new(),
        after_in_batch: Vec::new(),
    })
}

async fn submit(
    client: &mut Client,
    printer: &Printer,
    args: SubmitArgs,
) -> Result<ExitCode, Failure> {
    let mut spec = spec_from_args(&args.task)?;
    spec.schedule = match (&args.at, args.delay) {
        (Some(at), _) => {
            Some(pb::task_spec::Schedule::RunAtUnixMs(parse_time_ms(at).map_err(usage)?))
        }
        (None, Some(delay)) => Some(pb::task_spec::Schedule::DelayMs(delay.as_millis() as u64)),
        (None, None) => None,
    };
    spec.idempotency_key =
        args.key.clone().unwrap_or_else(|| taskraft::client::fresh_idempotency_key("cli"));
    spec.after = args.after.clone();
    let reply = client
        .call(|channel, timeout| {
            let message = pb::SubmitTaskRequest { spec: Some(spec.clone()) };
            async move { tasks(channel).submit_task(request(message, timeout)).await }
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let task = reply.task.unwrap_or_default();
    if args.quiet {
        printer.line(&task.id);
    } else {
        printer.submitted(&task, reply.already_existed);
    }
    Ok(ExitCode::SUCCESS)
}

async fn get(client: &mut Client, id: &str, stale: bool) -> Result<pb::Task, Failure> {
    let reply = client
        .call(|channel, timeout| {
            let message = pb::GetTaskRequest { id: id.to_owned(), stale };
            async move { tasks(channel).get_task(request(message, timeout)).await }
        })
        .await
        .map_err(status_error)?;
    Ok(reply.into_inner().task.unwrap_or_default())
}

async fn list(client: &mut Client, printer: &Printer, args: ListArgs) -> Result<ExitCode, Failure> {
    let states = args
        .states
        .iter()
        .map(|name| {
            TaskState::from_name(name)
                .map(|state| taskraft::api::convert::state_to_pb(state) as i32)
                .ok_or_else(|| usage(format!("{name:?} is not a task state")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut page_token = args.page_token.clone().unwrap_or_default();
    let mut first_page = true;
    let mut n_listed: u32 = 0;
    loop {
        // A filtered page may come back short, even empty, with a token
        // (the server looks at a bounded number of tasks per call): without
        // --all, ask on until the page the user asked for is full.
        let page_size =
            if args.all { args.page_size } else { args.page_size.saturating_sub(n_listed) };
        let reply = client
            .call(|channel, timeout| {
                let message = pb::ListTasksRequest {
                    states: states.clone(),
                    queue: args.queue.clone().unwrap_or_default(),
                    page_size,
                    page_token: page_token.clone(),
                    stale: args.stale,
                };
                async move { tasks(channel).list_tasks(request(message, timeout)).await }
            })
            .await
            .map_err(status_error)?
            .into_inner();
        printer.task_rows(&reply.tasks, first_page);
        first_page = false;
        n_listed = n_listed.saturating_add(reply.tasks.len() as u32);
        if reply.next_page_token.is_empty() {
            break;
        }
        if !args.all && n_listed >= args.page_size {
            printer.note(&format!("more: --page-token {} (or --all)", reply.next_page_token));
            break;
        }
        page_token = reply.next_page_token;
    }
    Ok(ExitCode::SUCCESS)
}

/// Streams events, resuming on another node when the stream breaks. With
/// `until_terminal`, stops at the first event that shows the task finished
/// and returns it.
async fn watch(
    client: &mut Client,
    printer: &Printer,
    id: Option<String>,
    after_revision: u64,
    until_terminal: Option<&mut Option<pb::Task>>,
) -> Result<ExitCode, Failure> {
    let mut finished = until_terminal;
    let mut cursor = WatchCursor::after(after_revision);
    loop {
        let task_id = id.clone().unwrap_or_default();
        let after_revision = cursor.resume_after();
        let stream = client
            .call(|channel, _| {
                let message = pb::WatchTasksRequest { task_id: task_id.clone(), after_revision };
                // No deadline on the stream itself: it lasts as long as the user wants.
                async move { tasks(channel).watch_tasks(tonic::Request::new(message)).await }
            })
            .await
            .map_err(status_error)?;
        cursor.started(stream.metadata());
        let mut stream = stream.into_inner();
        loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    let task = event.task.unwrap_or_default();
                    if !cursor.admit(event.revision, &task.id) {
                        continue;
                    }
                    match finished.as_deref_mut() {
                        Some(slot) => {
                            if is_terminal(task.state) {
                                *slot = Some(task);
                                return Ok(ExitCode::SUCCESS);
                            }
                        }
                        None => printer.event(event.revision, &task),
                    }
                }
                Some(Err(status))
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::NotFound
                            | tonic::Code::OutOfRange
                    ) =>
                {
                    return Err(status_error(status).into());
                }
                Some(Err(status)) => {
                    tracing::info!(cause = %status.message(), after_revision, "watch stream broke; resuming");
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_terminal(state: i32) -> bool {
    matches!(
        pb::TaskState::try_from(state),
        Ok(pb::TaskState::Succeeded | pb::TaskState::Failed | pb::TaskState::Cancelled)
    )
}

async fn wait(
    client: &mut Client,
    printer: &Printer,
    id: String,
    wait_for: Option<Duration>,
) -> Result<ExitCode, Failure> {
    let waiting = async {
        // Read first: the task may have finished long ago.
        let task = get(client, &id, false).await?;
        if is_terminal(task.state) {
            return Ok::<_, Failure>(task);
        }
        let mut finished = None;
        watch(client, printer, Some(id.clone()), task.revision, Some(&mut finished)).await?;
        finished.ok_or_else(|| anyhow!("the watch ended without a finished task").into())
    };
    let task = match wait_for {
        None => waiting.await?,
        Some(limit) => tokio::time::timeout(limit, waiting).await.map_err(|_| {
            anyhow!("task {id} did not finish within {}", humantime::format_duration(limit))
        })??,
    };
    printer.task(&task);
    if task.state == pb::TaskState::Succeeded as i32 {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(3))
    }
}

async fn cluster(
    client: &mut Client,
    printer: &Printer,
    command: ClusterCommand,
) -> Result<ExitCode, Failure> {
    let status = match command {
        ClusterCommand::Status => client
            .call(|channel, timeout| async move {
                cluster_client(channel)
                    .status(request(pb::StatusRequest { local_only: false }, timeout))
                    .await
            })
            .await
            .map_err(status_error)?
            .into_inner(),
        ClusterCommand::AddNode { id, api_addr, raft_addr } => client
            .call(|channel, timeout| {
                let message = pb::AddNodeRequest {
                    node_id: id,
                    api_addr: api_addr.clone(),
                    raft_addr: raft_addr.clone(),
                };
                async move { cluster_client(channel).add_node(request(message, timeout)).await }
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .status
            .unwrap_or_default(),
        ClusterCommand::RemoveNode { id } => client
            .call(|channel, timeout| async move {
                cluster_client(channel)
                    .remove_node(request(pb::RemoveNodeRequest { node_id: id }, timeout))
                    .await
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .status
            .unwrap_or_default(),
        ClusterCommand::Drain { id } | ClusterCommand::Undrain { id } => {
            let draining = matches!(command, ClusterCommand::Drain { .. });
            let reply = client
                .call(|channel, timeout| async move {
                    let message = pb::DrainRequest { node_id: id, draining };
                    cluster_client(channel).drain(request(message, timeout)).await
                })
                .await
                .map_err(status_error)?
                .into_inner();
            printer.drained(reply.node_id, reply.draining);
            return Ok(ExitCode::SUCCESS);
        }
        ClusterCommand::Snapshot => {
            let reply = client
                .call(|channel, timeout| async move {
                    cluster_client(channel).snapshot(request(pb::SnapshotRequest {}, timeout)).await
                })
                .await
                .map_err(status_error)?
                .into_inner();
            printer.snapshot(&reply);
            return Ok(ExitCode::SUCCESS);
        }
        ClusterCommand::TransferLeader { to } => {
            let reply = client
                .call(|channel, timeout| async move {
                    let message = pb::TransferLeaderRequest { to_node_id: to };
                    cluster_client(channel).transfer_leader(request(message, timeout)).await
                })
                .await
                .map_err(status_error)?
                .into_inner();
            printer.leader(reply.leader_id);
            return Ok(ExitCode::SUCCESS);
        }
    };
    printer.status(&status);
    Ok(ExitCode::SUCCESS)
}

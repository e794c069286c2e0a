//! A harness that runs the real `taskraft` binary as a cluster of processes
//! on 127.0.0.1, for the tests in `tests/it`.
//!
//! Each [`TestCluster`] owns a temporary directory (data and one log file per
//! node) and the child handles of its nodes. It signals only those children,
//! by handle or by their own PIDs, and kills them all when dropped; if the
//! test is failing, it prints the tail of every node's log first. Clusters run
//! one at a time (a process-wide lock), since two cores cannot host several
//! clusters without spurious elections.
//!
//! The binary is `$TASKRAFT_BIN` when set; otherwise the harness builds it
//! once with `cargo build --release --bin taskraft`.
//!
//! [`history`] and [`checker`] record a run Jepsen-style and judge it against
//! taskraft's promises; `check-history` runs the checker on a saved history.

pub mod checker;
pub mod history;
pub mod netns;
pub mod power_cut;
pub mod seeded;
pub mod sim;
pub mod whole_cluster;
pub mod witness;
pub mod workload;

#[cfg(test)]
mod checker_tests;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use taskraft::client::Client;
use taskraft::proto::taskraft_v1 as pb;
use taskraft::proto::taskraft_v1::cluster_client::ClusterClient;
use taskraft::proto::taskraft_v1::tasks_client::TasksClient;
use tempfile::TempDir;
use tonic::transport::Channel;

/// Serializes clusters across the tests of one process.
static CLUSTER_LOCK: Mutex<()> = Mutex::new(());
static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// How long a node may take to answer after it was started.
pub const NODE_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The path of the `taskraft` binary, built on first use.
pub fn binary() -> anyhow::Result<PathBuf> {
    let result = BINARY.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("cluster-tests sits in the workspace");
        if let Ok(path) = std::env::var("TASKRAFT_BIN") {
            // A relative path is taken from the workspace root, not the test's directory.
            return Ok(workspace.join(path));
        }
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet", "--bin", "taskraft"])
            .current_dir(workspace)
            .status()
            .map_err(|err| format!("cannot run cargo: {err}"))?;
        if !status.success() {
            return Err(format!("cargo build of taskraft failed: {status}"));
        }
        Ok(workspace.join("target/release/taskraft"))
    });
    result.clone().map_err(|err| anyhow!(err))
}

/// Ports the OS says are free now. Bound together so they differ.
fn free_ports(n_ports: usize) -> anyhow::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> =
        (0..n_ports).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    listeners.iter().map(|listener| Ok(listener.local_addr()?.port())).collect()
}

pub struct TestNode {
    pub id: u64,
    pub api_addr: String,
    pub raft_addr: String,
    /// Where the node serves its Prometheus metrics (`--metrics-addr`).
    pub metrics_addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// Started without an initial cluster, to be added with `AddNode`.
    joins: bool,
    child: Option<Child>,
}

impl TestNode {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct TestCluster {
    /// The `taskraft` binary the nodes run from.
    binary: PathBuf,
    pub nodes: Vec<TestNode>,
    initial_cluster: String,
    /// Where the nodes' data directories are.
    data_root: PathBuf,
    extra_args: Vec<String>,
    /// The namespaces the nodes run in, when the cluster was started in
    /// them; one more than the initial nodes, for a node that joins.
    pub netns: Option<netns::Netns>,
    dir: TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl TestCluster {
    /// Starts `n_nodes` nodes on 127.0.0.1 that form a new cluster, and waits for a leader.
    pub async fn start(n_nodes: usize, extra_args: &[&str]) -> anyhow::Result<TestCluster> {
        TestCluster::start_with(n_nodes, extra_args, false, None, binary()?).await
    }

    /// Like [`TestCluster::start`], with the nodes' data directories under
    /// `data_root` (a [`power_cut::PowerCutDisk`], say); their logs stay in
    /// the cluster's temporary directory.
    pub async fn start_with_data_in(
        n_nodes: usize,
        extra_args: &[&str],
        data_root: &Path,
    ) -> anyhow::Result<TestCluster> {
        TestCluster::start_with(n_nodes, extra_args, false, Some(data_root), binary()?).await
    }

    /// Like [`TestCluster::start`], each node in a network namespace of its
    /// own, so that the network between them can be cut (see [`netns::Netns`]).
    pub async fn start_in_netns(
        n_nodes: usize,
        extra_args: &[&str],
    ) -> anyhow::Result<TestCluster> {
        TestCluster::start_with(n_nodes, extra_args, true, None, binary()?).await
    }

    async fn start_with(
        n_nodes: usize,
        extra_args: &[&str],
        in_netns: bool,
        data_root: Option<&Path>,
        binary: PathBuf,
    ) -> anyhow::Result<TestCluster> {
        let serial = CLUSTER_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let netns = if in_netns { Some(netns::Netns::create(n_nodes as u64 + 1)?) } else { None };
        let dir = tempfile::Builder::new().prefix("taskraft-cluster-").tempdir()?;
        let data_root = data_root.unwrap_or(dir.path()).to_path_buf();
        let ports = free_ports(n_nodes * 3)?;
        let addr = |idx: usize, port_idx: usize| match &netns {
            Some(netns) => format!("{}:{}", netns.ip(idx as u64 + 1), [7001, 7101, 7201][port_idx]),
            None => format!("127.0.0.1:{}", ports[idx * 3 + port_idx]),
        };
        let nodes: Vec<TestNode> = (0..n_nodes)
            .map(|idx| {
                let id = idx as u64 + 1;
                TestNode {
                    id,
                    api_addr: addr(idx, 0),
                    raft_addr: addr(idx, 1),
                    metrics_addr: addr(idx, 2),
                    data_dir: data_root.join(format!("node{id}")),
                    log_path: dir.path().join(format!("node{id}.log")),
                    joins: false,
                    child: None,
                }
            })
            .collect();
        let initial_cluster = nodes
            .iter()
            .map(|node| format!("{}={}/{}", node.id, node.api_addr, node.raft_addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = TestCluster {
            binary,
            nodes,
            initial_cluster,
            data_root,
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
            netns,
            dir,
            _serial: serial,
        };
        for id in 1..=n_nodes as u64 {
            cluster.spawn(id)?;
        }
        cluster.wait_for_leader(NODE_READY_TIMEOUT).await?;
        Ok(cluster)
    }

    pub fn node(&self, id: u64) -> &TestNode {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: u64) -> &mut TestNode {
        &mut self.nodes[(id - 1) as usize]
    }

    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let binary = self.binary.clone();
        let initial_cluster = self.initial_cluster.clone();
        let extra_args = self.extra_args.clone();
        let node = self.node_mut(id);
        if node.child.is_some() {
            bail!("node {id} is running already");
        }
        let initial_cluster = if node.joins { String::new() } else { initial_cluster };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log_path)?;
        // In a namespace, `ip netns exec` execs the node in place: the child's PID is the node's.
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &netns.namespace(id)]).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        let node = &mut self.nodes[(id - 1) as usize];
        let child = command
            .arg("node")
            .args([
                "--id",
                &id.to_string(),
                "--api-addr",
                &node.api_addr,
                "--raft-addr",
                &node.raft_addr,
                "--metrics-addr",
                &node.metrics_addr,
            ])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--initial-cluster", &initial_cluster])
            .args(&extra_args)
            .env("RUST_LOG", std::env::var("TASKRAFT_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start node {id}"))?;
        node.child = Some(child);
        Ok(())
    }

    /// Starts a new, empty node that belongs to no cluster yet, and returns
    /// its id. Add it with `AddNode`.
    pub fn spawn_joining_node(&mut self) -> anyhow::Result<u64> {
        let id = self.nodes.len() as u64 + 1;
        let [api_addr, raft_addr, metrics_addr] = match &self.netns {
            Some(netns) => [7001, 7101, 7201].map(|port| format!("{}:{port}", netns.ip(id))),
            None => {
                let ports = free_ports(3)?;
                [0, 1, 2].map(|idx| format!("127.0.0.1:{}", ports[idx]))
            }
        };
        self.nodes.push(TestNode {
            id,
            api_addr,
            raft_addr,
            metrics_addr,
            data_dir: self.data_root.join(format!("node{id}")),
            log_path: self.dir.path().join(format!("node{id}.log")),
            joins: true,
            child: None,
        });
        self.spawn(id)?;
        Ok(id)
    }

    /// Runs the CLI against this cluster: exit code, stdout, stderr.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let output = Command::new(binary()?)
            .args(["--endpoints", &self.running_endpoints().join(","), "--timeout", "10s"])
            .args(args)
            .output()?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// Starts a stopped node again on its data.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.spawn(id)
    }

    /// SIGKILL, by the child handle.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.node_mut(id);
        let mut child = node.child.take().ok_or_else(|| anyhow!("node {id} is not running"))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGKILL to every running node at once, by child handle, then waits
    /// for them all: no node outlives another by more than the signals'
    /// delivery, as in a power cut.
    pub fn kill_all(&mut self) -> anyhow::Result<()> {
        let mut children: Vec<Child> =
            self.nodes.iter_mut().filter_map(|node| node.child.take()).collect();
        for child in &mut children {
            child.kill()?;
        }
        for child in &mut children {
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, by PID, then waits up to `timeout` for a clean exit.
    pub fn terminate(
        &mut self,
        id: u64,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(id, "TERM")?;
        let node = self.node_mut(id);
        let child = node.child.as_mut().ok_or_else(|| anyhow!("node {id} is not running"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                node.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("node {id} did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal to the node's own PID.
    pub fn signal(&self, id: u64, signal: &str) -> anyhow::Result<()> {
        let pid = self.node(id).pid().ok_or_else(|| anyhow!("node {id} is not running"))?;
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.api_addr.clone()).collect()
    }

    pub fn running_endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|node| node.is_running())
            .map(|node| node.api_addr.clone())
            .collect()
    }

    /// A client that tries every running node and follows the leader.
    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(&self.running_endpoints(), Duration::from_secs(15), Duration::from_secs(8))?)
    }

    /// A client of one node only, that retries for `retry_for`.
    pub fn node_client(&self, id: u64, retry_for: Duration) -> anyhow::Result<Client> {
        Ok(Client::new(&[self.node(id).api_addr.clone()], retry_for, Duration::from_secs(8))?)
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(&self.node(id).log_path).unwrap_or_default()
    }

    /// One node's own status, without asking the others.
    pub async fn local_status(&self, id: u64) -> anyhow::Result<pb::NodeInfo> {
        let channel = Channel::from_shared(format!("http://{}", self.node(id).api_addr))?
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await?;
        let mut request = tonic::Request::new(pb::StatusRequest { local_only: true });
        request.set_timeout(Duration::from_secs(2));
        let status = ClusterClient::new(channel).status(request).await?.into_inner();
        status.nodes.into_iter().next().ok_or_else(|| anyhow!("node {id} sent an empty status"))
    }

    /// A connection to node `id`'s client API.
    pub async fn api_channel(&self, id: u64) -> anyhow::Result<Channel> {
        connect_channel(&self.node(id).api_addr).await
    }

    /// A connection to node `id`'s peer (Raft) port.
    pub async fn raft_channel(&self, id: u64) -> anyhow::Result<Channel> {
        connect_channel(&self.node(id).raft_addr).await
    }

    /// Sends an executor request to node `id`'s peer port, as an executor would.
    pub async fn executor_request(
        &self,
        id: u64,
        request: &taskraft::executor::protocol::ExecutorRequest,
    ) -> anyhow::Result<taskraft::executor::protocol::ExecutorReply> {
        use taskraft::proto::peer_v1::{RaftMessage, raft_peer_client::RaftPeerClient};
        let channel = self.raft_channel(id).await?;
        let message = RaftMessage { data: taskraft::raft::codec::encode(request) };
        let reply = RaftPeerClient::new(channel).executor(message).await?.into_inner();
        Ok(taskraft::raft::codec::decode("executor reply", &reply.data)?)
    }

    /// Waits until the running nodes agree on one leader, and returns it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = BTreeMap::new();
            let mut n_answered = 0;
            for node in self.nodes.iter().filter(|node| node.is_running()) {
                if let Ok(info) = self.local_status(node.id).await {
                    n_answered += 1;
                    *leaders.entry(info.leader_id).or_insert(0) += 1;
                }
            }
            let n_running = self.nodes.iter().filter(|node| node.is_running()).count();
            if n_answered == n_running && leaders.len() == 1 {
                let (&leader, _) = leaders.iter().next().expect("one leader");
                if leader != 0 && self.node(leader).is_running() {
                    return Ok(leader);
                }
            }
            if Instant::now() > deadline {
                bail!("no agreed leader within {timeout:?}: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_for_applied(
        &self,
        id: u64,
        index: u64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let applied = self.local_status(id).await.map(|info| info.applied_index).unwrap_or(0);
            if applied >= index {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node {id} applied only {applied} of {index} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends `request_head` (an HTTP/1.1 request line and headers, without
    /// the blank line that ends them) to node `id`'s metrics address and
    /// returns the status code and the body of the answer.
    pub async fn metrics_http(&self, id: u64, request_head: &str) -> anyhow::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(&self.node(id).metrics_addr).await?;
            stream
                .write_all(format!("{request_head}\r\nConnection: close\r\n\r\n").as_bytes())
                .await?;
            let mut answer = Vec::new();
            stream.take(METRICS_ANSWER_BYTES_MAX).read_to_end(&mut answer).await?;
            anyhow::Ok(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .with_context(|| format!("node {id}'s metrics did not answer within 5 s"))??;
        let answer = String::from_utf8(answer).context("an answer that is not UTF-8")?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("an answer without a blank line after its head: {answer:?}"))?;
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow!("an answer without a status: {head:?}"))?;
        Ok((code, body.to_owned()))
    }

    /// Node `id`'s metrics (`GET /metrics`), as sample name (with its
    /// labels) to value.
    pub async fn metrics(&self, id: u64) -> anyhow::Result<BTreeMap<String, f64>> {
        let (code, body) = self
            .metrics_http(
                id,
                &format!("GET /metrics HTTP/1.1\r\nHost: {}", self.node(id).metrics_addr),
            )
            .await?;
        ensure!(code == 200, "node {id} answered /metrics with {code}: {body}");
        body.lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let (name, value) =
                    line.rsplit_once(' ').ok_or_else(|| anyhow!("not a sample: {line:?}"))?;
                let value = value.parse().with_context(|| format!("not a sample: {line:?}"))?;
                Ok((name.to_owned(), value))
            })
            .collect()
    }

    /// Every task in node `id`'s own state (stale reads), by id.
    pub async fn local_tasks(&self, id: u64) -> anyhow::Result<BTreeMap<String, pb::Task>> {
        let mut client = self.node_client(id, Duration::from_secs(5))?;
        let tasks = list_all(&mut client, true).await?;
        Ok(tasks.into_iter().map(|task| (task.id.clone(), task)).collect())
    }
}

/// How many distinct lines of each node's log a failing test prints.
/// The most of a metrics answer a test reads.
const METRICS_ANSWER_BYTES_MAX: u64 = 1024 * 1024;

/// How long a test waits for a connection to a node it expects to be up.
const CHANNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to a node's address `host:port`.
async fn connect_channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(CHANNEL_CONNECT_TIMEOUT)
        .connect()
        .await?)
}

const LOG_TAIL_LINES_MAX: usize = 40;

/// The last `lines_max` distinct lines of `log`, oldest first: lines that
/// differ only in their timestamp (the first word) are shown once, at their
/// latest, with how many more there were, so that a repeated warning does
/// not push everything else out of the tail.
fn log_tail(log: &str, lines_max: usize) -> Vec<String> {
    let mut order: Vec<&str> = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for line in log.lines().rev() {
        let message = line.split_once(' ').map_or(line, |(_, rest)| rest);
        match seen.get_mut(message) {
            Some(count) => *count += 1,
            None if order.len() < lines_max => {
                seen.insert(message, 1);
                order.push(line);
            }
            None => break,
        }
    }
    order
        .into_iter()
        .rev()
        .map(|line| {
            let message = line.split_once(' ').map_or(line, |(_, rest)| rest);
            match seen[message] {
                1 => line.to_owned(),
                count => format!("{line}  [and {} earlier lines like it]", count - 1),
            }
        })
        .collect()
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                let log = std::fs::read_to_string(&node.log_path).unwrap_or_default();
                let tail = log_tail(&log, LOG_TAIL_LINES_MAX);
                eprintln!("---- node {} log (last {} distinct lines) ----", node.id, tail.len());
                for line in tail {
                    eprintln!("{line}");
                }
            }
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // Resume first, in case a test left it stopped.
                let _ = Command::new("kill").arg("-CONT").arg(child.id().to_string()).status();
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A task spec that runs `program` with `args`, for submissions in tests.
pub fn spec(program: &str, args: &[&str], key: Option<String>) -> pb::TaskSpec {
    pb::TaskSpec {
        command: Some(pb::Command {
            program: program.into(),
            args: args.iter().map(|arg| arg.to_string()).collect(),
            ..Default::default()
        }),
        idempotency_key: key.unwrap_or_default(),
        ..Default::default()
    }
}

/// A node config file holding `toml` in a new temporary directory, and its
/// path for `--config`. The file lasts as long as the returned directory.
pub fn config_file(toml: &str) -> anyhow::Result<(tempfile::TempDir, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("node.toml");
    std::fs::write(&path, toml)?;
    let path = path.to_str().ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))?.to_owned();
    Ok((dir, path))
}

/// A label no test node carries: a task that requires it stays READY.
pub fn unplaceable(mut spec: pb::TaskSpec) -> pb::TaskSpec {
    spec.labels.insert("pool".into(), "nowhere".into());
    spec
}

/// Every task, page by page, through `client`; linearizable unless `stale`.
pub async fn list_all(client: &mut Client, stale: bool) -> anyhow::Result<Vec<pb::Task>> {
    let mut tasks = Vec::new();
    let mut page_token = String::new();
    loop {
        let token = page_token.clone();
        let page = client
            .call(|channel, timeout| {
                let message = pb::ListTasksRequest {
                    page_size: 1_000,
                    page_token: token.clone(),
                    stale,
                    ..Default::default()
                };
                async move {
                    TasksClient::new(channel)
                        .list_tasks(taskraft::client::request(message, timeout))
                        .await
                }
            })
            .await?
            .into_inner();
        tasks.extend(page.tasks);
        if page.next_page_token.is_empty() {
            return Ok(tasks);
        }
        page_token = page.next_page_token;
    }
}

/// `spec` with a fresh idempotency key if it has none. The client retries
/// an UNAVAILABLE or timed-out submission, and such a submission may still
/// commit ("the write may still commit later"): without a key the retry
/// would create a second task.
pub fn with_key(mut spec: pb::TaskSpec) -> pb::TaskSpec {
    if spec.idempotency_key.is_empty() {
        spec.idempotency_key = taskraft::client::fresh_idempotency_key("test");
    }
    spec
}

/// Submits one spec through `client`; a spec without an idempotency key gets
/// one ([`with_key`]), so retries never create a second task.
pub async fn submit(
    client: &mut Client,
    spec: pb::TaskSpec,
) -> Result<pb::SubmitTaskResponse, tonic::Status> {
    let spec = with_key(spec);
    client
        .call(|channel, timeout| {
            let message = pb::SubmitTaskRequest { spec: Some(spec.clone()) };
            async move {
                TasksClient::new(channel)
                    .submit_task(taskraft::client::request(message, timeout))
                    .await
            }
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Reads one task through `client`, linearizably unless `stale`.
pub async fn get(client: &mut Client, id: &str, stale: bool) -> Result<pb::Task, tonic::Status> {
    let reply = client
        .call(|channel, timeout| {
            let message = pb::GetTaskRequest { id: id.to_owned(), stale };
            async move {
                TasksClient::new(channel)
                    .get_task(taskraft::client::request(message, timeout))
                    .await
            }
        })
        .await?;
    reply.into_inner().task.ok_or_else(|| tonic::Status::internal("a reply without a task"))
}

#[cfg(test)]
mod tests {
    use super::log_tail;

    #[test]
    fn a_log_tail_shows_a_repeated_line_once_and_keeps_what_came_before() {
        let log = "t1 started\nt2 warn: heartbeat failed\nt3 elected\nt4 warn: heartbeat failed\n\
                   t5 warn: heartbeat failed";
        assert_eq!(
            log_tail(log, 40),
            vec![
                "t1 started".to_owned(),
                "t3 elected".to_owned(),
                "t5 warn: heartbeat failed  [and 2 earlier lines like it]".to_owned(),
            ]
        );
        assert_eq!(
            log_tail(log, 2),
            vec![
                "t3 elected".to_owned(),
                "t5 warn: heartbeat failed  [and 2 earlier lines like it]".to_owned()
            ]
        );
    }
}

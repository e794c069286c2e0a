//! How the CLI prints: human-readable text, or JSON (one object per line for
//! streams). A task's JSON has at least `id` and `state`, with the state names
//! PENDING, READY, ASSIGNED, RUNNING, SUCCEEDED, FAILED and CANCELLED.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};
use taskraft::proto::taskraft_v1 as pb;

use crate::cli::OutputFormat;

pub struct Printer {
    format: OutputFormat,
}

fn state_name(state: i32) -> &'static str {
    match pb::TaskState::try_from(state) {
        Ok(pb::TaskState::Waiting) => "WAITING",
        Ok(pb::TaskState::Pending) => "PENDING",
        Ok(pb::TaskState::Ready) => "READY",
        Ok(pb::TaskState::Assigned) => "ASSIGNED",
        Ok(pb::TaskState::Running) => "RUNNING",
        Ok(pb::TaskState::Succeeded) => "SUCCEEDED",
        Ok(pb::TaskState::Failed) => "FAILED",
        Ok(pb::TaskState::Cancelled) => "CANCELLED",
        _ => "UNKNOWN",
    }
}

fn time(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return String::new();
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

fn command_line(task: &pb::Task) -> String {
    spec_command_line(task.spec.as_ref())
}

fn spec_command_line(spec: Option<&pb::TaskSpec>) -> String {
    let Some(command) = spec.and_then(|spec| spec.command.as_ref()) else {
        return String::new();
    };
    std::iter::once(&command.program)
        .chain(&command.args)
        .map(
            |word| {
                if word.contains(' ') || word.is_empty() {
                    format!("{word:?}")
                } else {
                    word.clone()
                }
            },
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// A short account of every attempt, such as `n1:exit 1, n3:lost, n2:ok`.
fn attempts_summary(task: &pb::Task) -> String {
    task.attempts
        .iter()
        .map(|attempt| {
            let outcome = match attempt.outcome.as_str() {
                "" if attempt.started_at_unix_ms > 0 => "running".to_owned(),
                "" => "assigned".to_owned(),
                "exited 0" => "ok".to_owned(),
                other => other.replace("exited ", "exit "),
            };
            format!("n{}:{outcome}", attempt.node_id)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn task_json(task: &pb::Task) -> Value {
    let spec = task.spec.clone().unwrap_or_default();
    let command = spec.command.unwrap_or_default();
    json!({
        "id": task.id,
        "state": state_name(task.state),
        "queue": spec.queue,
        "priority": spec.priority,
        "command": { "program": command.program, "args": command.args, "env": command.env, "working_dir": command.working_dir },
        "run_at": time(task.run_at_unix_ms),
        "run_at_unix_ms": task.run_at_unix_ms,
        "created_at": time(task.created_at_unix_ms),
        "updated_at": time(task.updated_at_unix_ms),
        "revision": task.revision,
        "timeout_ms": spec.timeout_ms,
        "max_attempts": spec.max_attempts,
        "idempotency_key": spec.idempotency_key,
        "labels": spec.labels,
        "after": spec.after,
        "attempts": task.attempts.iter().map(|attempt| json!({
            "number": attempt.number,
            "node_id": attempt.node_id,
            "fencing_token": attempt.fencing_token,
            "assigned_at": time(attempt.assigned_at_unix_ms),
            "started_at": time(attempt.started_at_unix_ms),
            "ended_at": time(attempt.ended_at_unix_ms),
            "outcome": attempt.outcome,
            "exit_code": attempt.exit_code,
            "stdout_tail": attempt.stdout_tail,
            "stderr_tail": attempt.stderr_tail,
        })).collect::<Vec<_>>(),
    })
}

fn cadence(periodic: &pb::PeriodicTask) -> String {
    match &periodic.cadence {
        Some(pb::periodic_task::Cadence::Cron(cron)) => format!("cron {cron}"),
        Some(pb::periodic_task::Cadence::EveryMs(every_ms)) => {
            format!("every {}", humantime::format_duration(Duration::from_millis(*every_ms)))
        }
        None => String::new(),
    }
}

fn overlap_name(overlap: i32) -> &'static str {
    match pb::Overlap::try_from(overlap) {
        Ok(pb::Overlap::Forbid) => "forbid",
        _ => "allow",
    }
}

pub fn periodic_json(periodic: &pb::PeriodicTask) -> Value {
    let spec = periodic.spec.clone().unwrap_or_default();
    let command = spec.command.unwrap_or_default();
    let (cron, every_ms) = match &periodic.cadence {
        Some(pb::periodic_task::Cadence::Cron(cron)) => (json!(cron), Value::Null),
        Some(pb::periodic_task::Cadence::EveryMs(every_ms)) => (Value::Null, json!(every_ms)),
        None => (Value::Null, Value::Null),
    };
    json!({
        "name": periodic.name,
        "cron": cron,
        "every_ms": every_ms,
        "overlap": overlap_name(periodic.overlap),
        "queue": spec.queue,
        "priority": spec.priority,
        "command": { "program": command.program, "args": command.args, "env": command.env, "working_dir": command.working_dir },
        "timeout_ms": spec.timeout_ms,
        "max_attempts": spec.max_attempts,
        "labels": spec.labels,
        "next_fire": time(periodic.next_fire_unix_ms),
        "next_fire_unix_ms": periodic.next_fire_unix_ms,
        "last_fire_unix_ms": periodic.last_fire_unix_ms,
        "last_task_id": periodic.last_task_id,
        "fired_total": periodic.fired_total,
        "skipped_total": periodic.skipped_total,
    })
}

impl Printer {
    pub fn new(format: OutputFormat) -> Printer {
        Printer { format }
    }

    fn json(&self, value: &Value) {
        println!("{value}");
    }

    pub fn line(&self, text: &str) {
        println!("{text}");
    }

    /// A remark for people; JSON output leaves it out.
    pub fn note(&self, text: &str) {
        if self.format == OutputFormat::Human {
            eprintln!("{text}");
        }
    }

    pub fn submitted(&self, task: &pb::Task, already_existed: bool) {
        match self.format {
            OutputFormat::Json => {
                let mut value = task_json(task);
                value["already_existed"] = json!(already_existed);
                self.json(&value);
            }
            OutputFormat::Human => {
                let how = if already_existed { "already existed" } else { "submitted" };
                println!(
                    "task {} {how}: {}  run at {}",
                    task.id,
                    state_name(task.state),
                    time(task.run_at_unix_ms)
                );
            }
        }
    }

    pub fn task(&self, task: &pb::Task) {
        if self.format == OutputFormat::Json {
            return self.json(&task_json(task));
        }
        let spec = task.spec.clone().unwrap_or_default();
        println!("task {}  {}", task.id, state_name(task.state));
        println!("  command:   {}", command_line(task));
        println!("  queue:     {}   priority: {}", spec.queue, spec.priority);
        println!("  run at:    {}", time(task.run_at_unix_ms));
        println!(
            "  created:   {}   updated: {}",
            time(task.created_at_unix_ms),
            time(task.updated_at_unix_ms)
        );
        println!("  timeout:   {} ms   max attempts: {}", spec.timeout_ms, spec.max_attempts);
        if !spec.labels.is_empty() {
            let mut labels: Vec<String> =
                spec.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            println!("  labels:    {}", labels.join(","));
        }
        if !spec.after.is_empty() {
            println!("  after:     {}", spec.after.join(","));
        }
        println!("  revision:  {}", task.revision);
        if task.attempts.is_empty() {
            println!("  attempts:  none yet");
        }
        for attempt in &task.attempts {
            println!(
                "  attempt {} on node {} (token {}): started {} ended {} {}",
                attempt.number,
                attempt.node_id,
                attempt.fencing_token,
                time(attempt.started_at_unix_ms),
                time(attempt.ended_at_unix_ms),
                attempt.outcome
            );
        }
        if let Some(last) = task.attempts.last() {
            for (name, tail) in [("stdout", &last.stdout_tail), ("stderr", &last.stderr_tail)] {
                if !tail.is_empty() {
                    println!("  {name} (tail):");
                    tail.lines().for_each(|line| println!("    {line}"));
                }
            }
        }
    }

    /// A periodic task that was put or deleted.
    pub fn periodic(&self, periodic: &pb::PeriodicTask, what: &str) {
        if self.format == OutputFormat::Json {
            return self.json(&periodic_json(periodic));
        }
        let next = match periodic.next_fire_unix_ms {
            0 => "never".to_owned(),
            next_ms => time(next_ms),
        };
        println!(
            "periodic task {} {what}: {}, overlap {}, next fire {next}",
            periodic.name,
            cadence(periodic),
            overlap_name(periodic.overlap)
        );
    }

    pub fn periodic_rows(&self, periodics: &[pb::PeriodicTask], header: bool) {
        if self.format == OutputFormat::Json {
            return periodics.iter().for_each(|periodic| self.json(&periodic_json(periodic)));
        }
        if header {
            println!(
                "{:<20} {:<22} {:<7} {:<24} {:>6} {:>7} {:<8} COMMAND",
                "NAME", "CADENCE", "OVERLAP", "NEXT FIRE", "FIRED", "SKIPPED", "LAST"
            );
        }
        for periodic in periodics {
            println!(
                "{:<20} {:<22} {:<7} {:<24} {:>6} {:>7} {:<8} {}",
                periodic.name,
                cadence(periodic),
                overlap_name(periodic.overlap),
                time(periodic.next_fire_unix_ms),
                periodic.fired_total,
                periodic.skipped_total,
                periodic.last_task_id,
                spec_command_line(periodic.spec.as_ref())
            );
        }
    }

    pub fn queue_rows(&self, queues: &[pb::Queue], header: bool) {
        if self.format == OutputFormat::Json {
            return queues.iter().for_each(|queue| {
                self.json(&json!({
                    "name": queue.name,
                    "running_max": queue.running_max,
                    "ready": queue.ready,
                    "active": queue.active,
                }))
            });
        }
        if header {
            println!("{:<24} {:>11} {:>8} {:>8}", "QUEUE", "RUNNING MAX", "READY", "ACTIVE");
        }
        for queue in queues {
            let running_max = queue.running_max.map_or("-".to_owned(), |max| max.to_string());
            println!(
                "{:<24} {:>11} {:>8} {:>8}",
                queue.name, running_max, queue.ready, queue.active
            );
        }
    }

    pub fn task_rows(&self, tasks: &[pb::Task], header: bool) {
        if self.format == OutputFormat::Json {
            return tasks.iter().for_each(|task| self.json(&task_json(task)));
        }
        if header {
            println!(
                "{:<8} {:<10} {:<10} {:>8}  {:<28} COMMAND",
                "ID", "STATE", "QUEUE", "PRIORITY", "ATTEMPTS"
            );
        }
        for task in tasks {
            let spec = task.spec.clone().unwrap_or_default();
            println!(
                "{:<8} {:<10} {:<10} {:>8}  {:<28} {}",
                task.id,
                state_name(task.state),
                spec.queue,
                spec.priority,
                attempts_summary(task),
                command_line(task)
            );
        }
    }

    pub fn event(&self, revision: u64, task: &pb::Task) {
        match self.format {
            OutputFormat::Json => {
                self.json(&json!({ "revision": revision, "id": task.id, "state": state_name(task.state), "task": task_json(task) }))
            }
            OutputFormat::Human => {
                println!("revision {revision:<8} task {:<8} {:<10} {}", task.id, state_name(task.state), command_line(task))
            }
        }
    }

    pub fn drained(&self, node_id: u64, draining: bool) {
        match self.format {
            OutputFormat::Json => self.json(&json!({ "node_id": node_id, "draining": draining })),
            OutputFormat::Human if draining => {
                println!("node {node_id} is draining: it gets no new tasks")
            }
            OutputFormat::Human => println!("node {node_id} takes new tasks again"),
        }
    }

    pub fn snapshot(&self, reply: &pb::SnapshotResponse) {
        match self.format {
            OutputFormat::Json => self.json(&json!({
                "node_id": reply.node_id,
                "index": reply.index,
                "bytes": reply.bytes,
                "build_ms": reply.build_ms,
            })),
            OutputFormat::Human => println!(
                "node {}: snapshot at index {}, {} bytes, built in {} ms",
                reply.node_id, reply.index, reply.bytes, reply.build_ms
            ),
        }
    }

    pub fn leader(&self, leader_id: u64) {
        match self.format {
            OutputFormat::Json => self.json(&json!({ "leader_id": leader_id })),
            OutputFormat::Human => println!("leader is now node {leader_id}"),
        }
    }

    pub fn status(&self, status: &pb::StatusResponse) {
        if self.format == OutputFormat::Json {
            let nodes: Vec<Value> = status
                .nodes
                .iter()
                .map(|node| {
                    json!({
                        "node_id": node.node_id, "api_addr": node.api_addr, "raft_addr": node.raft_addr,
                        "role": node.role, "voter": node.voter, "term": node.term, "leader_id": node.leader_id,
                        "last_log_index": node.last_log_index, "commit_index": node.commit_index,
                        "applied_index": node.applied_index, "executor_slots": node.executor_slots, "error": node.error,
                        "snapshot_index": node.snapshot_index, "purged_index": node.purged_index,
                    })
                })
                .collect();
            return self.json(
                &json!({ "leader_id": status.leader_id, "term": status.term, "nodes": nodes }),
            );
        }
        println!("leader: node {}   term: {}", status.leader_id, status.term);
        println!(
            "{:<5} {:<11} {:>6} {:>9} {:>9} {:>9} {:>5}  {:<21} {:<21}",
            "NODE", "ROLE", "TERM", "LAST LOG", "COMMIT", "APPLIED", "SLOTS", "API", "RAFT"
        );
        for node in &status.nodes {
            println!(
                "{:<5} {:<11} {:>6} {:>9} {:>9} {:>9} {:>5}  {:<21} {:<21} {}",
                node.node_id,
                node.role,
                node.term,
                node.last_log_index,
                node.commit_index,
                node.applied_index,
                node.executor_slots,
                node.api_addr,
                node.raft_addr,
                node.error
            );
        }
    }
}

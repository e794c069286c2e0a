//! The `Tasks` service: submit, get, list, cancel and watch tasks; put,
//! delete and list periodic tasks; limit and list queues.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

use crate::api::convert::{
    after_from_pb, parse_task_id, periodic_from_pb, periodic_to_pb, queue_to_pb, spec_from_pb,
    state_from_pb, task_to_pb,
};
use crate::api::error::ApiError;
use crate::api::{Context, Routed, WATCH_AFTER_REVISION_KEY};
use crate::proto::taskraft_v1 as pb;
use crate::proto::taskraft_v1::tasks_client::TasksClient;
use crate::proto::taskraft_v1::tasks_server::Tasks;
use crate::scheduler::periodic::check_name as check_periodic_name;
use crate::scheduler::{Command, Response as Applied, Task, TaskId, TaskState};
use crate::storage::TaskEvent;

/// Events buffered per watch stream between the state machine and gRPC.
const WATCH_STREAM_BUFFER_EVENTS: usize = 256;

pub struct TasksService {
    ctx: Arc<Context>,
}

impl TasksService {
    pub fn new(ctx: Arc<Context>) -> TasksService {
        TasksService { ctx }
    }

    async fn submit(
        &self,
        specs: Vec<pb::TaskSpec>,
    ) -> Result<Vec<pb::SubmitTaskResponse>, ApiError> {
        let limits = &self.ctx.config.limits;
        if specs.len() > limits.batch_tasks_max {
            return Err(ApiError::InvalidArgument(format!(
                "the batch holds {} tasks, more than the limit of {}",
                specs.len(),
                limits.batch_tasks_max
            )));
        }
        let now_ms = self.ctx.clock.unix_now_ms();
        let n_specs = specs.len();
        let (specs, after): (Vec<_>, Vec<_>) = specs
            .into_iter()
            .enumerate()
            .map(|(spec_idx, spec)| {
                after_from_pb(&spec, spec_idx, limits)
                    .and_then(|after| Ok((spec_from_pb(spec, limits, now_ms)?, after)))
                    .map_err(|err| match err {
                        ApiError::InvalidArgument(message) if n_specs > 1 => {
                            ApiError::InvalidArgument(format!(
                                "task {spec_idx} of the batch: {message}"
                            ))
                        }
                        other => other,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let queued_tasks_max = limits.queued_tasks_max;
        // On the leader, the entry that submits the tasks also places them,
        // unless they wait for other tasks.
        let command = match self.ctx.placement_view.current() {
            _ if after.iter().any(|after| !after.is_empty()) => {
                Command::SubmitAfter { now_ms, queued_tasks_max, specs, after }
            }
            Some(placement) => {
                Command::SubmitAndPlace { now_ms, queued_tasks_max, specs, placement }
            }
            None => Command::SubmitTasks { now_ms, queued_tasks_max, specs },
        };
        match self.ctx.write(command).await? {
            Applied::Submitted(results) => Ok(results
                .iter()
                .map(|submitted| pb::SubmitTaskResponse {
                    task: Some(task_to_pb(&submitted.task)),
                    already_existed: submitted.already_existed,
                })
                .collect()),
            Applied::Rejected(rejection) => Err(rejection.into()),
            other => {
                Err(ApiError::Internal(format!("unexpected answer to a submission: {other:?}")))
            }
        }
    }

    /// Hands a read back to serve here when it may be (a stale one always,
    /// any other on the leader after a read index); otherwise forwards it to
    /// the leader with `call` and returns the leader's answer.
    async fn read_route<Req, Resp, F, Fut>(
        &self,
        request: Request<Req>,
        stale: bool,
        call: F,
    ) -> Result<Routed<Req, Resp>, ApiError>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        if stale {
            return Ok(Routed::Local(request));
        }
        let routed = self.ctx.to_leader(request, call).await?;
        if let Routed::Local(_) = routed {
            self.ctx.read_index().await?;
        }
        Ok(routed)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::TaskEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Tasks for TasksService {
    async fn submit_task(
        &self,
        request: Request<pb::SubmitTaskRequest>,
    ) -> Result<Response<pb::SubmitTaskResponse>, Status> {
        let request = match self
            .ctx
            .to_leader(request, |channel, req| async move {
                TasksClient::new(channel).submit_task(req).await
            })
            .await?
        {
            Routed::Local(request) => request,
            Routed::Forwarded(reply) => return Ok(Response::new(reply)),
        };
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| ApiError::InvalidArgument("no task spec given".into()))?;
        let mut results = self.submit(vec![spec]).await?;
        let result = results
            .pop()
            .ok_or_else(|| ApiError::Internal("a submission of one task gave none".into()))?;
        tracing::info!(task_id = %result.task.as_ref().map_or("", |task| &task.id), "task submitted");
        Ok(Response::new(result))
    }

    async fn submit_tasks(
        &self,
        request: Request<pb::SubmitTasksRequest>,
    ) -> Result<Response<pb::SubmitTasksResponse>, Status> {
        let request = match self
            .ctx
            .to_leader(request, |channel, req| async move {
                TasksClient::new(channel).submit_tasks(req).await
            })
            .await?
        {
            Routed::Local(request) => request,
            Routed::Forwarded(reply) => return Ok(Response::new(reply)),
        };
        let results = self.submit(request.into_inner().specs).await?;
        Ok(Response::new(pb::SubmitTasksResponse { results }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let id = parse_task_id(&request.get_ref().id)?;
        let span = info_span!("get_task", task_id = %id);
        async move {
            let stale = request.get_ref().stale;
            let routed = self.read_route(request, stale, |channel, req| async move {
                TasksClient::new(channel).get_task(req).await
            });
            if let Routed::Forwarded(reply) = routed.await? {
                return Ok(Response::new(reply));
            }
            let task = self.ctx.state_machine.read().state.task(id).map(task_to_pb);
            match task {
                Some(task) => Ok(Response::new(pb::GetTaskResponse { task: Some(task) })),
                None => Err(ApiError::NotFound(format!("task {id} does not exist")).into()),
            }
        }
        .instrument(span)
        .await
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let message = request.get_ref();
        let states: BTreeSet<TaskState> =
            message.states.iter().map(|state| state_from_pb(*state)).collect::<Result<_, _>>()?;
        let after = match message.page_token.as_str() {
            "" => None,
            token => Some(
                parse_task_id(token)
                    .map_err(|_| ApiError::InvalidArgument("bad page token".into()))?,
            ),
        };
        let server = &self.ctx.config.server;
        // A page larger than the limit is cut to it, not refused (as Google's
        // AIP-158 asks), so a client need not know this node's limit: the
        // page comes back short, with a token to go on.
        let page_size = match message.page_size {
            0 => server.list_page_size_default,
            page_size => page_size.min(server.list_page_size_max),
        };
        let stale = message.stale;
        let routed = self.read_route(request, stale, |channel, req| async move {
            TasksClient::new(channel).list_tasks(req).await
        });
        let request = match routed.await? {
            Routed::Local(request) => request,
            Routed::Forwarded(reply) => return Ok(Response::new(reply)),
        };
        let queue = request.get_ref().queue.as_str();
        let matches = |task: &Task| {
            (states.is_empty() || states.contains(&task.state))
                && (queue.is_empty() || *task.spec.queue == *queue)
        };
        let scanned_max = server.list_scanned_tasks_max as usize;
        let (tasks, resume_after) = {
            let applied = self.ctx.state_machine.read();
            let page = applied.state.list_page(after, page_size as usize, scanned_max, matches);
            (page.tasks.into_iter().map(task_to_pb).collect(), page.resume_after)
        };
        let next_page_token = resume_after.map(|id| id.to_string()).unwrap_or_default();
        Ok(Response::new(pb::ListTasksResponse { tasks, next_page_token }))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let id = parse_task_id(&request.get_ref().id)?;
        if let Routed::Forwarded(reply) = self
            .ctx
            .to_leader(request, |channel, req| async move {
                TasksClient::new(channel).cancel_task(req).await
            })
            .await?
        {
            return Ok(Response::new(reply));
        }
        match self
            .ctx
            .write(Command::CancelTask { now_ms: self.ctx.clock.unix_now_ms(), id })
            .await?
        {
            Applied::Cancelled(task) => {
                tracing::info!(task_id = %id, "task cancelled");
                Ok(Response::new(pb::CancelTaskResponse { task: Some(task_to_pb(&task)) }))
            }
            Applied::Rejected(rejection) => Err(ApiError::from(rejection).into()),
            other => {
                Err(ApiError::Internal(format!("unexpected answer to a cancellation: {other:?}"))
                    .into())
            }
        }
    }

    type WatchTasksStream = WatchStream;

    async fn watch_tasks(
        &self,
        request: Request<pb::WatchTasksRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let message = request.into_inner();
        let only: Option<TaskId> = match message.task_id.as_str() {
            "" => None,
            id => Some(parse_task_id(id)?),
        };
        let permit = self.ctx.watchers.clone().try_acquire_owned().map_err(|_| {
            ApiError::ResourceExhausted(format!(
                "this node already serves {} watch streams",
                self.ctx.config.server.watchers_max
            ))
        })?;
        let subscription = self
            .ctx
            .state_machine
            .subscribe(message.after_revision, only)
            .await
            .map_err(ApiError::from)?;
        let (tx, rx) = mpsc::channel(WATCH_STREAM_BUFFER_EVENTS);
        let shutdown = self.ctx.shutdown.clone();
        let matches = move |event: &TaskEvent| only.is_none_or(|id| event.task.id == id);
        let to_pb = |event: &TaskEvent| pb::TaskEvent {
            revision: event.revision,
            task: Some(task_to_pb(&event.task)),
        };
        // The stream carries every change after `start_revision`; a watch of
        // new changes only learns it from the response's metadata, so it can
        // resume with no gap even when it broke before its first event.
        let start_revision = match message.after_revision {
            0 => subscription.published_revision,
            after_revision => after_revision,
        };
        tokio::spawn(async move {
            let _permit = permit;
            // Every event up to `complete_revision` has been sent. The events
            // of one command share a revision, so a watcher cut off partway
            // through `last_revision`'s events resumes after the one before.
            let (mut complete_revision, mut last_revision) = (start_revision, start_revision);
            for event in subscription.backlog.iter().filter(|event| matches(event)) {
                if event.revision > last_revision {
                    (complete_revision, last_revision) = (last_revision, event.revision);
                }
                if tx.send(Ok(to_pb(event))).await.is_err() {
                    return;
                }
            }
            let mut live = subscription.live;
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the node is shutting down; resume elsewhere"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                    event = live.recv() => event,
                };
                match event {
                    // A node behind the revision asked for (a resume on a
                    // follower that has not yet applied what the watcher saw
                    // elsewhere) would otherwise send changes at or before it.
                    Ok(event) if matches(&event) && event.revision > start_revision => {
                        if event.revision > last_revision {
                            (complete_revision, last_revision) = (last_revision, event.revision);
                        }
                        if tx.send(Ok(to_pb(&event))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(n_missed)) => {
                        let status = Status::aborted(format!(
                            "this watcher fell {n_missed} events behind; resume with after_revision={complete_revision}"
                        ));
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        let mut response = Response::new(Box::pin(ReceiverStream::new(rx)) as WatchStream);
        response
            .metadata_mut()
            .insert(WATCH_AFTER_REVISION_KEY, MetadataValue::from(start_revision));
        Ok(response)
    }

    async fn put_periodic(
        &self,
        request: Request<pb::PutPeriodicRequest>,
    ) -> Result<Response<pb::PutPeriodicResponse>, Status> {
        let request = match self
            .ctx
            .to_leader(request, |channel, req| async move {
                TasksClient::new(channel).put_periodic(req).await
            })
            .await?
        {
            Routed::Local(request) => request,
            Routed::Forwarded(reply) => return Ok(Response::new(reply)),
        };
        let periodic = request
            .into_inner()
            .periodic
            .ok_or_else(|| ApiError::InvalidArgument("no periodic task given".into()))?;
        let limits = &self.ctx.config.limits;
        let now_ms = self.ctx.clock.unix_now_ms();
        let put = periodic_from_pb(periodic, limits, now_ms)?;
        let command = Command::PutPeriodic {
            now_ms,
            periodic_tasks_max: limits.periodic_tasks_max,
            name: put.name,
            cadence: put.cadence,
            overlap: put.overlap,
            spec: put.spec,
        };
        match self.ctx.write(command).await? {
            Applied::Periodic(periodic) => {
                tracing::info!(periodic = %periodic.name, cadence = %periodic.cadence, "periodic task put");
                Ok(Response::new(pb::PutPeriodicResponse {
                    periodic: Some(periodic_to_pb(&periodic)),
                }))
            }
            Applied::Rejected(rejection) => Err(ApiError::from(rejection).into()),
            other => Err(ApiError::Internal(format!(
                "unexpected answer to a periodic task's put: {other:?}"
            ))
            .into()),
        }
    }

    async fn delete_periodic(
        &self,
        request: Request<pb::DeletePeriodicRequest>,
    ) -> Result<Response<pb::DeletePeriodicResponse>, Status> {
        let request = match self
            .ctx
            .to_leader(request, |channel, req| async move {
                TasksClient::new(channel).delete_periodic(req).await
            })
            .await?
        {
            Routed::Local(request) => request,
            Routed::Forwarded(reply) => return Ok(Response::new(reply)),
        };
        let name = request.into_inner().name;
        check_periodic_name(&name).map_err(ApiError::InvalidArgument)?;
        match self.ctx.write(Command::DeletePeriodic { name }).await? {
            Applied::Periodic(periodic) => {
                tracing::info!(periodic = %periodic.name, "periodic task deleted");
                Ok(Response::new(pb::DeletePeriodicResponse {
                    periodic: Some(periodic_to_pb(&periodic)),
                }))
            }
            Applied::Rejected(rejection) => Err(ApiError::from(rejection).into()),
            other => Err(ApiError::Internal(format!(
                "unexpected answer to a periodic task's deletion: {other:?}"
            ))
            .into()),
        }
    }

    async fn list_periodic(
        &self,
        request: Request<pb::ListPeriodicRequest>,
    ) -> Result<Response<pb::ListPeriodicResponse>, Status> {
        let server = &self.ctx.config.server;
        let message = request.get_ref();
        let page_size = match message.page_size {
            0 => server.list_page_size_default,
            page_size => page_size.min(server.list_page_size_max),
        } as usize;
        if !message.page_token.is_empty() {
            check_periodic_name(&message.page_token)
                .map_err(|_| ApiError::InvalidArgument("bad page token".into()))?;
        }
        let stale = message.stale;
        let routed = self.read_route(request, stale, |channel, req| async move {
            TasksClient::new(channel).list_periodic(req).await
        });
        let request = match routed.await? {
            Routed::Local(request) => request,
            Routed::Forwarded(reply) => return Ok(Response::new(reply)),
        };
        let after = Some(request.get_ref().page_token.as_str()).filter(|token| !token.is_empty());
        let (periodics, next_page_token) = {
            let applied = self.ctx.state_machine.read();
            let mut page = applied.state.periodics_after(after).take(page_size + 1);
            let periodics: Vec<pb::PeriodicTask> =
                page.by_ref().take(page_size).map(periodic_to_pb).collect();
            let more = page.next().is_some();
            let next_page_token = match periodics.last() {
                Some(last) if more => last.name.clone(),
                _ => String::new(),
            };
            (periodics, next_page_token)
        };
        Ok(Response::new(pb::ListPeriodicResponse { periodics, next_page_token }))
    }

    async fn set_queue_limit(
        &self,
        request: Request<pb::SetQueueLimitRequest>,
    ) -> Result<Response<pb::SetQueueLimitResponse>, Status> {
        let request = match self
            .ctx
            .to_leader(request, |channel, req| async move {
                TasksClient::new(channel).set_queue_limit(req).await
            })
            .await?
        {
            Routed::Local(request) => request,
            Routed::Forwarded(reply) => return Ok(Response::new(reply)),
        };
        let pb::SetQueueLimitRequest { queue, running_max } = request.into_inner();
        let limits = &self.ctx.config.limits;
        limits.check_queue(&queue).map_err(|err| ApiError::InvalidArgument(err.0))?;
        // Judged on this leader's state before proposing, so concurrent
        // calls may pass it together; `apply` holds the ceiling exactly.
        let n_limits = {
            let applied = self.ctx.state_machine.read();
            let state = &applied.state;
            (state.queue_running_max(&queue).is_none() && running_max.is_some())
                .then(|| state.queue_limits().len() as u64)
        };
        if let Some(n_limits) = n_limits
            && n_limits >= limits.queue_limits_max
        {
            return Err(ApiError::ResourceExhausted(format!(
                "{n_limits} queues have limits, the limit is {} (limits.queue_limits_max)",
                limits.queue_limits_max
            ))
            .into());
        }
        let command = Command::SetQueueLimit { queue: queue.clone(), running_max };
        match self.ctx.write(command).await? {
            Applied::Rejected(rejection) => Err(ApiError::from(rejection).into()),
            _ => {
                tracing::info!(%queue, ?running_max, "queue limit set");
                let applied = self.ctx.state_machine.read();
                Ok(Response::new(pb::SetQueueLimitResponse {
                    queue: Some(queue_to_pb(&applied.state, &queue)),
                }))
            }
        }
    }

    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let server = &self.ctx.config.server;
        let message = request.get_ref();
        let page_size = match message.page_size {
            0 => server.list_page_size_default,
            page_size => page_size.min(server.list_page_size_max),
        } as usize;
        if !message.page_token.is_empty() {
            self.ctx
                .config
                .limits
                .check_queue(&message.page_token)
                .map_err(|_| ApiError::InvalidArgument("bad page token".into()))?;
        }
        let stale = message.stale;
        let routed = self.read_route(request, stale, |channel, req| async move {
            TasksClient::new(channel).list_queues(req).await
        });
        let request = match routed.await? {
            Routed::Local(request) => request,
            Routed::Forwarded(reply) => return Ok(Response::new(reply)),
        };
        let after = Some(request.get_ref().page_token.as_str()).filter(|token| !token.is_empty());
        let (queues, next_page_token) = {
            let applied = self.ctx.state_machine.read();
            let state = &applied.state;
            let mut names = state.known_queues_after(after).take(page_size + 1);
            let queues: Vec<pb::Queue> =
                names.by_ref().take(page_size).map(|queue| queue_to_pb(state, queue)).collect();
            let more = names.next().is_some();
            let next_page_token = match queues.last() {
                Some(last) if more => last.name.clone(),
                _ => String::new(),
            };
            (queues, next_page_token)
        };
        Ok(Response::new(pb::ListQueuesResponse { queues, next_page_token }))
    }
}

//! What a node takes from the world around it, by injection: its network
//! (listeners and outgoing channels), its wall clock, its disk and the way
//! it runs programs. [`Platform::production`] is TCP, the system clock,
//! sled and operating-system processes; a simulation passes its own.
//!
//! Time that only measures intervals comes from `tokio::time::Instant`,
//! which a simulated runtime already controls; the [`Clock`] is for the wall
//! time written into commands (run-at times, attempt times), which is where
//! clock skew between nodes shows.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tonic::transport::server::{Connected, TcpIncoming};
use tonic::transport::{Channel, Endpoint};

use crate::executor::process::{ProcessRunner, TaskRunner};
use crate::storage::Disk;

/// Everything a node takes from outside.
#[derive(Clone)]
pub struct Platform {
    pub network: Arc<dyn Network>,
    pub clock: Arc<dyn Clock>,
    pub disk: Disk,
    pub runner: Arc<dyn TaskRunner>,
    /// Whether to start a warden process that kills this node's task
    /// processes when the node cannot (see `executor::warden`). Only
    /// meaningful when tasks are operating-system processes.
    pub warden: bool,
}

impl Platform {
    /// TCP, the system clock, sled and real processes.
    pub fn production() -> Platform {
        Platform {
            network: Arc::new(Tcp),
            clock: Arc::new(SystemClock),
            disk: Disk::Sled,
            runner: Arc::new(ProcessRunner::production()),
            warden: true,
        }
    }
}

/// A wall clock.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn unix_now_ms(&self) -> u64;
}

/// The operating system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_now_ms(&self) -> u64 {
        unix_now_ms()
    }
}

/// Milliseconds since the Unix epoch by the system clock; 0 before it.
pub fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// The accepted connections of one listener.
pub type Incoming = BoxStream<'static, io::Result<Connection>>;

/// How a node listens and connects.
pub trait Network: Send + Sync + 'static {
    /// Listens on `addr` (`host:port`).
    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Incoming>>;

    /// A lazily connecting channel to `endpoint`, with its settings.
    fn channel(&self, endpoint: Endpoint) -> Channel;
}

/// Real TCP, with Nagle's algorithm off on both sides.
pub struct Tcp;

impl Network for Tcp {
    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Incoming>> {
        Box::pin(async move {
            let listener = TcpListener::bind(addr).await?;
            // The server builder's `tcp_nodelay` applies only to listeners
            // it binds itself; without this, each small reply waited for
            // the peer's delayed ACK (40 ms).
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            Ok(incoming.map(|accepted| accepted.map(Connection::new)).boxed())
        })
    }

    fn channel(&self, endpoint: Endpoint) -> Channel {
        endpoint.tcp_nodelay(true).connect_lazy()
    }
}

/// A byte stream in both directions.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// One accepted connection, whatever the network.
pub struct Connection(Pin<Box<dyn Io>>);

impl Connection {
    pub fn new(io: impl Io) -> Connection {
        Connection(Box::pin(io))
    }
}

impl Connected for Connection {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.as_mut().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.0.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

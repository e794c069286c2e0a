//! Stand-ins for other nodes in unit tests of the code that calls them: one
//! that answers (the gRPC health service) and one that dies under every call.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// A node that dies under every call: it accepts the connection, takes the
/// call's first bytes and closes the socket without an answer, as the kernel
/// does for a node killed with SIGKILL. Returns its address.
pub async fn node_that_dies_under_a_call() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut received = vec![0u8; 64 * 1024];
            let _ = socket.read(&mut received).await;
            // The call's frames follow the connection preface.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ =
                tokio::time::timeout(Duration::from_millis(50), socket.read(&mut received)).await;
            drop(socket);
        }
    });
    Ok(addr)
}

/// A node that answers: the gRPC health service, serving. Returns its address.
pub async fn node_that_answers() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok(addr)
}

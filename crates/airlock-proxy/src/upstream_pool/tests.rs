#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::*;
use crate::provider::build_connector;

const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Connections a test server accepted and saw closed.
struct Counts {
    accepted: watch::Receiver<usize>,
    closed: watch::Receiver<usize>,
}

impl Counts {
    fn accepted(&self) -> usize {
        *self.accepted.borrow()
    }

    async fn wait_closed(&mut self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), self.closed.wait_for(|c| *c >= n))
            .await
            .expect("connections not closed in time")
            .unwrap();
    }
}

/// Serves `200 ok` over kept-alive HTTP/1 connections.
async fn keep_alive_server() -> (SocketAddr, Counts) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, accepted) = watch::channel(0);
    let (closed_tx, closed) = watch::channel(0);
    tokio::spawn(async move {
        let closed_tx = Arc::new(closed_tx);
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            accepted_tx.send_modify(|n| *n += 1);
            let closed_tx = Arc::clone(&closed_tx);
            tokio::spawn(async move {
                let answer = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), answer)
                    .await;
                closed_tx.send_modify(|n| *n += 1);
            });
        }
    });
    (addr, Counts { accepted, closed })
}

/// Answers one request per connection, without saying it will close, then
/// closes: the connection looks reusable until its end is read.
async fn one_answer_server() -> (SocketAddr, watch::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, accepted) = watch::channel(0);
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            accepted_tx.send_modify(|n| *n += 1);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

type TestPool = UpstreamPool<Full<Bytes>>;

fn pool(addr: SocketAddr) -> TestPool {
    let authority: Authority = addr.to_string().parse().unwrap();
    let host = HeaderValue::from_str(authority.as_str()).unwrap();
    let connector = build_connector(false, None, Duration::from_secs(5)).unwrap();
    UpstreamPool::new(
        connector,
        Scheme::HTTP,
        authority,
        host,
        PoolSettings {
            idle_timeout: IDLE_TIMEOUT,
            read_buffer: 64 * 1024,
        },
    )
    .unwrap()
}

fn get() -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = Uri::from_static("/x");
    req
}

/// Sends a request and reads the answer to its end.
async fn call(pool: &TestPool) -> Bytes {
    let response = pool.send(get()).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn a_connection_serves_call_after_call_once_its_body_is_read() {
    let (addr, counts) = keep_alive_server().await;
    let pool = pool(addr);
    for _ in 0..5 {
        assert_eq!(call(&pool).await, Bytes::from_static(b"ok"));
        assert_eq!(pool.idle_count(), 1);
    }
    assert_eq!(counts.accepted(), 1);
}

#[tokio::test]
async fn a_connection_whose_body_is_unread_is_not_lent_again() {
    let (addr, mut counts) = keep_alive_server().await;
    let pool = pool(addr);
    let unread = pool.send(get()).await.unwrap();
    assert_eq!(pool.idle_count(), 0);
    // A second call while the first body is pending gets a connection of
    // its own.
    assert_eq!(call(&pool).await, Bytes::from_static(b"ok"));
    assert_eq!(counts.accepted(), 2);
    // Dropped unread, the first body takes its connection down with it.
    drop(unread);
    counts.wait_closed(1).await;
    assert_eq!(pool.idle_count(), 1);
    assert_eq!(call(&pool).await, Bytes::from_static(b"ok"));
    assert_eq!(counts.accepted(), 2);
}

#[tokio::test]
async fn idle_connections_expire() {
    let (addr, mut counts) = keep_alive_server().await;
    let pool = pool(addr);
    call(&pool).await;
    assert_eq!(pool.idle_count(), 1);

    // Past the idle timeout the connection is closed by the pool's reaper,
    // with no call needed to notice.
    tokio::time::pause();
    tokio::time::advance(IDLE_TIMEOUT * 2 + Duration::from_secs(1)).await;
    counts.wait_closed(1).await;
    tokio::time::resume();
    assert_eq!(pool.idle_count(), 0);

    // A connection found expired at checkout is not used either.
    call(&pool).await;
    assert_eq!(counts.accepted(), 2);
    tokio::time::pause();
    tokio::time::advance(IDLE_TIMEOUT + Duration::from_secs(1)).await;
    tokio::time::resume();
    call(&pool).await;
    assert_eq!(counts.accepted(), 3);
}

/// The provider closes each connection after one answer: the pool either
/// sees it closed before lending it or, when the close arrives as the
/// request is handed over, sends the request again on a new connection.
#[tokio::test]
async fn a_connection_the_provider_closed_while_idle_fails_no_call() {
    let (addr, accepted) = one_answer_server().await;
    let pool = pool(addr);
    for _ in 0..5 {
        assert_eq!(call(&pool).await, Bytes::from_static(b"ok"));
    }
    assert_eq!(*accepted.borrow(), 5);
}

#[tokio::test]
async fn http1_requests_name_the_upstream_in_host() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            head.extend_from_slice(&buf[..n]);
        }
        stream
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8(head).unwrap()
    });
    let pool = pool(addr);
    let response = pool.send(get()).await.unwrap();
    assert_eq!(response.status(), 204);
    let head = server.await.unwrap().to_ascii_lowercase();
    assert!(head.starts_with("get /x http/1.1\r\n"), "{head}");
    assert!(head.contains(&format!("\r\nhost: {addr}\r\n")), "{head}");
}

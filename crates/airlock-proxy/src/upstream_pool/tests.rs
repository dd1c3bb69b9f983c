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

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// Accepts connections at a local address, counting them, and runs
/// `serve` on each in a task of its own.
async fn raw_server<F, Fut>(serve: F) -> (SocketAddr, watch::Receiver<usize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, accepted) = watch::channel(0);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            accepted_tx.send_modify(|n| *n += 1);
            tokio::spawn(serve(stream));
        }
    });
    (addr, accepted)
}

/// Reads into `pending` until it holds a whole request head; returns the
/// head's length, or `None` when the connection ends first.
async fn read_head(stream: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> Option<usize> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end + 4);
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// Answers one request per connection, without saying it will close, then
/// closes: the connection looks reusable until its end is read.
async fn one_answer_server() -> (SocketAddr, watch::Receiver<usize>) {
    raw_server(|mut stream| async move {
        if read_head(&mut stream, &mut Vec::new()).await.is_some() {
            let _ = stream.write_all(OK).await;
            let _ = stream.shutdown().await;
        }
    })
    .await
}

type TestPool = UpstreamPool<Full<Bytes>>;

/// A slot of the process's bound, unbounded in tests.
fn slot() -> crate::descriptors::UpstreamSlot {
    crate::descriptors::UpstreamSlot::take().unwrap()
}

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
    let response = pool.send(get(), slot()).await.unwrap();
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
    let unread = pool.send(get(), slot()).await.unwrap();
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
async fn shedding_closes_idle_connections_and_leaves_lent_ones() {
    let (addr, mut counts) = keep_alive_server().await;
    let pool = pool(addr);
    let lent = pool.send(get(), slot()).await.unwrap();
    call(&pool).await;
    assert_eq!(pool.idle_count(), 1);
    assert_eq!(pool.shed_idle(), 1);
    assert_eq!(pool.idle_count(), 0);
    // The idle one is closed; the lent one still carries its call.
    counts.wait_closed(1).await;
    let body = lent.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from_static(b"ok"));
    assert_eq!(pool.idle_count(), 1);
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
        read_head(&mut stream, &mut head).await.unwrap();
        stream
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8(head).unwrap()
    });
    let pool = pool(addr);
    let response = pool.send(get(), slot()).await.unwrap();
    assert_eq!(response.status(), 204);
    let head = server.await.unwrap().to_ascii_lowercase();
    assert!(head.starts_with("get /x http/1.1\r\n"), "{head}");
    assert!(head.contains(&format!("\r\nhost: {addr}\r\n")), "{head}");
}

/// The provider closes an idle connection and the pool lends it before
/// its task has seen the close. Depending on which the connection's task
/// notices first, the request is handed back unsent and goes out on a new
/// connection, or it was written to the closed socket and the call fails
/// (hyper-util's client did the same; sending it again could repeat a
/// call the provider acted on). Either way no request is sent twice, and
/// the next call gets a new connection.
#[tokio::test]
async fn a_connection_closed_unseen_never_sends_a_request_twice() {
    use std::io::{Read, Write};
    use std::sync::mpsc;

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (close_tx, close_rx) = mpsc::channel::<()>();
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    let (heads_tx, heads_rx) = mpsc::channel::<(usize, String)>();
    std::thread::spawn(move || {
        let answer = |stream: &mut std::net::TcpStream, n: usize| {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    // The pool closed the connection: the test is over.
                    Ok(0) | Err(_) => return,
                    Ok(read) => head.extend_from_slice(&buf[..read]),
                }
            }
            let _ = heads_tx.send((n, String::from_utf8_lossy(&head).into_owned()));
            let _ = stream.write_all(OK);
        };
        let Ok((mut first, _)) = listener.accept() else {
            return;
        };
        answer(&mut first, 1);
        close_rx.recv().unwrap();
        drop(first);
        closed_tx.send(()).unwrap();
        let Ok((mut second, _)) = listener.accept() else {
            return;
        };
        answer(&mut second, 2);
        // The connection stays open for the call after, if any.
        answer(&mut second, 2);
    });

    let pool = pool(addr);
    assert_eq!(call(&pool).await, Bytes::from_static(b"ok"));
    assert_eq!(pool.idle_count(), 1);
    // Closed while the runtime is blocked here: the connection's task
    // cannot have seen it when the pool lends the connection again.
    close_tx.send(()).unwrap();
    closed_rx.recv().unwrap();
    let resent = match pool.send(get(), slot()).await {
        Ok(response) => {
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, Bytes::from_static(b"ok"));
            true
        }
        Err(UpstreamError::Request(e)) => {
            assert!(e.is_incomplete_message(), "{e:?}");
            false
        }
        Err(other) => panic!("unexpected failure: {other}"),
    };
    // The call after is answered on the second connection.
    assert_eq!(call(&pool).await, Bytes::from_static(b"ok"));
    let heads: Vec<usize> = heads_rx.try_iter().map(|(n, _)| n).collect();
    let want = if resent { vec![1, 2, 2] } else { vec![1, 2] };
    assert_eq!(heads, want);
}

/// A request body sent upstream through a channel, for a request whose
/// answer comes before the body has all gone out.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// Answers every request on a connection as soon as its head is in, then
/// reads its body (`content-length`) before the next head.
async fn early_answer_server() -> (SocketAddr, watch::Receiver<usize>) {
    raw_server(|mut stream| async move {
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        while let Some(end) = read_head(&mut stream, &mut pending).await {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            pending.drain(..end);
            let _ = stream.write_all(OK).await;
            while pending.len() < length {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
            }
            pending.drain(..length);
        }
    })
    .await
}

#[tokio::test]
async fn an_answer_before_the_request_body_ends_returns_its_connection_after_it() {
    let (addr, accepted) = early_answer_server().await;
    let authority: Authority = addr.to_string().parse().unwrap();
    let pool = UpstreamPool::<ChannelBody>::new(
        build_connector(false, None, Duration::from_secs(5)).unwrap(),
        Scheme::HTTP,
        authority.clone(),
        HeaderValue::from_str(authority.as_str()).unwrap(),
        PoolSettings {
            idle_timeout: IDLE_TIMEOUT,
            read_buffer: 64 * 1024,
        },
    )
    .unwrap();
    let request = |body: ChannelBody, length: usize| {
        let mut req = Request::new(body);
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = Uri::from_static("/upload");
        req.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
        req
    };

    let (chunks, rx) = tokio::sync::mpsc::channel(1);
    chunks.send(Bytes::from_static(b"abc")).await.unwrap();
    let response = pool
        .send(request(ChannelBody(rx), 6), slot())
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from_static(b"ok"));
    // The answer is read but the request is not finished: the connection
    // cannot carry another call yet.
    assert_eq!(pool.idle_count(), 0);

    chunks.send(Bytes::from_static(b"def")).await.unwrap();
    drop(chunks);
    tokio::time::timeout(Duration::from_secs(10), async {
        while pool.idle_count() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the connection never came back");

    let (chunks, rx) = tokio::sync::mpsc::channel(1);
    chunks.send(Bytes::from_static(b"xy")).await.unwrap();
    drop(chunks);
    let response = pool
        .send(request(ChannelBody(rx), 2), slot())
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from_static(b"ok"));
    assert_eq!(*accepted.borrow(), 1);
}

#[tokio::test]
async fn a_body_ending_in_trailers_returns_its_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, accepted) = watch::channel(0);
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        accepted_tx.send_modify(|n| *n += 1);
        let answer = service_fn(|_req: Request<Incoming>| async {
            let trailers = {
                let mut map = http::HeaderMap::new();
                map.insert("x-done", HeaderValue::from_static("1"));
                map
            };
            let frames = futures_util::stream::iter([
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"ok"))),
                Ok(Frame::trailers(trailers)),
            ]);
            let mut response = Response::new(http_body_util::StreamBody::new(frames));
            // hyper's server sends only the trailer fields announced here.
            response
                .headers_mut()
                .insert(http::header::TRAILER, HeaderValue::from_static("x-done"));
            Ok::<_, Infallible>(response)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), answer)
            .await;
    });
    let pool = pool(addr);
    for _ in 0..2 {
        let mut req = get();
        req.headers_mut()
            .insert(http::header::TE, HeaderValue::from_static("trailers"));
        let mut body = pool.send(req, slot()).await.unwrap().into_body();
        let data = body.frame().await.unwrap().unwrap();
        assert_eq!(data.into_data().unwrap(), Bytes::from_static(b"ok"));
        let trailers = body.frame().await.unwrap().unwrap();
        assert!(trailers.is_trailers());
        // Not polled past the trailers, as hyper's server does not.
        assert_eq!(pool.idle_count(), 1);
    }
    assert_eq!(*accepted.borrow(), 1);
}

#[test]
fn a_target_takes_the_form_of_each_attempt_s_protocol() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let pool = pool(addr);
    let mut req = get();
    *req.uri_mut() = Uri::from_static("/v1/x?a=b");
    pool.shared.set_target(&mut req, true).unwrap();
    assert_eq!(req.uri().to_string(), "http://127.0.0.1:9/v1/x?a=b");
    pool.shared.set_target(&mut req, true).unwrap();
    assert_eq!(req.uri().to_string(), "http://127.0.0.1:9/v1/x?a=b");
    pool.shared.set_target(&mut req, false).unwrap();
    assert_eq!(req.uri().to_string(), "/v1/x?a=b");
    assert!(req.uri().scheme().is_none() && req.uri().authority().is_none());
}

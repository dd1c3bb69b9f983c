//! Tests of the recording mock provider.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::time::Duration;

use airlock_testkit::{MockProvider, MAX_RECORDED_BODY};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type ReqBody = BoxBody<Bytes, Infallible>;

fn client() -> Client<HttpConnector, ReqBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn empty() -> ReqBody {
    Empty::new().boxed()
}

fn full(data: impl Into<Bytes>) -> ReqBody {
    Full::new(data.into()).boxed()
}

/// Sends a request and returns the response with its body still open.
async fn open(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: ReqBody,
) -> Response<Incoming> {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client().request(request.body(body).unwrap()).await.unwrap()
}

/// Sends a request and reads the whole response.
async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: ReqBody,
) -> (StatusCode, HeaderMap, Bytes) {
    let response = open(method, url, headers, body).await;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

async fn send_json(method: &str, url: &str, body: Option<Value>) -> (StatusCode, Value) {
    let (status, _, bytes) = match body {
        Some(body) => {
            send(
                method,
                url,
                &[("content-type", "application/json")],
                full(body.to_string()),
            )
            .await
        }
        None => send(method, url, &[], empty()).await,
    };
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// Reads the next data frame, skipping trailers; `None` at the end.
async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            return Some(data);
        }
    }
    None
}

/// The JSON payloads of the `data:` lines of an SSE body (except `[DONE]`).
fn sse_data(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

#[tokio::test]
async fn records_requests() {
    let mock = MockProvider::start().await;
    assert!(mock.url().starts_with("http://127.0.0.1:"));
    assert_eq!(mock.url(), format!("http://{}", mock.addr()));

    let (status, _, body) = send(
        "POST",
        &format!("{}/some/path?a=1&b=two", mock.url()),
        &[
            ("x-first", "one"),
            ("authorization", "Bearer sess_abc"),
            ("x-first", "two"),
        ],
        full("hello body"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        json!({"ok": true, "method": "POST", "path": "/some/path"})
    );

    mock.wait_for_requests(1).await;
    assert_eq!(mock.request_count(), 1);
    let request = &mock.requests()[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path_and_query, "/some/path?a=1&b=two");
    assert_eq!(request.path(), "/some/path");
    assert_eq!(request.query(), Some("a=1&b=two"));
    assert_eq!(request.header("X-First").as_deref(), Some("one"));
    assert_eq!(request.header_values("x-first"), ["one", "two"]);
    assert_eq!(request.header("missing"), None);
    assert_eq!(&request.body[..], b"hello body");
    assert_eq!(request.body_len, 10);
    assert!(request.contains("sess_abc"));
    assert!(request.contains("b=two"));
    assert!(request.contains("x-first"));
    assert!(request.contains("o bo"));
    assert!(!request.contains("sk-real"));
    assert!(request
        .headers
        .iter()
        .all(|(name, _)| *name == name.to_ascii_lowercase()));

    send("GET", &format!("{}/second", mock.url()), &[], empty()).await;
    mock.wait_for_requests(2).await;
    let paths: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(paths, ["/some/path?a=1&b=two", "/second"]);
    assert_eq!(mock.requests()[1].query(), None);

    mock.clear();
    assert_eq!(mock.request_count(), 0);
    assert!(mock.requests().is_empty());
    send("GET", &format!("{}/third", mock.url()), &[], empty()).await;
    mock.wait_for_requests(1).await;
    assert_eq!(mock.requests()[0].path(), "/third");
}

#[tokio::test]
async fn records_the_raw_target() {
    let mock = MockProvider::start().await;
    let mut stream = TcpStream::connect(mock.addr()).await.unwrap();
    stream
        .write_all(
            b"GET /a/../b%2Fc;x=1?q=%00&q=2 HTTP/1.1\r\nHost: example\r\n\
              X-Raw: caf\xc3\xa9\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"));

    mock.wait_for_requests(1).await;
    let request = &mock.requests()[0];
    assert_eq!(request.path_and_query, "/a/../b%2Fc;x=1?q=%00&q=2");
    assert_eq!(request.path(), "/a/../b%2Fc;x=1");
    assert_eq!(request.header("host").as_deref(), Some("example"));
    assert_eq!(
        request.headers[1],
        ("x-raw".to_owned(), "café".as_bytes().to_vec())
    );
    assert!(request.contains("café"));
}

#[tokio::test]
async fn echo_route() {
    let mock = MockProvider::start().await;
    let (status, _, body) = send(
        "PATCH",
        &format!("{}/echo?x=y", mock.url()),
        &[("x-test", "value")],
        full("payload"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["method"], "PATCH");
    assert_eq!(echo["path_and_query"], "/echo?x=y");
    assert_eq!(echo["body"], "payload");
    let headers = echo["headers"].as_array().unwrap();
    assert!(headers.contains(&json!(["x-test", "value"])));
}

#[tokio::test]
async fn chat_completions() {
    let mock = MockProvider::start().await;
    let url = format!("{}/v1/chat/completions", mock.url());
    let request = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let (status, completion) = send_json("POST", &url, Some(request)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["model"], "gpt-4o-mini");
    assert_eq!(completion["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "Hello from mock"
    );
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");
    assert!(completion["usage"]["total_tokens"].is_u64());

    let request = json!({"model": "gpt-mock-2", "stream": true, "messages": []});
    let response = open(
        "POST",
        &url,
        &[("content-type", "application/json")],
        full(request.to_string()),
    )
    .await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut text = String::new();
    let mut frames = 0;
    while let Some(data) = next_data(&mut body).await {
        frames += 1;
        text.push_str(std::str::from_utf8(&data).unwrap());
    }
    assert!(frames >= 6, "{frames} frames");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let chunks = sse_data(&text);
    assert_eq!(chunks.len(), 5);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "gpt-mock-2"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello from mock");
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");

    // GET is not the chat route.
    let (status, value) = send_json("GET", &url, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(value["ok"], true);
}

#[tokio::test]
async fn anthropic_messages() {
    let mock = MockProvider::start().await;
    let url = format!("{}/v1/messages", mock.url());
    let request = json!({"model": "claude-x", "max_tokens": 10, "messages": []});
    let (status, message) = send_json("POST", &url, Some(request)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(message["id"], "msg_mock");
    assert_eq!(message["type"], "message");
    assert_eq!(message["model"], "claude-x");
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "Hello from mock"}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert!(message["stop_sequence"].is_null());

    let request = json!({"model": "claude-y", "max_tokens": 10, "stream": true, "messages": []});
    let (status, headers, body) = send(
        "POST",
        &url,
        &[("content-type", "application/json")],
        full(request.to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    let text = String::from_utf8(body.to_vec()).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("event: "))
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let events = sse_data(&text);
    for (name, event) in names.iter().zip(&events) {
        assert_eq!(event["type"], *name);
    }
    assert_eq!(events[0]["message"]["model"], "claude-y");
    let text: String = events
        .iter()
        .filter_map(|e| e["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "Hello from mock");
    assert_eq!(events[6]["delta"]["stop_reason"], "end_turn");
}

#[tokio::test]
async fn models_list() {
    let mock = MockProvider::start().await;
    let (status, list) = send_json("GET", &format!("{}/v1/models", mock.url()), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list,
        json!({"object": "list", "data": [{"id": "gpt-mock", "object": "model", "created": 0, "owned_by": "mock"}]})
    );
}

#[tokio::test]
async fn sse_events() {
    let mock = MockProvider::start().await;
    let response = open(
        "GET",
        &format!("{}/sse?events=4&delay_ms=5", mock.url()),
        &[],
        empty(),
    )
    .await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut text = String::new();
    while let Some(data) = next_data(&mut body).await {
        text.push_str(std::str::from_utf8(&data).unwrap());
    }
    let events = sse_data(&text);
    assert_eq!(
        events,
        [
            json!({"n": 0}),
            json!({"n": 1}),
            json!({"n": 2}),
            json!({"n": 3})
        ]
    );
}

#[tokio::test]
async fn gated_sse_holds_until_opened() {
    let mock = MockProvider::start().await;
    let url = format!("{}/gated-sse", mock.url());
    let response = open("GET", &url, &[], empty()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    assert_eq!(
        next_data(&mut body).await.unwrap(),
        Bytes::from_static(b"data: first\n\n")
    );
    // Nothing more arrives while the gate is shut.
    let early = tokio::time::timeout(Duration::from_millis(100), body.frame()).await;
    assert!(early.is_err(), "second event sent before the gate opened");
    mock.open_gate();
    assert_eq!(
        next_data(&mut body).await.unwrap(),
        Bytes::from_static(b"data: second\n\n")
    );
    assert!(next_data(&mut body).await.is_none());

    // A gate opened before the stream waits is not lost.
    mock.open_gate();
    let (_, _, body) = send("GET", &url, &[], empty()).await;
    assert_eq!(&body[..], b"data: first\n\ndata: second\n\n");
}

#[tokio::test]
async fn bytes_route() {
    let mock = MockProvider::start().await;
    let len = 3 * 64 * 1024 + 17;
    let response = open(
        "GET",
        &format!("{}/bytes?n={len}", mock.url()),
        &[],
        empty(),
    )
    .await;
    assert_eq!(
        response.headers()["content-length"],
        len.to_string().as_str()
    );
    let mut body = response.into_body();
    let mut total = 0usize;
    while let Some(data) = next_data(&mut body).await {
        assert!(data.iter().all(|b| *b == b'a'));
        total += data.len();
    }
    assert_eq!(total, len);

    let (status, headers, body) =
        send("GET", &format!("{}/bytes?n=0", mock.url()), &[], empty()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], "0");
    assert!(body.is_empty());
}

#[tokio::test]
async fn upload_counts_streamed_body() {
    let mock = MockProvider::start().await;
    let chunk = Bytes::from(vec![b'x'; 256 * 1024]);
    let chunks = 12u64; // 3 MiB, sent chunked without a length
    let frames = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
    );
    let (status, _, body) = send(
        "POST",
        &format!("{}/upload", mock.url()),
        &[],
        StreamBody::new(frames).boxed(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    let total = chunks * 256 * 1024;
    assert_eq!(answer, json!({ "received": total }));

    mock.wait_for_requests(1).await;
    let request = &mock.requests()[0];
    assert_eq!(request.body_len, total);
    assert_eq!(request.body.len(), MAX_RECORDED_BODY);

    let (status, answer) =
        send_json("PUT", &format!("{}/upload", mock.url()), Some(json!("abc"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({"received": 5}));
}

#[tokio::test]
async fn redirect_and_status_routes() {
    let mock = MockProvider::start().await;
    let (status, headers, _) = send("GET", &format!("{}/redirect", mock.url()), &[], empty()).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(headers["location"], "http://example.invalid/stolen");

    for code in [200u16, 401, 418, 429, 500, 503] {
        let (status, body) =
            send_json("POST", &format!("{}/status/{code}", mock.url()), None).await;
        assert_eq!(status.as_u16(), code);
        assert_eq!(body, json!({ "status": code }));
    }
    let (status, _, body) = send("GET", &format!("{}/status/204", mock.url()), &[], empty()).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(body.is_empty());
}

#[tokio::test]
async fn wait_for_concurrent_requests() {
    let mock = MockProvider::start().await;
    let url = mock.url();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let url = format!("{url}/n/{i}");
            tokio::spawn(async move { send("GET", &url, &[], empty()).await })
        })
        .collect();
    mock.wait_for_requests(8).await;
    assert_eq!(mock.request_count(), 8);
    for task in tasks {
        assert_eq!(task.await.unwrap().0, StatusCode::OK);
    }
}

#[tokio::test]
async fn keep_alive_reuses_connections() {
    let mock = MockProvider::start().await;
    let mut stream = TcpStream::connect(mock.addr()).await.unwrap();
    for i in 0..3 {
        let request = format!("GET /k/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        mock.wait_for_requests(i + 1).await;
    }
    stream
        .write_all(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8(answer).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 4, "{text}");
}

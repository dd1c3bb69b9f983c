//! Request recording and the mock's routes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::body::{frames, full, MockBody, RepeatBody};
use super::{Shared, MAX_RECORDED_BODY};

/// Text of the mock assistant's answer, split as it is streamed.
const ANSWER_PARTS: [&str; 3] = ["Hello", " from", " mock"];
/// The whole answer.
const ANSWER: &str = "Hello from mock";

/// Records the request, reads its body, then answers it.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let target = request_target(&parts.uri);
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    let seq = shared.begin(parts.method.as_str().to_owned(), target.clone(), headers);
    let (kept, total) = consume(&shared, seq, body).await;
    shared.finish(seq);

    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target.as_str(), None),
    };
    if path.starts_with("/ws/") || path == "/v1/realtime" {
        let upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        return Ok(super::websocket::handle(
            &shared,
            path,
            &parts.headers,
            upgrade,
        ));
    }
    let method = &parts.method;
    let response = match path {
        "/v1/chat/completions" if method == Method::POST => chat_completions(&kept),
        "/v1/messages" if method == Method::POST => messages(&kept),
        "/v1/models" if method == Method::GET => json_response(
            StatusCode::OK,
            &json!({
                "object": "list",
                "data": [{"id": "gpt-mock", "object": "model", "created": 0, "owned_by": "mock"}],
            }),
        ),
        "/sse" if method == Method::GET => sse(query),
        "/gated-sse" if method == Method::GET => gated_sse(shared),
        "/gated-json" if method == Method::GET => gated_json(shared),
        "/gated-head" if method == Method::GET => {
            // The whole answer, head included, waits for the gate.
            if let Ok(permit) = shared.gate.acquire().await {
                permit.forget();
            }
            json_response(StatusCode::OK, &json!({ "gated": true }))
        }
        "/bytes" if method == Method::GET => bytes_response(query),
        "/upload" if method == Method::POST || method == Method::PUT => {
            json_response(StatusCode::OK, &json!({ "received": total }))
        }
        "/redirect" if method == Method::GET => {
            let mut response = json_response(StatusCode::FOUND, &json!({ "redirect": true }));
            response.headers_mut().insert(
                header::LOCATION,
                HeaderValue::from_static("http://example.invalid/stolen"),
            );
            response
        }
        "/close" if method == Method::GET => {
            // The mock closes the connection after this answer.
            let mut response = json_response(StatusCode::OK, &json!({ "closing": true }));
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        "/echo" => echo(method, &target, &parts.headers, &kept),
        batch if method == Method::GET && batch.starts_with("/v1/messages/batches/") => {
            message_batch(batch, &parts.headers)
        }
        "/gzip-always" => gzip_always(&parts.headers),
        "/leak-head" => leak_head(&parts.headers),
        "/leak-sse" => leak_sse(&parts.headers),
        _ => match path.strip_prefix("/status/") {
            Some(code) => status(code),
            None => json_response(
                StatusCode::OK,
                &json!({ "ok": true, "method": method.as_str(), "path": path }),
            ),
        },
    };
    Ok(response)
}

/// The request target as it appeared on the request line.
fn request_target(uri: &Uri) -> String {
    if uri.scheme().is_some() || uri.authority().is_some() {
        uri.to_string()
    } else {
        uri.path_and_query()
            .map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned())
    }
}

/// Reads the whole body frame by frame, recording it as it goes.
/// Returns the first [`MAX_RECORDED_BODY`] bytes and the total length.
async fn consume(shared: &Shared, seq: u64, mut body: Incoming) -> (Bytes, u64) {
    let mut kept = Vec::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        match frame.into_data() {
            Ok(data) => {
                total += data.len() as u64;
                let room = MAX_RECORDED_BODY.saturating_sub(kept.len());
                kept.extend_from_slice(&data[..data.len().min(room)]);
                shared.append(seq, &data);
            }
            Err(frame) => {
                if let Some(fields) = frame.trailers_ref() {
                    shared.trailers(seq, fields);
                }
            }
        }
    }
    (Bytes::from(kept), total)
}

fn json_response(status: StatusCode, value: &Value) -> Response<MockBody> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn event_stream(events: MockBody) -> Response<MockBody> {
    let mut response = Response::new(events);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Value of `key` in a query string (no percent-decoding).
fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| match pair.split_once('=') {
            Some((k, v)) if k == key => Some(v),
            None if pair == key => Some(""),
            _ => None,
        })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The request body as JSON, or `null` if it is not JSON.
fn json_body(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

fn wants_stream(request: &Value) -> bool {
    request.get("stream").and_then(Value::as_bool) == Some(true)
}

fn model_of(request: &Value, default: &str) -> String {
    request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(default)
        .to_owned()
}

/// `POST /v1/chat/completions` in the OpenAI shape.
fn chat_completions(body: &[u8]) -> Response<MockBody> {
    let request = json_body(body);
    let model = model_of(&request, "gpt-mock");
    let created = unix_now();
    let id = "chatcmpl-mock";
    if !wants_stream(&request) {
        return json_response(
            StatusCode::OK,
            &json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": null,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER, "refusal": null},
                    "logprobs": null,
                    "finish_reason": "stop",
                }],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            }),
        );
    }

    let chunk = |delta: Value, finish_reason: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        })
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    events.extend(
        ANSWER_PARTS
            .iter()
            .map(|part| chunk(json!({ "content": part }), Value::Null)),
    );
    events.push(chunk(json!({}), json!("stop")));
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    if include_usage {
        events.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }));
    }
    let mut frames_out: Vec<Bytes> = events
        .iter()
        .map(|event| Bytes::from(format!("data: {event}\n\n")))
        .collect();
    if model == "gpt-mock-hold" {
        // The first chunk, then the stream stays open, silent.
        frames_out.truncate(1);
        return event_stream(frames(stream::iter(frames_out).chain(stream::pending())));
    }
    frames_out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    event_stream(frames(stream::iter(frames_out)))
}

/// `POST /v1/messages` in the Anthropic shape.
fn messages(body: &[u8]) -> Response<MockBody> {
    let request = json_body(body);
    let model = model_of(&request, "claude-mock");
    if !wants_stream(&request) {
        return json_response(
            StatusCode::OK,
            &json!({
                "id": "msg_mock",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": ANSWER}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": {"input_tokens": 5, "output_tokens": 3},
            }),
        );
    }

    let mut events = vec![
        (
            "message_start",
            json!({
                "type": "message_start",
                "message": {
                    "id": "msg_mock",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": {"input_tokens": 5, "output_tokens": 1},
                },
            }),
        ),
        (
            "content_block_start",
            json!({
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }),
        ),
    ];
    events.extend(ANSWER_PARTS.iter().map(|part| {
        (
            "content_block_delta",
            json!({
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": part},
            }),
        )
    }));
    events.push((
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push((
        "message_delta",
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": 3},
        }),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    let mut frames_out: Vec<Bytes> = events
        .iter()
        .map(|(name, data)| Bytes::from(format!("event: {name}\ndata: {data}\n\n")))
        .collect();
    if model == "claude-mock-hold" {
        // The first event, then the stream stays open, silent.
        frames_out.truncate(1);
        return event_stream(frames(stream::iter(frames_out).chain(stream::pending())));
    }
    event_stream(frames(stream::iter(frames_out)))
}

/// `GET /sse?events=N&delay_ms=D`: N events `data: {"n":i}`, D ms apart.
fn sse(query: Option<&str>) -> Response<MockBody> {
    let count: u64 = query_param(query, "events")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let delay = Duration::from_millis(
        query_param(query, "delay_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let events = stream::unfold(0u64, move |i| async move {
        if i >= count {
            return None;
        }
        if i > 0 && !delay.is_zero() {
            // Pacing of the provider, not synchronisation.
            tokio::time::sleep(delay).await;
        }
        let event = Bytes::from(format!("data: {}\n\n", json!({ "n": i })));
        Some((event, i + 1))
    });
    event_stream(frames(events))
}

/// `GET /gated-sse`: `first` now, `second` once a gate is opened.
fn gated_sse(shared: Arc<Shared>) -> Response<MockBody> {
    let events = stream::unfold((0u8, shared), |(step, shared)| async move {
        match step {
            0 => Some((Bytes::from_static(b"data: first\n\n"), (1, shared))),
            1 => {
                // The semaphore is never closed; a permit is consumed only if
                // the client is still there to receive the second event.
                if let Ok(permit) = shared.gate.acquire().await {
                    permit.forget();
                }
                Some((Bytes::from_static(b"data: second\n\n"), (2, shared)))
            }
            _ => None,
        }
    });
    event_stream(frames(events))
}

/// `GET /gated-json`: a JSON answer of known length whose head goes out
/// now and whose body once a gate is opened.
fn gated_json(shared: Arc<Shared>) -> Response<MockBody> {
    const BODY: &[u8] = br#"{"gated":true}"#;
    let body = stream::unfold(Some(shared), |shared| async move {
        let shared = shared?;
        if let Ok(permit) = shared.gate.acquire().await {
            permit.forget();
        }
        Some((Bytes::from_static(BODY), None))
    });
    let mut response = Response::new(frames(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(BODY.len()));
    response
}

/// `GET /bytes?n=N`: N bytes of `a` in 64 KiB frames.
fn bytes_response(query: Option<&str>) -> Response<MockBody> {
    let len: u64 = query_param(query, "n")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut response = Response::new(RepeatBody::new(len).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// `/status/{code}`: that status with `{"status":code}`.
fn status(code: &str) -> Response<MockBody> {
    let status = code
        .parse::<u16>()
        .ok()
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok());
    let Some(status) = status else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({ "error": format!("bad status code {code:?}") }),
        );
    };
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        let mut response = Response::new(full(Bytes::new()));
        *response.status_mut() = status;
        return response;
    }
    let mut response = json_response(status, &json!({ "status": status.as_u16() }));
    // As hosted providers do: the id a provider's error is known by.
    response
        .headers_mut()
        .insert("x-request-id", HeaderValue::from_static(MOCK_REQUEST_ID));
    response
}

/// The `x-request-id` of the mock's `/status/N` answers.
pub const MOCK_REQUEST_ID: &str = "req_mock_0001";

/// `/echo`: what was received, as JSON.
/// `/leak-sse`: a provider that leaks what it was sent. Every request
/// header value goes back in the `x-leak` response header and in an SSE
/// stream cut into 5-byte frames sent 2 ms apart, so a secret among them is
/// split across many chunks.
fn leak_sse(headers: &http::HeaderMap) -> Response<MockBody> {
    let joined = headers
        .values()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect::<Vec<_>>()
        .join(" | ");
    let text = Bytes::from(format!("data: {joined}\n\n"));
    let pieces: Vec<Bytes> = (0..text.len())
        .step_by(5)
        .map(|i| text.slice(i..(i + 5).min(text.len())))
        .collect();
    let events = stream::unfold(pieces.into_iter(), |mut rest| async move {
        let next = rest.next()?;
        tokio::time::sleep(Duration::from_millis(2)).await;
        Some((next, rest))
    });
    let mut response = event_stream(frames(events));
    if let Ok(value) = HeaderValue::from_str(&joined) {
        response.headers_mut().insert("x-leak", value);
    }
    response
}

fn echo(
    method: &Method,
    target: &str,
    headers: &http::HeaderMap,
    body: &[u8],
) -> Response<MockBody> {
    let listed: Vec<Value> = headers
        .iter()
        .map(|(name, value)| json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())]))
        .collect();
    let echo = json!({
        "method": method.as_str(),
        "path_and_query": target,
        "headers": listed,
        "body": String::from_utf8_lossy(body),
    });
    // As real providers do: compressed when the client accepts gzip.
    let accepts_gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|c| c.trim().eq_ignore_ascii_case("gzip")));
    if accepts_gzip {
        gzip_json(&echo)
    } else {
        json_response(StatusCode::OK, &echo)
    }
}

/// Anthropic's Message Batches API, as far as `results()` needs: a batch
/// (`/v1/messages/batches/ID`) names its `results_url` at the provider's
/// own address (the `Host` it was called by), and the results
/// (`…/results`) are JSON lines.
fn message_batch(path: &str, headers: &http::HeaderMap) -> Response<MockBody> {
    let rest = &path["/v1/messages/batches/".len()..];
    if let Some(id) = rest.strip_suffix("/results") {
        let line = json!({"custom_id": "c1", "result": {"type": "succeeded"}, "batch": id});
        let mut response = Response::new(full(format!("{line}\n")));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/binary"),
        );
        return response;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("mock.invalid");
    let batch = json!({
        "id": rest,
        "type": "message_batch",
        "processing_status": "ended",
        "results_url": format!("http://{host}/v1/messages/batches/{rest}/results"),
    });
    if !rest.ends_with("-chunked") {
        return json_response(StatusCode::OK, &batch);
    }
    // Without a length, in two frames, the URL split between them.
    let text = batch.to_string();
    let (first, second) = text.split_at(text.len() - 20);
    let parts = vec![
        Bytes::from(first.to_owned()),
        Bytes::from(second.to_owned()),
    ];
    let mut response = Response::new(frames(stream::iter(parts)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The request's `Authorization` value echoed, gzip-encoded whatever the
/// client accepts: a provider that compresses regardless.
fn gzip_always(headers: &http::HeaderMap) -> Response<MockBody> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    gzip_json(&json!({ "authorization": authorization }))
}

/// A provider that puts the credential it was sent where no header value
/// is: in its reason phrase (`200 key <credential>`) and in a header name
/// (`x-<credential, lower case>: 1`).
fn leak_head(headers: &http::HeaderMap) -> Response<MockBody> {
    let credential = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_whitespace().last())
        .unwrap_or("none")
        .to_owned();
    let mut response = json_response(StatusCode::OK, &json!({"leak": "head"}));
    if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(format!("key {credential}").into_bytes())
    {
        response.extensions_mut().insert(reason);
    }
    if let Ok(name) = http::HeaderName::from_bytes(format!("x-{credential}").as_bytes()) {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_static("1"));
    }
    response
}

/// `value` as a gzip-encoded JSON answer.
fn gzip_json(value: &Value) -> Response<MockBody> {
    use std::io::Write as _;

    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let compressed = encoder
        .write_all(value.to_string().as_bytes())
        .and_then(|()| encoder.finish())
        .expect("mock provider: gzip into memory");
    let mut response = json_response(StatusCode::OK, &Value::Null);
    *response.body_mut() = full(compressed);
    response
        .headers_mut()
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    response
}

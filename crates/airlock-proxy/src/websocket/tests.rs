#![allow(clippy::unwrap_used)]

use super::*;

const KEY: &[u8] = b"sk-live-0123456789abcdef0123";

fn guard() -> FrameGuard {
    FrameGuard::new(Redactor::new(&[KEY]).unwrap().state())
}

/// An unmasked server frame: FIN, `opcode`, `payload`.
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

/// Feeds `bytes` to a fresh guard in pieces of `piece` bytes.
fn feed(bytes: &[u8], piece: usize) -> (Vec<u8>, bool) {
    let mut guard = guard();
    let mut out = BytesMut::new();
    for chunk in bytes.chunks(piece) {
        guard.push(Bytes::copy_from_slice(chunk), &mut out).unwrap();
    }
    out.extend_from_slice(&guard.finish());
    (out.to_vec(), guard.redacted())
}

#[test]
fn a_key_in_a_text_frame_is_masked_in_place_whatever_the_reads() {
    let text = [b"{\"echo\":\"".as_slice(), KEY, b"\"}"].concat();
    let mut stream = frame(0x1, &text);
    stream.extend(frame(0x1, b"after"));
    let masked = [
        b"{\"echo\":\"".as_slice(),
        &crate::redact::mask_for(KEY.len()),
        b"\"}",
    ]
    .concat();
    let mut expected = frame(0x1, &masked);
    expected.extend(frame(0x1, b"after"));
    for piece in [1, 2, 3, 7, 13, stream.len()] {
        let (out, redacted) = feed(&stream, piece);
        assert_eq!(out, expected, "pieces of {piece}");
        assert!(redacted);
    }
}

#[test]
fn a_frame_ending_in_a_key_prefix_is_not_held_back() {
    // The payload ends with the key's first bytes: the frame's end decides.
    let stream = frame(0x1, b"ask sk-live");
    let mut guard = guard();
    let mut out = BytesMut::new();
    guard.push(Bytes::from(stream.clone()), &mut out).unwrap();
    assert_eq!(out.to_vec(), stream);
    assert!(!guard.redacted());
}

#[test]
fn long_frames_keep_their_extended_lengths() {
    let big = vec![b'a'; 70_000];
    let medium = vec![b'b'; 300];
    let mut stream = frame(0x2, &big);
    stream.extend(frame(0x2, &medium));
    stream.extend(frame(0x9, b""));
    let (out, redacted) = feed(&stream, 4096);
    assert_eq!(out, stream);
    assert!(!redacted);
}

#[test]
fn masked_or_compressed_frames_are_refused() {
    let mut out = BytesMut::new();
    // Masked: the payload is unreadable as sent.
    let masked = [0x81, 0x85, 1, 2, 3, 4, b'h', b'e', b'l', b'l', b'o'];
    assert_eq!(
        guard().push(Bytes::copy_from_slice(&masked), &mut out),
        Err(Unreadable::Masked)
    );
    // RSV1: permessage-deflate.
    let compressed = [0xc1, 0x02, 0xf2, 0x48];
    assert_eq!(
        guard().push(Bytes::copy_from_slice(&compressed), &mut out),
        Err(Unreadable::Reserved)
    );
    assert!(out.is_empty(), "nothing of a refused frame is passed on");
    let mut huge = vec![0x82, 127];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(
        guard().push(Bytes::from(huge), &mut out),
        Err(Unreadable::Length)
    );
}

fn request(headers: &[(&str, &str)]) -> Request<()> {
    let mut builder = Request::get("/openai/v1/realtime");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap()
}

#[test]
fn only_a_plain_websocket_upgrade_is_one() {
    let ws = [
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "WebSocket"),
    ];
    assert_eq!(classify(&request(&ws)), Ok(true));
    assert_eq!(classify(&request(&[("connection", "upgrade")])), Ok(false));
    assert_eq!(classify(&request(&[])), Ok(false));

    let refused = |headers: &[(&str, &str)]| {
        let denial = classify(&request(headers)).unwrap_err();
        assert_eq!(denial.code(), ErrorCode::BadRequest);
    };
    refused(&[("connection", "upgrade"), ("upgrade", "h2c")]);
    refused(&[("connection", "upgrade"), ("upgrade", "websocket, h2c")]);
    refused(&[
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("upgrade", "websocket"),
    ]);
    // Not named in Connection: no upgrade at all (stripped as hop-by-hop).
    assert_eq!(classify(&request(&[("upgrade", "websocket")])), Ok(false));
    assert_eq!(classify(&request(&[("upgrade", "h2c")])), Ok(false));
    refused(&[
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("content-length", "5"),
    ]);
    refused(&[
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("transfer-encoding", "chunked"),
    ]);
    let mut post = request(&ws);
    *post.method_mut() = Method::POST;
    assert!(classify(&post).is_err());
    let mut http10 = request(&ws);
    *http10.version_mut() = Version::HTTP_10;
    assert!(classify(&http10).is_err());
    let mut extended = request(&[]);
    extended
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    assert!(classify(&extended).is_err());
}

#[test]
fn a_switch_with_extensions_or_to_another_protocol_is_refused() {
    let mut headers = HeaderMap::new();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    assert!(unacceptable(&headers, "p").is_none());
    headers.insert(
        header::SEC_WEBSOCKET_EXTENSIONS,
        HeaderValue::from_static("permessage-deflate"),
    );
    assert!(unacceptable(&headers, "p").is_some());
    let mut other = HeaderMap::new();
    other.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
    assert!(unacceptable(&other, "p").is_some());
    assert!(unacceptable(&HeaderMap::new(), "p").is_some());
}

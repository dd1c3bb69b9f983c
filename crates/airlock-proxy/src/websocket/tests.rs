#![allow(clippy::unwrap_used)]

use super::*;

const KEY: &[u8] = b"sk-live-0123456789abcdef0123";

fn guard() -> FrameGuard {
    FrameGuard::new(&Redactor::new(&[KEY]).unwrap())
}

/// An unmasked server frame: FIN, `opcode`, `payload`.
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    fragment(true, opcode, payload)
}

/// An unmasked server frame, FIN set or not.
fn fragment(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 | opcode } else { opcode }];
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

/// Feeds `bytes` to a fresh guard in pieces of `piece` bytes; what it sent
/// and whether it redacted.
fn feed(bytes: &[u8], piece: usize) -> (Vec<u8>, bool) {
    let mut guard = guard();
    let mut out = BytesMut::new();
    for chunk in bytes.chunks(piece) {
        guard.push(Bytes::copy_from_slice(chunk), &mut out).unwrap();
    }
    (out.to_vec(), guard.redacted())
}

/// What an agent makes of `bytes` (unmasked frames, all complete): the
/// messages and control frames in order, as (opcode, payload), each data
/// message reassembled. Panics on anything RFC 6455 forbids: a masked
/// frame, reserved bits, a continuation of nothing, a new message inside
/// another, a fragmented or oversized control frame, an empty non-final
/// fragment (airlock never sends one), an unfinished message.
fn reassemble(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut messages = Vec::new();
    let mut open: Option<(u8, Vec<u8>)> = None;
    let mut at = 0;
    while at < bytes.len() {
        let (first, second) = (bytes[at], bytes[at + 1]);
        assert_eq!(second & 0x80, 0, "a masked frame at {at}");
        assert_eq!(first & 0x70, 0, "reserved bits at {at}");
        let (fin, opcode) = (first & 0x80 != 0, first & 0x0f);
        let (len, header) = match second & 0x7f {
            126 => {
                let len = u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize;
                assert!(len >= 126, "a 16-bit length for {len} bytes");
                (len, 4)
            }
            127 => {
                let len = u64::from_be_bytes(bytes[at + 2..at + 10].try_into().unwrap()) as usize;
                assert!(len > 0xffff, "a 64-bit length for {len} bytes");
                (len, 10)
            }
            short => (short as usize, 2),
        };
        let payload = bytes[at + header..at + header + len].to_vec();
        at += header + len;
        match opcode {
            0x8..=0xa => {
                assert!(fin && len <= 125, "a bad control frame");
                messages.push((opcode, payload));
            }
            0x0 => {
                let (_, data) = open.as_mut().expect("a continuation of nothing");
                assert!(fin || !payload.is_empty(), "an empty non-final fragment");
                data.extend_from_slice(&payload);
            }
            0x1 | 0x2 => {
                assert!(open.is_none(), "a message inside another");
                assert!(fin || !payload.is_empty(), "an empty non-final fragment");
                open = Some((opcode, payload));
            }
            other => panic!("opcode {other}"),
        }
        if fin && opcode < 0x8 {
            messages.push(open.take().unwrap());
        }
    }
    assert!(open.is_none(), "a message left unfinished");
    messages
}

/// `{"echo":"<KEY>"}` with the key masked.
fn masked_echo() -> Vec<u8> {
    [
        b"{\"echo\":\"".as_slice(),
        &crate::redact::mask_for(KEY.len()),
        b"\"}",
    ]
    .concat()
}

/// Every way of cutting a stream into reads these tests try.
const PIECES: [usize; 8] = [1, 2, 3, 5, 7, 13, 64, usize::MAX];

#[test]
fn a_key_in_a_text_frame_is_masked_in_place_whatever_the_reads() {
    let text = [b"{\"echo\":\"".as_slice(), KEY, b"\"}"].concat();
    let mut stream = frame(0x1, &text);
    stream.extend(frame(0x1, b"after"));
    let mut expected = frame(0x1, &masked_echo());
    expected.extend(frame(0x1, b"after"));
    // In one read: frames as they came.
    assert_eq!(feed(&stream, usize::MAX), (expected, true));
    // In many: each message still whole and valid, however re-fragmented.
    for piece in PIECES {
        let (out, redacted) = feed(&stream, piece);
        assert_eq!(
            reassemble(&out),
            [(0x1, masked_echo()), (0x1, b"after".to_vec())],
            "pieces of {piece}"
        );
        assert!(redacted);
    }
}

#[test]
fn a_key_split_across_two_fragments_is_masked() {
    let text = [b"{\"echo\":\"".as_slice(), KEY, b"\"}"].concat();
    for cut in [9, 10, 17, text.len() - 3] {
        let mut stream = fragment(false, 0x1, &text[..cut]);
        stream.extend(fragment(true, 0x0, &text[cut..]));
        for piece in PIECES {
            let (out, redacted) = feed(&stream, piece);
            assert_eq!(
                reassemble(&out),
                [(0x1, masked_echo())],
                "cut at {cut}, pieces of {piece}"
            );
            assert!(redacted);
        }
    }
}

#[test]
fn a_key_split_across_fragments_with_a_ping_between_is_masked() {
    let text = [b"{\"echo\":\"".as_slice(), KEY, b"\"}"].concat();
    let cut = 15;
    let mut stream = fragment(false, 0x1, &text[..cut]);
    stream.extend(frame(0x9, b"ping"));
    stream.extend(fragment(false, 0x0, &text[cut..cut + 6]));
    stream.extend(frame(0xa, b""));
    stream.extend(fragment(true, 0x0, &text[cut + 6..]));
    stream.extend(frame(0x2, b"next"));
    for piece in PIECES {
        let (out, redacted) = feed(&stream, piece);
        let messages = reassemble(&out);
        // The control frames pass (in order, between the message's
        // fragments), the message is whole and masked.
        let controls: Vec<_> = messages.iter().filter(|(op, _)| *op >= 0x8).collect();
        assert_eq!(
            controls,
            [&(0x9, b"ping".to_vec()), &(0xa, Vec::new())],
            "pieces of {piece}"
        );
        let data: Vec<_> = messages.iter().filter(|(op, _)| *op < 0x8).collect();
        assert_eq!(
            data,
            [&(0x1, masked_echo()), &(0x2, b"next".to_vec())],
            "pieces of {piece}"
        );
        assert!(redacted);
    }
}

#[test]
fn a_message_ending_in_a_key_prefix_is_held_back_until_it_ends() {
    let mut guard = guard();
    let mut out = BytesMut::new();
    // A fragment ending with the key's first bytes: they wait.
    guard
        .push(Bytes::from(fragment(false, 0x1, b"ask sk-live")), &mut out)
        .unwrap();
    assert_eq!(out.to_vec(), fragment(false, 0x1, b"ask "));
    out.clear();
    // The message's next bytes do not complete the key: released with them.
    guard
        .push(Bytes::from(fragment(false, 0x0, b"-0123")), &mut out)
        .unwrap();
    assert!(out.is_empty(), "still a prefix: {out:?}");
    guard
        .push(Bytes::from(fragment(true, 0x0, b"!")), &mut out)
        .unwrap();
    assert_eq!(out.to_vec(), fragment(true, 0x0, b"sk-live-0123!"));
    assert!(!guard.redacted());

    // A final frame ending in a prefix, in two reads: released at its end.
    let mut guard = self::guard();
    let stream = frame(0x1, b"ask sk-live");
    let mut out = BytesMut::new();
    guard
        .push(Bytes::copy_from_slice(&stream[..8]), &mut out)
        .unwrap();
    assert_eq!(out.to_vec(), fragment(false, 0x1, b"ask "));
    out.clear();
    guard
        .push(Bytes::copy_from_slice(&stream[8..]), &mut out)
        .unwrap();
    assert_eq!(out.to_vec(), fragment(true, 0x0, b"sk-live"));
    assert!(!guard.redacted());
}

#[test]
fn a_key_in_a_control_frame_is_masked() {
    let mut stream = frame(0x9, KEY);
    stream.extend(frame(0x8, &[[0x03, 0xe8].as_slice(), KEY].concat()));
    let mut expected = frame(0x9, &crate::redact::mask_for(KEY.len()));
    expected.extend(frame(
        0x8,
        &[[0x03, 0xe8].as_slice(), &crate::redact::mask_for(KEY.len())].concat(),
    ));
    for piece in PIECES {
        assert_eq!(feed(&stream, piece), (expected.clone(), true), "{piece}");
    }
}

#[test]
fn long_frames_keep_their_extended_lengths() {
    let big = vec![b'a'; 70_000];
    let medium = vec![b'b'; 300];
    let mut stream = frame(0x2, &big);
    stream.extend(frame(0x2, &medium));
    stream.extend(frame(0x9, b""));
    let (out, redacted) = feed(&stream, usize::MAX);
    assert_eq!(out, stream);
    assert!(!redacted);
    let (out, _) = feed(&stream, 4096);
    assert_eq!(
        reassemble(&out),
        [(0x2, big), (0x2, medium), (0x9, Vec::new())]
    );
    for length in [0, 125, 126, 0xffff, 0x1_0000, u64::from(u32::MAX) + 1] {
        let mut header = BytesMut::new();
        write_header(&mut header, true, 0x2, None, length);
        assert_eq!(header_len(&header), header.len(), "{length}");
        let head = parse_header(&header).unwrap();
        assert_eq!(
            (head.fin, head.opcode, head.masked, head.length),
            (true, 0x2, false, length)
        );
    }
}

#[test]
fn frames_the_guard_cannot_follow_are_refused() {
    let refused = |bytes: &[u8]| {
        let mut out = BytesMut::new();
        let mut guard = guard();
        let result = guard.push(Bytes::copy_from_slice(bytes), &mut out);
        assert!(out.is_empty(), "nothing of a refused frame is passed on");
        // Nor anything after it.
        assert!(guard.push(Bytes::from(frame(0x1, b"x")), &mut out).is_err());
        result.unwrap_err()
    };
    // Masked: the payload is unreadable as sent.
    let masked = [0x81, 0x85, 1, 2, 3, 4, b'h', b'e', b'l', b'l', b'o'];
    assert_eq!(refused(&masked), Unreadable::Masked);
    // RSV1: permessage-deflate.
    assert_eq!(refused(&[0xc1, 0x02, 0xf2, 0x48]), Unreadable::Reserved);
    let mut huge = vec![0x82, 127];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(refused(&huge), Unreadable::Length);
    // A reserved opcode; a continuation of nothing; a message inside
    // another; a control frame too long, or fragmented.
    assert_eq!(refused(&frame(0x3, b"x")), Unreadable::Protocol);
    assert_eq!(refused(&frame(0x0, b"x")), Unreadable::Protocol);
    let mut nested = fragment(false, 0x1, b"a");
    nested.extend(frame(0x1, b"b"));
    let mut out = BytesMut::new();
    assert_eq!(
        guard().push(Bytes::from(nested), &mut out),
        Err(Unreadable::Protocol)
    );
    assert_eq!(refused(&frame(0x9, &[0; 126])), Unreadable::Protocol);
    assert_eq!(refused(&fragment(false, 0x9, b"x")), Unreadable::Protocol);
}

/// A masked client frame: `fin`, `opcode`, `payload`.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1, 2, 3, 4];
    let mut out = BytesMut::new();
    write_header(&mut out, fin, opcode, Some(mask), payload.len() as u64);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    out.to_vec()
}

/// Feeds the agent's `bytes` in pieces of `piece`: what goes on, and the
/// first refusal.
fn check_agent(bytes: &[u8], piece: usize) -> (Vec<u8>, Option<NotWebSocket>) {
    let mut frames = AgentFrames::new();
    let mut sent = Vec::new();
    for chunk in bytes.chunks(piece) {
        let mut out = BytesMut::new();
        let checked = frames.push(chunk, &mut out);
        sent.extend_from_slice(&out);
        if let Err(e) = checked {
            return (sent, Some(e));
        }
    }
    (sent, None)
}

#[test]
fn agent_frames_pass_unchanged_whatever_the_reads() {
    let mut stream = client_frame(true, 0x1, b"hello");
    stream.extend(client_frame(false, 0x2, &[7; 300]));
    stream.extend(client_frame(true, 0x9, b"ping"));
    stream.extend(client_frame(true, 0x0, &[8; 70_000]));
    stream.extend(client_frame(true, 0x8, &[0x03, 0xe8]));
    for piece in PIECES {
        assert_eq!(
            check_agent(&stream, piece),
            (stream.clone(), None),
            "{piece}"
        );
    }
}

#[test]
fn agent_bytes_that_are_no_websocket_frame_go_no_further() {
    let hello = client_frame(true, 0x1, b"hello");
    let refused = |bad: &[u8], want: NotWebSocket| {
        let mut stream = hello.clone();
        stream.extend_from_slice(bad);
        stream.extend(client_frame(true, 0x1, b"after"));
        for piece in PIECES {
            // The frame before passes; nothing of the bad one, nor after.
            assert_eq!(
                check_agent(&stream, piece),
                (hello.clone(), Some(want)),
                "{bad:?} in pieces of {piece}"
            );
        }
    };
    // An HTTP request after the switch: `GE` reads as a frame with RSV1
    // and opcode 7, unmasked.
    refused(
        b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n",
        NotWebSocket::Unmasked,
    );
    refused(b"POST / HTTP/1.1\r\n\r\n", NotWebSocket::Unmasked);
    // Unmasked, reserved bits, reserved opcodes.
    refused(&frame(0x1, b"x"), NotWebSocket::Unmasked);
    let mut rsv = client_frame(true, 0x1, b"x");
    rsv[0] |= 0x40;
    refused(&rsv, NotWebSocket::Reserved);
    refused(&client_frame(true, 0x3, b"x"), NotWebSocket::Protocol);
    refused(&client_frame(true, 0xb, b""), NotWebSocket::Protocol);
    // Control frames fragmented or too long; continuations of nothing.
    refused(&client_frame(false, 0x9, b"x"), NotWebSocket::Protocol);
    refused(&client_frame(true, 0xa, &[0; 126]), NotWebSocket::Protocol);
    refused(&client_frame(true, 0x0, b"x"), NotWebSocket::Protocol);
    // A new message before the last ended.
    let mut stream = client_frame(false, 0x1, b"a");
    stream.extend(client_frame(true, 0x2, b"b"));
    assert_eq!(
        check_agent(&stream, usize::MAX),
        (client_frame(false, 0x1, b"a"), Some(NotWebSocket::Protocol))
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
    // An upgrade airlock does not offer is ignored (RFC 9110 §7.8).
    assert_eq!(
        classify(&request(&[("connection", "upgrade"), ("upgrade", "h2c")])),
        Ok(false)
    );
    refused(&[("connection", "upgrade"), ("upgrade", "websocket, h2c")]);
    refused(&[("connection", "upgrade"), ("upgrade", "h2c, WebSocket/13")]);
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

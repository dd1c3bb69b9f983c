//! A raw HTTP/2 (prior knowledge, cleartext) client that sends exactly the
//! header fields it is given — duplicate or misplaced pseudo-headers,
//! connection-specific headers, upper-case names — which a real client
//! library refuses to send. Header blocks use HPACK literals without
//! indexing or Huffman coding; the response status is decoded from the
//! static table or a literal (Huffman-coded digits included).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::hostile::authority;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// How the server answered stream 1.
#[derive(Debug, Default)]
pub struct H2Outcome {
    /// `:status` of the response, if one came.
    pub status: Option<u16>,
    /// The response body.
    pub body: Vec<u8>,
    /// `RST_STREAM` error code for the stream, if it was reset.
    pub reset: Option<u32>,
    /// `GOAWAY` error code, if the server sent one.
    pub goaway: Option<u32>,
    /// The server closed the connection.
    pub closed: bool,
}

impl H2Outcome {
    /// Whether the request was refused in any of the ways HTTP/2 allows:
    /// a 4xx status, a stream reset, or a connection error.
    pub fn refused(&self) -> bool {
        self.status.is_some_and(|s| (400..500).contains(&s))
            || self.reset.is_some()
            || self.goaway.is_some_and(|code| code != 0)
            || (self.status.is_none() && self.closed)
    }

    /// `error.code` of a JSON error body.
    pub fn error_code(&self) -> Option<String> {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()?
            .pointer("/error/code")?
            .as_str()
            .map(str::to_owned)
    }
}

/// An HPACK header block of `fields`, each a literal without indexing.
pub fn header_block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        put_int(&mut block, 0, 7, name.len());
        block.extend_from_slice(name);
        put_int(&mut block, 0, 7, value.len());
        block.extend_from_slice(value);
    }
    block
}

fn put_int(out: &mut Vec<u8>, flags: u8, prefix: u8, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Opens an HTTP/2 connection to `base_url`, sends `fields` as the header
/// block of stream 1 (with `body`, if any, as one DATA frame) and reads
/// until the stream is answered, reset, or the connection ends (or `limit`).
pub async fn request(
    base_url: &str,
    fields: &[(&[u8], &[u8])],
    body: Option<&[u8]>,
    limit: Duration,
) -> H2Outcome {
    let mut stream = TcpStream::connect(authority(base_url))
        .await
        .expect("connect to the server");
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let headers_flags = END_HEADERS | if body.is_none() { END_STREAM } else { 0 };
    out.extend(frame(HEADERS, headers_flags, 1, &header_block(fields)));
    if let Some(body) = body {
        out.extend(frame(DATA, END_STREAM, 1, body));
    }
    let _ = stream.write_all(&out).await;
    read_outcome(&mut stream, limit).await
}

/// Opens an HTTP/2 connection, exchanges SETTINGS and then stays idle;
/// returns how long until the server closed it or said GOAWAY (or `None`
/// after `limit`).
pub async fn idle_connection_lifetime(base_url: &str, limit: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(authority(base_url))
        .await
        .expect("connect to the server");
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    stream.write_all(&out).await.ok()?;
    stay_until_closed(&mut stream, limit, true, None).await?;
    Some(started.elapsed())
}

/// Opens an HTTP/2 connection whose flow-control window for the server's
/// answers is 0 (`SETTINGS_INITIAL_WINDOW_SIZE`), sends `fields` as stream
/// 1 and never opens the window: an agent that does not take its answer.
/// Returns how long until the server closed the connection (a GOAWAY
/// alone leaves the stream, and the connection's slot, held), or `None`
/// after `limit`.
pub async fn unread_answer_lifetime(
    base_url: &str,
    fields: &[(&[u8], &[u8])],
    limit: Duration,
) -> Option<Duration> {
    unread_lifetime(base_url, fields, None, limit).await
}

/// As [`unread_answer_lifetime`], but sending `fields` again as a new
/// stream every `every`, none of whose answers it takes either: new
/// requests are no sign that the agent takes its answers.
pub async fn unread_answers_lifetime(
    base_url: &str,
    fields: &[(&[u8], &[u8])],
    every: Duration,
    limit: Duration,
) -> Option<Duration> {
    unread_lifetime(base_url, fields, Some(every), limit).await
}

/// The window-0 connection of [`unread_answer_lifetime`], sending `fields`
/// once, or every `every`.
async fn unread_lifetime(
    base_url: &str,
    fields: &[(&[u8], &[u8])],
    every: Option<Duration>,
    limit: Duration,
) -> Option<Duration> {
    const INITIAL_WINDOW_SIZE: u16 = 0x4;
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(authority(base_url))
        .await
        .expect("connect to the server");
    let mut out = PREFACE.to_vec();
    let mut settings = INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
    settings.extend(0u32.to_be_bytes());
    out.extend(frame(SETTINGS, 0, 0, &settings));
    stream.write_all(&out).await.ok()?;
    let requests = Requests {
        block: header_block(fields),
        every: every.unwrap_or(limit),
    };
    stay_until_closed(&mut stream, limit, false, Some(requests)).await?;
    Some(started.elapsed())
}

/// A request sent as a new stream every `every` (the first at once; with
/// an `every` of the whole limit, only that one).
struct Requests {
    block: Vec<u8>,
    every: Duration,
}

/// Reads `stream` until the server closes it (or, with `at_goaway`, says
/// GOAWAY), acknowledging settings and answering pings so that the server
/// has no reason to close other than the one a test waits for, and sending
/// `requests` meanwhile. `None` after `limit`.
async fn stay_until_closed(
    stream: &mut TcpStream,
    limit: Duration,
    at_goaway: bool,
    requests: Option<Requests>,
) -> Option<()> {
    let deadline = tokio::time::Instant::now() + limit;
    // Polled only with requests to send.
    let mut ticks = tokio::time::interval(requests.as_ref().map_or(limit, |r| r.every));
    let mut next_stream: u32 = 1;
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        tokio::select! {
            _ = ticks.tick(), if requests.is_some() => {
                let block = requests.as_ref().map_or(&[][..], |r| &r.block[..]);
                let headers = frame(HEADERS, END_HEADERS | END_STREAM, next_stream, block);
                next_stream += 2;
                if stream.write_all(&headers).await.is_err() {
                    return Some(());
                }
            }
            read = tokio::time::timeout_at(deadline, stream.read(&mut chunk)) => match read {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => return Some(()),
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            },
        }
        while let Some((kind, flags, _, payload, used)) = next_frame(&buf) {
            if kind == SETTINGS && flags & ACK == 0 {
                let _ = stream.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
            }
            if kind == PING && flags & ACK == 0 {
                let _ = stream.write_all(&frame(PING, ACK, 0, &payload)).await;
            }
            if kind == GOAWAY && at_goaway {
                return Some(());
            }
            buf.drain(..used);
        }
    }
}

/// One frame at the start of `buf`: (type, flags, stream, payload, bytes used).
fn next_frame(buf: &[u8]) -> Option<(u8, u8, u32, Vec<u8>, usize)> {
    if buf.len() < 9 {
        return None;
    }
    let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
    if buf.len() < 9 + len {
        return None;
    }
    let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
    Some((buf[3], buf[4], stream, buf[9..9 + len].to_vec(), 9 + len))
}

async fn read_outcome(stream: &mut TcpStream, limit: Duration) -> H2Outcome {
    let deadline = tokio::time::Instant::now() + limit;
    let mut outcome = H2Outcome::default();
    let mut buf = Vec::new();
    loop {
        while let Some((kind, flags, id, payload, used)) = next_frame(&buf) {
            buf.drain(..used);
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    let _ = stream.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
                }
                HEADERS if id == 1 => {
                    if outcome.status.is_none() {
                        outcome.status = decode_status(header_payload(flags, &payload));
                    }
                    if flags & END_STREAM != 0 {
                        return outcome;
                    }
                }
                DATA if id == 1 => {
                    let data = if flags & 0x8 != 0 {
                        strip_padding(&payload)
                    } else {
                        &payload[..]
                    };
                    outcome.body.extend_from_slice(data);
                    if flags & END_STREAM != 0 {
                        return outcome;
                    }
                }
                RST_STREAM if id == 1 => {
                    outcome.reset = payload
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    return outcome;
                }
                GOAWAY => {
                    outcome.goaway = payload
                        .get(4..8)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    if outcome.goaway != Some(0) {
                        return outcome;
                    }
                }
                _ => {}
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return outcome,
            Ok(Ok(0) | Err(_)) => {
                outcome.closed = true;
                return outcome;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn strip_padding(payload: &[u8]) -> &[u8] {
    let Some((&pad, rest)) = payload.split_first() else {
        return payload;
    };
    &rest[..rest.len().saturating_sub(usize::from(pad))]
}

/// The header block fragment of a HEADERS payload (padding and priority
/// removed).
fn header_payload(flags: u8, payload: &[u8]) -> &[u8] {
    let mut block = payload;
    let mut pad = 0usize;
    if flags & 0x8 != 0 {
        let Some((&p, rest)) = block.split_first() else {
            return &[];
        };
        pad = usize::from(p);
        block = rest;
    }
    if flags & 0x20 != 0 {
        block = block.get(5..).unwrap_or(&[]);
    }
    &block[..block.len().saturating_sub(pad)]
}

/// Reads an HPACK integer with a `prefix`-bit prefix.
fn get_int(block: &[u8], prefix: u8) -> Option<(usize, &[u8])> {
    let (&first, mut rest) = block.split_first()?;
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Some((value, rest));
    }
    let mut shift = 0;
    loop {
        let (&b, tail) = rest.split_first()?;
        rest = tail;
        value += (usize::from(b) & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Some((value, rest));
        }
    }
}

/// `:status` from the first field of a response header block.
fn decode_status(mut block: &[u8]) -> Option<u16> {
    loop {
        let first = *block.first()?;
        if first & 0xe0 == 0x20 {
            // Dynamic table size update.
            block = get_int(block, 5)?.1;
            continue;
        }
        if first & 0x80 != 0 {
            let (index, _) = get_int(block, 7)?;
            return match index {
                8 => Some(200),
                9 => Some(204),
                10 => Some(206),
                11 => Some(304),
                12 => Some(400),
                13 => Some(404),
                14 => Some(500),
                _ => None,
            };
        }
        let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
        let (name_index, rest) = get_int(block, prefix)?;
        if !(8..=14).contains(&name_index) {
            return None;
        }
        let huffman = rest.first()? & 0x80 != 0;
        let (len, rest) = get_int(rest, 7)?;
        let value = rest.get(..len)?;
        let digits = if huffman {
            huffman_digits(value)?
        } else {
            String::from_utf8(value.to_vec()).ok()?
        };
        return digits.get(..3)?.parse().ok();
    }
}

/// Decodes a Huffman-coded string of ASCII digits (RFC 7541 Appendix B:
/// `0`-`2` are 5-bit codes 0-2, `3`-`9` are 6-bit codes 0x19-0x1f).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<bool> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1))
        .collect();
    let read = |at: usize, n: usize| -> Option<u8> {
        bits.get(at..at + n)
            .map(|s| s.iter().fold(0u8, |acc, b| acc << 1 | u8::from(*b)))
    };
    let mut out = String::new();
    let mut at = 0;
    while out.len() < 3 {
        let five = read(at, 5)?;
        if five <= 2 {
            out.push(char::from(b'0' + five));
            at += 5;
            continue;
        }
        let six = read(at, 6)?;
        if (0x19..=0x1f).contains(&six) {
            out.push(char::from(b'0' + 3 + (six - 0x19)));
            at += 6;
            continue;
        }
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_decode() {
        assert_eq!(decode_status(&[0x88]), Some(200));
        assert_eq!(decode_status(&[0x8d]), Some(404));
        // Literal with incremental indexing, name index 8, raw "431".
        assert_eq!(decode_status(&[0x48, 0x03, b'4', b'3', b'1']), Some(431));
        // "403" Huffman-coded: 011010 00000 011001 + 111 padding.
        assert_eq!(
            decode_status(&[0x48, 0x83, 0b0110_1000, 0b0000_1100, 0b1111_1111]),
            Some(403)
        );
        assert_eq!(
            huffman_digits(&[0b0110_1000, 0b0000_1100, 0b1111_1111]).as_deref(),
            Some("403")
        );
    }

    #[test]
    fn integers_round_trip() {
        for value in [0usize, 5, 126, 127, 128, 300, 70_000] {
            let mut out = Vec::new();
            put_int(&mut out, 0, 7, value);
            assert_eq!(get_int(&out, 7).map(|(v, _)| v), Some(value));
        }
    }
}

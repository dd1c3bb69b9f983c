use proptest::prelude::*;

use super::*;

fn sniff(chunks: &[&[u8]]) -> (Vec<Option<&'static str>>, bool) {
    let shared = SharedVerdicts::default();
    let mut sniffer = Sniffer::new(64 * 1024, Arc::clone(&shared));
    for chunk in chunks {
        sniffer.feed(chunk);
    }
    let verdicts = shared.lock().unwrap();
    (
        verdicts.queue.iter().map(|(_, v)| *v).collect(),
        verdicts.lost,
    )
}

fn one(request: &[u8]) -> Option<&'static str> {
    let (verdicts, _) = sniff(&[request]);
    assert_eq!(verdicts.len(), 1, "{:?}", String::from_utf8_lossy(request));
    verdicts[0]
}

#[test]
fn clean_requests_pass_and_are_followed_through_their_bodies() {
    let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
        POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\n\
        \r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n";
    let (verdicts, lost) = sniff(&[stream]);
    assert_eq!(verdicts, vec![None, None, None]);
    assert!(!lost);
    // The same stream split at every byte gives the same verdicts.
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    let (verdicts, lost) = sniff(&bytes);
    assert_eq!(verdicts, vec![None, None, None]);
    assert!(!lost);
}

#[test]
fn bodies_that_look_like_requests_are_skipped() {
    let inner = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut stream = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        inner.len()
    )
    .into_bytes();
    stream.extend_from_slice(inner);
    assert_eq!(sniff(&[&stream]).0, vec![None]);
}

#[test]
fn anomalies_are_reported() {
    let cases: &[(&[u8], &str)] = &[
        (b"GET / HTTP/1.1\nHost: x\r\n\r\n", "bare LF"),
        (b"GET / HTTP/1.1\r\nHost: x\n\r\n", "bare LF"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\n", "bare LF"),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "Content-Length together",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
            "Content-Length together",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            "more than one Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "more than one Transfer-Encoding",
        ),
        (b"GET /a#/../b HTTP/1.1\r\nHost: x\r\n\r\n", "fragment"),
        (b"GET  /a HTTP/1.1\r\nHost: x\r\n\r\n", "extra spaces"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", "folded"),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
            "overflows",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "without digits",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
            "broken chunked",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
            "broken chunked",
        ),
    ];
    for (request, expected) in cases {
        let verdict = one(request);
        assert!(
            verdict.is_some_and(|v| v.contains(expected)),
            "{:?}: {verdict:?}",
            String::from_utf8_lossy(request)
        );
    }
}

#[test]
fn a_dispatched_request_is_not_amended_but_the_connection_is_lost() {
    let shared = SharedVerdicts::default();
    let mut sniffer = Sniffer::new(1024, Arc::clone(&shared));
    sniffer.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(Verdicts::take(&shared), None);
    sniffer.feed(b"xyz\r\n");
    assert!(sniffer.is_off());
    // Whatever hyper makes of the rest, it is refused.
    assert!(Verdicts::take(&shared).is_some());
}

#[test]
fn http2_preface_switches_the_sniffer_off() {
    let shared = SharedVerdicts::default();
    let mut sniffer = Sniffer::new(1024, Arc::clone(&shared));
    sniffer.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00");
    assert!(sniffer.is_off());
    assert_eq!(Verdicts::take(&shared), None);
}

#[test]
fn over_long_lines_stop_the_sniffer() {
    let shared = SharedVerdicts::default();
    let mut sniffer = Sniffer::new(16, Arc::clone(&shared));
    sniffer.feed(b"GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\n");
    assert!(sniffer.is_off());
    assert!(Verdicts::take(&shared).is_some());
}

proptest! {
    /// Arbitrary bytes never panic the sniffer, however they are split.
    #[test]
    fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), split in 1usize..64) {
        let shared = SharedVerdicts::default();
        let mut sniffer = Sniffer::new(128, Arc::clone(&shared));
        for chunk in bytes.chunks(split) {
            sniffer.feed(chunk);
        }
    }

    /// Well-formed chunked bodies of any shape are followed to their end,
    /// however the stream is split.
    #[test]
    fn chunked_bodies_are_followed(
        sizes in proptest::collection::vec(0usize..300, 0..8),
        upper in any::<bool>(),
        split in 1usize..97,
    ) {
        let mut stream = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for size in sizes.iter().filter(|s| **s > 0) {
            let hex = if upper { format!("{size:X}") } else { format!("{size:x}") };
            stream.extend_from_slice(hex.as_bytes());
            stream.extend_from_slice(b"\r\n");
            stream.extend(std::iter::repeat_n(b'\n', *size));
            stream.extend_from_slice(b"\r\n");
        }
        stream.extend_from_slice(b"0\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n");
        let chunks: Vec<&[u8]> = stream.chunks(split).collect();
        let (verdicts, lost) = sniff(&chunks);
        prop_assert_eq!(verdicts, vec![None, None]);
        prop_assert!(!lost);
    }
}

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;

use http_body_util::BodyExt;
use proptest::prelude::*;

use super::*;

/// 24 bytes: masked as the full marker and three `*`.
const SECRET: &[u8] = b"sk-live-0123456789abcdef";
const MASK: &[u8] = b"[REDACTED BY AIRLOCK]***";

fn redactor(secrets: &[&[u8]]) -> Redactor {
    Redactor::new(secrets).unwrap()
}

/// The mask of a secret of `len` bytes, written independently of `mask_for`.
fn reference_mask(len: usize) -> Vec<u8> {
    let marker: &[u8] = match len {
        21.. => b"[REDACTED BY AIRLOCK]",
        10..=20 => b"[REDACTED]",
        _ => b"",
    };
    let mut mask = marker.to_vec();
    mask.extend(std::iter::repeat_n(b'*', len - marker.len()));
    mask
}

/// The one-shot replacement the streaming output must equal: scan left to
/// right; at the first position where secrets match, replace the longest by
/// its mask.
fn reference(secrets: &[&[u8]], text: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let longest = secrets
            .iter()
            .filter(|s| text[i..].starts_with(s))
            .map(|s| s.len())
            .max();
        match longest {
            Some(len) => {
                out.extend_from_slice(&reference_mask(len));
                i += len;
            }
            None => {
                out.push(text[i]);
                i += 1;
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Streams `text` split at `cuts` through a fresh state; checks the
/// invariants after every push and returns the output chunks (the last one
/// from `finish`) and the state's redacted flag.
fn stream(
    redactor: &Redactor,
    secrets: &[&[u8]],
    text: &[u8],
    cuts: &[usize],
) -> (Vec<Bytes>, bool) {
    let max_len = secrets.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (text.len() + 1)).collect();
    cuts.push(0);
    cuts.push(text.len());
    cuts.sort_unstable();
    let mut state = redactor.state();
    let mut outs = Vec::new();
    for pair in cuts.windows(2) {
        let (out, _) = state.push(Bytes::copy_from_slice(&text[pair[0]..pair[1]]));
        assert!(
            state.held.len() < max_len.max(1),
            "held {}",
            state.held.len()
        );
        if !state.held.is_empty() {
            assert!(
                secrets
                    .iter()
                    .any(|s| s.len() > state.held.len() && s.starts_with(&state.held)),
                "held bytes are not a proper secret prefix"
            );
        }
        outs.push(out);
    }
    outs.push(state.finish());
    assert_eq!(state.held_len(), 0);
    (outs, state.redacted())
}

fn concat(chunks: &[Bytes]) -> Vec<u8> {
    chunks.iter().flat_map(|c| c.iter().copied()).collect()
}

// === masks ===

#[test]
fn masks_at_the_boundary_lengths() {
    assert_eq!(REDACTION_MARKER.len(), 21);
    for (len, expected) in [
        (8, &b"********"[..]),
        (9, b"*********"),
        (10, b"[REDACTED]"),
        (20, b"[REDACTED]**********"),
        (21, b"[REDACTED BY AIRLOCK]"),
        (
            60,
            b"[REDACTED BY AIRLOCK]***************************************",
        ),
    ] {
        let mask = mask_for(len);
        assert_eq!(mask, expected, "len {len}");
        assert_eq!(mask.len(), len);
        assert_eq!(mask, reference_mask(len));
    }
    assert_eq!(mask_for(SECRET.len()), MASK);
    for len in 0..100 {
        assert_eq!(mask_for(len), reference_mask(len), "len {len}");
    }
}

#[test]
fn each_secret_gets_the_mask_of_its_length() {
    let r = redactor(&[b"12345678", b"abcdefghijklmn", SECRET]);
    let text = [
        b"<".as_slice(),
        b"12345678",
        b"|",
        b"abcdefghijklmn",
        b"|",
        SECRET,
        b">",
    ]
    .concat();
    let out = r.redact(&text);
    assert_eq!(
        out.as_ref(),
        b"<********|[REDACTED]****|[REDACTED BY AIRLOCK]***>"
    );
    assert_eq!(out.len(), text.len());
}

// === Redactor ===

#[test]
fn short_secrets_are_refused() {
    let err = Redactor::new(&[b"1234567"]).unwrap_err();
    assert_eq!(err, RedactorError::TooShort(7));
    assert!(err.to_string().contains("at least 8 bytes"), "{err}");
    assert!(Redactor::new(&[SECRET, b""]).is_err());
    assert!(Redactor::new(&[b"12345678"]).is_ok());
}

#[test]
fn duplicates_are_ignored_and_debug_shows_no_secret() {
    let r = redactor(&[SECRET, SECRET]);
    let shown = format!("{r:?}");
    assert_eq!(shown, "Redactor { secrets: 1 }");
    let mut state = r.state();
    state.push(Bytes::from_static(b"xx sk-live"));
    let shown = format!("{state:?}");
    assert!(!shown.contains("sk-live"), "{shown}");
}

#[test]
fn one_shot_redaction() {
    let r = redactor(&[SECRET]);
    let text = b"key=sk-live-0123456789abcdef; again sk-live-0123456789abcdef.";
    assert_eq!(
        r.redact(text).as_ref(),
        b"key=[REDACTED BY AIRLOCK]***; again [REDACTED BY AIRLOCK]***.".as_slice()
    );
    assert_eq!(r.redact(text).len(), text.len());
    assert!(matches!(r.redact(b"nothing here"), Cow::Borrowed(_)));
    assert!(r.contains_secret(text));
    assert!(!r.contains_secret(b"sk-live-0123456789abcde"));
}

#[test]
fn empty_redactor_passes_everything() {
    let r = Redactor::empty();
    assert!(r.is_empty());
    let mut state = r.state();
    let chunk = Bytes::from_static(b"anything at all s");
    let (out, redacted) = state.push(chunk.clone());
    assert_eq!(out.as_ptr(), chunk.as_ptr());
    assert!(!redacted);
    assert!(state.finish().is_empty());
    assert!(r
        .scrub_header_value(&HeaderValue::from_static("x"))
        .is_none());
}

// === RedactState ===

#[test]
fn clean_chunk_is_passed_without_copy() {
    let r = redactor(&[SECRET]);
    let mut state = r.state();
    let chunk = Bytes::from(b"data: {\"text\":\"hello\"}\n\n".to_vec());
    let (out, redacted) = state.push(chunk.clone());
    assert!(!redacted);
    assert_eq!(out.as_ptr(), chunk.as_ptr());
    assert_eq!(out.len(), chunk.len());
    assert_eq!(state.held_len(), 0);
}

#[test]
fn sse_event_is_never_delayed() {
    let r = redactor(&[SECRET, b"\n\nnot-a-real-prefix"]);
    let mut state = r.state();
    // Ends in "\n\n", which is a prefix of a secret here: held. With
    // ordinary secrets (not starting with a newline) it is never held.
    let (out, _) = state.push(Bytes::from_static(b"data: a\n\n"));
    assert_eq!(&out[..], b"data: a");
    let r = redactor(&[SECRET]);
    let mut state = r.state();
    for event in [
        &b"data: s\n\n"[..],
        b"data: sk-live\n\n",
        b"event: x\ndata: {}\n\n",
    ] {
        let (out, _) = state.push(Bytes::copy_from_slice(event));
        assert_eq!(&out[..], event);
        assert_eq!(state.held_len(), 0);
    }
}

#[test]
fn only_a_secret_prefix_is_held_and_the_rest_is_a_slice() {
    let r = redactor(&[SECRET]);
    let mut state = r.state();
    let chunk = Bytes::from_static(b"{\"echo\":\"sk-li");
    let (out, redacted) = state.push(chunk.clone());
    assert!(!redacted);
    assert_eq!(&out[..], b"{\"echo\":\"");
    assert_eq!(out.as_ptr(), chunk.as_ptr());
    assert_eq!(state.held_len(), 5);
    // Not the secret after all: released with the next chunk.
    let (out, redacted) = state.push(Bytes::from_static(b"mit\"}"));
    assert!(!redacted);
    assert_eq!(&out[..], b"sk-limit\"}");
    assert_eq!(state.held_len(), 0);
}

#[test]
fn held_prefix_is_flushed_unchanged_at_the_end() {
    let r = redactor(&[SECRET]);
    let mut state = r.state();
    let (out, _) = state.push(Bytes::from_static(b"tail sk-live-01"));
    assert_eq!(&out[..], b"tail ");
    assert_eq!(&state.finish()[..], b"sk-live-01");
    assert!(!state.redacted());
    assert!(state.finish().is_empty());
}

#[test]
fn secret_split_into_single_bytes() {
    let r = redactor(&[SECRET]);
    let text = [b"<<".as_slice(), SECRET, b">>"].concat();
    let mut state = r.state();
    let mut out = Vec::new();
    let mut any = false;
    for b in &text {
        let (chunk, redacted) = state.push(Bytes::copy_from_slice(&[*b]));
        assert!(!contains(&chunk, b"sk-live-0"));
        any |= redacted;
        out.extend_from_slice(&chunk);
    }
    out.extend_from_slice(&state.finish());
    assert!(any);
    assert!(state.redacted());
    assert_eq!(out, [b"<<".as_slice(), MASK, b">>"].concat());
}

#[test]
fn longest_secret_wins_across_chunks() {
    let short: &[u8] = b"AAAAAAAA";
    let long: &[u8] = b"AAAAAAAAZ";
    let r = redactor(&[short, long]);
    for (tail, expected) in [(&b"Z"[..], &b"*********"[..]), (b"Y", b"********Y")] {
        let mut state = r.state();
        let (out, _) = state.push(Bytes::from_static(b"AAAAAAAA"));
        // A complete short secret that may still grow into the long one: held.
        assert!(out.is_empty());
        let (out, redacted) = state.push(Bytes::copy_from_slice(tail));
        assert!(redacted);
        assert_eq!(&out[..], expected);
    }
    // At the end of the stream the held short secret is still redacted.
    let mut state = r.state();
    state.push(Bytes::from_static(b"xAAAAAAAA"));
    assert_eq!(&state.finish()[..], b"********");
    assert!(state.redacted());
}

#[test]
fn overlapping_occurrences() {
    let secret: &[u8] = b"abababab";
    let r = redactor(&[secret]);
    let text = b"abababababab";
    let (outs, redacted) = stream(&r, &[secret], text, &[3, 7, 9]);
    assert!(redacted);
    assert_eq!(concat(&outs), reference(&[secret], text));
    assert_eq!(concat(&outs), b"********abab");
}

#[test]
fn many_secrets_many_chunks() {
    // 22 and 20 bytes: the full marker and the short one.
    let a: &[u8] = b"sk-ant-api03-xyzxyzxyz";
    let b: &[u8] = b"ghp_0123456789abcdef";
    let r = redactor(&[a, b]);
    let text = [
        b"first ".as_slice(),
        a,
        b" then ",
        b,
        b" and ",
        a,
        a,
        b" end",
    ]
    .concat();
    for step in 1..text.len() {
        let cuts: Vec<usize> = (step..text.len()).step_by(step).collect();
        let (outs, redacted) = stream(&r, &[a, b], &text, &cuts);
        assert!(redacted);
        let out = concat(&outs);
        assert_eq!(out.len(), text.len());
        assert_eq!(
            out,
            b"first [REDACTED BY AIRLOCK]* then [REDACTED]********** and \
              [REDACTED BY AIRLOCK]*[REDACTED BY AIRLOCK]* end"
                .as_slice(),
            "step {step}"
        );
    }
}

// === headers ===

#[test]
fn header_values_are_scrubbed() {
    let r = redactor(&[SECRET]);
    let mut value = HeaderValue::from_static("Bearer sk-live-0123456789abcdef");
    value.set_sensitive(true);
    let scrubbed = r.scrub_header_value(&value).unwrap();
    assert_eq!(scrubbed, "Bearer [REDACTED BY AIRLOCK]***");
    assert_eq!(scrubbed.len(), value.len());
    assert!(scrubbed.is_sensitive());
    assert!(r
        .scrub_header_value(&HeaderValue::from_static("Bearer sk-live-0123"))
        .is_none());

    let mut headers = HeaderMap::new();
    headers.insert("x-clean", HeaderValue::from_static("fine"));
    headers.append("x-echo", HeaderValue::from_static("a"));
    headers.append(
        "x-echo",
        HeaderValue::from_static("sk-live-0123456789abcdef,sk-live-0123456789abcdef"),
    );
    assert!(r.scrub_headers(&mut headers));
    assert_eq!(headers["x-clean"], "fine");
    let echoes: Vec<_> = headers.get_all("x-echo").iter().collect();
    assert_eq!(
        echoes,
        ["a", "[REDACTED BY AIRLOCK]***,[REDACTED BY AIRLOCK]***"]
    );
    // Shorter secrets get the same masks as in bodies.
    let r = redactor(&[b"tok-12345678"]);
    let scrubbed = r
        .scrub_header_value(&HeaderValue::from_static("x tok-12345678 y"))
        .unwrap();
    assert_eq!(scrubbed, "x [REDACTED]** y");
    assert!(!r.scrub_headers(&mut headers));
    // A value exactly as long as the shortest secret is searched.
    let two = redactor(&[SECRET, b"tok-12345678"]);
    assert_eq!(
        two.scrub_header_value(&HeaderValue::from_static("tok-12345678"))
            .unwrap(),
        "[REDACTED]**"
    );
    assert!(two
        .scrub_header_value(&HeaderValue::from_static("tok-1234567"))
        .is_none());
}

// === RedactingBody ===

/// A body yielding the given frames, then the end.
struct FramesBody(VecDeque<Result<Frame<Bytes>, &'static str>>);

impl FramesBody {
    fn data(chunks: &[&[u8]]) -> Self {
        Self(
            chunks
                .iter()
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect(),
        )
    }
}

impl Body for FramesBody {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
        Poll::Ready(self.get_mut().0.pop_front())
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let mut total = 0;
        for frame in self.0.iter().flatten() {
            if let Some(data) = frame.data_ref() {
                total += data.len() as u64;
            }
        }
        SizeHint::with_exact(total)
    }
}

async fn frames<B: Body<Data = Bytes> + Unpin>(mut body: B) -> Vec<Result<Frame<Bytes>, B::Error>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        out.push(frame);
    }
    out
}

#[tokio::test]
async fn body_redacts_across_frames_and_sets_the_flag() {
    let r = redactor(&[SECRET]);
    let flag = RedactionFlag::new();
    let inner = FramesBody::data(&[
        b"data: {\"k\":\"sk-live-01",
        b"23456789ab",
        b"cdef\"}\n\n",
        b"data: [DONE]\n\n",
    ]);
    let len = inner.size_hint().exact().unwrap();
    let body = RedactingBody::new(inner, &r, flag.clone());
    assert_eq!(body.size_hint().exact(), Some(len));
    let collected = body.collect().await.unwrap().to_bytes();
    assert_eq!(
        &collected[..],
        b"data: {\"k\":\"[REDACTED BY AIRLOCK]***\"}\n\ndata: [DONE]\n\n"
    );
    assert_eq!(collected.len() as u64, len);
    assert!(flag.is_set());
}

#[tokio::test]
async fn clean_body_frames_pass_unchanged() {
    let r = redactor(&[SECRET]);
    let flag = RedactionFlag::new();
    let chunks: [&[u8]; 3] = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"];
    let body = RedactingBody::new(FramesBody::data(&chunks), &r, flag.clone());
    let out = frames(body).await;
    let out: Vec<Bytes> = out
        .into_iter()
        .map(|f| f.unwrap().into_data().unwrap())
        .collect();
    assert_eq!(out, chunks.map(Bytes::copy_from_slice));
    assert!(!flag.is_set());
}

#[tokio::test]
async fn tail_is_flushed_before_scrubbed_trailers() {
    let r = redactor(&[SECRET]);
    let flag = RedactionFlag::new();
    let mut trailers = HeaderMap::new();
    trailers.insert(
        "x-echo",
        HeaderValue::from_static("sk-live-0123456789abcdef"),
    );
    let mut inner = FramesBody::data(&[b"end sk-live"]);
    inner.0.push_back(Ok(Frame::trailers(trailers)));
    let mut body = RedactingBody::new(inner, &r, flag.clone());
    assert!(!body.is_end_stream());

    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"end ");
    assert!(!flag.is_set());
    let tail = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&tail[..], b"sk-live");
    assert!(!body.is_end_stream());
    let trailers = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_trailers()
        .unwrap();
    assert_eq!(trailers["x-echo"].as_bytes(), MASK);
    assert!(flag.is_set());
    assert!(body.is_end_stream());
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn secret_completed_at_the_end_is_redacted() {
    let short: &[u8] = b"AAAAAAAA";
    let long: &[u8] = b"AAAAAAAAZ";
    let r = redactor(&[short, long]);
    let flag = RedactionFlag::new();
    let body = RedactingBody::new(FramesBody::data(&[b"x", b"AAAAAAAA"]), &r, flag.clone());
    let out = body.collect().await.unwrap().to_bytes();
    assert_eq!(&out[..], b"x********");
    assert!(flag.is_set());
}

#[tokio::test]
async fn errors_pass_through() {
    let r = redactor(&[SECRET]);
    let mut inner = FramesBody::data(&[b"ok sk-live"]);
    inner.0.push_back(Err("upstream reset"));
    let out = frames(RedactingBody::new(inner, &r, RedactionFlag::new())).await;
    assert_eq!(out.len(), 2);
    assert_eq!(&out[0].as_ref().unwrap().data_ref().unwrap()[..], b"ok ");
    // The held secret prefix is not emitted after an error.
    assert_eq!(out[1].as_ref().unwrap_err(), &"upstream reset");
}

#[tokio::test]
async fn size_hint_passes_through_even_when_a_secret_is_redacted() {
    let inner = FramesBody::data(&[b"12345"]);
    let body = RedactingBody::new(inner, &Redactor::empty(), RedactionFlag::new());
    assert_eq!(body.size_hint().exact(), Some(5));

    let body = RedactingBody::new(
        FramesBody::data(&[]),
        &redactor(&[SECRET]),
        RedactionFlag::new(),
    );
    assert_eq!(body.size_hint().exact(), Some(0));
    assert!(body.is_end_stream());

    // A secret split across frames: the hint is exact before the first
    // frame, after each one (held bytes included) and matches the output.
    let chunks: [&[u8]; 3] = [b"a sk-live-0123", b"456789abcdef b", b" sk-li"];
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let flag = RedactionFlag::new();
    let mut body = RedactingBody::new(
        FramesBody::data(&chunks),
        &redactor(&[SECRET]),
        flag.clone(),
    );
    assert_eq!(body.size_hint().exact(), Some(total as u64));
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        out.extend_from_slice(&frame.unwrap().into_data().unwrap());
        assert_eq!(body.size_hint().exact(), Some((total - out.len()) as u64));
    }
    assert!(flag.is_set());
    assert_eq!(out, b"a [REDACTED BY AIRLOCK]*** b sk-li");
    assert_eq!(out.len(), total);

    // A hint without an exact value passes through as well.
    let mut inner = FramesBody::data(&[SECRET]);
    inner.0.push_back(Ok(Frame::data(Bytes::from_static(b"x"))));
    struct Unknown(FramesBody);
    impl Body for Unknown {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            Pin::new(&mut self.get_mut().0).poll_frame(cx)
        }
        fn size_hint(&self) -> SizeHint {
            let mut hint = SizeHint::new();
            hint.set_lower(self.0.size_hint().lower());
            hint
        }
    }
    let body = RedactingBody::new(Unknown(inner), &redactor(&[SECRET]), RedactionFlag::new());
    let hint = body.size_hint();
    assert_eq!((hint.lower(), hint.upper()), (25, None));
}

#[test]
fn body_is_send_and_sync_for_hyper() {
    fn assert_send<T: Send + Sync + 'static>() {}
    assert_send::<RedactingBody<http_body_util::Full<Bytes>>>();
    assert_send::<Redactor>();
}

// === properties ===

fn secret_strategy(
    alphabet: &'static [u8],
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(proptest::sample::select(alphabet), len)
}

/// Secrets built from one another: prefixes, extensions and overlaps of a
/// base secret, where leftmost-longest decisions across chunks matter most.
fn related_secrets() -> impl Strategy<Value = Vec<Vec<u8>>> {
    (
        secret_strategy(b"ab", 8..12),
        proptest::collection::vec((0..4u8, secret_strategy(b"ab", 1..6), 0..8usize), 1..4),
    )
        .prop_map(|(base, derived)| {
            let mut out = vec![base.clone()];
            for (kind, extra, k) in derived {
                let secret = match kind {
                    // The base is a proper prefix of it.
                    0 => [base.as_slice(), &extra].concat(),
                    // It is a proper prefix of the base.
                    1 => base[..base.len().saturating_sub(k + 1).max(MIN_SECRET_LEN)].to_vec(),
                    // It starts inside the base and runs past its end.
                    2 => [&base[k.min(base.len() - 1)..], extra.as_slice(), &base].concat(),
                    // The base is a suffix of it.
                    _ => [extra.as_slice(), &base].concat(),
                };
                if secret.len() >= MIN_SECRET_LEN {
                    out.push(secret);
                }
            }
            out
        })
}

#[derive(Clone, Debug)]
enum Piece {
    Text(Vec<u8>),
    Secret(usize),
}

/// Text made of random pieces and whole secrets.
fn text_strategy(
    secrets: Vec<Vec<u8>>,
    alphabet: &'static [u8],
) -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<u8>)> {
    let piece = prop_oneof![
        3 => proptest::collection::vec(proptest::sample::select(alphabet), 0..12).prop_map(Piece::Text),
        1 => (0..secrets.len()).prop_map(Piece::Secret),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(move |pieces| {
        let mut text = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Text(bytes) => text.extend_from_slice(&bytes),
                Piece::Secret(i) => text.extend_from_slice(&secrets[i]),
            }
        }
        (secrets.clone(), text)
    })
}

fn check(secrets: &[Vec<u8>], text: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
    let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
    let r = redactor(&refs);
    let (outs, redacted) = stream(&r, &refs, text, cuts);
    let expected = reference(&refs, text);
    let out = concat(&outs);
    // Length-preserving, whatever the cuts.
    prop_assert_eq!(out.len(), text.len());
    prop_assert_eq!(&out, &expected);
    prop_assert_eq!(redacted, expected != text);
    for secret in &refs {
        prop_assert!(!contains(&out, secret));
        for chunk in &outs {
            prop_assert!(!contains(chunk, secret));
        }
    }
    // The one-shot API agrees.
    let one_shot = r.redact(text);
    prop_assert_eq!(one_shot.as_ref(), expected.as_slice());
    Ok(())
}

/// Streamed output has the input's length, chunk boundaries aside: the
/// concatenated output of the body equals the input length, and so does its
/// size hint taken before the first frame.
fn check_length(secrets: &[Vec<u8>], text: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
    let refs: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
    let r = redactor(&refs);
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (text.len() + 1)).collect();
    cuts.extend([0, text.len()]);
    cuts.sort_unstable();
    let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    let mut body = RedactingBody::new(FramesBody::data(&chunks), &r, RedactionFlag::new());
    prop_assert_eq!(body.size_hint().exact(), Some(text.len() as u64));
    // A `FramesBody` is always ready: poll it without a runtime.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut out = Vec::new();
    while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
        let data = frame.unwrap().into_data().unwrap();
        for secret in &refs {
            prop_assert!(!contains(&data, secret));
        }
        out.extend_from_slice(&data);
        // What is left to come is exactly what the hint says.
        prop_assert_eq!(
            body.size_hint().exact(),
            Some((text.len() - out.len()) as u64)
        );
    }
    prop_assert!(body.is_end_stream());
    prop_assert_eq!(out.len(), text.len());
    prop_assert_eq!(out, reference(&refs, text));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A tiny alphabet: secrets overlap, nest and share prefixes all the time.
    #[test]
    fn prop_streaming_equals_one_shot_small_alphabet(
        (secrets, text) in proptest::collection::vec(secret_strategy(b"ab", 8..12), 1..4)
            .prop_flat_map(|s| text_strategy(s, b"abc")),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        check(&secrets, &text, &cuts)?;
    }

    /// Secrets that are prefixes, extensions and overlaps of each other.
    #[test]
    fn prop_streaming_equals_one_shot_related_secrets(
        (secrets, text) in related_secrets().prop_flat_map(|s| text_strategy(s, b"ab")),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        check(&secrets, &text, &cuts)?;
    }

    /// Realistic secrets in realistic text, cut anywhere.
    #[test]
    fn prop_streaming_equals_one_shot_realistic(
        (secrets, text) in proptest::collection::vec(
            secret_strategy(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", 8..64),
            1..3,
        )
        .prop_flat_map(|s| text_strategy(s, b"sk-abc {}\":,\n")),
        cuts in proptest::collection::vec(any::<usize>(), 0..32),
    ) {
        check(&secrets, &text, &cuts)?;
    }

    /// Output length always equals input length, through the body too.
    #[test]
    fn prop_output_length_equals_input_length(
        (secrets, text) in proptest::collection::vec(
            secret_strategy(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", 8..64),
            1..3,
        )
        .prop_flat_map(|s| text_strategy(s, b"ab-_ {}\":,\n")),
        cuts in proptest::collection::vec(any::<usize>(), 0..32),
    ) {
        check_length(&secrets, &text, &cuts)?;
    }
}

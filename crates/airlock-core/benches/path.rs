//! Strict path validation: typical provider paths and hostile ones (dot
//! segments, encoded separators, overlong UTF-8, a long path).

use std::hint::black_box;

use airlock_core::path;
use criterion::{criterion_group, criterion_main, Criterion};

mod support;

const ACCEPTED: [(&str, &str); 4] = [
    ("typical: chat completions", "/v1/chat/completions"),
    ("typical: model id", "/v1/models/gpt-4o-2024-08-06"),
    (
        "typical: deep repo path",
        "/repos/acme/widgets/contents/src/lib.rs",
    ),
    (
        "escapes: UTF-8 name",
        "/v1/files/r%C3%A9sum%C3%A9%20final.pdf",
    ),
];

const REFUSED: [(&str, &str); 6] = [
    ("hostile: dot-dot segment", "/v1/../admin/keys"),
    ("hostile: encoded slash", "/v1/files/a%2Fb"),
    ("hostile: encoded dot-dot", "/v1/%2e%2e/admin"),
    ("hostile: empty segment", "/v1//chat/completions"),
    ("hostile: overlong UTF-8", "/v1/%C0%AE%C0%AE/admin"),
    ("hostile: backslash", "/v1/chat\\completions"),
];

fn bench_paths(c: &mut Criterion) {
    let mut group = c.benchmark_group("path");
    for (name, p) in ACCEPTED {
        assert!(path::validate(p).is_ok(), "{name}");
        group.bench_function(name, |b| b.iter(|| path::validate(black_box(p)).is_ok()));
    }
    for (name, p) in REFUSED {
        assert!(path::validate(p).is_err(), "{name}");
        group.bench_function(name, |b| b.iter(|| path::validate(black_box(p)).is_err()));
    }
    // 64 segments, 1.5 KiB: a long but valid path.
    let long: String = (0..64)
        .map(|i| format!("/segment-{i:02}-abcdefghij"))
        .collect();
    assert!(path::validate(&long).is_ok());
    group.bench_function("long: 64 segments", |b| {
        b.iter(|| path::validate(black_box(&long)).is_ok())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = support::quick();
    targets = bench_paths
}
criterion_main!(benches);

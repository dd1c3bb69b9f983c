//! Scope matching: a realistic five-rule scope, calls it allows (early and
//! late rules, `*` and `/**` patterns) and calls it refuses.
// The fixtures are constant rules; failing to parse one is a bug in this
// benchmark, and a panic is the right way to report it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use airlock_core::{Method, Rule, Scope};
use criterion::{criterion_group, criterion_main, Criterion};

mod support;

const RULES: [&str; 5] = [
    "openai:POST:/v1/chat/completions",
    "openai:POST:/v1/embeddings",
    "openai:GET:/v1/models/*",
    "anthropic:POST:/v1/messages",
    "github:GET,HEAD:/repos/acme/**",
];

const CALLS: [(&str, &str, Method, &str); 7] = [
    (
        "hit: first rule",
        "openai",
        Method::Post,
        "/v1/chat/completions",
    ),
    (
        "hit: '*' segment",
        "openai",
        Method::Get,
        "/v1/models/gpt-4o",
    ),
    (
        "hit: last rule, deep '/**'",
        "github",
        Method::Get,
        "/repos/acme/widgets/pulls/12/files",
    ),
    (
        "miss: method",
        "openai",
        Method::Delete,
        "/v1/chat/completions",
    ),
    ("miss: path", "openai", Method::Post, "/v1/files"),
    (
        "miss: longer than pattern",
        "anthropic",
        Method::Post,
        "/v1/messages/batches",
    ),
    (
        "miss: provider",
        "gitlab",
        Method::Get,
        "/repos/acme/widgets",
    ),
];

fn build_scope() -> Scope {
    let rules = RULES.iter().map(|r| r.parse::<Rule>().expect(r)).collect();
    Scope::new(rules).unwrap()
}

fn bench_scope(c: &mut Criterion) {
    let scope = build_scope();
    let mut group = c.benchmark_group("scope");
    for (name, provider, method, path) in CALLS {
        let expected = name.starts_with("hit");
        assert_eq!(scope.allows(provider, method, path), expected, "{name}");
        group.bench_function(name, |b| {
            b.iter(|| {
                black_box(&scope).allows(black_box(provider), black_box(method), black_box(path))
            })
        });
    }
    group.bench_function("parse the 5 rules", |b| b.iter(build_scope));
    group.finish();
}

criterion_group! {
    name = benches;
    config = support::quick();
    targets = bench_scope
}
criterion_main!(benches);

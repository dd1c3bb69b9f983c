//! Runs the mock provider standalone (for load measurements):
//! `cargo run --release -p airlock-testkit --example mock_provider`
//! prints its URL and serves until Ctrl-C.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[tokio::main]
async fn main() {
    let mock = airlock_testkit::MockProvider::start().await;
    println!("{}", mock.url());
    tokio::signal::ctrl_c().await.unwrap();
}

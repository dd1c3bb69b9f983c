#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Test support for airlock integration tests.
//!
//! - [`MockProvider`]: an in-process HTTP/1.1 server that imitates the
//!   upstream providers (OpenAI, Anthropic, plain streaming endpoints) and
//!   records every request it receives.
//! - [`Airlock`]: the real `airlock` binary running as a child process on
//!   port 0, with a generated config in a temporary data directory.
//! - [`pg`]: a fresh PostgreSQL database per test.
//! - [`tls`]: a test CA, a TLS mock provider and HTTPS clients.

pub mod client;
pub mod h2raw;
pub mod hostile;
mod mock;
pub mod pg;
mod process;
pub mod tls;

pub use mock::{MockProvider, RecordedRequest, MAX_RECORDED_BODY, MOCK_REQUEST_ID};
pub use process::{Airlock, AirlockBuilder, StoreLock};

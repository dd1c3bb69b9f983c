//! Pure types and rules of airlock. Nothing in this crate performs I/O, except
//! reading and creating key files in [`seal`].
//!
//! - [`audit`]: audit records, their HMAC chain and the verifier.
//! - [`secret`]: [`Secret`], a string whose `Debug`/`Display` redact and whose memory is zeroed on drop.
//! - [`token`]: session tokens (`sess_…`), their hashes and session ids (`ses_…`).
//! - [`path`]: strict validation of request paths; ambiguous paths are refused, never normalised.
//! - [`rule`]: scope rules (`PROVIDER:METHODS:PATH`), path patterns and the matcher.
//! - [`seal`]: sealing secrets at rest (XChaCha20-Poly1305) and loading keys from the
//!   environment or a 0600 key file (the one module that touches the file system).
//! - [`duration`]: the `90s` / `15m` / `2h` durations used by the CLI and config.
//! - [`limits`]: per-session limits.
//! - [`object_only`]: [`ObjectOnly`], a struct deserialised from a JSON object only.
#![forbid(unsafe_code)]

pub mod audit;
pub mod duration;
pub mod limits;
pub mod object_only;
pub mod path;
pub mod rule;
pub mod seal;
pub mod secret;
pub mod spaced;
pub mod token;

pub use limits::Limits;
pub use object_only::ObjectOnly;
pub use rule::{Method, MethodSet, PathPattern, Rule, Scope};
pub use seal::{KeyBytes, KeyOrigin, KeyPurpose, MasterKey, SecretBytes};
pub use secret::Secret;
pub use token::{SessionId, TokenHash};

//! Session tokens and session ids.
//!
//! A token is `sess_` followed by 43 base62 characters drawn from the OS CSPRNG
//! (43 × log2(62) ≈ 256 bits, i.e. 32 random bytes). Only its SHA-256 hash is
//! ever stored; the hash is what the proxy looks up. An id (`ses_…`) names a
//! session in logs, audit and the admin API and is not a secret.

use std::fmt;
use std::sync::Arc;

use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::Secret;

/// Prefix of every session token.
pub const TOKEN_PREFIX: &str = "sess_";
/// Number of base62 characters after the prefix.
pub const TOKEN_RANDOM_CHARS: usize = 43;
/// Prefix of every session id.
pub const ID_PREFIX: &str = "ses_";
const ID_RANDOM_CHARS: usize = 22;

/// Generates a fresh session token.
pub fn generate_token() -> Secret {
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + TOKEN_RANDOM_CHARS);
    token.push_str(TOKEN_PREFIX);
    Alphanumeric.append_string(&mut rand::rng(), &mut token, TOKEN_RANDOM_CHARS);
    Secret::new(token)
}

/// Generates a random secret with the given prefix (used for admin tokens).
pub fn generate_secret(prefix: &str) -> Secret {
    let mut value = String::from(prefix);
    Alphanumeric.append_string(&mut rand::rng(), &mut value, TOKEN_RANDOM_CHARS);
    Secret::new(value)
}

/// What stands for a withheld token after its `sess_` (`sess_[withheld]`),
/// and for other withheld secrets.
pub const WITHHELD: &str = "[withheld]";

/// Fewest letters, digits and `_` after `sess_` that make a token's shape
/// for [`withhold_runs`]. A token has 43; a shorter run may be a token cut
/// short.
pub const TOKEN_RUN_MIN: usize = 16;

/// `text` with every run that has a token's shape (`sess_` and at least
/// [`TOKEN_RUN_MIN`] letters, digits or `_`; two tokens back to back are
/// one run) shown as `sess_[withheld]`; `None` when there is none. For
/// what airlock writes out (records, messages) that may quote an input.
pub fn withhold_runs(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut withheld = false;
    let mut rest = text;
    while let Some(at) = rest.find(TOKEN_PREFIX) {
        let after = &rest[at + TOKEN_PREFIX.len()..];
        let run = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        out.push_str(&rest[..at + TOKEN_PREFIX.len()]);
        if run >= TOKEN_RUN_MIN {
            out.push_str(WITHHELD);
            withheld = true;
            rest = &after[run..];
        } else {
            rest = after;
        }
    }
    withheld.then(|| {
        out.push_str(rest);
        out
    })
}

/// Whether `candidate` has the exact shape of a session token. Used to refuse
/// garbage before any lookup.
pub fn is_well_formed(candidate: &str) -> bool {
    candidate.len() == TOKEN_PREFIX.len() + TOKEN_RANDOM_CHARS
        && candidate.starts_with(TOKEN_PREFIX)
        && candidate.as_bytes()[TOKEN_PREFIX.len()..]
            .iter()
            .all(u8::is_ascii_alphanumeric)
}

/// SHA-256 of a token: the only form in which tokens are stored or indexed.
///
/// Equality is constant-time.
#[derive(Clone, Copy)]
pub struct TokenHash([u8; 32]);

/// A session id (`ses_…`). Not a secret. Shared text: a clone (every
/// audit record names its session) costs no allocation.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct SessionId(Arc<str>);

// === impl TokenHash ===

impl TokenHash {
    /// Hashes a presented token.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// The hash as lower-case hex (the stored form).
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        out
    }

    /// Parses the stored hex form.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Self(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl PartialEq for TokenHash {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for TokenHash {}

impl std::hash::Hash for TokenHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Equal hashes have equal bytes, so hashing the bytes is consistent
        // with the constant-time `PartialEq`.
        self.0.hash(state);
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

// === impl SessionId ===

impl SessionId {
    /// Generates a fresh id.
    pub fn generate() -> Self {
        let mut id = String::with_capacity(ID_PREFIX.len() + ID_RANDOM_CHARS);
        id.push_str(ID_PREFIX);
        Alphanumeric.append_string(&mut rand::rng(), &mut id, ID_RANDOM_CHARS);
        Self(Arc::from(id))
    }

    /// Wraps an id read from the store or a request. Returns `None` unless it
    /// has the shape of an id.
    pub fn parse(id: &str) -> Option<Self> {
        let ok = id.starts_with(ID_PREFIX)
            && id.len() > ID_PREFIX.len()
            && id.len() <= 64
            && id.as_bytes()[ID_PREFIX.len()..]
                .iter()
                .all(u8::is_ascii_alphanumeric);
        ok.then(|| Self(Arc::from(id)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as shared text.
    pub fn shared(&self) -> &Arc<str> {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests;

//! Secrets at rest: sealing with XChaCha20-Poly1305 under a 32-byte key, and
//! the "key from the environment, else a 0600 key file" rule for loading or
//! creating such keys.
//!
//! This is the one module of the crate that touches the file system, and only
//! in [`load_or_create_key`] (and [`MasterKey::load_or_create`]).
//!
//! Sealed format (version 1): `0x01 || nonce (24 bytes) || ciphertext || tag (16 bytes)`.
//! The nonce is drawn from the operating system's RNG for every call. The
//! associated data (AAD) binds a sealed value to its purpose: a value sealed
//! for one provider does not open for another (see [`credential_aad`]).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Key, KeyInit, Tag, XChaCha20Poly1305, XNonce};
use rand::rngs::OsRng;
use rand::TryRngCore;
use zeroize::Zeroizing;

use crate::secret::{Secret, REDACTED};

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of the random nonce stored in a sealed value.
pub const NONCE_LEN: usize = 24;
/// Length of the authentication tag at the end of a sealed value.
pub const TAG_LEN: usize = 16;
/// The format version byte that starts every sealed value.
pub const SEAL_VERSION: u8 = 1;
/// Bytes a sealed value adds to its plaintext.
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
/// The environment variable holding the master key.
pub const MASTER_KEY_ENV: &str = "AIRLOCK_MASTER_KEY";

/// Longest key file accepted (a key is 64 hex characters plus a newline).
const MAX_KEY_FILE_LEN: usize = 256;
/// Prefix of the AAD of sealed provider credentials.
const CREDENTIAL_AAD_PREFIX: &[u8] = b"airlock credential v1\0";

/// Why an encoded key was refused. Never includes the key material itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyEncodingError {
    /// Neither 64 (hex) nor 44 (base64) characters.
    #[error("expected 64 hex characters or 44 standard base64 characters encoding 32 bytes, got {0} characters")]
    Length(usize),
    /// 64 characters, but not hex.
    #[error("64 characters but not valid hex")]
    Hex,
    /// 44 characters, but not standard base64 of exactly 32 bytes.
    #[error("44 characters but not standard base64 (with padding) of exactly 32 bytes")]
    Base64,
}

/// Why a key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The environment variable holds a malformed key.
    #[error("{purpose} from {env_var}: {reason}")]
    Env {
        purpose: &'static str,
        env_var: &'static str,
        reason: KeyEncodingError,
    },
    /// The key file holds a malformed key.
    #[error("{purpose} file {}: {reason}", .path.display())]
    FileContent {
        purpose: &'static str,
        path: PathBuf,
        reason: KeyEncodingError,
    },
    /// The key file is accessible by group or others.
    #[error(
        "{purpose} file {} is readable or writable by group or others (mode {mode:04o}); \
         it must be 0600 or stricter: run `chmod 600 {}`",
        .path.display(), .path.display()
    )]
    Permissions {
        purpose: &'static str,
        path: PathBuf,
        mode: u32,
    },
    /// The key file path names something other than a regular file.
    #[error("{purpose} file {} is not a regular file", .path.display())]
    NotAFile {
        purpose: &'static str,
        path: PathBuf,
    },
    /// The key file does not exist and its directory does not either.
    #[error(
        "cannot create {purpose} file {}: directory {} does not exist",
        .path.display(), .dir.display()
    )]
    NoParentDir {
        purpose: &'static str,
        path: PathBuf,
        dir: PathBuf,
    },
    /// Reading the key file failed.
    #[error("cannot read {purpose} file {}: {source}", .path.display())]
    Read {
        purpose: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating the key file failed.
    #[error("cannot create {purpose} file {}: {source}", .path.display())]
    Create {
        purpose: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Rng,
}

/// Why sealing or opening failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Shorter than the version byte, nonce and tag.
    #[error("sealed value is truncated ({0} bytes)")]
    Truncated(usize),
    /// Starts with a version byte this build does not know.
    #[error("sealed value has unsupported format version {0}")]
    Version(u8),
    /// Authentication failed: wrong key, wrong purpose (AAD) or altered bytes.
    #[error(
        "sealed value cannot be opened: wrong master key, sealed for another purpose, or altered"
    )]
    Open,
    /// The opened value is not UTF-8 (from [`SecretBytes::into_secret`]).
    #[error("sealed value is not UTF-8 text")]
    NotUtf8,
    /// The plaintext is too large for the cipher.
    #[error("value too large to seal")]
    TooLarge,
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Rng,
}

/// What a key is for, used in error messages and to name its environment variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyPurpose {
    /// Human name, e.g. `"master key"`.
    pub name: &'static str,
    /// The environment variable that may hold the key.
    pub env_var: &'static str,
}

impl KeyPurpose {
    /// The master key that seals stored credentials.
    pub const MASTER: KeyPurpose = KeyPurpose {
        name: "master key",
        env_var: MASTER_KEY_ENV,
    };
}

/// Where a loaded key came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    /// The environment variable.
    Env,
    /// An existing key file.
    File,
    /// A key file created just now.
    Created,
}

/// 32 bytes of key material: redacting `Debug`/`Display`, zeroed on drop.
pub struct KeyBytes(Zeroizing<[u8; KEY_LEN]>);

/// Decrypted bytes: redacting `Debug`, zeroed on drop.
pub struct SecretBytes(Zeroizing<Vec<u8>>);

/// The key that seals stored credentials: redacting `Debug`/`Display`, zeroed on drop.
pub struct MasterKey(KeyBytes);

// === impl KeyBytes ===

impl KeyBytes {
    /// Wraps raw bytes. The caller's copy of `bytes` is not zeroed.
    pub fn from_array(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Fresh random key material from the operating system's RNG.
    pub fn generate() -> Result<Self, KeyError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        OsRng
            .try_fill_bytes(key.as_mut_slice())
            .map_err(|_| KeyError::Rng)?;
        Ok(Self(key))
    }

    /// Decodes 64 hex characters or 44 characters of standard base64 (with
    /// padding) encoding exactly 32 bytes. Surrounding whitespace is ignored.
    pub fn from_encoded(encoded: &str) -> Result<Self, KeyEncodingError> {
        let encoded = encoded.trim();
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        match encoded.len() {
            64 => {
                hex::decode_to_slice(encoded, key.as_mut_slice())
                    .map_err(|_| KeyEncodingError::Hex)?;
            }
            44 => {
                // 44 base64 characters decode to at most 33 bytes.
                let mut buf = Zeroizing::new([0u8; KEY_LEN + 1]);
                let n = STANDARD
                    .decode_slice(encoded, buf.as_mut_slice())
                    .map_err(|_| KeyEncodingError::Base64)?;
                if n != KEY_LEN {
                    return Err(KeyEncodingError::Base64);
                }
                key.copy_from_slice(&buf[..KEY_LEN]);
            }
            _ => return Err(KeyEncodingError::Length(encoded.chars().count())),
        }
        Ok(Self(key))
    }

    /// The key bytes. Use only to key a cipher or a MAC.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

// === impl SecretBytes ===

impl SecretBytes {
    /// The plaintext.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The plaintext as a [`Secret`] string, without copying it.
    pub fn into_secret(mut self) -> Result<Secret, SealError> {
        let bytes = std::mem::take(&mut *self.0);
        match String::from_utf8(bytes) {
            Ok(text) => Ok(Secret::new(text)),
            Err(err) => {
                // Zeroed on drop.
                drop(Zeroizing::new(err.into_bytes()));
                Err(SealError::NotUtf8)
            }
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

// === impl MasterKey ===

impl MasterKey {
    /// Wraps key material.
    pub fn new(key: KeyBytes) -> Self {
        Self(key)
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, KeyError> {
        KeyBytes::generate().map(Self)
    }

    /// Decodes a key given as 64 hex characters or standard base64 (44 characters).
    pub fn from_encoded(encoded: &str) -> Result<Self, KeyEncodingError> {
        KeyBytes::from_encoded(encoded).map(Self)
    }

    /// The master key from `AIRLOCK_MASTER_KEY` (pass its value, if set), else
    /// from `key_file`, else a new key written to `key_file` with mode 0600.
    /// See [`load_or_create_key`].
    pub fn load_or_create(
        env_value: Option<&str>,
        key_file: &Path,
    ) -> Result<(Self, KeyOrigin), KeyError> {
        let (key, origin) = load_or_create_key(env_value, key_file, KeyPurpose::MASTER)?;
        Ok((Self(key), origin))
    }

    /// The key material.
    pub fn bytes(&self) -> &KeyBytes {
        &self.0
    }

    /// A value that tells this key from another without revealing it
    /// (HMAC-SHA-256 keyed with it, of a constant): stored beside the
    /// sealed credentials, it lets a server refuse to start with a master
    /// key other than the one they were sealed with.
    pub fn check_value(&self) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        type HmacSha256 = Hmac<sha2::Sha256>;
        // HMAC pads a key shorter than its block (64 bytes) with zeroes
        // (RFC 2104): padded here, the same function, keyed infallibly.
        let mut padded = Zeroizing::new([0u8; 64]);
        padded[..KEY_LEN].copy_from_slice(self.0.expose());
        let key = hmac::digest::Key::<HmacSha256>::from_slice(padded.as_slice());
        let mut m = <HmacSha256 as hmac::digest::KeyInit>::new(key);
        m.update(MASTER_KEY_CHECK_DOMAIN);
        m.finalize().into_bytes().into()
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(self.0.expose()))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({REDACTED})")
    }
}

impl fmt::Display for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Domain of [`MasterKey::check_value`].
const MASTER_KEY_CHECK_DOMAIN: &[u8] = b"airlock-master-key-check-v1\0";

// === sealing ===

/// The AAD binding a sealed credential to its provider:
/// `b"airlock credential v1\0" || provider`.
pub fn credential_aad(provider: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(CREDENTIAL_AAD_PREFIX.len() + provider.len());
    aad.extend_from_slice(CREDENTIAL_AAD_PREFIX);
    aad.extend_from_slice(provider.as_bytes());
    aad
}

/// Seals `plaintext` under `key`, bound to `aad`: `0x01 || nonce || ciphertext || tag`.
pub fn seal(key: &MasterKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|_| SealError::Rng)?;
    // Exact capacity: the plaintext copied in is encrypted in place and the
    // buffer never reallocates, so no plaintext copy is left behind.
    let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    out.push(SEAL_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .cipher()
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), aad, &mut out[1 + NONCE_LEN..])
        .map_err(|_| SealError::TooLarge)?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens a value made by [`seal`] with the same key and AAD.
pub fn open(key: &MasterKey, aad: &[u8], sealed: &[u8]) -> Result<SecretBytes, SealError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(SealError::Truncated(sealed.len()));
    }
    if sealed[0] != SEAL_VERSION {
        return Err(SealError::Version(sealed[0]));
    }
    let nonce = XNonce::from_slice(&sealed[1..1 + NONCE_LEN]);
    let (ciphertext, tag) = sealed[1 + NONCE_LEN..].split_at(sealed.len() - SEAL_OVERHEAD);
    let mut plaintext = Zeroizing::new(ciphertext.to_vec());
    key.cipher()
        .decrypt_in_place_detached(nonce, aad, &mut plaintext, Tag::from_slice(tag))
        .map_err(|_| SealError::Open)?;
    Ok(SecretBytes(plaintext))
}

// === key files ===

/// Loads a 32-byte key: from `env_value` when given (the value of
/// `purpose.env_var`; an empty or all-whitespace value counts as unset), else
/// from `key_file`, else creates `key_file` with a new random key.
///
/// - A key file must be a regular file with mode 0600 or stricter (no group
///   or other bits) and hold the key as 64 hex characters or 44 base64
///   characters (surrounding whitespace ignored); anything else is refused.
/// - A new key file is written as lowercase hex and a newline to a temporary
///   file (mode 0600, fsynced) that is then hard-linked into place, so the
///   key file appears complete or not at all and an existing one is never
///   overwritten (if another process wins the race, its key is loaded). Its
///   directory must already exist.
///
/// Errors name the purpose and the file or variable, never the key.
pub fn load_or_create_key(
    env_value: Option<&str>,
    key_file: &Path,
    purpose: KeyPurpose,
) -> Result<(KeyBytes, KeyOrigin), KeyError> {
    match find_key(env_value, key_file, purpose)? {
        Some(found) => Ok(found),
        None => {
            if create_key_file(key_file, purpose)? {
                // Re-read what is now on disk: proves the file round-trips.
                read_key_file(key_file, purpose).map(|key| (key, KeyOrigin::Created))
            } else {
                read_key_file(key_file, purpose).map(|key| (key, KeyOrigin::File))
            }
        }
    }
}

/// Checks what [`load_or_create_key`] would load, short of creating a key
/// file: a malformed variable or key file, or a key file with loose
/// permissions, is the same error; a key file that does not exist yet is
/// `Ok(None)` when its directory exists (where it would be created), else
/// [`KeyError::NoParentDir`]. For `airlock config check`, which must refuse
/// what `serve` would refuse and create nothing.
pub fn check_key(
    env_value: Option<&str>,
    key_file: &Path,
    purpose: KeyPurpose,
) -> Result<Option<KeyOrigin>, KeyError> {
    match find_key(env_value, key_file, purpose)? {
        Some((_, origin)) => Ok(Some(origin)),
        None => key_file_dir(key_file, purpose).map(|_| None),
    }
}

/// The key from `env_value`, else from an existing `key_file`; `None` when
/// there is neither (the file does not exist).
fn find_key(
    env_value: Option<&str>,
    key_file: &Path,
    purpose: KeyPurpose,
) -> Result<Option<(KeyBytes, KeyOrigin)>, KeyError> {
    if let Some(value) = env_value.filter(|v| !v.trim().is_empty()) {
        let key = KeyBytes::from_encoded(value).map_err(|reason| KeyError::Env {
            purpose: purpose.name,
            env_var: purpose.env_var,
            reason,
        })?;
        return Ok(Some((key, KeyOrigin::Env)));
    }
    match read_key_file(key_file, purpose) {
        Ok(key) => Ok(Some((key, KeyOrigin::File))),
        Err(KeyError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// The directory a new key file `path` goes in: it must exist.
fn key_file_dir(path: &Path, purpose: KeyPurpose) -> Result<&Path, KeyError> {
    let dir = match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() => Path::new("."),
        Some(dir) => dir,
        None => {
            return Err(KeyError::Create {
                purpose: purpose.name,
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
            })
        }
    };
    if !dir.is_dir() {
        return Err(KeyError::NoParentDir {
            purpose: purpose.name,
            path: path.to_owned(),
            dir: dir.to_owned(),
        });
    }
    Ok(dir)
}

/// Reads and checks an existing key file.
fn read_key_file(path: &Path, purpose: KeyPurpose) -> Result<KeyBytes, KeyError> {
    let read_err = |source| KeyError::Read {
        purpose: purpose.name,
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    // Check the opened file itself, not the path, so a swap in between cannot fool us.
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(KeyError::NotAFile {
            purpose: purpose.name,
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            purpose: purpose.name,
            path: path.to_owned(),
            mode,
        });
    }
    // A fixed buffer: reading never reallocates and leaves no stray copies.
    let mut buf = Zeroizing::new([0u8; MAX_KEY_FILE_LEN]);
    let mut len = 0;
    loop {
        if len == buf.len() {
            break;
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(read_err(err)),
        }
    }
    let content_err = |reason| KeyError::FileContent {
        purpose: purpose.name,
        path: path.to_owned(),
        reason,
    };
    if len == buf.len() {
        return Err(content_err(KeyEncodingError::Length(len)));
    }
    let text =
        std::str::from_utf8(&buf[..len]).map_err(|_| content_err(KeyEncodingError::Length(len)))?;
    KeyBytes::from_encoded(text).map_err(content_err)
}

/// Creates a key file with a new key. `Ok(false)` when another process
/// created it first.
fn create_key_file(path: &Path, purpose: KeyPurpose) -> Result<bool, KeyError> {
    let create_err = |source| KeyError::Create {
        purpose: purpose.name,
        path: path.to_owned(),
        source,
    };
    let dir = key_file_dir(path, purpose)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| create_err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    let mut suffix = [0u8; 8];
    OsRng
        .try_fill_bytes(&mut suffix)
        .map_err(|_| KeyError::Rng)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", hex::encode(suffix)));
    let tmp = dir.join(tmp_name);

    let key = KeyBytes::generate()?;
    let result = write_new_file(&tmp, &key).and_then(|()| fs::hard_link(&tmp, path));
    // The temporary name goes away whatever happened; the key stays under `path`.
    let _ = fs::remove_file(&tmp);
    match result {
        Ok(()) => {
            // Make the new directory entry durable too (best effort).
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
            Ok(true)
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(err) => Err(create_err(err)),
    }
}

/// Writes `key` as hex and a newline to a new file with mode 0600, fsynced.
fn write_new_file(path: &Path, key: &KeyBytes) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // A fixed, zeroizing buffer: no stray copies of the encoded key.
    let mut line = Zeroizing::new([0u8; 2 * KEY_LEN + 1]);
    hex::encode_to_slice(key.expose(), &mut line[..2 * KEY_LEN])
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?;
    line[2 * KEY_LEN] = b'\n';
    file.write_all(line.as_slice())?;
    file.sync_all()
}

#[cfg(test)]
mod tests;

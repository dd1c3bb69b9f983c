#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;

use proptest::prelude::*;

use super::*;

const HEX_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const B64_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn key() -> MasterKey {
    MasterKey::generate().unwrap()
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn write_with_mode(path: &Path, content: &str, mode: u32) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

const AUDIT: KeyPurpose = KeyPurpose {
    name: "audit key",
    env_var: "AIRLOCK_AUDIT_KEY",
};

// === sealing ===

#[test]
fn seal_round_trips() {
    let key = key();
    let aad = credential_aad("openai");
    for plaintext in [&b""[..], b"sk-abc", &[0xffu8; 5000][..]] {
        let sealed = seal(&key, &aad, plaintext).unwrap();
        assert_eq!(sealed.len(), SEAL_OVERHEAD + plaintext.len());
        assert_eq!(sealed[0], SEAL_VERSION);
        assert_eq!(open(&key, &aad, &sealed).unwrap().expose(), plaintext);
    }
}

#[test]
fn ciphertext_hides_plaintext_and_nonces_differ() {
    let key = key();
    let a = seal(&key, b"aad", b"sk-live-0123456789").unwrap();
    let b = seal(&key, b"aad", b"sk-live-0123456789").unwrap();
    assert_ne!(a, b);
    assert_ne!(a[1..1 + NONCE_LEN], b[1..1 + NONCE_LEN]);
    assert!(!a
        .windows(b"sk-live".len())
        .any(|w| w == b"sk-live".as_slice()));
}

#[test]
fn wrong_key_fails() {
    let sealed = seal(&key(), b"aad", b"secret").unwrap();
    assert_eq!(open(&key(), b"aad", &sealed).unwrap_err(), SealError::Open);
}

#[test]
fn wrong_aad_fails() {
    let key = key();
    let sealed = seal(&key, &credential_aad("openai"), b"sk-abc").unwrap();
    assert_eq!(
        open(&key, &credential_aad("anthropic"), &sealed).unwrap_err(),
        SealError::Open
    );
    assert_eq!(open(&key, b"", &sealed).unwrap_err(), SealError::Open);
    assert!(open(&key, &credential_aad("openai"), &sealed).is_ok());
}

#[test]
fn credential_aad_format() {
    assert_eq!(credential_aad("openai"), b"airlock credential v1\0openai");
    // The separator keeps "a" + "b..." distinct from "ab" + "...".
    assert_ne!(credential_aad("openai"), credential_aad("openai2"));
}

#[test]
fn truncated_values_fail() {
    let key = key();
    let sealed = seal(&key, b"aad", b"sk-abc").unwrap();
    for len in 0..sealed.len() {
        let err = open(&key, b"aad", &sealed[..len]).unwrap_err();
        if len < SEAL_OVERHEAD {
            assert_eq!(err, SealError::Truncated(len));
        } else {
            assert_eq!(err, SealError::Open, "len {len}");
        }
    }
}

#[test]
fn every_bit_flip_fails() {
    let key = key();
    let sealed = seal(&key, b"aad", b"sk-abc").unwrap();
    for i in 0..sealed.len() {
        for bit in 0..8 {
            let mut bad = sealed.clone();
            bad[i] ^= 1 << bit;
            let err = open(&key, b"aad", &bad).unwrap_err();
            if i == 0 {
                assert_eq!(err, SealError::Version(bad[0]));
            } else {
                assert_eq!(err, SealError::Open, "byte {i} bit {bit}");
            }
        }
    }
}

#[test]
fn unknown_version_is_refused() {
    let key = key();
    let mut sealed = seal(&key, b"aad", b"x").unwrap();
    sealed[0] = 2;
    assert_eq!(
        open(&key, b"aad", &sealed).unwrap_err(),
        SealError::Version(2)
    );
    sealed[0] = 0;
    assert_eq!(
        open(&key, b"aad", &sealed).unwrap_err(),
        SealError::Version(0)
    );
}

#[test]
fn into_secret() {
    let key = key();
    let sealed = seal(&key, b"aad", "sk-ünïcode".as_bytes()).unwrap();
    let secret = open(&key, b"aad", &sealed).unwrap().into_secret().unwrap();
    assert_eq!(secret.expose(), "sk-ünïcode");

    let sealed = seal(&key, b"aad", &[0xff, 0xfe]).unwrap();
    let err = open(&key, b"aad", &sealed)
        .unwrap()
        .into_secret()
        .unwrap_err();
    assert_eq!(err, SealError::NotUtf8);
}

#[test]
fn debug_and_display_redact() {
    let key = MasterKey::from_encoded(HEX_KEY).unwrap();
    for shown in [
        format!("{key:?}"),
        format!("{key}"),
        format!("{:?}", key.bytes()),
        format!("{}", key.bytes()),
    ] {
        assert!(shown.contains(REDACTED), "{shown}");
        assert!(!shown.contains("0102"), "{shown}");
        assert!(!shown.contains("[0, 1"), "{shown}");
    }
    let opened = open(&key, b"", &seal(&key, b"", b"sk-abc").unwrap()).unwrap();
    assert_eq!(format!("{opened:?}"), REDACTED);
}

#[test]
fn errors_never_show_key_material() {
    let sealed = seal(&key(), b"aad", b"sk-abc").unwrap();
    let err = open(&key(), b"aad", &sealed).unwrap_err();
    assert!(!err.to_string().contains("sk-abc"));
}

// === key encodings ===

#[test]
fn hex_and_base64_decode_to_the_same_key() {
    let from_hex = KeyBytes::from_encoded(HEX_KEY).unwrap();
    let from_upper = KeyBytes::from_encoded(&HEX_KEY.to_uppercase()).unwrap();
    let from_b64 = KeyBytes::from_encoded(B64_KEY).unwrap();
    let spaced = KeyBytes::from_encoded(&format!("  {B64_KEY}\n")).unwrap();
    let expected: Vec<u8> = (0u8..32).collect();
    for key in [&from_hex, &from_upper, &from_b64, &spaced] {
        assert_eq!(key.expose().as_slice(), expected.as_slice());
    }
}

#[test]
fn malformed_keys_are_refused_without_echoing_them() {
    let cases: Vec<(String, KeyEncodingError)> = vec![
        (String::new(), KeyEncodingError::Length(0)),
        ("abc".into(), KeyEncodingError::Length(3)),
        (HEX_KEY[..62].into(), KeyEncodingError::Length(62)),
        (format!("{HEX_KEY}00"), KeyEncodingError::Length(66)),
        // Unpadded base64 is 43 characters: refused.
        (B64_KEY[..43].into(), KeyEncodingError::Length(43)),
        (format!("{}zz", &HEX_KEY[..62]), KeyEncodingError::Hex),
        (format!("{}!", &B64_KEY[..43]), KeyEncodingError::Base64),
        // URL-safe alphabet is not standard base64.
        (
            "-_ECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
            KeyEncodingError::Base64,
        ),
        // 44 characters encoding 31 bytes.
        (
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHg==".into(),
            KeyEncodingError::Base64,
        ),
    ];
    for (input, expected) in cases {
        let err = KeyBytes::from_encoded(&input).unwrap_err();
        assert_eq!(err, expected, "{input:?}");
        assert!(
            input.len() < 8 || !err.to_string().contains(&input[..8]),
            "{err}"
        );
    }
}

// === key files ===

#[test]
fn creates_key_file_with_mode_0600_then_reloads_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let (created, origin) = MasterKey::load_or_create(None, &path).unwrap();
    assert_eq!(origin, KeyOrigin::Created);
    assert_eq!(mode_of(&path), 0o600);

    let content = fs::read_to_string(&path).unwrap();
    assert_eq!(content.len(), 65);
    assert!(content.ends_with('\n'));
    assert_eq!(content.trim(), hex::encode(created.bytes().expose()));

    let (loaded, origin) = MasterKey::load_or_create(None, &path).unwrap();
    assert_eq!(origin, KeyOrigin::File);
    assert_eq!(loaded.bytes().expose(), created.bytes().expose());

    // Sealed under the created key, opens under the reloaded one.
    let sealed = seal(&created, b"aad", b"sk-abc").unwrap();
    assert_eq!(open(&loaded, b"aad", &sealed).unwrap().expose(), b"sk-abc");

    // No temporary file is left behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("master.key")]);
}

#[test]
fn env_takes_precedence_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    MasterKey::load_or_create(None, &path).unwrap();

    let (key, origin) = MasterKey::load_or_create(Some(B64_KEY), &path).unwrap();
    assert_eq!(origin, KeyOrigin::Env);
    assert_eq!(key.bytes().expose()[31], 31);

    // With the env set, a missing file is not created.
    let other = dir.path().join("other.key");
    let (_, origin) = MasterKey::load_or_create(Some(HEX_KEY), &other).unwrap();
    assert_eq!(origin, KeyOrigin::Env);
    assert!(!other.exists());

    // A broken file does not matter either.
    write_with_mode(&other, "garbage", 0o644);
    assert!(MasterKey::load_or_create(Some(HEX_KEY), &other).is_ok());
}

#[test]
fn empty_env_counts_as_unset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let (_, origin) = MasterKey::load_or_create(Some("  \n"), &path).unwrap();
    assert_eq!(origin, KeyOrigin::Created);
}

#[test]
fn bad_env_value_is_refused_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let err = MasterKey::load_or_create(Some("not-a-key-value"), &path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, KeyError::Env { .. }));
    assert!(msg.contains("AIRLOCK_MASTER_KEY"), "{msg}");
    assert!(msg.contains("master key"), "{msg}");
    assert!(!msg.contains("not-a-key-value"), "{msg}");
    assert!(!path.exists());
}

#[test]
fn group_or_other_accessible_key_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    for mode in [0o640, 0o604, 0o620, 0o602, 0o644, 0o660, 0o666, 0o610] {
        write_with_mode(&path, HEX_KEY, mode);
        let err = MasterKey::load_or_create(None, &path).unwrap_err();
        match &err {
            KeyError::Permissions { mode: m, .. } => assert_eq!(*m, mode),
            other => panic!("mode {mode:o}: {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        assert!(msg.contains("chmod 600"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(!msg.contains(HEX_KEY), "{msg}");
    }
    for mode in [0o600, 0o400, 0o200] {
        write_with_mode(&path, HEX_KEY, mode);
        let (_, origin) = MasterKey::load_or_create(None, &path).unwrap();
        assert_eq!(origin, KeyOrigin::File, "mode {mode:o}");
    }
}

#[test]
fn malformed_key_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    for (content, expected) in [
        ("", KeyEncodingError::Length(0)),
        ("short\n", KeyEncodingError::Length(5)),
        (&HEX_KEY[..63], KeyEncodingError::Length(63)),
    ] {
        write_with_mode(&path, content, 0o600);
        let err = MasterKey::load_or_create(None, &path).unwrap_err();
        match err {
            KeyError::FileContent { reason, .. } => assert_eq!(reason, expected),
            other => panic!("{content:?}: {other}"),
        }
    }
    // Very long or binary files are refused without reading them whole.
    write_with_mode(&path, &"a".repeat(10_000), 0o600);
    assert!(matches!(
        MasterKey::load_or_create(None, &path).unwrap_err(),
        KeyError::FileContent { .. }
    ));
    fs::write(&path, [0xffu8; 64]).unwrap();
    assert!(matches!(
        MasterKey::load_or_create(None, &path).unwrap_err(),
        KeyError::FileContent { .. }
    ));
    // A key file in base64 with surrounding whitespace is fine.
    write_with_mode(&path, &format!("\n{B64_KEY}\n\n"), 0o600);
    assert!(MasterKey::load_or_create(None, &path).is_ok());
}

#[test]
fn directory_is_not_a_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keydir");
    fs::create_dir(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
    let err = MasterKey::load_or_create(None, &path).unwrap_err();
    assert!(matches!(err, KeyError::NotAFile { .. }), "{err}");
}

#[test]
fn missing_parent_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("master.key");
    let err = MasterKey::load_or_create(None, &path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, KeyError::NoParentDir { .. }), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(!dir.path().join("missing").exists());
}

#[test]
fn symlinked_key_file_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("real.key");
    write_with_mode(&target, HEX_KEY, 0o600);
    let link = dir.path().join("master.key");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (key, origin) = MasterKey::load_or_create(None, &link).unwrap();
    assert_eq!(origin, KeyOrigin::File);
    assert_eq!(key.bytes().expose()[1], 1);
}

#[test]
fn generic_helper_serves_other_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.key");
    let (created, origin) = load_or_create_key(None, &path, AUDIT).unwrap();
    assert_eq!(origin, KeyOrigin::Created);
    assert_eq!(mode_of(&path), 0o600);
    let (loaded, origin) = load_or_create_key(None, &path, AUDIT).unwrap();
    assert_eq!(origin, KeyOrigin::File);
    assert_eq!(created.expose(), loaded.expose());

    let err = load_or_create_key(Some("bad"), &path, AUDIT).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("audit key from AIRLOCK_AUDIT_KEY"), "{msg}");

    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let msg = load_or_create_key(None, &path, AUDIT)
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("audit key file"), "{msg}");
}

#[test]
fn concurrent_creation_agrees_on_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let keys: Vec<[u8; KEY_LEN]> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    *MasterKey::load_or_create(None, &path)
                        .unwrap()
                        .0
                        .bytes()
                        .expose()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(keys.iter().all(|k| k == &keys[0]));
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

proptest! {
    #[test]
    fn prop_round_trip(plaintext in proptest::collection::vec(any::<u8>(), 0..512),
                       aad in proptest::collection::vec(any::<u8>(), 0..64),
                       other in proptest::collection::vec(any::<u8>(), 0..64)) {
        let key = MasterKey::from_encoded(HEX_KEY).unwrap();
        let sealed = seal(&key, &aad, &plaintext).unwrap();
        let opened = open(&key, &aad, &sealed).unwrap();
        prop_assert_eq!(opened.expose(), plaintext.as_slice());
        if other != aad {
            prop_assert_eq!(open(&key, &other, &sealed).unwrap_err(), SealError::Open);
        }
    }
}

/// `check_key` refuses what `load_or_create_key` refuses and creates nothing.
#[test]
fn check_key_refuses_what_loading_refuses_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.key");
    let err = check_key(Some("zz"), &path, AUDIT).unwrap_err();
    assert!(matches!(err, KeyError::Env { .. }), "{err}");
    assert!(!err.to_string().contains("zz"), "{err}");
    assert_eq!(
        check_key(Some(HEX_KEY), &path, AUDIT).unwrap(),
        Some(KeyOrigin::Env)
    );
    // No file yet: would be created, but is not.
    assert_eq!(check_key(None, &path, AUDIT).unwrap(), None);
    assert!(!path.exists());
    let missing = dir.path().join("missing").join("audit.key");
    assert!(matches!(
        check_key(None, &missing, AUDIT),
        Err(KeyError::NoParentDir { .. })
    ));
    write_with_mode(&path, HEX_KEY, 0o644);
    assert!(matches!(
        check_key(None, &path, AUDIT),
        Err(KeyError::Permissions { .. })
    ));
    write_with_mode(&path, "short", 0o600);
    assert!(matches!(
        check_key(None, &path, AUDIT),
        Err(KeyError::FileContent { .. })
    ));
    write_with_mode(&path, B64_KEY, 0o600);
    assert_eq!(
        check_key(None, &path, AUDIT).unwrap(),
        Some(KeyOrigin::File)
    );
}

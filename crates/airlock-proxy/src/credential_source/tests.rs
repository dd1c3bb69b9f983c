#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::os::unix::fs::symlink;

use super::*;

/// Generous: only a broken watcher ever waits this long.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `cond` until it holds, failing the test after [`TIMEOUT`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn identity(secret: Secret) -> Result<Secret, Infallible> {
    Ok(secret)
}

fn value(cell: &CredentialCell<Secret>) -> Option<String> {
    cell.load().map(|l| l.value.expose().to_owned())
}

fn watch(path: &Path) -> (Arc<CredentialCell<Secret>>, FileWatcher) {
    let cell = Arc::new(CredentialCell::new());
    let watcher = FileWatcher::start(path, Arc::clone(&cell), identity).unwrap();
    (cell, watcher)
}

/// Writes `content` to a temporary file beside `path` and renames it over `path`.
fn rotate_by_rename(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, content).unwrap();
    fs::rename(&tmp, path).unwrap();
}

// === CredentialCell ===

/// The value a removal took out of force stays what a new one replaces
/// (`last`), until one is stored: a removed key is guarded by its
/// successor.
#[test]
fn a_removed_value_is_the_last_one_until_another_is_stored() {
    let cell: CredentialCell<Secret> = CredentialCell::new();
    assert!(cell.last().is_none());
    cell.store(Some(Secret::new("sk-one")));
    let last = |cell: &CredentialCell<Secret>| cell.last().map(|l| l.value.expose().to_owned());
    assert_eq!(last(&cell).as_deref(), Some("sk-one"));
    cell.store(None);
    assert!(cell.load().is_none());
    assert_eq!(last(&cell).as_deref(), Some("sk-one"));
    // Removing again keeps it.
    cell.store(None);
    assert_eq!(last(&cell).as_deref(), Some("sk-one"));
    cell.store(Some(Secret::new("sk-two")));
    assert_eq!(last(&cell).as_deref(), Some("sk-two"));
    cell.store(None);
    assert_eq!(last(&cell).as_deref(), Some("sk-two"));
}

#[test]
fn cell_stores_and_versions() {
    let cell: CredentialCell<Secret> = CredentialCell::new();
    assert_eq!(cell.version(), 0);
    assert!(cell.load().is_none());

    assert_eq!(cell.store(Some(Secret::new("sk-one"))), 1);
    let loaded = cell.load().unwrap();
    assert_eq!(loaded.value.expose(), "sk-one");
    assert_eq!(loaded.version, 1);

    assert_eq!(cell.store(None), 2);
    assert!(cell.load().is_none());
    assert_eq!(cell.version(), 2);
    // A reader keeps what it loaded.
    assert_eq!(loaded.value.expose(), "sk-one");

    let cell = CredentialCell::with_value(Secret::new("sk-two"));
    assert_eq!(cell.version(), 1);
    let shown = format!("{cell:?} {:?}", cell.load());
    assert!(!shown.contains("sk-two"), "{shown}");
    assert!(shown.contains("version: 1"), "{shown}");
}

#[test]
fn readers_always_see_a_consistent_value() {
    let cell: Arc<CredentialCell<u64>> = Arc::new(CredentialCell::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            let cell = &cell;
            s.spawn(move || {
                let mut last = 0;
                while last < 1000 {
                    if let Some(loaded) = cell.load() {
                        // The value stored as version n is n.
                        assert_eq!(loaded.value, loaded.version);
                        assert!(loaded.version >= last);
                        last = loaded.version;
                    }
                }
            });
        }
        for i in 1..=1000 {
            assert_eq!(cell.store(Some(i)), i);
        }
    });
}

// === FileWatcher ===

#[test]
fn initial_read_trims_whitespace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    fs::write(&path, "  sk-live-abc \n").unwrap();
    let (cell, watcher) = watch(&path);
    assert_eq!(value(&cell).as_deref(), Some("sk-live-abc"));
    assert_eq!(cell.version(), 1);
    assert_eq!(watcher.path(), path);
    assert_eq!(
        watcher.stats(),
        WatchStats {
            reads: 1,
            reloads: 1,
            failures: 0
        }
    );
}

#[test]
fn empty_file_means_no_credential() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    for content in ["", "\n", "  \n\t"] {
        fs::write(&path, content).unwrap();
        let (cell, _watcher) = watch(&path);
        assert!(cell.load().is_none(), "{content:?}");
        assert_eq!(cell.version(), 1);
    }
}

#[test]
fn unreadable_file_at_start_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cell: Arc<CredentialCell<Secret>> = Arc::new(CredentialCell::new());

    let missing = dir.path().join("missing");
    let err = FileWatcher::start(&missing, Arc::clone(&cell), identity).unwrap_err();
    assert!(matches!(err, CredentialFileError::Read { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");

    let binary = dir.path().join("binary");
    fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    let err = FileWatcher::start(&binary, Arc::clone(&cell), identity).unwrap_err();
    assert!(matches!(err, CredentialFileError::NotUtf8 { .. }), "{err}");

    let large = dir.path().join("large");
    fs::write(&large, vec![b'a'; MAX_CREDENTIAL_FILE_LEN as usize + 1]).unwrap();
    let err = FileWatcher::start(&large, Arc::clone(&cell), identity).unwrap_err();
    assert!(matches!(err, CredentialFileError::TooLarge { .. }), "{err}");

    let err = FileWatcher::start(dir.path(), Arc::clone(&cell), identity).unwrap_err();
    assert!(matches!(err, CredentialFileError::Read { .. }), "{err}");

    assert_eq!(cell.version(), 0);
}

#[test]
fn prepare_runs_on_every_value_and_its_refusal_fails_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    fs::write(&path, "sk-abc\n").unwrap();
    let cell: Arc<CredentialCell<String>> = Arc::new(CredentialCell::new());
    let _watcher = FileWatcher::start(&path, Arc::clone(&cell), |s: Secret| {
        Ok::<_, Infallible>(format!("Bearer {}", s.expose()))
    })
    .unwrap();
    assert_eq!(cell.load().unwrap().value, "Bearer sk-abc");

    fs::write(&path, "bad value\n").unwrap();
    let err = FileWatcher::start(&path, Arc::clone(&cell), |s: Secret| {
        if s.expose().contains(' ') {
            Err("contains a space")
        } else {
            Ok(String::new())
        }
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("credential file {}: contains a space", path.display())
    );
}

#[test]
fn in_place_rewrite_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    fs::write(&path, "sk-old\n").unwrap();
    let (cell, watcher) = watch(&path);

    fs::write(&path, "sk-new\n").unwrap();
    // The version is bumped just after the value is stored: both awaited.
    wait_until("the new value", || {
        value(&cell).as_deref() == Some("sk-new") && cell.version() >= 2
    });
    assert_eq!(cell.load().unwrap().version, cell.version());
    assert_eq!(watcher.stats().failures, 0);
}

#[test]
fn atomic_rename_rotation_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    fs::write(&path, "sk-old").unwrap();
    let (cell, _watcher) = watch(&path);

    for (i, next) in ["sk-second", "sk-third", "sk-fourth"].iter().enumerate() {
        rotate_by_rename(&path, next);
        wait_until(next, || value(&cell).as_deref() == Some(*next));
        // The version is bumped just after the value is stored: wait for
        // it too, then check the rotation was one reload, not several.
        let expected = i as u64 + 2;
        wait_until("the version", || cell.version() >= expected);
        assert_eq!(cell.version(), expected);
    }
}

#[test]
fn kubernetes_symlink_swap_is_applied() {
    // A Secret volume: key -> ..data/key, ..data -> ..v1; an update writes
    // ..v2, points ..data_tmp at it and renames ..data_tmp over ..data.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join("..v1")).unwrap();
    fs::write(root.join("..v1/key"), "sk-v1\n").unwrap();
    symlink("..v1", root.join("..data")).unwrap();
    symlink("..data/key", root.join("key")).unwrap();
    let (cell, _watcher) = watch(&root.join("key"));
    assert_eq!(value(&cell).as_deref(), Some("sk-v1"));

    fs::create_dir(root.join("..v2")).unwrap();
    fs::write(root.join("..v2/key"), "sk-v2\n").unwrap();
    symlink("..v2", root.join("..data_tmp")).unwrap();
    fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    fs::remove_dir_all(root.join("..v1")).unwrap();
    wait_until("the swapped value", || {
        value(&cell).as_deref() == Some("sk-v2")
    });
}

#[test]
fn deletion_keeps_the_last_value_until_the_file_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    fs::write(&path, "sk-kept").unwrap();
    let (cell, watcher) = watch(&path);

    fs::remove_file(&path).unwrap();
    wait_until("a failed read", || watcher.stats().failures > 0);
    assert_eq!(value(&cell).as_deref(), Some("sk-kept"));
    assert_eq!(cell.version(), 1);

    rotate_by_rename(&path, "sk-back");
    wait_until("the restored file", || {
        value(&cell).as_deref() == Some("sk-back")
    });
    // The version follows the value a moment later.
    wait_until("the version", || cell.version() >= 2);
    assert_eq!(cell.version(), 2);
}

#[test]
fn rotation_to_an_empty_file_removes_the_credential() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    fs::write(&path, "sk-old").unwrap();
    let (cell, _watcher) = watch(&path);
    rotate_by_rename(&path, "\n");
    wait_until("no credential", || cell.version() == 2);
    assert!(cell.load().is_none());
}

#[test]
fn refused_value_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    fs::write(&path, "sk-good").unwrap();
    let cell: Arc<CredentialCell<Secret>> = Arc::new(CredentialCell::new());
    let watcher = FileWatcher::start(&path, Arc::clone(&cell), |s: Secret| {
        if s.expose().contains(' ') {
            Err("contains a space")
        } else {
            Ok(s)
        }
    })
    .unwrap();

    rotate_by_rename(&path, "sk bad");
    wait_until("the refusal", || watcher.stats().failures > 0);
    assert_eq!(value(&cell).as_deref(), Some("sk-good"));
    assert_eq!(cell.version(), 1);

    rotate_by_rename(&path, "sk-fixed");
    wait_until("the fixed value", || {
        value(&cell).as_deref() == Some("sk-fixed")
    });
}

#[test]
fn unchanged_content_does_not_bump_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    fs::write(&path, "sk-same\n").unwrap();
    // Staged outside the watched directory: the only event is the rename,
    // so the re-read waited for below happens after it.
    let staging = tempfile::tempdir().unwrap();
    let staged = staging.path().join("key");
    fs::write(&staged, "sk-same").unwrap();
    let (cell, watcher) = watch(&path);

    fs::rename(&staged, &path).unwrap();
    wait_until("a re-read", || watcher.stats().reads >= 2);
    assert_eq!(cell.version(), 1);
    assert_eq!(watcher.stats().reloads, 1);
}

#[test]
fn periodic_check_alone_sees_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    fs::write(&path, "sk-old").unwrap();
    let cell: Arc<CredentialCell<Secret>> = Arc::new(CredentialCell::new());
    let options = WatchOptions {
        poll_interval: Duration::from_millis(20),
        notify: false,
        ..WatchOptions::default()
    };
    let watcher = FileWatcher::start_with(&path, Arc::clone(&cell), identity, options).unwrap();
    assert!(!format!("{watcher:?}").contains("sk-old"));

    rotate_by_rename(&path, "sk-polled");
    wait_until("the polled value", || {
        value(&cell).as_deref() == Some("sk-polled")
    });

    fs::remove_file(&path).unwrap();
    wait_until("a failed check", || watcher.stats().failures > 0);
    assert_eq!(value(&cell).as_deref(), Some("sk-polled"));
}

#[test]
fn drop_stops_watching() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    fs::write(&path, "sk-one").unwrap();
    let (cell, watcher) = watch(&path);
    assert_eq!(Arc::strong_count(&cell), 2);
    drop(watcher);
    // The worker thread has ended and released the cell: nothing can store
    // into it any more.
    assert_eq!(Arc::strong_count(&cell), 1);
    rotate_by_rename(&path, "sk-two");
    assert_eq!(value(&cell).as_deref(), Some("sk-one"));
}

#[test]
fn watcher_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<FileWatcher>();
    assert_send_sync::<CredentialCell<Secret>>();
}

#[test]
fn open_modes_are_those_others_can_use_or_the_group_write() {
    for open in [0o644, 0o604, 0o660, 0o620, 0o606, 0o777] {
        assert!(is_open(open), "{open:o}");
    }
    for tight in [0o600, 0o400, 0o640, 0o440] {
        assert!(!is_open(tight), "{tight:o}");
    }
}

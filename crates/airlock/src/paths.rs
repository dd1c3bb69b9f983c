//! Paths from the config as `serve` will use them. Relative paths (the
//! SQLite file, key files) resolve against the working directory, not the
//! config file's; what they resolve to is shown absolute (`config check`,
//! the start-up log) so that a user starting airlock elsewhere sees it.
//! Also the check that a SQLite store's directory can take the database,
//! shared by `serve` and `config check`, and the hint for a store that
//! failed to open on a full disk.

use std::path::{Path, PathBuf};

/// `path` made absolute against the working directory (unchanged when it
/// already is, or when the working directory cannot be read). Nothing is
/// resolved on disk: symbolic links stay as written.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Where a key comes from: `env:VAR` when the variable is set (not blank),
/// else `file:ABSOLUTE_PATH`. Never the key.
pub fn key_source(env_var: &str, file: &Path) -> String {
    if std::env::var(env_var).is_ok_and(|v| !v.trim().is_empty()) {
        format!("env:{env_var}")
    } else {
        format!("file:{}", absolute(file).display())
    }
}

/// The absolute path of the SQLite database `store_url` names (`None` for
/// PostgreSQL or an in-memory database), once its directory is known to be
/// able to hold it: the directory must exist, be a directory and be
/// writable (SQLite creates the file, its `-wal` and `-shm` files, and
/// `serve` its `.lock` file there). `Err` says what is wrong and how to fix
/// it, naming the absolute path; callers put `store.url: ` in front.
pub fn sqlite_location(store_url: &str) -> Result<Option<PathBuf>, String> {
    let Some(file) = airlock_store::sqlite_file(store_url) else {
        return Ok(None);
    };
    let file = absolute(&file);
    // SQLite and the lock file go where a link leads: the directory that
    // must take them is the target's (a link in a read-only directory to a
    // file elsewhere works, as it always did).
    let target = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
    let dir = target.parent().unwrap_or(Path::new("/"));
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(format!(
                "{} is not a directory, so the database {} cannot be created there: point \
                 store.url at a file in a directory",
                dir.display(),
                file.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "directory {} does not exist, so the database {} cannot be created: create it \
                 (mkdir -p {}) or point store.url elsewhere (a relative path is relative to the \
                 working directory)",
                dir.display(),
                file.display(),
                dir.display()
            ))
        }
        Err(e) => {
            return Err(format!(
                "cannot reach directory {} of the database {}: {e}",
                dir.display(),
                file.display()
            ))
        }
    }
    if let Err(e) = rustix::fs::access(dir, rustix::fs::Access::WRITE_OK) {
        return Err(format!(
            "directory {} is not writable by this user ({e}): the database {} needs its \
             directory writable (SQLite's -wal and -shm files, airlock's .lock and -auditlog \
             files); fix its permissions or point store.url elsewhere",
            dir.display(),
            file.display()
        ));
    }
    Ok(Some(file))
}

/// Below this much free space a SQLite store that failed to open is said to
/// be on a full disk: its write-ahead log and shared-memory index grow by
/// pages and 32 KiB blocks, and SQLite itself names a failed growth of the
/// index only "disk I/O error".
const LOW_SPACE: u64 = 1024 * 1024;

/// Why a SQLite store at `database` may have failed to open, when the file
/// system holding it is (nearly) full: what is free and what to do.
pub fn full_disk_hint(database: &Path) -> Option<String> {
    // Where a link leads, as `sqlite_location` checks.
    let target = std::fs::canonicalize(database).unwrap_or_else(|_| database.to_path_buf());
    let dir = target.parent().unwrap_or(Path::new("/"));
    let stats = rustix::fs::statvfs(dir).ok()?;
    low_space_hint(dir, stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// [`full_disk_hint`] for `free` bytes left in `dir`.
fn low_space_hint(dir: &Path, free: u64) -> Option<String> {
    (free < LOW_SPACE).then(|| {
        format!(
            "the file system holding {} has {free} bytes free: SQLite needs room for its \
             -wal and -shm files; free some space or point store.url elsewhere",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/sub/airlock.db", dir.path().display());
        let err = sqlite_location(&url).unwrap_err();
        let sub = dir.path().join("sub");
        assert!(
            err.starts_with(&format!("directory {} does not exist", sub.display())),
            "{err}"
        );
        assert!(
            err.contains(&format!("mkdir -p {}", sub.display())),
            "{err}"
        );
        std::fs::create_dir(&sub).unwrap();
        assert_eq!(sqlite_location(&url).unwrap(), Some(sub.join("airlock.db")));
        assert_eq!(sqlite_location("postgres://u@h/db").unwrap(), None);
        assert_eq!(sqlite_location("sqlite::memory:").unwrap(), None);
    }

    #[test]
    fn a_relative_path_is_shown_absolute() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(absolute(Path::new("airlock.db")), cwd.join("airlock.db"));
        assert_eq!(absolute(Path::new("/a/b")), PathBuf::from("/a/b"));
    }

    #[test]
    fn a_full_disk_is_named_with_what_is_free() {
        let dir = Path::new("/var/lib/airlock");
        let hint = low_space_hint(dir, 4096).unwrap();
        assert!(
            hint.starts_with("the file system holding /var/lib/airlock has 4096 bytes free"),
            "{hint}"
        );
        assert_eq!(low_space_hint(dir, LOW_SPACE), None);
        // A store directory with room says nothing.
        let room = tempfile::tempdir().unwrap();
        let database = room.path().join("airlock.db");
        let free = rustix::fs::statvfs(room.path()).unwrap();
        if free.f_bavail * free.f_frsize >= LOW_SPACE {
            assert_eq!(full_disk_hint(&database), None);
        }
    }
}

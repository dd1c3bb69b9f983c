//! Paths from the config as `serve` will use them. Relative paths (the
//! SQLite file, key files) resolve against the working directory, not the
//! config file's; what they resolve to is shown absolute (`config check`,
//! the start-up log) so that a user starting airlock elsewhere sees it.
//! Also the check that a SQLite store's directory can take the database,
//! shared by `serve` and `config check`.

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
             directory writable (SQLite's -wal and -shm files, airlock's .lock file); fix its \
             permissions or point store.url elsewhere",
            dir.display(),
            file.display()
        ));
    }
    Ok(Some(file))
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
}

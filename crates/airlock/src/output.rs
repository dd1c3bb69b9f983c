//! Commands' output on stdout. When the reader has gone (`airlock ... |
//! head -1`), a write fails with [`StdoutClosed`], which ends the command
//! quietly, as for `gh` and `vault`: `main` exits 0 with nothing on stderr
//! ([`is_stdout_closed`]). Every command writes its output through here.
//! (`session create` fails instead: see `commands/session.rs`.)

use std::borrow::Cow;
use std::fmt;
use std::io::{self, ErrorKind, Write};

/// Stdout's reader has closed the pipe (EPIPE): not a failure.
#[derive(Debug)]
pub struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Locked stdout whose errors say where they come from: a closed pipe is
/// [`StdoutClosed`], anything else `writing to stdout: ...`.
pub struct Stdout(io::StdoutLock<'static>);

/// Stdout, locked for a command's output.
pub fn stdout() -> Stdout {
    Stdout(io::stdout().lock())
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(tag)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(tag)
    }
}

fn tag(error: io::Error) -> io::Error {
    match error.kind() {
        ErrorKind::BrokenPipe => io::Error::new(ErrorKind::BrokenPipe, StdoutClosed),
        // Retried by `write_all`.
        ErrorKind::Interrupted => error,
        kind => io::Error::new(kind, format!("writing to stdout: {error}")),
    }
}

/// Writes `text` to stdout and flushes it.
pub fn print(text: &str) -> io::Result<()> {
    let mut out = stdout();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Writes `text` for a command whose exit status is a verdict (`audit
/// verify`, `config check`): a closed stdout leaves the verdict as it is.
pub fn print_verdict(text: &str) -> io::Result<()> {
    match print(text) {
        Err(e) if is_closed(&e) => Ok(()),
        other => other,
    }
}

/// Whether stdout is `/dev/null`, where nobody reads what is written; a
/// stdout the command was started with closed (`>&-`) is one too (Rust's
/// start-up opens `/dev/null` on a closed descriptor 0, 1 or 2).
pub fn stdout_is_null() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(null) = std::fs::metadata("/dev/null") else {
        return false;
    };
    let Ok(fd) = io::stdout().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|out| out.file_type().is_char_device() && out.rdev() == null.rdev())
}

/// Whether `error` (or one of its causes) is a write to a closed stdout.
pub fn is_stdout_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<StdoutClosed>() || cause.downcast_ref::<io::Error>().is_some_and(is_closed)
    })
}

fn is_closed(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<StdoutClosed>())
}

/// Whether stdout's reader has gone (a pipe whose reading end is closed),
/// found without writing: for a command that waits between writes (`audit
/// tail`), so that `| head -1` ends it without waiting for the next record.
/// A terminal or a file is never gone.
pub fn stdout_gone() -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let stdout = io::stdout();
    let mut fds = [PollFd::new(&stdout, PollFlags::OUT)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(_) => fds[0]
            .revents()
            .intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL),
        Err(_) => false,
    }
}

/// Writes `airlock: {message}` to stderr, with whatever has a session
/// token's shape withheld (`sess_[withheld]`): messages may quote what the
/// user typed, and a token pasted in the wrong place is never printed back.
pub fn error_line(message: impl fmt::Display) {
    // Not `eprintln!`, which panics when stderr is closed (`2>&1 | head`).
    let _ = writeln!(io::stderr(), "{}", withheld(&format!("airlock: {message}")));
}

/// Says why the command could not go on: as [`error_line`], or with
/// `json` as a log line of `--log-format json` at ERROR (stderr stays one
/// JSON object a line for a log pipeline), written directly, whatever
/// `RUST_LOG` filters.
pub fn fatal_line(json: bool, message: &str) {
    if !json {
        error_line(message);
        return;
    }
    let timestamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let line = serde_json::json!({
        "timestamp": timestamp,
        "level": "ERROR",
        "fields": { "message": withheld(message) },
        "target": "airlock",
    });
    let _ = writeln!(io::stderr(), "{line}");
}

/// `message` with whatever has a session token's shape withheld, as
/// [`error_line`] prints it.
pub fn withheld(message: &str) -> Cow<'_, str> {
    match airlock_core::token::withhold_runs(message) {
        Some(withheld) => Cow::Owned(withheld),
        None => Cow::Borrowed(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_is_told_apart_from_other_errors() {
        let closed = tag(io::Error::from(ErrorKind::BrokenPipe));
        assert!(is_closed(&closed));
        let err = anyhow::Error::new(closed).context("printing sessions");
        assert!(is_stdout_closed(&err));

        // Another EPIPE (a socket's) is not stdout's.
        let socket = anyhow::Error::new(io::Error::from(ErrorKind::BrokenPipe));
        assert!(!is_stdout_closed(&socket));

        let full = tag(io::Error::from(ErrorKind::StorageFull));
        assert!(!is_closed(&full));
        assert!(
            full.to_string().starts_with("writing to stdout: "),
            "{full}"
        );
    }
}

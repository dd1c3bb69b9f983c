//! Child processes of the benchmark (the mock, nginx, airlock) and what
//! `/proc` says about them: CPU time and resident memory.

use std::collections::VecDeque;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use parking_lot::Mutex;

/// Lines of output kept for error messages.
const TAIL_LINES: usize = 40;
/// An unterminated line longer than this is dropped.
const TAIL_LINE_BYTES: usize = 64 * 1024;
/// How long a stopped process may take before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// A running child process; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    name: String,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Lines as they come; dropped once the listening lines were seen.
    lines: Option<mpsc::Receiver<String>>,
}

impl Proc {
    /// Spawns `command` with piped output, which is read (and kept as a
    /// short tail) by background threads.
    pub fn spawn(name: &str, mut command: Command) -> anyhow::Result<Self> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {name} ({command:?})"))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, lines) = mpsc::channel();
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for pipe in pipes.into_iter().flatten() {
            let tail = Arc::clone(&tail);
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-output"))
                .spawn(move || read_lines(pipe, &tail, &tx))
                .context("starting an output reader")?;
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            tail,
            lines: Some(lines),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the output has shown a URL after each of `prefixes`
    /// (e.g. `listening on `) and returns them in the same order. Later
    /// output is only kept as the tail.
    pub fn wait_for_urls(
        &mut self,
        prefixes: &[&str],
        limit: Duration,
    ) -> anyhow::Result<Vec<String>> {
        // From here on the reader stops sending lines: the receiver is
        // dropped when this returns.
        let lines = self
            .lines
            .take()
            .ok_or_else(|| anyhow!("{}: output already consumed", self.name))?;
        let deadline = Instant::now() + limit;
        let mut found: Vec<Option<String>> = vec![None; prefixes.len()];
        while found.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{} printed no listening line within {limit:?}:\n{}",
                    self.name,
                    self.tail()
                );
            }
            match lines.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => {
                    for (slot, prefix) in found.iter_mut().zip(prefixes) {
                        if slot.is_none() {
                            *slot = url_after(&line, prefix);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.check_alive()?,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(100));
                    self.check_alive()?;
                    bail!("{} closed its output:\n{}", self.name, self.tail());
                }
            }
        }
        Ok(found.into_iter().flatten().collect())
    }

    /// Stops handing out lines (for a process whose listening line is not
    /// awaited): from now on its output is only kept as the tail.
    pub fn ignore_output(&mut self) {
        self.lines = None;
    }

    /// An error (with the output tail) if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.tail());
        }
        Ok(())
    }

    /// The last lines the process printed.
    pub fn tail(&self) -> String {
        self.tail
            .lock()
            .iter()
            .map(|l| format!("  {l}\n"))
            .collect()
    }

    /// SIGTERM, then SIGKILL if it is still there after a while.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = signal(self.pid(), "TERM");
        let deadline = Instant::now() + STOP_LIMIT;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads `pipe` in large chunks until it closes. Complete lines go to the
/// tail and, while `tx`'s receiver exists, to `tx`; once nobody listens the
/// lines are only kept as the tail. A server that logs every call (airlock
/// does) must never be slowed down by this reader.
fn read_lines(
    mut pipe: Box<dyn Read + Send>,
    tail: &Mutex<VecDeque<String>>,
    tx: &mpsc::Sender<String>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    let mut listening = true;
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        partial.extend_from_slice(&buf[..n]);
        let Some(end) = partial.iter().rposition(|b| *b == b'\n') else {
            if partial.len() > TAIL_LINE_BYTES {
                partial.clear();
            }
            continue;
        };
        let complete: Vec<u8> = partial.drain(..=end).collect();
        // Only the last lines of a large chunk can reach the tail.
        let lines: Vec<&[u8]> = complete.split(|b| *b == b'\n').collect();
        let skip = if listening {
            0
        } else {
            lines.len().saturating_sub(TAIL_LINES + 1)
        };
        for line in &lines[skip..] {
            if line.is_empty() {
                continue;
            }
            let line = String::from_utf8_lossy(line).trim_end().to_owned();
            {
                let mut tail = tail.lock();
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
            }
            if listening && tx.send(line).is_err() {
                listening = false;
            }
        }
    }
}

/// The URL following `prefix` in `line`.
pub fn url_after(line: &str, prefix: &str) -> Option<String> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let url = rest.split_whitespace().next()?;
    url.starts_with("http://").then(|| url.to_owned())
}

/// Sends a signal with the `kill` utility (the workspace forbids `unsafe`).
fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("kill -{name} {pid}: {status}");
    }
    Ok(())
}

/// A process and all its descendants, as found in `/proc` right now.
pub fn tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse().ok()))
            {
                parents.push((pid, ppid));
            }
        }
    }
    let mut pids = vec![root];
    let mut i = 0;
    while i < pids.len() {
        let parent = pids[i];
        pids.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    pids
}

/// The fields of `/proc/PID/stat` after the command name: index 0 is the
/// state (field 3 in proc(5)), 1 the parent, 11 `utime`, 12 `stime`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU time of the processes, in clock ticks.
pub fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| stat_fields(*pid))
        .map(|f| {
            let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            field(11) + field(12)
        })
        .sum()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails).
pub fn ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), summed over `pids`.
pub fn status_kib(pids: &[u32], field: &str) -> Option<u64> {
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()?;
        total += value;
    }
    Some(total)
}

/// Resets the peak resident size (`VmHWM`) of the processes to their current
/// size (`echo 5 > /proc/PID/clear_refs`). Fails if the kernel refused.
pub fn reset_peak(pids: &[u32]) -> anyhow::Result<()> {
    for pid in pids {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
            .map_err(|e| anyhow!("resetting the peak RSS of {pid}: {e}"))?;
    }
    Ok(())
}

/// Busy and total CPU ticks of the whole machine (first line of `/proc/stat`).
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

/// Share of all cores (0–100 %) busy over `window`, whoever used them.
pub async fn machine_busy(window: std::time::Duration) -> Option<f64> {
    let (busy0, total0) = machine_ticks()?;
    tokio::time::sleep(window).await;
    let (busy1, total1) = machine_ticks()?;
    let total = total1.checked_sub(total0).filter(|t| *t > 0)?;
    Some(busy1.saturating_sub(busy0) as f64 * 100.0 / total as f64)
}

/// `/proc/loadavg`'s three load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_lines() {
        assert_eq!(
            url_after(
                "airlock proxy listening on http://127.0.0.1:1 (x)",
                "proxy listening on "
            )
            .as_deref(),
            Some("http://127.0.0.1:1")
        );
        assert_eq!(url_after("listening on ", "listening on "), None);
    }

    #[test]
    fn lines_go_to_the_listener_and_the_tail() {
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = Mutex::new(VecDeque::new());
        let (tx, rx) = mpsc::channel();
        read_lines(
            Box::new(std::io::Cursor::new(text.into_bytes())),
            &tail,
            &tx,
        );
        let got: Vec<String> = rx.try_iter().collect();
        assert_eq!(got.len(), 100);
        assert_eq!(got[0], "line 0");
        let tail = tail.lock();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail.back().map(String::as_str), Some("line 99"));
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(status_kib(&[me], "VmRSS").unwrap() > 0);
        assert!(tree(me).contains(&me));
        let _ = cpu_ticks(&[me]);
        let (busy, total) = machine_ticks().unwrap();
        assert!(busy <= total);
    }
}

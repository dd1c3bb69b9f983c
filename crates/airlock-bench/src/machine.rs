//! What the benchmark ran on: CPU, cores, memory, kernel, date, revision and
//! tool versions.

use std::path::Path;
use std::process::Command;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Facts about the machine and the build.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// Total memory, in MiB.
    pub memory_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// Operating system (`PRETTY_NAME`).
    pub os: String,
    /// UTC time of the run.
    pub date: String,
    /// `git rev-parse --short HEAD`, with `-dirty` for uncommitted changes.
    pub git_rev: String,
    /// `rustc -V`.
    pub rustc: String,
    /// First line of `wrk -v`.
    pub wrk: String,
    /// `nginx -v`.
    pub nginx: String,
    /// Niceness of the benchmark (its children inherit it).
    pub nice: String,
}

impl Machine {
    /// Collects the facts; unknown ones are `?`.
    pub fn collect(root: &Path, wrk: &Path, nginx: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(unknown);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        let os = std::fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_owned())
            })
            .unwrap_or_else(unknown);
        let head = command_line(Command::new("git").arg("-C").arg(root).args([
            "rev-parse",
            "--short",
            "HEAD",
        ]));
        let dirty = Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["status", "--porcelain", "--untracked-files=no"])
            .output()
            .is_ok_and(|o| !o.stdout.is_empty());
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_mib,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| unknown(), |s| s.trim().to_owned()),
            os,
            date: OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .ok()
                .and_then(|d| d.format(&Rfc3339).ok())
                .unwrap_or_else(unknown),
            git_rev: if dirty { format!("{head}-dirty") } else { head },
            rustc: command_line(Command::new("rustc").arg("-V")),
            wrk: command_line(Command::new(wrk).arg("-v")),
            nginx: command_line(Command::new(nginx).arg("-v")),
            nice: own_nice().unwrap_or_else(unknown),
        }
    }
}

/// Field 19 of `/proc/self/stat`.
fn own_nice() -> Option<String> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(16).map(str::to_owned)
}

/// The first non-empty line a command printed (on stdout or stderr).
fn command_line(command: &mut Command) -> String {
    command
        .output()
        .ok()
        .and_then(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(unknown)
}

fn unknown() -> String {
    "?".to_owned()
}

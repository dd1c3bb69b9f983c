//! The CLI's output: snapshot tests of help, session, config check and error
//! output (ids, tokens, times, ports and paths redacted), plus `--version`,
//! completions, `audit tail` and `/readyz`.
//!
//! Snapshots are plain files in `tests/snapshots/`. After an intended change,
//! rewrite them with `UPDATE_SNAPSHOTS=1 cargo test -p airlock --test cli`
//! and review the diff.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use airlock_testkit::client::request;
use airlock_testkit::hostile::{Script, ScriptedUpstream};
use airlock_testkit::{Airlock, AirlockBuilder, MockProvider};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_airlock");
const OPENAI_KEY: &str = "sk-real-openai-cli-0123456789";
/// A well-formed session token no session has.
const UNKNOWN_TOKEN: &str = "sess_0123456789abcdefghijABCDEFGHIJ0123456789xyz";
/// Upper bound for anything a test waits for.
const DEADLINE: Duration = Duration::from_secs(30);

// --- snapshots ------------------------------------------------------------

/// Compares `actual` with `tests/snapshots/NAME.txt`, or writes it there
/// when `UPDATE_SNAPSHOTS` is set.
fn assert_snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "snapshot {} missing ({e}); create it with UPDATE_SNAPSHOTS=1",
            path.display()
        )
    });
    if expected != actual {
        let first_diff = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "one output is a prefix of the other".to_owned(),
                |i| format!("first difference on line {}", i + 1),
            );
        panic!(
            "snapshot {name} differs ({first_diff}; UPDATE_SNAPSHOTS=1 to accept):\n\
             --- expected\n{expected}\n--- actual\n{actual}"
        );
    }
}

/// Makes output deterministic: `replacements` first (URLs, paths), then
/// session ids (numbered by first appearance, padded to their length so that
/// tables stay aligned), tokens and RFC 3339 times.
fn redact(text: &str, replacements: &[(&str, &str)]) -> String {
    let mut text = text.to_owned();
    for (from, to) in replacements {
        text = text.replace(from, to);
    }
    let mut ids: Vec<String> = Vec::new();
    let mut out = String::new();
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let at_word_start = text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
        if at_word_start {
            if let Some(n) = prefixed_run(rest, "sess_") {
                out.push_str("sess_<token>");
                i += n;
                continue;
            }
            if let Some(n) = prefixed_run(rest, "ses_") {
                let id = &rest[..n];
                let k = match ids.iter().position(|known| known == id) {
                    Some(k) => k + 1,
                    None => {
                        ids.push(id.to_owned());
                        ids.len()
                    }
                };
                out.push_str(&format!("{:.<n$}", format!("ses_<{k}>")));
                i += n;
                continue;
            }
            if let Some(n) = timestamp_len(rest) {
                out.push_str("<time>");
                i += n;
                continue;
            }
        }
        let c = rest.chars().next().unwrap();
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Length of `prefix` followed by at least one ASCII alphanumeric.
fn prefixed_run(text: &str, prefix: &str) -> Option<usize> {
    let run = text
        .strip_prefix(prefix)?
        .bytes()
        .take_while(u8::is_ascii_alphanumeric)
        .count();
    (run > 0).then_some(prefix.len() + run)
}

/// Length of an RFC 3339 time at the start of `text`
/// (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`).
fn timestamp_len(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    let shape = b"dddd-dd-ddTdd:dd:dd";
    if b.len() < shape.len() {
        return None;
    }
    for (have, want) in b.iter().zip(shape) {
        let ok = match want {
            b'd' => have.is_ascii_digit(),
            other => have == other,
        };
        if !ok {
            return None;
        }
    }
    let mut n = shape.len();
    if b.get(n) == Some(&b'.') {
        n += 1;
        while b.get(n).is_some_and(u8::is_ascii_digit) {
            n += 1;
        }
    }
    match b.get(n) {
        Some(b'Z') => Some(n + 1),
        Some(b'+' | b'-') if b.len() >= n + 6 => Some(n + 6),
        _ => None,
    }
}

/// Replaces the cells of column `column` of an aligned table (up to the
/// next column) with `placeholder`, keeping the alignment; `-` cells stay.
fn redact_column(table: &str, column: &str, next: &str, placeholder: &str) -> String {
    let header = table.lines().next().unwrap();
    let start = header.find(column).unwrap();
    let end = header.find(next).unwrap();
    let width = end - start;
    table
        .lines()
        .enumerate()
        .map(|(i, line)| {
            if i == 0 || line.len() < end || line[start..end].trim() == "-" {
                format!("{line}\n")
            } else {
                format!("{}{placeholder:<width$}{}\n", &line[..start], &line[end..])
            }
        })
        .collect()
}

// --- running the binary ---------------------------------------------------

/// The binary with a fixed terminal width and no admin settings inherited.
fn airlock_cmd(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("COLUMNS", "100")
        .env_remove("CLICOLOR_FORCE")
        .env_remove("AIRLOCK_ADMIN_URL")
        .env_remove("AIRLOCK_ADMIN_TOKEN")
        .env_remove("AIRLOCK_ADMIN_TIMEOUT")
        .env_remove("AIRLOCK_AUDIT_KEY")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// The CLI against a running server; it must succeed.
async fn cli(airlock: &Airlock, args: &[&str]) -> Output {
    let out = cli_ending(airlock, args).await;
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    out
}

/// The CLI against a running server, however it ends.
async fn cli_ending(airlock: &Airlock, args: &[&str]) -> Output {
    airlock_cmd(args)
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
        .current_dir(airlock.dir())
        .output()
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn start(mock: &MockProvider) -> Airlock {
    AirlockBuilder::new(BIN)
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .provider(
            "anthropic",
            &mock.url(),
            "header:x-api-key",
            "sk-ant-cli",
            "",
        )
        .start()
        .await
        .unwrap()
}

// --- tests ----------------------------------------------------------------

#[tokio::test]
async fn version_flag() {
    for args in [&["--version"][..], &["-V"]] {
        let out = airlock_cmd(args).output().await.unwrap();
        assert!(out.status.success());
        assert_eq!(
            stdout(&out),
            format!("airlock {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

/// Every command's `--help`, in one snapshot; each has examples.
#[tokio::test]
async fn help_snapshots() {
    let commands: &[&[&str]] = &[
        &[],
        &["serve"],
        &["session"],
        &["session", "create"],
        &["session", "list"],
        &["session", "show"],
        &["session", "revoke"],
        &["exec"],
        &["audit"],
        &["audit", "verify"],
        &["audit", "export"],
        &["audit", "tail"],
        &["audit", "prune"],
        &["status"],
        &["config"],
        &["config", "check"],
        &["completions"],
        &["credential"],
        &["credential", "set"],
        &["credential", "show"],
    ];
    let mut all = String::new();
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let out = airlock_cmd(&args).output().await.unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let help = stdout(&out);
        assert!(
            help.contains("\nExample"),
            "{args:?} has no examples:\n{help}"
        );
        all.push_str(&format!("=== airlock {} ===\n{help}\n", args.join(" ")));
    }
    assert_snapshot("help", &all);

    // `exec --help` names every variable it keeps from CMD, and says that
    // a Ctrl-C at the terminal is not forwarded a second time.
    let out = airlock_cmd(&["exec", "--help"]).output().await.unwrap();
    let help = stdout(&out).replace('\n', " ");
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains(
            "a Ctrl-C typed at the terminal reaches CMD directly and is not sent a second time"
        ),
        "{help}"
    );
    for var in [
        "AIRLOCK_ADMIN_TOKEN",
        "AIRLOCK_AUDIT_KEY",
        "AIRLOCK_MASTER_KEY",
    ] {
        assert!(help.contains(var), "exec --help leaves out {var}:\n{help}");
    }

    // `-h` is the short form, and still shows the examples.
    let out = airlock_cmd(&["exec", "-h"]).output().await.unwrap();
    assert!(stdout(&out).contains("Examples:\n  airlock exec --allow"));
}

#[tokio::test]
async fn completions_for_bash_zsh_and_fish() {
    for (shell, marker) in [
        ("bash", "complete -F _airlock"),
        ("zsh", "#compdef airlock"),
        ("fish", "complete -c airlock"),
    ] {
        let out = airlock_cmd(&["completions", shell]).output().await.unwrap();
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        assert!(script.contains(marker), "{shell}:\n{script}");
        for word in ["exec", "session", "revoke", "tail", "check", "allow"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    // The bash script is valid bash.
    let out = airlock_cmd(&["completions", "bash"])
        .output()
        .await
        .unwrap();
    let check = Command::new("bash")
        .args(["-n", "-c", &stdout(&out)])
        .output()
        .await
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));

    let out = airlock_cmd(&["completions", "tcsh"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("invalid value 'tcsh'"));
}

#[tokio::test]
async fn session_output_snapshots() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let proxy = airlock.proxy_url();
    let admin = airlock.admin_url();
    let replacements = [
        (proxy.as_str(), "http://<proxy>"),
        (admin.as_str(), "http://<admin>"),
    ];
    let mut all = String::new();
    let mut record = |title: &str, text: &str| {
        all.push_str(&format!("=== {title} ===\n{text}\n"));
    };

    let rule = "openai:POST:/v1/chat/completions";
    let out = cli(
        &airlock,
        &[
            "session",
            "create",
            "--allow",
            rule,
            "--allow",
            "anthropic:POST:/v1/messages",
            "--ttl",
            "1h",
            "--label",
            "agent=a1",
            "--label",
            "team=ml",
            // A value that would read as more labels is shown quoted.
            "--label",
            "note=a, b=c",
            "--rpm",
            "60",
            "--max-requests",
            "1000",
            "--max-denied",
            "3",
        ],
    )
    .await;
    let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let first_id = created["id"].as_str().unwrap().to_owned();
    record("session create (json)", &stdout(&out));

    let out = cli(
        &airlock,
        &["session", "create", "--allow", rule, "--format", "env"],
    )
    .await;
    let env = stdout(&out);
    record("session create --format env", &env);
    for line in env.lines() {
        let (key, value) = line.split_once('=').unwrap();
        assert!(!key.is_empty() && !value.is_empty(), "{line}");
    }
    // The session's id too, as exec sets it.
    assert!(
        env.lines()
            .any(|l| l.starts_with("AIRLOCK_SESSION_ID=ses_")),
        "{env}"
    );

    let out = cli(
        &airlock,
        &[
            "session", "create", "--allow", rule, "--label", "agent=a2", "--format", "shell",
        ],
    )
    .await;
    let shell = stdout(&out);
    record("session create --format shell", &shell);
    // The shell lines work in a real shell.
    let sh = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{shell}\nprintf '%s %s %s' \"$OPENAI_API_KEY\" \"$OPENAI_BASE_URL\" \
             \"$AIRLOCK_SESSION_ID\""
        ))
        .output()
        .await
        .unwrap();
    let token = shell
        .lines()
        .find_map(|l| l.strip_prefix("export OPENAI_API_KEY='"))
        .unwrap()
        .trim_end_matches('\'')
        .to_owned();
    let shell_id = shell
        .lines()
        .find_map(|l| l.strip_prefix("export AIRLOCK_SESSION_ID='"))
        .unwrap()
        .trim_end_matches('\'')
        .to_owned();
    assert!(shell_id.starts_with("ses_"), "{shell}");
    assert_eq!(stdout(&sh), format!("{token} {proxy}/openai/v1 {shell_id}"));

    // One allowed call on the first session, so that the counts show.
    let first_token = created["token"].as_str().unwrap();
    let reply = request(
        "POST",
        &format!("{proxy}/openai/v1/chat/completions"),
        &[("authorization", &format!("Bearer {first_token}"))],
        r#"{"model":"m","messages":[]}"#,
    )
    .await;
    assert_eq!(reply.status, 200);
    // Call counters reach the list through the store: wait for them.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, view) = airlock
            .admin("GET", &format!("/v1/sessions/{first_id}"), None)
            .await
            .unwrap();
        if view["calls"]["allowed"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the call was not counted: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = cli(&airlock, &["session", "list"]).await;
    let table = redact_column(&stdout(&out), "EXPIRES IN", "ALLOWED/DENIED", "<left>");
    record("session list", &table);

    let out = cli(&airlock, &["session", "show", &first_id]).await;
    assert!(
        !stdout(&out).contains("sess_"),
        "show never prints the token"
    );
    record("session show", &stdout(&out));
    let out = cli(
        &airlock,
        &["session", "show", &first_id, "--format", "json"],
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&out)).unwrap()["id"],
        first_id.as_str()
    );
    let out = cli(
        &airlock,
        &["session", "show", &first_id, "--format", "text"],
    )
    .await;
    assert!(!stdout(&out).contains("sess_"), "never the token");
    record("session show --format text", &stdout(&out));
    // --json wherever JSON is printed, as `session list --json` (round 37:
    // each command spelled it its own way).
    let shown = stdout(&cli(&airlock, &["session", "show", &first_id]).await);
    let out = cli(&airlock, &["session", "show", &first_id, "--json"]).await;
    assert_eq!(stdout(&out), shown);

    let out = cli(&airlock, &["session", "revoke", &first_id]).await;
    record("session revoke ID", &stdout(&out));
    let out = cli(&airlock, &["session", "revoke", &token]).await;
    record("session revoke TOKEN", &stdout(&out));

    let out = cli(&airlock, &["session", "list", "--all"]).await;
    let table = redact_column(&stdout(&out), "EXPIRES IN", "ALLOWED/DENIED", "<left>");
    record("session list --all", &table);
    let out = cli(&airlock, &["session", "list", "--json"]).await;
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 1);
    record("session list --json", &stdout(&out));
    // --format json is the same document (it was refused with a tip about
    // --log-format); --format table the default table.
    let json = stdout(&out);
    let out = cli(&airlock, &["session", "list", "--format", "json"]).await;
    assert_eq!(stdout(&out), json);
    let out = cli(&airlock, &["session", "list", "--format", "table"]).await;
    assert!(stdout(&out).starts_with("ID "), "{}", stdout(&out));

    // Redacted as a whole, so that each session keeps its number throughout.
    assert_snapshot("session", &redact(&all, &replacements));

    // (After the snapshot: one more session.)
    let out = cli(
        &airlock,
        &[
            "session",
            "create",
            "--allow",
            "openai:GET:/v1/models",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let json_created: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(json_created["token"].as_str().unwrap().starts_with("sess_"));
    let out = cli(&airlock, &["credential", "show", "openai", "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&out)).unwrap()["provider"],
        "openai"
    );
}

/// Errors: one line naming what is wrong, and the exit code.
#[tokio::test]
async fn error_output_snapshot() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let cases: &[&[&str]] = &[
        &["session", "create", "--allow", "openai:post:/v1/x"],
        &["session", "create", "--allow", "openai:POST"],
        &["session", "create", "--allow", "nope:POST:/v1/x"],
        // The rule an unknown provider came from is quoted; whitespace is
        // refused anywhere in a rule, named as a person reads it; a
        // provider in capitals gets the configured one it would be.
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--allow",
            "opneai:POST:/v1/x",
        ],
        &["session", "create", "--allow", "openai: POST:/v1/x"],
        &["session", "create", "--allow", "openai:POST:/v1/a b"],
        &["session", "create", "--allow", "openai:POST:/v1/a;b"],
        &["session", "create", "--allow", "OpenAI:POST:/v1/x"],
        &["session", "create", "--allow", "Nope:POST:/v1/x"],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--ttl",
            "forever",
        ],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--label",
            "novalue",
        ],
        &["session", "show", "nope"],
        &["session", "show", "ses_unknown"],
        // A token where an id is expected: named, never echoed.
        &["session", "show", UNKNOWN_TOKEN],
        &["session", "revoke", "ses_unknown"],
        &["session", "revoke", "sess_unknown"],
        &["session", "revoke", UNKNOWN_TOKEN],
        &["session", "revoke", "sk-proj-a-real-key-pasted-here"],
        &["exec", "--allow", "openai:POST:/v1/x"],
        &["exec", "--", "true"],
        &["session", "create"],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--ttl",
            "500ms",
        ],
        // A hyphen value reaches the duration parser; a TTL is whole
        // seconds.
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--ttl",
            "-5m",
        ],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--ttl",
            "1500ms",
        ],
        &["audit", "export", "--session", "bogus"],
        // Usage errors exit 2 and name the option, for every command.
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--ttl",
            "15",
        ],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--ttl",
            "48h",
        ],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--max-denied",
            "0",
        ],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--max-requests",
            "-1",
        ],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--rpm",
            "1000001",
        ],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--label",
            "a=1",
            "--label",
            "a=2",
        ],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--label",
            "a b=1",
        ],
        &["exec", "--allow", "openai:POST", "--", "true"],
        &[
            "exec",
            "--allow",
            "openai:POST:/v1/x",
            "--ttl",
            "48h",
            "--",
            "true",
        ],
        &["credential", "show", "a b"],
        &["credential", "set", "../../x"],
        // Well-formed, but not a provider of the server's.
        &["credential", "show", "nope"],
        &["credential", "set", "nope"],
        &["audit", "export", "--since", "last tuesday"],
        // Would match no record: refused rather than followed forever.
        &["audit", "tail", "--session", "bad"],
        &["audit", "verify", "--from", "-", "--session", "bad"],
    ];
    let mut all = String::new();
    for args in cases {
        let out = tokio::time::timeout(
            DEADLINE,
            airlock_cmd(args)
                .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
                .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
                .current_dir(airlock.dir())
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not exit"))
        .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(stdout(&out), "", "{args:?}");
        for secret in [UNKNOWN_TOKEN, "sk-proj-a-real-key-pasted-here"] {
            assert!(!stderr(&out).contains(secret), "{args:?}: {}", stderr(&out));
        }
        all.push_str(&format!(
            "=== airlock {} -> exit {} ===\n{}\n",
            args.join(" "),
            out.status.code().unwrap(),
            stderr(&out)
        ));
    }
    // HTTP or HTTPS, nothing else.
    let out = airlock_cmd(&["session", "list"])
        .env("AIRLOCK_ADMIN_URL", "ftp://airlock.internal:8081")
        .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
        .output()
        .await
        .unwrap();
    all.push_str(&format!(
        "=== AIRLOCK_ADMIN_URL=ftp://airlock.internal:8081 airlock session list -> exit {} ===\n{}\n",
        out.status.code().unwrap(),
        stderr(&out)
    ));
    // A token that cannot be a header value is the token's fault, not the
    // URL's.
    let out = airlock_cmd(&["session", "list"])
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .env(
            "AIRLOCK_ADMIN_TOKEN",
            format!("{}\n", airlock.admin_token()),
        )
        .output()
        .await
        .unwrap();
    all.push_str(&format!(
        "=== AIRLOCK_ADMIN_TOKEN=\"$TOKEN<newline>\" airlock session list -> exit {} ===\n{}\n",
        out.status.code().unwrap(),
        stderr(&out)
    ));
    // A token the server does not know, and none at all.
    let out = airlock_cmd(&["session", "list"])
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .env("AIRLOCK_ADMIN_TOKEN", "not-the-admin-token")
        .output()
        .await
        .unwrap();
    all.push_str(&format!(
        "=== AIRLOCK_ADMIN_TOKEN=not-the-admin-token airlock session list -> exit {} ===\n{}\n",
        out.status.code().unwrap(),
        stderr(&out)
    ));
    let out = airlock_cmd(&["session", "list"])
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .output()
        .await
        .unwrap();
    all.push_str(&format!(
        "=== (AIRLOCK_ADMIN_TOKEN unset) airlock session list -> exit {} ===\n{}\n",
        out.status.code().unwrap(),
        stderr(&out)
    ));
    assert_snapshot(
        "errors",
        &redact(&all, &[(airlock.admin_url().as_str(), "http://<admin>")]),
    );
}

/// Without AIRLOCK_ADMIN_TOKEN the CLI says so and sends nothing (it used
/// to send the request and report the server's 401 as if the token were
/// wrong).
/// AIRLOCK_ADMIN_URL set to the proxy's address by mistake is named as
/// such (the proxy answers the admin token with 401 `invalid_token`, as
/// it is no session token).
#[tokio::test]
async fn an_admin_url_that_is_the_proxy_s_is_said_to_be() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let out = airlock_cmd(&["session", "list"])
        .env("AIRLOCK_ADMIN_URL", airlock.proxy_url())
        .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "answered as airlock's proxy, not its admin API: AIRLOCK_ADMIN_URL points at \
             proxy.listen"
        ),
        "{}",
        stderr(&out)
    );
}

/// A web server that is not airlock: answers every request with
/// `status_line` and an HTML page. Keep it while it is used.
async fn foreign_server(status_line: &'static str) -> ScriptedUpstream {
    foreign_server_answering(
        status_line,
        "text/html",
        "<html><body><h1>Welcome</h1></body></html>",
    )
    .await
}

/// A server that is not airlock answering every request with `status_line`
/// and `body` of `content_type`. Keep it while it is used.
async fn foreign_server_answering(
    status_line: &'static str,
    content_type: &'static str,
    body: &'static str,
) -> ScriptedUpstream {
    ScriptedUpstream::start(Script::Fixed {
        status_line,
        content_type,
        body,
    })
    .await
}

/// AIRLOCK_ADMIN_URL naming a server that is not airlock: said so, with
/// exit 1, rather than "no error message" (and, for a 404, exit 2 as if
/// the session were unknown) or a missing "sessions" list. A 5xx without
/// airlock's error stays a refusal that may pass (a proxy in front of a
/// restarting airlock), said as such.
#[tokio::test]
async fn an_admin_url_that_is_not_airlock_is_said_to_be() {
    let cases: [(&str, &[&str], &str); 3] = [
        (
            "404 Not Found",
            &["session", "show", "ses_x"],
            "answered HTTP 404 but not as airlock's admin API does (no JSON error): is \
             AIRLOCK_ADMIN_URL the address of airlock's [admin] listen",
        ),
        (
            "200 OK",
            &["session", "list"],
            "answered HTTP 200 but not as airlock's admin API does (no JSON object): is \
             AIRLOCK_ADMIN_URL the address of airlock's [admin] listen",
        ),
        (
            "502 Bad Gateway",
            &["session", "list"],
            "answered without airlock's JSON error (a proxy in front of a restarting airlock? if \
             not, AIRLOCK_ADMIN_URL may name another server) (HTTP 502)",
        ),
    ];
    for (status_line, args, said) in cases {
        let server = foreign_server(status_line).await;
        let url = server.url();
        let out = against(&url, args).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "{status_line}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(said),
            "{status_line}: {}",
            stderr(&out)
        );
    }
}

/// With `--log-format json`, why `serve` cannot start is a JSON log line at
/// ERROR like every other line on stderr, with its exit status (round 43:
/// plain text, which a log pipeline reading JSON lines drops or chokes
/// on); a session token the message would quote is withheld, as in text.
#[tokio::test]
async fn serve_with_json_logs_says_why_it_cannot_start_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("[proxy]\nlisten = \"{UNKNOWN_TOKEN}\"\n")).unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    // The last with every log line filtered out: said all the same.
    let cases = [
        (&bad, None, 64, "invalid config: ", "info"),
        (
            &good,
            Some("short"),
            1,
            "AIRLOCK_ADMIN_TOKEN has only 5 characters",
            "info",
        ),
        (&bad, None, 64, "invalid config: ", "off"),
    ];
    for (config, admin_token, code, said, rust_log) in cases {
        let mut cmd = airlock_cmd(&[
            "--log-format",
            "json",
            "serve",
            "--config",
            config.to_str().unwrap(),
        ]);
        cmd.current_dir(dir.path())
            .env_remove("AIRLOCK_ADMIN_TOKEN")
            .env("RUST_LOG", rust_log);
        if let Some(token) = admin_token {
            cmd.env("AIRLOCK_ADMIN_TOKEN", token);
        }
        let out = tokio::time::timeout(DEADLINE, cmd.output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
        let lines: Vec<Value> = stderr(&out)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        let last = lines.last().unwrap();
        assert_eq!(last["level"], "ERROR", "{last}");
        let message = last["fields"]["message"].as_str().unwrap();
        assert!(message.contains(said), "{message}");
        assert!(!stderr(&out).contains(UNKNOWN_TOKEN), "{}", stderr(&out));
    }
}

/// A server that has a route the CLI calls but not its method answers 405:
/// the server is older than the command, and the message says so (round
/// 43: `credential remove` against a server from before it said only
/// "method not allowed").
#[tokio::test]
async fn a_method_the_server_does_not_have_names_an_older_server() {
    let server = foreign_server_answering(
        "405 Method Not Allowed",
        "application/json",
        r#"{"error":{"type":"invalid_request_error","code":"method_not_allowed","message":"method not allowed"}}"#,
    )
    .await;
    let out = against(&server.url(), &["credential", "remove", "openai"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "method not allowed: DELETE {}/v1/providers/openai/credential (a server older than \
             this command? `airlock status` shows its version)",
            server.url()
        )),
        "{}",
        stderr(&out)
    );
}

/// A server answering JSON objects of another API: no command takes them
/// for airlock's answer (a session created, a credential stored, a trail
/// verified); each names the field that is missing and the variable.
#[tokio::test]
async fn another_api_s_json_does_not_pass_for_airlock_s() {
    let server = foreign_server_answering("200 OK", "application/json", r#"{"ok":true}"#).await;
    let url = server.url();
    let cases: [(&[&str], i32, &str); 9] = [
        (&["session", "list"], 1, "no \"sessions\" in its JSON"),
        (
            &["audit", "export", "--remote"],
            1,
            "no \"records\" in its JSON",
        ),
        (
            &["audit", "tail", "--remote"],
            1,
            "no \"records\" in its JSON",
        ),
        (
            &[
                "session",
                "create",
                "--allow",
                "openai:POST:/v1/x",
                "--format",
                "shell",
            ],
            1,
            "no \"id\" in its JSON",
        ),
        (&["session", "show", "ses_x"], 1, "no \"id\" in its JSON"),
        (&["session", "revoke", "ses_x"], 1, "no \"id\" in its JSON"),
        (
            &["credential", "set", "openai"],
            1,
            "no \"provider\" in its JSON",
        ),
        (
            &["credential", "show", "openai"],
            1,
            "no \"provider\" in its JSON",
        ),
        (
            &["audit", "verify", "--remote"],
            2,
            "no \"records\" in its JSON",
        ),
    ];
    for (args, code, said) in cases {
        let out = against(&url, args).await;
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "{url} answered HTTP 200 but not as airlock's admin API does ({said}): is \
                 AIRLOCK_ADMIN_URL the address of airlock's [admin] listen"
            )),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(stdout(&out).is_empty(), "{args:?}: {}", stdout(&out));
    }
}

/// The CLI with AIRLOCK_ADMIN_URL `url` and some admin token, however it
/// ends.
async fn against(url: &str, args: &[&str]) -> Output {
    airlock_cmd(args)
        .env("AIRLOCK_ADMIN_URL", url)
        .env("AIRLOCK_ADMIN_TOKEN", "some-admin-token")
        .output()
        .await
        .unwrap()
}

/// `airlock ARGS...` against the admin API at `url` with no admin token.
async fn without_token(url: &str, args: &[&str]) -> Output {
    airlock_cmd(args)
        .env("AIRLOCK_ADMIN_URL", url)
        .env_remove("AIRLOCK_ADMIN_TOKEN")
        .output()
        .await
        .unwrap()
}

/// A listener that never accepts, and its URL: a connection to it would
/// wait in the backlog, where [`assert_nothing_sent`] finds it.
fn unanswering_listener() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

/// No connection reached `listener`.
fn assert_nothing_sent(listener: &std::net::TcpListener) {
    let accepted = listener.accept();
    assert!(
        accepted
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "a request was sent: {accepted:?}"
    );
}

/// An admin URL with a query string (or a fragment) is refused before any
/// request: the paths would be appended to the query (round 31: "no such
/// admin route").
#[tokio::test]
async fn an_admin_url_with_a_query_is_refused_before_any_request() {
    let (listener, url) = unanswering_listener();
    let url = format!("{url}?x=1");
    let out = against(&url, &["session", "list"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "airlock: AIRLOCK_ADMIN_URL {url:?} has a query or a fragment: give the admin \
             listener's address (a path prefix is kept), e.g. http://127.0.0.1:8081\n"
        )
    );
    assert_nothing_sent(&listener);
}

/// A server answering errors in airlock's JSON shape but with another API's
/// codes (OpenAI's 404 `unknown_url`, 401 `invalid_api_key`): not read as
/// an unknown session or provider (exit 2) or a refused admin token, but
/// said to be another server (round 32).
#[tokio::test]
async fn another_api_s_json_errors_do_not_pass_for_airlock_s() {
    let not_found_server = foreign_server_answering(
        "404 Not Found",
        "application/json",
        r#"{"error":{"message":"Unknown request URL","type":"invalid_request_error","code":"unknown_url"}}"#,
    )
    .await;
    let not_found = not_found_server.url();
    let unauthorized_server = foreign_server_answering(
        "401 Unauthorized",
        "application/json",
        r#"{"error":{"message":"Incorrect API key","type":"invalid_request_error","code":"invalid_api_key"}}"#,
    )
    .await;
    let unauthorized = unauthorized_server.url();
    let cases: [(&str, &[&str], u16, &str); 4] = [
        (
            &not_found,
            &["session", "show", "ses_x"],
            404,
            "unknown_url",
        ),
        (
            &not_found,
            &["session", "revoke", "ses_x"],
            404,
            "unknown_url",
        ),
        (
            &not_found,
            &["credential", "show", "openai"],
            404,
            "unknown_url",
        ),
        (&unauthorized, &["session", "list"], 401, "invalid_api_key"),
    ];
    for (url, args, status, code) in cases {
        let out = against(url, args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "{url} answered HTTP {status} but not as airlock's admin API does (error code \
                 \"{code}\", not "
            )),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// A server without the credential route (an older airlock's JSON 404)
/// is not said to lack the provider: its own message is.
#[tokio::test]
async fn a_missing_credential_route_is_not_an_unknown_provider() {
    let server = foreign_server_answering(
        "404 Not Found",
        "application/json",
        r#"{"error":{"type":"not_found","code":"not_found","message":"no such admin route"}}"#,
    )
    .await;
    let url = server.url();
    let out = against(&url, &["credential", "show", "openai"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // Naming the URL that had no route (round 37: AIRLOCK_ADMIN_URL with
    // a path that is no prefix of the admin API's).
    assert_eq!(
        stderr(&out),
        format!(
            "airlock: no such admin route: GET {url}/v1/providers/openai/credential (HTTP 404)\n"
        )
    );
}

#[tokio::test]
async fn an_unset_admin_token_is_said_before_any_request() {
    let (listener, url) = unanswering_listener();
    for args in [
        &["session", "list"][..],
        &["session", "revoke", "ses_x"],
        &["credential", "show", "openai"],
    ] {
        let out = tokio::time::timeout(
            DEADLINE,
            airlock_cmd(args).env("AIRLOCK_ADMIN_URL", &url).output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not exit"))
        .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with("airlock: AIRLOCK_ADMIN_TOKEN is not set: "),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert_nothing_sent(&listener);
}

/// An admin URL where something accepts connections but never answers:
/// each call gives up after AIRLOCK_ADMIN_TIMEOUT (60s unless set), naming
/// the URL, with the exit code of an unreachable server (it used to wait
/// forever).
#[tokio::test]
async fn an_admin_api_that_never_answers_times_out() {
    // Never accepted: the kernel completes the handshake and the request
    // sits in the backlog unanswered.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let cases: [(&[&str], i32); 2] = [
        (&["session", "list"], 1),
        (&["exec", "--allow", "openai:POST:/v1/x", "--", "true"], 125),
    ];
    for (args, code) in cases {
        let started = Instant::now();
        let out = tokio::time::timeout(
            DEADLINE,
            airlock_cmd(args)
                .env("AIRLOCK_ADMIN_URL", &url)
                .env("AIRLOCK_ADMIN_TOKEN", "some-admin-token")
                .env("AIRLOCK_ADMIN_TIMEOUT", "1s")
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not give up"))
        .unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!(
                "airlock: the airlock admin API at {url} did not answer within 1s (is it an \
                 airlock admin listener? set AIRLOCK_ADMIN_URL; AIRLOCK_ADMIN_TIMEOUT sets the \
                 wait)\n"
            ),
            "{args:?}"
        );
        assert!(started.elapsed() >= Duration::from_secs(1), "{args:?}");
    }
    // A timeout that is no duration is refused, naming the variable.
    let out = airlock_cmd(&["session", "list"])
        .env("AIRLOCK_ADMIN_URL", &url)
        .env("AIRLOCK_ADMIN_TOKEN", "some-admin-token")
        .env("AIRLOCK_ADMIN_TIMEOUT", "soon")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("airlock: AIRLOCK_ADMIN_TIMEOUT \"soon\" is not a timeout"),
        "{}",
        stderr(&out)
    );
    drop(listener);
}

/// A config named by `--config` that cannot be read or parsed is refused by
/// every command alike, with exit 64 (the commands that talk to the admin
/// API used to fall back to the defaults and blame the network).
#[tokio::test]
async fn every_command_refuses_a_config_it_was_given_but_cannot_load() {
    let (_dir, malformed) = config_dir("[admin\nlisten = 1\n");
    let malformed = malformed.to_str().unwrap().to_owned();
    let commands: &[&[&str]] = &[
        &["serve"],
        &["config", "check"],
        &["session", "list"],
        &["session", "create", "--allow", "openai:POST:/v1/x"],
        &["session", "show", "ses_x"],
        &["session", "revoke", "ses_x"],
        &["credential", "show", "openai"],
        &["credential", "set", "openai"],
        &["audit", "verify"],
        &["exec", "--allow", "openai:POST:/v1/x", "--", "true"],
    ];
    for config in ["/nonexistent/airlock.toml", malformed.as_str()] {
        let mut messages = Vec::new();
        for command in commands {
            // Before the command: what follows exec's `--` is CMD's.
            let mut args = vec!["--config", config];
            args.extend_from_slice(command);
            let out = tokio::time::timeout(DEADLINE, airlock_cmd(&args).output())
                .await
                .unwrap_or_else(|_| panic!("{args:?} did not exit"))
                .unwrap();
            assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
            let err = stderr(&out);
            assert!(
                err.starts_with(&format!("airlock: invalid config: {config}: ")),
                "{args:?}: {err}"
            );
            messages.push(err);
        }
        messages.dedup();
        assert_eq!(messages.len(), 1, "one message for all: {messages:?}");
    }

    // A config that loads is used: its admin.listen is where the CLI goes.
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let listen = airlock.admin_url().replace("http://", "");
    let (_dir, config) = config_dir(&format!("[admin]\nlisten = \"{listen}\"\n"));
    let out = airlock_cmd(&["session", "list", "--config", config.to_str().unwrap()])
        .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("ID "), "{}", stdout(&out));
}

/// Revoking a session that has already expired says so: it stays expired;
/// one already revoked says so too.
#[tokio::test]
async fn revoking_an_ended_session_says_it_had_ended() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let out = cli(
        &airlock,
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--ttl",
            "1s",
        ],
    )
    .await;
    let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, view) = airlock
            .admin("GET", &format!("/v1/sessions/{id}"), None)
            .await
            .unwrap();
        if view["state"] == "expired" {
            break;
        }
        assert!(Instant::now() < deadline, "never expired: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = cli(&airlock, &["session", "revoke", &id]).await;
    assert_eq!(
        stdout(&out),
        format!("{id} had already expired; nothing to revoke\n")
    );
    let (_, view) = airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(view["state"], "expired", "{view}");

    // A live session is revoked, and said to be.
    let out = cli(
        &airlock,
        &["session", "create", "--allow", "openai:POST:/v1/x"],
    )
    .await;
    let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let out = cli(&airlock, &["session", "revoke", &id]).await;
    assert_eq!(stdout(&out), format!("revoked {id}\n"));
    // `session show` says who ended it.
    let out = cli(&airlock, &["session", "show", &id, "--format", "text"]).await;
    let shown = stdout(&out);
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("revoked:") && l.ends_with(" (by an operator)")),
        "{shown}"
    );

    // Revoking it again changes nothing, and says so, by id or by token.
    let out = cli(&airlock, &["session", "revoke", &id]).await;
    assert_eq!(
        stdout(&out),
        format!("session {id} was already revoked; nothing to do\n")
    );
    let token = created["token"].as_str().unwrap();
    let out = cli(&airlock, &["session", "revoke", token]).await;
    assert_eq!(
        stdout(&out),
        format!("session {id} was already revoked; nothing to do\n")
    );
    // A live session revoked by token is said to be revoked.
    let out = cli(
        &airlock,
        &["session", "create", "--allow", "openai:POST:/v1/x"],
    )
    .await;
    let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let token = created["token"].as_str().unwrap();
    let out = cli(&airlock, &["session", "revoke", token]).await;
    assert_eq!(
        stdout(&out),
        format!("revoked {}\n", created["id"].as_str().unwrap())
    );
    // Counted: the two sessions that were live, not the expired one nor a
    // repeat.
    let (_, metrics) = airlock.admin("GET", "/metrics", None).await.unwrap();
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "airlock_sessions_revoked_total 2"),
        "{metrics}"
    );
}

/// The CLI reaches an admin API behind a TLS-terminating proxy over
/// `https://`, trusting the system's roots and AIRLOCK_ADMIN_CA_FILE's
/// (round 28: refused, "must start with http://", though the message
/// itself suggested such a proxy); a certificate it cannot trust is
/// refused.
#[tokio::test]
async fn the_cli_speaks_https_to_an_admin_api_behind_tls() {
    use airlock_testkit::tls::{TestCa, TlsFront};

    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let ca = TestCa::new("airlock test CA");
    let admin = airlock
        .admin_url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let front = TlsFront::start(&ca.leaf("admin.internal"), admin).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    ca.write_cert(&ca_file);
    let list = |ca_file: Option<&Path>| {
        let mut command = airlock_cmd(&["session", "list", "--json"]);
        command
            .env("AIRLOCK_ADMIN_URL", front.url())
            .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token());
        if let Some(ca_file) = ca_file {
            command.env("AIRLOCK_ADMIN_CA_FILE", ca_file);
        }
        command.output()
    };
    let out = list(Some(&ca_file)).await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(listed["sessions"].is_array(), "{listed}");
    // The test CA is not trusted without the file.
    let out = list(None).await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("cannot reach the airlock admin API"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("a CA this machine does not trust: AIRLOCK_ADMIN_CA_FILE names"),
        "{}",
        stderr(&out)
    );
    // https:// to the admin listener itself, which speaks plain HTTP.
    let plain = airlock.admin_url().replace("http://", "https://");
    let out = airlock_cmd(&["session", "list"])
        .env("AIRLOCK_ADMIN_URL", &plain)
        .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("the server there does not speak TLS"),
        "{}",
        stderr(&out)
    );
}

/// The state of session `id` as the admin API shows it.
async fn session_state(airlock: &Airlock, id: &str) -> String {
    let (_, view) = airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    view["state"].as_str().unwrap().to_owned()
}

/// `session revoke` takes several sessions (round 28: one per run, so an
/// incident meant a loop): each is revoked; one the server does not know is
/// named on stderr, the others revoked all the same, exit 2; a malformed
/// one revokes nothing.
#[tokio::test]
async fn session_revoke_takes_several_sessions() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let create = async || {
        let out = cli(
            &airlock,
            &["session", "create", "--allow", "openai:POST:/v1/x"],
        )
        .await;
        let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
        (
            created["id"].as_str().unwrap().to_owned(),
            created["token"].as_str().unwrap().to_owned(),
        )
    };
    let (a, _) = create().await;
    let (b, b_token) = create().await;
    let (c, _) = create().await;
    let state = async |id: &str| session_state(&airlock, id).await;

    // A malformed one: nothing is revoked.
    let out = cli_ending(&airlock, &["session", "revoke", &a, "ses_no-such"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(state(&a).await, "active");

    let unknown = "ses_AAAAAAAAAAAAAAAAAAAAAA";
    let out = cli_ending(&airlock, &["session", "revoke", &a, unknown, &b_token, &c]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        stdout(&out),
        format!("revoked {a}\nrevoked {b}\nrevoked {c}\n")
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(unknown), "{err}");
    assert!(err.contains("not every session given was revoked"), "{err}");
    assert!(!err.contains(&b_token), "{err}");
    for id in [&a, &b, &c] {
        assert_eq!(state(id).await, "revoked");
    }
}

/// `session revoke --label` revokes every active session with all the
/// labels given (round 28: an incident's "everything agent X holds" took
/// `list --json`, a filter and a loop); none matching is said, exit 0.
#[tokio::test]
async fn session_revoke_by_label_revokes_the_sessions_with_all_of_them() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let create = async |labels: &[&str]| {
        let mut args = vec!["session", "create", "--allow", "openai:POST:/v1/x"];
        for label in labels {
            args.extend(["--label", label]);
        }
        let out = cli(&airlock, &args).await;
        let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
        created["id"].as_str().unwrap().to_owned()
    };
    let a1 = create(&["agent=a", "team=x"]).await;
    let a2 = create(&["agent=a", "team=y"]).await;
    let b = create(&["agent=b", "team=x"]).await;
    let state = async |id: &str| session_state(&airlock, id).await;

    let out = cli(
        &airlock,
        &[
            "session", "revoke", "--label", "agent=a", "--label", "team=x",
        ],
    )
    .await;
    assert_eq!(stdout(&out), format!("revoked {a1}\n"));
    assert_eq!(state(&a2).await, "active");
    let out = cli(&airlock, &["session", "revoke", "--label", "agent=a"]).await;
    assert_eq!(stdout(&out), format!("revoked {a2}\n"));
    assert_eq!(state(&b).await, "active");
    // Nothing left with it: said, not an error.
    let out = cli(&airlock, &["session", "revoke", "--label", "agent=a"]).await;
    assert_eq!(stdout(&out), "");
    assert!(stderr(&out).contains("no active session has the labels agent=a"));
    // Ids and labels together are refused.
    let out = cli_ending(&airlock, &["session", "revoke", &b, "--label", "agent=b"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(state(&b).await, "active");
}

/// A revocation the server answers with an error (here its store is
/// locked by another process: the server holds the revocation and writes it
/// later) does not stop `session revoke` from sending the others (diff
/// review: in an incident, the sessions after it stayed active); exit 1.
#[tokio::test]
async fn session_revoke_goes_on_past_a_failed_one() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let out = cli(
            &airlock,
            &["session", "create", "--allow", "openai:POST:/v1/x"],
        )
        .await;
        let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    let locker = airlock.lock_store(false).await;
    let out = cli_ending(&airlock, &["session", "revoke", &ids[0], &ids[1]]).await;
    locker.release().await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("not every session given was revoked"), "{err}");
    // Both were sent: each is revoked (held by the server) and named.
    for id in &ids {
        assert_eq!(session_state(&airlock, id).await, "revoked");
    }
    assert_eq!(err.matches("revoked in this process").count(), 2, "{err}");
}

/// Without `--ttl`, a session lasts 15m, or the server's `sessions.max_ttl`
/// when that is shorter (it was refused: "--ttl 15m: must be at most 10m",
/// an option never typed); an explicit `--ttl` over the maximum is still
/// refused, naming it.
#[tokio::test]
async fn the_default_ttl_is_at_most_the_servers_max_ttl() {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(BIN)
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .config("[sessions]\nmax_ttl = \"10m\"\n")
        .start()
        .await
        .unwrap();
    let lifetime = |session: &Value| {
        let at = |key: &str| {
            time::OffsetDateTime::parse(
                session[key].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        };
        (at("expires_at") - at("created_at")).whole_seconds()
    };
    let out = cli(
        &airlock,
        &["session", "create", "--allow", "openai:POST:/v1/x"],
    )
    .await;
    let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(lifetime(&created), 600, "{created}");

    let out = cli(
        &airlock,
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--ttl",
            "5m",
        ],
    )
    .await;
    let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(lifetime(&created), 300, "{created}");

    let out = airlock_cmd(&[
        "session",
        "create",
        "--allow",
        "openai:POST:/v1/x",
        "--ttl",
        "15m",
    ])
    .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
    .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "airlock: --ttl 15m: must be at most 10m (the server's sessions.max_ttl)\n"
    );

    // exec too.
    let out = airlock_cmd(&[
        "exec",
        "--allow",
        "openai:POST:/v1/x",
        "--",
        "sh",
        "-c",
        "echo $AIRLOCK_SESSION_ID",
    ])
    .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
    .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
    .output()
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    let (_, view) = airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(lifetime(&view), 600, "{view}");
}

/// `session list` follows the admin API's pages to the end: with pages of
/// 2 or 3 sessions it prints exactly what one page of all prints (the
/// table aligned over every row, the JSON one document); `--limit` stops
/// after that many, newest first.
#[tokio::test]
async fn session_list_prints_every_page() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;

    // No session: an empty table, an empty list.
    let out = cli(&airlock, &["session", "list", "--json", "--page-size", "2"]).await;
    assert_eq!(
        stdout(&out),
        format!(
            "{}\n",
            serde_json::to_string_pretty(&json!({"sessions": []})).unwrap()
        )
    );
    let out = cli(&airlock, &["session", "list", "--all", "--page-size", "2"]).await;
    assert_eq!(
        stdout(&out),
        "ID  STATE  EXPIRES IN  ALLOWED/DENIED  LABELS\n"
    );

    let mut ids = Vec::new();
    for n in 0..7 {
        let label = format!("n={n}");
        let out = cli(
            &airlock,
            &[
                "session",
                "create",
                "--allow",
                "openai:POST:/v1/x",
                "--label",
                &label,
            ],
        )
        .await;
        let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    cli(&airlock, &["session", "revoke", &ids[2]]).await;
    cli(&airlock, &["session", "revoke", &ids[5]]).await;

    let table = |args: &'static [&'static str]| {
        let airlock = &airlock;
        async move {
            let out = cli(airlock, args).await;
            redact_column(&stdout(&out), "EXPIRES IN", "ALLOWED/DENIED", "<left>")
        }
    };
    let whole = table(&["session", "list", "--all"]).await;
    assert_eq!(whole.lines().count(), 1 + 7, "{whole}");
    for id in &ids {
        assert_eq!(whole.matches(id.as_str()).count(), 1, "{id} in\n{whole}");
    }
    assert_eq!(
        table(&["session", "list", "--all", "--page-size", "2"]).await,
        whole
    );
    assert_eq!(
        table(&["session", "list", "--all", "--page-size", "3"]).await,
        whole
    );
    // Active only: the revoked two left out, across pages too.
    let active = table(&["session", "list"]).await;
    assert_eq!(active.lines().count(), 1 + 5, "{active}");
    assert!(!active.contains(&ids[2]) && !active.contains(&ids[5]));
    assert_eq!(
        table(&["session", "list", "--page-size", "2"]).await,
        active
    );
    // --limit: the first rows of the whole table (aligned over those).
    let limited = table(&[
        "session",
        "list",
        "--all",
        "--limit",
        "4",
        "--page-size",
        "3",
    ])
    .await;
    let first: Vec<&str> = whole
        .lines()
        .skip(1)
        .take(4)
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    let got: Vec<&str> = limited
        .lines()
        .skip(1)
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(got, first, "{limited}");

    // JSON: byte for byte the same document, however it was paged.
    let json = |args: &'static [&'static str]| {
        let airlock = &airlock;
        async move { stdout(&cli(airlock, args).await) }
    };
    let whole = json(&["session", "list", "--all", "--json"]).await;
    let parsed: Value = serde_json::from_str(&whole).unwrap();
    assert_eq!(
        parsed.as_object().unwrap().len(),
        1,
        "only sessions: {whole}"
    );
    assert_eq!(parsed["sessions"].as_array().unwrap().len(), 7);
    assert_eq!(
        whole,
        format!("{}\n", serde_json::to_string_pretty(&parsed).unwrap())
    );
    assert_eq!(
        json(&["session", "list", "--all", "--json", "--page-size", "2"]).await,
        whole
    );
    assert_eq!(
        json(&["session", "list", "--all", "--json", "--page-size", "7"]).await,
        whole
    );
    let limited = json(&[
        "session",
        "list",
        "--all",
        "--json",
        "--limit",
        "3",
        "--page-size",
        "2",
    ])
    .await;
    let limited: Value = serde_json::from_str(&limited).unwrap();
    assert_eq!(
        limited["sessions"],
        json!(parsed["sessions"].as_array().unwrap()[..3])
    );

    // Out of range.
    for args in [
        &["session", "list", "--limit", "0"][..],
        &["session", "list", "--page-size", "0"],
        &["session", "list", "--page-size", "10001"],
    ] {
        let out = airlock_cmd(args)
            .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
            .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

/// Writes `airlock.toml` for `config check` into a fresh directory.
/// A config whose admin.listen is port 0 names no address the CLI can
/// reach: said so, with what to do (round 37: it tried port 0).
#[tokio::test]
async fn an_admin_listen_on_port_0_is_no_address_for_the_cli() {
    let (_dir, path) = config_dir("[admin]\nlisten = \"127.0.0.1:0\"\n");
    let path = path.to_str().unwrap();
    let exec = [
        "exec",
        "--config",
        path,
        "--allow",
        "openai:GET:/v1/models",
        "--",
        "true",
    ];
    for (args, code) in [
        (&["session", "list", "--config", path][..], 64),
        (&exec, 125),
    ] {
        let out = airlock_cmd(args)
            .env("AIRLOCK_ADMIN_TOKEN", "some-admin-token")
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("admin.listen is 127.0.0.1:0"), "{err}");
        assert!(err.contains("set AIRLOCK_ADMIN_URL"), "{err}");
    }
}

fn config_dir(toml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("airlock.toml");
    std::fs::write(&path, toml).unwrap();
    (dir, path)
}

#[tokio::test]
async fn config_check_describes_what_would_run_without_revealing_credentials() {
    let secret_file_value = "sk-from-a-file-0123456789";
    let (dir, path) = config_dir(
        r#"
[proxy]
listen = "127.0.0.1:18080"
public_url = "https://airlock.example.com/"
drain_timeout = "10s"

[admin]
listen = "127.0.0.1:18081"

[store]
url = "sqlite://data/airlock.db"

[audit]
fail_closed = false

[sessions]
max_ttl = "2h"

[providers.openai]
upstream = "https://api.openai.com"
auth = "bearer"
credential = "env:CHECK_OPENAI_KEY"
env_key = "OPENAI_API_KEY"
env_base_url = "OPENAI_BASE_URL"
base_path = "/v1"

[providers.anthropic]
upstream = "https://api.anthropic.com"
auth = "header:x-api-key"
credential = "env:CHECK_ANTHROPIC_KEY"
env_key = "ANTHROPIC_API_KEY"
env_base_url = "ANTHROPIC_BASE_URL"
headers = { "anthropic-version" = "2023-06-01", "anthropic-beta" = "secret-beta-value" }

[providers.github]
upstream = "https://api.github.com"
auth = "bearer"
auth_format = "token {key}"
credential = "file:github.key"
env_key = "GITHUB_TOKEN"
env_base_url = "GITHUB_API_URL"
keepalive_timeout = "4s"
ca_file = "ca.pem"

[providers.local]
upstream = "http://127.0.0.1:9999"
credential = "env:CHECK_LOCAL_KEY"
env_key = "LOCAL_KEY"
env_base_url = "LOCAL_URL"
ca_file = "ca.pem"
"#,
    );
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("github.key"), secret_file_value).unwrap();
    airlock_testkit::tls::TestCa::new("config check CA").write_cert(&dir.path().join("ca.pem"));
    let dir_text = dir.path().display().to_string();
    let out = airlock_cmd(&["config", "check", "--config", path.to_str().unwrap()])
        .current_dir(dir.path())
        .env("CHECK_OPENAI_KEY", OPENAI_KEY)
        .env_remove("CHECK_ANTHROPIC_KEY")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(!text.contains(OPENAI_KEY) && !text.contains(secret_file_value));
    assert!(!text.contains("secret-beta-value"), "{text}");
    assert!(text.contains("env:CHECK_OPENAI_KEY (set)"), "{text}");
    assert!(text.contains("env:CHECK_ANTHROPIC_KEY (not set"), "{text}");
    // The default worker count is the machine's core count.
    let cores = std::thread::available_parallelism().unwrap().get();
    let workers = format!("workers:              {cores}\n");
    let workers = (workers.as_str(), "workers:              <cores>\n");
    let mut all = format!(
        "=== config check ===\n{}\n",
        redact(&text, &[(&dir_text, "<dir>"), workers])
    );

    // Built-in defaults: no config file in the working directory.
    let empty = tempfile::tempdir().unwrap();
    let out = airlock_cmd(&["config", "check"])
        .current_dir(empty.path())
        .env("OPENAI_API_KEY", OPENAI_KEY)
        .env("AIRLOCK_ADMIN_TOKEN", "adm_secret_admin_token")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(!text.contains(OPENAI_KEY) && !text.contains("adm_secret_admin_token"));
    all.push_str(&format!(
        "=== config check (built-in defaults) ===\n{}\n",
        redact(
            &text,
            &[(&empty.path().display().to_string(), "<cwd>"), workers]
        )
    ));

    // A credential file and a CA file that cannot be read: serve would
    // refuse to start.
    std::fs::remove_file(dir.path().join("github.key")).unwrap();
    std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
    let out = airlock_cmd(&["config", "check", "--config", path.to_str().unwrap()])
        .current_dir(dir.path())
        // Set, but too short to be guarded against echoes: serve refuses it.
        .env("CHECK_OPENAI_KEY", "y")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    all.push_str(&format!(
        "=== config check (unreadable credential file, no certificate in the CA file, a credential too short) -> exit 1 ===\n--- stdout\n{}--- stderr\n{}\n",
        redact(&stdout(&out), &[(&dir_text, "<dir>"), workers]),
        redact(&stderr(&out), &[(&dir_text, "<dir>")]),
    ));
    assert_snapshot("config_check", &all);
}

#[tokio::test]
async fn config_check_refuses_a_bad_config_exactly_as_serve_does() {
    let bad_configs = [
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[providers.openai]\nupstream = \"https://x\"\nauth = \"basic\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"Y\"\n",
        "[proxy]\nlisten = \"nowhere\"\n",
        "[proxy\n",
        "[sessions]\nmax_ttl = \"0s\"\n",
        "[unknown]\n",
        "[proxy]\npublic_url = \"http://h/a?b=x\"\n",
        "[proxy]\npublic_url = \"http://h/#f\"\n",
        "[proxy]\npublic_url = \"http://user:pw@h\"\n",
    ];
    let mut all = String::new();
    for toml in bad_configs {
        let (dir, path) = config_dir(toml);
        let path_text = path.to_str().unwrap();
        let check = airlock_cmd(&["config", "check", "--config", path_text])
            .output()
            .await
            .unwrap();
        let serve = airlock_cmd(&["serve", "--config", path_text])
            .current_dir(dir.path())
            .output()
            .await
            .unwrap();
        assert_eq!(check.status.code(), Some(64), "{toml}");
        assert_eq!(serve.status.code(), Some(64), "{toml}");
        assert_eq!(stdout(&check), "");
        assert_eq!(stderr(&check), stderr(&serve), "{toml}");
        assert!(
            stderr(&check).starts_with(&format!("airlock: invalid config: {path_text}: ")),
            "{}",
            stderr(&check)
        );
        all.push_str(&redact(&stderr(&check), &[(path_text, "<FILE>")]));
    }
    let out = airlock_cmd(&["config", "check", "--config", "/nonexistent/airlock.toml"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    all.push_str(&stderr(&out));
    assert_snapshot("config_check_errors", &all);
}

/// The next JSON line of an `audit tail`, within the deadline.
async fn next(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> Value {
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("no record in time")
        .unwrap()
        .expect("audit tail ended");
    serde_json::from_str(&line).unwrap()
}

/// Audit records as the admin API has them, once there are at least `n`.
async fn audit_records(airlock: &Airlock, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, answer) = airlock.admin("GET", "/v1/audit", None).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        let records = answer["records"].as_array().unwrap().clone();
        if records.len() >= n {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "only {} audit records",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn chat(airlock: &Airlock, token: &str, path: &str) -> u16 {
    request(
        "POST",
        &format!("{}/openai{path}", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {token}"))],
        r#"{"model":"m","messages":[]}"#,
    )
    .await
    .status
}

async fn create(airlock: &Airlock) -> (String, String) {
    let created = airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["POST"], "paths": ["/v1/chat/completions"]}],
            "ttl_seconds": 600
        }))
        .await
        .unwrap();
    (
        created["id"].as_str().unwrap().to_owned(),
        created["token"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn audit_tail_prints_the_last_records_then_follows_new_ones() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let (id, token) = create(&airlock).await;
    let (other_id, other_token) = create(&airlock).await;
    assert_eq!(chat(&airlock, &token, "/v1/chat/completions").await, 200);
    assert_eq!(chat(&airlock, &token, "/v1/models").await, 403);
    assert_eq!(
        chat(&airlock, &other_token, "/v1/chat/completions").await,
        200
    );
    assert_eq!(chat(&airlock, &token, "/v1/chat/completions").await, 200);
    let before = audit_records(&airlock, 4).await;

    let config = airlock.config_path();
    let spawn_tail = |args: &[&str]| {
        airlock_cmd(
            &[
                &["audit", "tail", "--config", config.to_str().unwrap()],
                args,
            ]
            .concat(),
        )
        .current_dir(airlock.dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };

    // -n 2 over the whole trail: the last two records, oldest first.
    let mut all = spawn_tail(&["-n", "2"]);
    let mut all_lines = BufReader::new(all.stdout.take().unwrap()).lines();
    // Only this session's: its last two of three.
    let mut mine = spawn_tail(&["-n", "2", "--session", &id]);
    let mut mine_lines = BufReader::new(mine.stdout.take().unwrap()).lines();
    let seqs = |records: &[Value]| -> Vec<u64> {
        records.iter().map(|r| r["seq"].as_u64().unwrap()).collect()
    };
    let first_two = [next(&mut all_lines).await, next(&mut all_lines).await];
    assert_eq!(seqs(&first_two), seqs(&before[2..4]));
    let my_two = [next(&mut mine_lines).await, next(&mut mine_lines).await];
    assert_eq!(my_two[0]["decision"], "out_of_scope");
    assert_eq!(my_two[1]["decision"], "allow");
    assert!(my_two.iter().all(|r| r["session"] == id.as_str()));

    // New records are followed; the session filter holds.
    let sessions = [(id.as_str(), token.as_str()), (&other_id, &other_token)];
    follows_new_records(&airlock, sessions, &mut all_lines, &mut mine_lines).await;
    interrupted_cleanly([&mut all, &mut mine]).await;

    // A closed pipe ends it cleanly at the next record it writes.
    let mut tail = spawn_tail(&["-n", "1"]);
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    next(&mut lines).await;
    drop(lines);
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        assert_eq!(chat(&airlock, &token, "/v1/chat/completions").await, 200);
        if let Some(status) = tail.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "audit tail ignored the closed pipe"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(0));
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut tail.stderr.take().unwrap(), &mut err)
        .await
        .unwrap();
    assert_eq!(err, "", "a closed pipe is not an error");
}

/// A tail of the whole trail and one of the first session's (`sessions`:
/// id and token of each of two) print what is committed next: a call of
/// the second session's, then one of the first's.
async fn follows_new_records(
    airlock: &Airlock,
    [(id, token), (other_id, other_token)]: [(&str, &str); 2],
    all_lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    mine_lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    assert_eq!(
        chat(airlock, other_token, "/v1/chat/completions").await,
        200
    );
    assert_eq!(chat(airlock, token, "/v1/other").await, 403);
    let new = [next(all_lines).await, next(all_lines).await];
    assert_eq!(new[0]["session"], other_id);
    assert_eq!(new[1]["session"], id);
    assert_eq!(new[1]["path"], "/openai/v1/other");
    assert_eq!(next(mine_lines).await, new[1]);
}

/// SIGINT ends each of `children` cleanly (exit 0).
async fn interrupted_cleanly<const N: usize>(children: [&mut tokio::process::Child; N]) {
    for child in children {
        let pid = rustix::process::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
        rustix::process::kill_process(pid.unwrap(), rustix::process::Signal::INT).unwrap();
        let status = tokio::time::timeout(DEADLINE, child.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.code(), Some(0));
    }
}

/// Makes calls with `token` until every tail (each follows from when it
/// started) has printed one, then reads the records those calls left for
/// them, so that each one's next line is the next record committed; the
/// first seq each printed.
async fn caught_up(
    airlock: &Airlock,
    token: &str,
    tails: &mut [&mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>],
) -> Vec<u64> {
    let deadline = Instant::now() + DEADLINE;
    let mut firsts: Vec<Option<u64>> = vec![None; tails.len()];
    while firsts.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "audit tail printed nothing");
        assert_eq!(chat(airlock, token, "/v1/chat/completions").await, 200);
        for (tail, first) in tails.iter_mut().zip(&mut firsts) {
            if first.is_some() {
                continue;
            }
            // (`next_line` is cancel safe: a line cut short here is read
            // whole by the next call.)
            let waited = tokio::time::timeout(Duration::from_millis(300), tail.next_line()).await;
            if let Ok(line) = waited {
                let line = line.unwrap().expect("audit tail ended");
                let record: Value = serde_json::from_str(&line).unwrap();
                *first = record["seq"].as_u64();
            }
        }
    }
    let last = audit_records(airlock, 1).await.last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    for (tail, first) in tails.iter_mut().zip(&firsts) {
        let mut at = first.unwrap();
        while at != last {
            at = next(tail).await["seq"].as_u64().unwrap();
        }
    }
    firsts.into_iter().map(Option::unwrap).collect()
}

/// `audit tail --remote` follows the trail through the admin API, from
/// when it starts, with the session filter, from where neither store nor
/// key is.
#[tokio::test]
async fn audit_tail_remote_follows_through_the_admin_api() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let (id, token) = create(&airlock).await;
    let (other_id, other_token) = create(&airlock).await;
    assert_eq!(chat(&airlock, &token, "/v1/chat/completions").await, 200);
    let before = audit_records(&airlock, 1).await[0]["seq"].as_u64().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let remote = |args: &[&str]| {
        let mut command = airlock_cmd(&[&["audit", "tail", "--remote"], args].concat());
        command
            .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
            .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
            .current_dir(elsewhere.path());
        command
    };
    let spawn = |args: &[&str]| {
        remote(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    let mut all = spawn(&[]);
    let mut all_lines = BufReader::new(all.stdout.take().unwrap()).lines();
    let mut mine = spawn(&["--session", &id]);
    let mut mine_lines = BufReader::new(mine.stdout.take().unwrap()).lines();
    // From when it started: the record before is not printed.
    let firsts = caught_up(&airlock, &token, &mut [&mut all_lines, &mut mine_lines]).await;
    assert!(firsts.iter().all(|&seq| seq > before), "{firsts:?}");

    let sessions = [(id.as_str(), token.as_str()), (&other_id, &other_token)];
    follows_new_records(&airlock, sessions, &mut all_lines, &mut mine_lines).await;
    interrupted_cleanly([&mut all, &mut mine]).await;

    // What it cannot do is a usage error.
    let unknown = "ses_0000000000000000000000";
    for (args, said) in [
        (&["-n", "5"][..], "--lines: not with --remote"),
        (
            &["--session", unknown],
            "--session: the server has no session",
        ),
    ] {
        let out = remote(args).output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(said), "{args:?}: {}", stderr(&out));
    }
    let left: Vec<_> = std::fs::read_dir(elsewhere.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Runs `command` with stdout as `| head -1` leaves it once it has its
/// line: a pipe whose reader is gone, closed before the command starts so
/// that its first write fails however little it writes. (`output()` would
/// pipe stdout to this process instead.)
async fn with_stdout_closed(command: &mut Command) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = command
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("a closed stdout did not end the command")
        .unwrap()
}

/// A closed stdout ends a command quietly, as for `gh` and `vault`: exit 0
/// and nothing on stderr (`completions` panicked in clap_complete, exit
/// 101; `audit export` said `Broken pipe` and exited 1; `session show` and
/// the other one-answer commands panicked in `println!`). `audit verify`
/// and `config check` keep their verdict.
#[tokio::test]
async fn a_closed_stdout_ends_a_command_quietly() {
    let quiet = |what: &str, out: &Output, code: i32| {
        assert_eq!(out.status.code(), Some(code), "{what}: {}", stderr(out));
        assert_eq!(stderr(out), "", "{what}");
    };
    for shell in ["bash", "zsh", "fish"] {
        let out = with_stdout_closed(&mut airlock_cmd(&["completions", shell])).await;
        quiet(shell, &out, 0);
    }
    let empty = tempfile::tempdir().unwrap();
    let out = with_stdout_closed(airlock_cmd(&["config", "check"]).current_dir(empty.path())).await;
    quiet("config check", &out, 0);

    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let (id, token) = create(&airlock).await;
    assert_eq!(chat(&airlock, &token, "/v1/chat/completions").await, 200);
    audit_records(&airlock, 1).await;
    let config = airlock.config_path();
    let config = config.to_str().unwrap();
    let against_server = |args: &[&str]| {
        let mut command = airlock_cmd(args);
        command
            .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
            .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
            .current_dir(airlock.dir());
        command
    };
    let commands: &[&[&str]] = &[
        &["session", "list"],
        &["session", "list", "--json"],
        &["session", "show", &id],
        &["session", "show", &id, "--format", "text"],
        &["credential", "show", "openai"],
        &["audit", "export", "--config", config],
        &["audit", "tail", "-n", "1", "--config", config],
        &["audit", "verify", "--config", config],
        &["session", "revoke", &id],
    ];
    for args in commands {
        let out = with_stdout_closed(&mut against_server(args)).await;
        quiet(&args.join(" "), &out, 0);
    }
    // `audit tail -n 1 | head -1`: the reader goes after the line it
    // wanted; no record follows, yet tail ends (it used to wait for the
    // next record to find the pipe closed).
    let mut tail = against_server(&["audit", "tail", "-n", "1", "--config", config])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(tail.stdout.take().unwrap())
        .read_line(&mut first)
        .await
        .unwrap();
    assert!(first.contains("\"seq\":"), "{first}");
    let out = tokio::time::timeout(DEADLINE, tail.wait_with_output())
        .await
        .expect("audit tail went on after its reader left")
        .unwrap();
    quiet("audit tail | head -1", &out, 0);
    // `session create` is the exception: a session whose token was printed
    // nowhere is revoked, and the command fails, saying so.
    let args = [
        "session",
        "create",
        "--allow",
        "openai:POST:/v1/x",
        "--label",
        "test=closed-stdout",
    ];
    let out = with_stdout_closed(&mut against_server(&args)).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.starts_with(
            "airlock: stdout was closed before the session's token was printed; session ses_"
        ) && said.trim_end().ends_with(" revoked"),
        "{said}"
    );
    let listed = cli(&airlock, &["session", "list", "--all", "--json"]).await;
    let listed: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    let created: Vec<&Value> = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["labels"]["test"] == "closed-stdout")
        .collect();
    assert_eq!(created.len(), 1, "{listed}");
    assert_eq!(created[0]["state"], "revoked", "{listed}");
    // Nor is a session opened for a stdout that is /dev/null (which is
    // also what a stdout closed at start, `>&-`, becomes).
    let args = [
        "session",
        "create",
        "--allow",
        "openai:POST:/v1/x",
        "--label",
        "test=null-stdout",
    ];
    // (`output` would make stdout a pipe.)
    let out = against_server(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim_end(),
        "airlock: stdout is /dev/null (or was closed): the session's token would be printed \
         nowhere; no session created"
    );
    let listed = cli(&airlock, &["session", "list", "--all", "--json"]).await;
    assert!(
        !stdout(&listed).contains("null-stdout"),
        "{}",
        stdout(&listed)
    );

    // A broken file is still exit 1 (nothing on stderr: the verdict was
    // for stdout).
    let export = cli(&airlock, &["audit", "export", "--config", config]).await;
    let tampered = stdout(&export).replacen("\"status\":200", "\"status\":201", 1);
    assert_ne!(tampered, stdout(&export));
    let file = airlock.dir().join("tampered.jsonl");
    std::fs::write(&file, tampered).unwrap();
    let args = [
        "audit",
        "verify",
        "--from",
        file.to_str().unwrap(),
        "--config",
        config,
    ];
    let out = with_stdout_closed(&mut against_server(&args)).await;
    quiet("audit verify --from", &out, 1);
}

/// Commands that read what `serve` stored refuse a database that does not
/// exist, rather than creating an empty one and reporting on it (an
/// operator who forgot `--config` was told "audit trail intact").
#[tokio::test]
async fn audit_commands_refuse_a_store_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    // Named absolute, with where a relative path starts (round 37: run
    // from another directory, verify said the audit key was missing).
    let database = dir.path().canonicalize().unwrap().join("airlock.db");
    let missing = format!("no database at {}", database.display());
    for (args, code, key) in [
        (&["audit", "verify"][..], 2, true),
        (&["audit", "verify"], 2, false),
        (&["audit", "export"], 1, true),
        (&["audit", "tail", "--lines", "1"], 1, true),
    ] {
        let mut cmd = airlock_cmd(args);
        if key {
            cmd.env("AIRLOCK_AUDIT_KEY", "ab".repeat(32));
        } else {
            cmd.env_remove("AIRLOCK_AUDIT_KEY");
        }
        let out = cmd.current_dir(dir.path()).output().await.unwrap();
        // Not 1 for verify, whose 1 is "the trail does not verify": 2, a
        // trail it could not check; 1 for the others.
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stdout(&out));
        let err = stderr(&out);
        assert!(err.contains(&missing), "{args:?}: {err}");
        assert!(
            err.contains("relative to the working directory"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("intact"), "{args:?}: {err}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A time given as an age too large to count is said to be too large
/// (round 43: it was said to be neither a time nor a duration).
#[tokio::test]
async fn an_age_too_large_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["audit", "export", "--since", "99999999999999d"][..],
        &["audit", "prune", "--before", "99999999999999d"],
    ] {
        let out = airlock_cmd(args)
            .current_dir(dir.path())
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("duration \"99999999999999d\" is too large"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// A SQLite file that is not airlock's (empty, or another program's
/// database) is refused as well, and left as it was: nothing is written to
/// it.
#[tokio::test]
async fn audit_commands_refuse_a_sqlite_file_that_is_not_airlocks() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let foreign = dir.path().join("foreign.db");
    {
        use sqlx::ConnectOptions as _;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&foreign)
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        sqlx::query("CREATE TABLE notes (body TEXT)")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::Connection::close(conn).await.unwrap();
    }
    for file in [&empty, &foreign] {
        let before = std::fs::read(file).unwrap();
        let config = dir.path().join("airlock.toml");
        std::fs::write(
            &config,
            format!("[store]\nurl = \"sqlite://{}\"\n", file.display()),
        )
        .unwrap();
        let out = airlock_cmd(&["audit", "verify", "--config", config.to_str().unwrap()])
            .env("AIRLOCK_AUDIT_KEY", "ab".repeat(32))
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{file:?}: {}", stdout(&out));
        let err = stderr(&out);
        assert!(err.contains("no airlock store in the database"), "{err}");
        assert!(!stdout(&out).contains("intact"));
        assert_eq!(
            std::fs::read(file).unwrap(),
            before,
            "{file:?} was written to"
        );
    }
}

/// The same for a PostgreSQL database airlock never wrote to (round 43:
/// `audit verify` gave it airlock's tables and said "audit trail intact:
/// 0 records").
#[tokio::test]
async fn audit_commands_refuse_a_postgres_database_airlock_never_wrote_to() {
    let Some(db) = airlock_testkit::pg::fresh_database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("airlock.toml");
    std::fs::write(&config, format!("[store]\nurl = \"{}\"\n", db.url())).unwrap();
    let config = config.to_str().unwrap();
    for (args, code) in [
        (&["audit", "verify", "--config", config][..], 2),
        (&["audit", "export", "--config", config], 1),
        (&["audit", "tail", "--lines", "1", "--config", config], 1),
    ] {
        let out = airlock_cmd(args)
            .env("AIRLOCK_AUDIT_KEY", "ab".repeat(32))
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stdout(&out));
        let err = stderr(&out);
        assert!(
            err.contains("no airlock store in the database") && err.contains("nothing was created"),
            "{args:?}: {err}"
        );
        assert!(!stdout(&out).contains("intact"), "{args:?}");
    }
    let tables = db
        .scalar_i64(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
        )
        .await;
    assert_eq!(tables, 0, "the commands created tables");
}

/// `serve` raises its soft limit on open files to the hard one: each
/// connection, stream and upstream connection holds a descriptor.
#[tokio::test]
async fn serve_raises_its_open_files_limit() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("airlock-low-nofile");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nulimit -Sn 256\nexec {BIN} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let airlock = AirlockBuilder::new(&wrapper).start().await.unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", airlock.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "soft and hard differ: {line}");
    assert_ne!(numbers[0], "256", "{line}");
}

/// SIGHUP (from `systemctl reload`, log rotation) without TLS is logged and
/// ignored: its default action would end the server without a drain.
#[tokio::test]
async fn sighup_without_tls_is_harmless() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    airlock.signal("HUP").unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !airlock.output().contains("SIGHUP: nothing to reload") {
        assert!(Instant::now() < deadline, "{}", airlock.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = request("GET", &format!("{}/healthz", airlock.admin_url()), &[], "").await;
    assert_eq!(reply.status, 200);
    let created = airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["GET"], "paths": ["/v1/models"]}],
            "ttl_seconds": 60
        }))
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap();
    let models = request(
        "GET",
        &format!("{}/openai/v1/models", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await;
    assert_eq!(models.status, 200, "{}", models.text());
}

#[tokio::test]
async fn readyz_is_ready_while_serving_and_503_while_draining() {
    use futures_util::StreamExt;
    use http_body_util::BodyStream;

    let mock = MockProvider::start().await;
    let mut airlock = start(&mock).await;
    let readyz = format!("{}/readyz", airlock.admin_url());
    // No admin token needed, like /healthz.
    let reply = request("GET", &readyz, &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"status": "ready"}));

    // Hold a call open so that draining lasts until the gate opens.
    let created = airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["GET"], "paths": ["/gated-sse"]}],
            "ttl_seconds": 600
        }))
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = hyper::Request::get(format!("{}/openai/gated-sse", airlock.proxy_url()))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut frames = BodyStream::new(response.into_body());
    let mut received = String::new();
    while !received.contains("data: first") {
        let frame = tokio::time::timeout(DEADLINE, frames.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            received.push_str(&String::from_utf8_lossy(&data));
        }
    }

    airlock.signal("TERM").unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = request("GET", &readyz, &[], "").await;
        if reply.status == 503 {
            assert_eq!(reply.json(), json!({"status": "draining"}));
            break;
        }
        assert_eq!(reply.status, 200);
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Liveness is unaffected while draining.
    let health = request("GET", &format!("{}/healthz", airlock.admin_url()), &[], "").await;
    assert_eq!(health.status, 200);
    // `status` says so, as /readyz does (round 37: "starting or shutting
    // down").
    let out = cli_ending(&airlock, &["status"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("not ready: draining"),
        "{}",
        stdout(&out)
    );

    mock.open_gate();
    while let Some(frame) = tokio::time::timeout(DEADLINE, frames.next()).await.unwrap() {
        if let Ok(data) = frame.unwrap().into_data() {
            received.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(
        received.contains("data: second"),
        "the held call finished: {received}"
    );
    // Its drain ends by itself (a second SIGTERM would cut it).
    let status = airlock.wait_exit().await.unwrap();
    assert!(status.success(), "{status:?}\n{}", airlock.output());
}

/// A database password in `[store] url` never shows: not in `config check`,
/// not in the error of a store that cannot be opened.
#[tokio::test]
async fn a_store_password_is_never_shown() {
    let (dir, path) = config_dir(
        r#"
[store]
url = "postgres://airlock:Sup3rSecretPw@127.0.0.1:1/airlock"

[audit]
key_file = "audit.key"
"#,
    );
    std::fs::write(dir.path().join("audit.key"), "ab".repeat(32)).unwrap();
    let path = path.to_str().unwrap();
    let check = airlock_cmd(&["config", "check", "--config", path])
        .output()
        .await
        .unwrap();
    let shown = format!("{}{}", stdout(&check), stderr(&check));
    assert!(
        shown.contains("postgres://airlock:***@127.0.0.1:1/airlock"),
        "{shown}"
    );
    let export = airlock_cmd(&["audit", "export", "--config", path])
        .output()
        .await
        .unwrap();
    assert!(!export.status.success());
    let shown = format!("{shown}{}{}", stdout(&export), stderr(&export));
    assert!(shown.contains("airlock:***@"), "{shown}");
    assert!(!shown.contains("Sup3rSecretPw"), "{shown}");
}

/// A `serve` that cannot listen stops before it writes anything: no admin
/// token shown (and stored) for a server that never ran, no database.
#[tokio::test]
async fn serve_that_cannot_listen_writes_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (dir, path) = config_dir(&format!(
        "[proxy]\nlisten = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        taken.local_addr().unwrap()
    ));
    let out = airlock_cmd(&["serve", "--config", path.to_str().unwrap()])
        .env("AIRLOCK_AUDIT_KEY", "ab".repeat(32))
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("binding proxy.listen"), "{err}");
    assert!(
        !err.contains("AIRLOCK_ADMIN_TOKEN=") && !stdout(&out).contains("AIRLOCK_ADMIN_TOKEN=")
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name != "airlock.toml")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// One `serve` per SQLite file: a second one on it (it would claim the same
/// audit chain and refuse every call), under the same name, through a
/// symlink or a hard link, stops at once and says why; the first goes on
/// serving.
#[tokio::test]
async fn a_second_serve_on_the_same_sqlite_file_is_refused() {
    let mock = MockProvider::start().await;
    let serve_on = |dir: &Path| {
        AirlockBuilder::new(BIN)
            .provider(
                "openai",
                &mock.url(),
                "bearer",
                "sk-real-cli-0123456789",
                "/v1",
            )
            .dir(dir.to_path_buf())
            .start()
    };
    // What starting a second serve on `dir` says (it must not start).
    let refusal = async |dir: &Path| match serve_on(dir).await {
        Ok(_) => panic!("a second serve on {} started", dir.display()),
        Err(err) => format!("{err:#}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let first = serve_on(dir.path()).await.unwrap();
    let err = refusal(dir.path()).await;
    assert!(err.contains("in use by another `airlock serve`"), "{err}");
    // Nor through another name: a symlink to the file, or a hard link.
    let linked = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("airlock.db"),
        linked.path().join("airlock.db"),
    )
    .unwrap();
    let err = refusal(linked.path()).await;
    assert!(err.contains("in use by another `airlock serve`"), "{err}");
    let hard = tempfile::tempdir().unwrap();
    std::fs::hard_link(
        dir.path().join("airlock.db"),
        hard.path().join("airlock.db"),
    )
    .unwrap();
    let err = refusal(hard.path()).await;
    assert!(err.contains("hard links"), "{err}");
    // A directory where the file should be is named as such (round 24: it
    // was said to have hard links).
    let directory = tempfile::tempdir().unwrap();
    std::fs::create_dir(directory.path().join("airlock.db")).unwrap();
    let err = refusal(directory.path()).await;
    assert!(
        err.contains("is a directory: store.url names the database file"),
        "{err}"
    );
    let (id, _) = create(&first).await;
    assert!(id.starts_with("ses_"));
    assert!(!first
        .output()
        .contains("can be read or written by other users"));
}

/// A server started, stopped and started again (with `env`) on its store
/// made 0644 in between: readable by others.
async fn restarted_on_an_open_store(env: &[(&str, &str)]) -> (tempfile::TempDir, Airlock) {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let start = || {
        let mut builder =
            AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock")).dir(dir.path().to_path_buf());
        for (key, value) in env {
            builder = builder.env(key, value);
        }
        builder.start()
    };
    let mut first = start().await.unwrap();
    first.terminate().await.unwrap();
    let database = dir.path().join("airlock.db");
    std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o644)).unwrap();
    let second = start().await.unwrap();
    (dir, second)
}

/// A SQLite store others can read is warned about at start (round 24: a
/// 0644 database, with its token hashes, sealed credentials and audit
/// trail, was taken silently; airlock creates it 0600).
#[tokio::test]
async fn a_store_others_can_read_is_warned_about() {
    let (_dir, mut second) = restarted_on_an_open_store(&[]).await;
    let warned = second
        .wait_for_output("can be read or written by other users", 0)
        .await;
    second.terminate().await.unwrap();
    assert!(
        warned.contains("WARN") && warned.contains("mode=0644"),
        "{warned}"
    );
}

/// A `RUST_LOG` without a level (here the typo `infoo`, a target name to
/// `tracing`) keeps airlock's warnings and says why, where it silenced
/// every line (known since round 24). The warning looked for: the store
/// others can read.
#[tokio::test]
async fn a_rust_log_without_a_level_keeps_warnings() {
    let (_dir, mut second) = restarted_on_an_open_store(&[("RUST_LOG", "infoo")]).await;
    let named = second.wait_for_output("which is not a level", 0).await;
    assert!(
        named.contains("WARN") && named.contains("\"infoo\""),
        "{named}"
    );
    second
        .wait_for_output("can be read or written by other users", 0)
        .await;
    second.terminate().await.unwrap();
    // Warnings, not INFO lines.
    assert!(!second.output().contains(" INFO "), "{}", second.output());
}

/// `config check` refuses a PostgreSQL config without the keys every
/// replica must share, as `serve` does, and passes it once they are set.
#[tokio::test]
async fn config_check_wants_the_shared_keys_serve_wants() {
    let (dir, path) = config_dir(
        r#"
[store]
url = "postgres://airlock@127.0.0.1:1/airlock"

[providers.p]
upstream = "https://p.example.com"
credential = "store"
env_key = "P_KEY"
env_base_url = "P_URL"
"#,
    );
    let path = path.to_str().unwrap();
    let out = airlock_cmd(&["config", "check", "--config", path])
        .current_dir(dir.path())
        .env_remove("AIRLOCK_MASTER_KEY")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "audit.key_file: with a PostgreSQL store every replica needs the same audit key"
        ),
        "{err}"
    );
    assert!(
        err.contains("store.master_key_file: with a PostgreSQL store every replica needs the same master key"),
        "{err}"
    );
    // No default key file is shown for a store without a SQLite file to
    // put it next to (round 25: it showed `file:…/airlock.master-key`).
    let said = stdout(&out);
    for line in [
        "master key:           not set (see below)",
        "key:                  not set (see below)",
    ] {
        assert!(
            said.lines().any(|l| l.trim_start() == line),
            "{line} in\n{said}"
        );
    }
    assert!(
        !said.contains("airlock.master-key") && !said.contains("airlock.audit-key"),
        "{said}"
    );
    let out = airlock_cmd(&["config", "check", "--config", path])
        .current_dir(dir.path())
        .env("AIRLOCK_AUDIT_KEY", "ab".repeat(32))
        .env("AIRLOCK_MASTER_KEY", "cd".repeat(32))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Polls `airlock`'s output until a line holds `needle`; returns that line.
async fn output_line(airlock: &Airlock, needle: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(line) = airlock.output().lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {needle:?}:\n{}",
            airlock.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `serve`'s error line (the last `airlock: ` line of its stderr).
fn serve_error(out: &Output) -> String {
    stderr(out)
        .lines()
        .rfind(|l| l.starts_with("airlock: "))
        .unwrap_or_default()
        .to_owned()
}

/// A malformed `AIRLOCK_AUDIT_KEY` or `AIRLOCK_MASTER_KEY` (with a provider
/// on `credential = "store"`) is refused by `config check` in the words
/// `serve` refuses it with, and the value is never shown.
#[tokio::test]
async fn config_check_refuses_the_keys_serve_refuses() {
    let bad = "bad-key-value-xyz";
    for (var, purpose) in [
        ("AIRLOCK_AUDIT_KEY", "loading the audit key"),
        ("AIRLOCK_MASTER_KEY", "loading the master key"),
    ] {
        let (dir, path) = config_dir(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [providers.p]\nupstream = \"https://p.example.com\"\ncredential = \"store\"\n\
             env_key = \"P_KEY\"\nenv_base_url = \"P_URL\"\n",
        );
        let path = path.to_str().unwrap();
        let check = airlock_cmd(&["config", "check", "--config", path])
            .current_dir(dir.path())
            .env_remove("AIRLOCK_MASTER_KEY")
            .env(var, bad)
            .output()
            .await
            .unwrap();
        assert_eq!(check.status.code(), Some(1), "{var}: {}", stdout(&check));
        let serve = airlock_cmd(&["serve", "--config", path])
            .current_dir(dir.path())
            .env_remove("AIRLOCK_MASTER_KEY")
            .env(var, bad)
            .output()
            .await
            .unwrap();
        assert_eq!(serve.status.code(), Some(1), "{var}: {}", stderr(&serve));
        let refused = serve_error(&serve);
        assert!(
            refused.starts_with(&format!("airlock: {purpose}: ")) && refused.contains(var),
            "{refused}"
        );
        assert!(
            stderr(&check).lines().any(|l| l == refused),
            "{var}: config check said\n{}\nserve said\n{refused}",
            stderr(&check)
        );
        for text in [stdout(&check), stderr(&check), stderr(&serve)] {
            assert!(!text.contains(bad), "{text}");
        }
    }
    // An admin token serve refuses (round 40: config check passed these).
    for token in ["short", "a token with spaces in it 0123"] {
        let (dir, path) =
            config_dir("[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n");
        let path = path.to_str().unwrap();
        let run = |command: &[&str]| {
            let mut args = command.to_vec();
            args.extend(["--config", path]);
            airlock_cmd(&args)
                .current_dir(dir.path())
                .env("AIRLOCK_ADMIN_TOKEN", token)
                .output()
        };
        let check = run(&["config", "check"]).await.unwrap();
        assert_eq!(check.status.code(), Some(1), "{token}: {}", stdout(&check));
        assert!(
            stdout(&check).contains("env:AIRLOCK_ADMIN_TOKEN (set, refused: see below)"),
            "{}",
            stdout(&check)
        );
        let serve = run(&["serve"]).await.unwrap();
        assert_eq!(serve.status.code(), Some(1), "{token}: {}", stderr(&serve));
        let refused = serve_error(&serve);
        assert!(refused.contains("AIRLOCK_ADMIN_TOKEN"), "{refused}");
        assert!(
            stderr(&check).lines().any(|l| l == refused),
            "{token}: config check said\n{}\nserve said\n{refused}",
            stderr(&check)
        );
    }
}

/// A SQLite store whose directory does not exist is a problem for `config
/// check` (exit 1) and refused by `serve`, both naming `store.url`, the
/// directory and the fix.
#[tokio::test]
async fn a_sqlite_store_in_a_missing_directory_is_refused_naming_store_url() {
    let (dir, path) = config_dir("");
    let sub = dir.path().join("ro").join("sub");
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [store]\nurl = \"sqlite://{}/airlock.db\"\n",
            sub.display()
        ),
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let want = format!(
        "airlock: store.url: directory {} does not exist, so the database {}/airlock.db cannot \
         be created: create it (mkdir -p {})",
        sub.display(),
        sub.display(),
        sub.display()
    );
    let check = airlock_cmd(&["config", "check", "--config", path])
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    assert_eq!(check.status.code(), Some(1), "{}", stdout(&check));
    assert!(
        stderr(&check).lines().any(|l| l.starts_with(&want)),
        "{}",
        stderr(&check)
    );
    let serve = airlock_cmd(&["serve", "--config", path])
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    assert_eq!(serve.status.code(), Some(1), "{}", stderr(&serve));
    assert!(serve_error(&serve).starts_with(&want), "{}", stderr(&serve));
    assert!(!sub.exists());
}

/// A relative store path resolves against the working directory; the
/// start-up log shows what it resolved to, with the listeners and the
/// audit key's file.
#[tokio::test]
async fn the_start_up_log_names_listeners_and_resolved_paths() {
    let mut airlock = AirlockBuilder::new(BIN)
        .store_url("sqlite://airlock.db")
        .start()
        .await
        .unwrap();
    let started = output_line(&airlock, "airlock started").await;
    let dir = airlock.dir().display().to_string();
    for field in [
        format!("proxy={}", airlock.proxy_url()),
        format!("admin={}", airlock.admin_url()),
        format!("store=sqlite://airlock.db ({dir}/airlock.db)"),
        format!("audit_key=file:{dir}/airlock.db.audit-key"),
    ] {
        assert!(started.contains(&field), "{field} not in {started}");
    }
    airlock.terminate().await.unwrap();
}

/// An error said on a closed stderr (`2>&1 | head` that has exited) ends
/// the command with its own exit status, not a panic (round 47: exit 101).
#[tokio::test]
async fn an_error_on_a_closed_stderr_is_no_panic() {
    let mut child = airlock_cmd(&["serve", "--config", "/nonexistent/airlock.toml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(64));
}

/// A generated admin token that cannot be printed (stdout closed) is not
/// kept: `serve` stops saying so, and the next start generates and prints
/// another (round 47: the hash was stored, and the token lost for good).
#[tokio::test]
async fn an_admin_token_that_cannot_be_printed_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("airlock.toml"),
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let serve = || {
        let mut cmd = airlock_cmd(&["serve", "--config", "airlock.toml"]);
        cmd.current_dir(dir.path())
            .env_remove("AIRLOCK_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn().unwrap()
    };
    let mut first = serve();
    drop(first.stdout.take());
    let out = tokio::time::timeout(DEADLINE, first.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("could not print the generated admin token on stdout"),
        "{}",
        stderr(&out)
    );

    let mut second = serve();
    let mut lines = BufReader::new(second.stdout.take().unwrap()).lines();
    let export = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("export AIRLOCK_ADMIN_TOKEN=adm_") {
                return line;
            }
        }
        panic!("no admin token printed");
    })
    .await
    .unwrap();
    assert!(export.trim().len() > "export AIRLOCK_ADMIN_TOKEN=adm_".len());
    second.kill().await.unwrap();
}

/// `serve` says which admin token is in force (never the token): one it
/// generated, the stored one, or `AIRLOCK_ADMIN_TOKEN`, which replaces the
/// stored one while it is set.
#[tokio::test]
async fn serve_logs_which_admin_token_is_in_force() {
    let data = tempfile::tempdir().unwrap();
    let builder = AirlockBuilder::new(BIN).dir(data.path().to_path_buf());
    // An empty variable counts as unset.
    let unset = builder.clone().env("AIRLOCK_ADMIN_TOKEN", "");

    let mut first = unset.clone().start().await.unwrap();
    output_line(&first, "admin token: generated now").await;
    let export = output_line(&first, "export AIRLOCK_ADMIN_TOKEN=").await;
    let generated = export.split('=').nth(1).unwrap().trim().to_owned();
    assert!(generated.starts_with("adm_"), "{export}");
    first.terminate().await.unwrap();

    let mut second = unset.start().await.unwrap();
    output_line(&second, "admin token: the one generated on first start").await;
    assert!(!second.output().contains(&generated));
    let sessions = format!("{}/v1/sessions", second.admin_url());
    let auth = format!("Bearer {generated}");
    let reply = request("GET", &sessions, &[("authorization", &auth)], "").await;
    assert_eq!(reply.status, 200);
    second.terminate().await.unwrap();

    let mut third = builder.start().await.unwrap();
    let line = output_line(&third, "admin token: the one in AIRLOCK_ADMIN_TOKEN").await;
    assert!(line.contains("INFO"), "{line}");
    assert!(
        line.contains("is not accepted while the variable is set"),
        "{line}"
    );
    assert!(!third.output().contains(third.admin_token()));
    let sessions = format!("{}/v1/sessions", third.admin_url());
    let reply = request("GET", &sessions, &[("authorization", &auth)], "").await;
    assert_eq!(reply.status, 401);
    third.terminate().await.unwrap();
}

/// An admin API on a non-loopback address (plain HTTP) draws one warning
/// at start: the admin token would cross the network in clear.
#[tokio::test]
async fn an_admin_api_off_loopback_is_warned_about_once() {
    let warning = "admin.listen is not a loopback address";
    let mut exposed = AirlockBuilder::new(BIN)
        .admin_listen("0.0.0.0:0")
        .start()
        .await
        .unwrap();
    let line = output_line(&exposed, warning).await;
    assert!(line.contains("WARN"), "{line}");
    output_line(&exposed, "airlock started").await;
    assert_eq!(exposed.output().matches(warning).count(), 1);
    exposed.terminate().await.unwrap();

    let mut local = AirlockBuilder::new(BIN).start().await.unwrap();
    output_line(&local, "airlock started").await;
    assert!(!local.output().contains(warning));
    local.terminate().await.unwrap();
}

/// `--json` answers stay JSON when the command cannot do its job: `status
/// --json` against a server that cannot be asked, and `audit verify --json`
/// that cannot check the trail, print an object a script can read (`ready`
/// or `ok` false, and the `error`) besides the line on stderr, with the
/// same exit status (round 33: stdout was empty).
#[tokio::test]
async fn json_answers_stay_json_when_the_command_fails() {
    let (listener, url) = unanswering_listener();
    drop(listener);
    let out = against(&url, &["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["ready"], false, "{status}");
    assert_eq!(status["url"], url.as_str(), "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("cannot reach"),
        "{status}"
    );
    assert!(stderr(&out).contains("cannot reach"), "{out:?}");
    // A server that refuses the token still says it is ready (`/readyz`
    // needs none).
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let out = against(&airlock.admin_url(), &["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("401"),
        "{status}"
    );
    // Nor does a CLI without a token (round 43: `ready` false without
    // asking).
    let out = without_token(&airlock.admin_url(), &["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("AIRLOCK_ADMIN_TOKEN is not set"),
        "{status}"
    );
    // In text, the server's line, then what the rest needs.
    let out = without_token(&airlock.admin_url(), &["status"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stdout(&out),
        format!("server:     {}: ready\n", airlock.admin_url())
    );
    assert!(
        stderr(&out).contains("AIRLOCK_ADMIN_TOKEN is not set"),
        "{out:?}"
    );

    let out = against(&url, &["audit", "verify", "--remote", "--json"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let verdict: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(verdict["ok"], false, "{verdict}");
    assert!(
        verdict["error"].as_str().unwrap().contains("cannot reach"),
        "{verdict}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = airlock_cmd(&["audit", "verify", "--json"])
        .current_dir(dir.path())
        .env("AIRLOCK_AUDIT_KEY", "not-a-key")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let verdict: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(verdict["ok"], false, "{verdict}");
    // The store is looked for first (then the key).
    assert!(
        verdict["error"]
            .as_str()
            .unwrap()
            .contains("no database at"),
        "{verdict}"
    );
    // By prune too (round 43: it named the missing key first).
    let out = airlock_cmd(&["audit", "prune", "--before", "30d"])
        .current_dir(dir.path())
        .env_remove("AIRLOCK_AUDIT_KEY")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("no database at"), "{out:?}");
    assert!(!stderr(&out).contains("no audit key"), "{out:?}");

    // A config that cannot be read: exit 64, and still the JSON (round 34).
    for (args, field) in [
        (&["status", "--json"][..], "ready"),
        (&["audit", "verify", "--json"], "ok"),
        (&["audit", "verify", "--remote", "--json"], "ok"),
    ] {
        let mut all = vec!["--config", "/nonexistent/airlock.toml"];
        all.extend_from_slice(args);
        let out = airlock_cmd(&all).output().await.unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        let answer: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(answer[field], false, "{args:?}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("/nonexistent/airlock.toml"),
            "{args:?}: {answer}"
        );
    }
}

/// A non-UTF-8 `AIRLOCK_ADMIN_TOKEN` (Latin-1 bytes) is named as such, not
/// taken for an unset variable (round 34).
#[tokio::test]
async fn a_non_utf8_admin_token_is_named() {
    use std::os::unix::ffi::OsStrExt;
    let (listener, url) = unanswering_listener();
    let out = airlock_cmd(&["session", "list"])
        .env("AIRLOCK_ADMIN_URL", &url)
        .env(
            "AIRLOCK_ADMIN_TOKEN",
            std::ffi::OsStr::from_bytes(b"adm_t\xe9st_token_0123456789"),
        )
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr(&out).contains("AIRLOCK_ADMIN_TOKEN is not valid UTF-8"),
        "{out:?}"
    );
    assert_nothing_sent(&listener);
}

/// A rule whose path no SDK call through the session's base URL can match
/// (relative to `OPENAI_BASE_URL`, or with airlock's `/openai` prefix) is
/// created, with a warning on stderr that names the path meant (round
/// 40: it was taken without a word, and every SDK call got 403). Paths
/// under the base path, and patterns that may reach it, get none.
#[tokio::test]
async fn a_rule_no_sdk_call_can_match_is_warned_about() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    for (rule, meant) in [
        ("openai:POST:/chat/completions", "/v1/chat/completions"),
        (
            "openai:POST:/openai/v1/chat/completions",
            "/v1/chat/completions",
        ),
        // The base itself, or above it: no SDK call is there.
        ("openai:GET:/v1", "/v1/**"),
        ("openai:GET:/*", "/v1/**"),
    ] {
        let out = cli(&airlock, &["session", "create", "--allow", rule]).await;
        let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert!(created["token"].is_string(), "{created}");
        let path = rule.rsplit(':').next().unwrap();
        let said = stderr(&out);
        assert!(
            said.starts_with(&format!(
                "airlock: warning: openai path {path} is not under /v1"
            )) && said.contains(&format!("did you mean {meant}?")),
            "{said}"
        );
        assert_eq!(said.lines().count(), 1, "{said}");
    }
    for rule in [
        "openai:POST:/v1/chat/completions",
        "openai:GET:/v1/**",
        "openai:*:/**",
        "openai:POST:/*/chat/completions",
        "openai:GET:/v1/*",
    ] {
        let out = cli(&airlock, &["session", "create", "--allow", rule]).await;
        assert_eq!(stderr(&out), "", "{rule}");
    }
}

/// `AIRLOCK_ADMIN_URL` with the API's own `/v1` at its end is named as the
/// likely mistake (round 40: only "no such admin route: …/v1/v1/sessions").
#[tokio::test]
async fn an_admin_url_ending_in_v1_is_named() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let url = format!("{}/v1", airlock.admin_url());
    let out = airlock_cmd(&["session", "list"])
        .env("AIRLOCK_ADMIN_URL", &url)
        .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains(&format!("no such admin route: GET {url}/v1/sessions"))
            && said.contains("AIRLOCK_ADMIN_URL ends in /v1"),
        "{said}"
    );
}

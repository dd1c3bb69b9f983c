//! End-to-end tests of `airlock exec` against a real server: the child's
//! environment, revocation after the child exits (normally, by a signal, or
//! because airlock itself was signalled) and exit status propagation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use airlock_testkit::client::request;
use airlock_testkit::{Airlock, AirlockBuilder, MockProvider};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const BIN: &str = env!("CARGO_BIN_EXE_airlock");
/// The real credentials, as the operator's shell holds them.
const OPENAI_KEY: &str = "sk-real-openai-exec-0123456789";
const ANTHROPIC_KEY: &str = "sk-real-anthropic-exec-0123456789";
/// A real key the operator's shell holds where the Anthropic SDK looks.
const SHELL_ANTHROPIC_KEY: &str = "sk-ant-in-the-shell-0123456789";
/// A real key the operator's shell holds for some other AI SDK.
const SHELL_SDK_KEY: &str = "hf-or-other-sdk-key-in-the-shell-0123456789";
/// Where AI SDKs other than OpenAI's and Anthropic's read their keys (and
/// Azure OpenAI's Entra ID token).
const SDK_KEY_VARIABLES: [&str; 9] = [
    "AZURE_OPENAI_AD_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "REPLICATE_API_TOKEN",
    "FIREWORKS_API_KEY",
    "PERPLEXITY_API_KEY",
    "VOYAGE_API_KEY",
    "GEMINI_API_KEY",
    "MISTRAL_API_KEY",
];
/// Legacy base-URL variables that SDKs (LangChain, LiteLLM, openai < 1.0)
/// read before the one a session sets.
const LEGACY_BASE_URL_VARIABLES: [&str; 3] =
    ["OPENAI_API_BASE", "ANTHROPIC_API_URL", "ANTHROPIC_API_BASE"];
/// Where the operator's shell points them.
const ELSEWHERE: &str = "https://elsewhere.example/v1";
/// Upper bound for anything a test waits for.
const DEADLINE: Duration = Duration::from_secs(30);

async fn start(mock: &MockProvider) -> Airlock {
    AirlockBuilder::new(BIN)
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .provider(
            "anthropic",
            &mock.url(),
            "header:x-api-key",
            ANTHROPIC_KEY,
            "",
        )
        .start()
        .await
        .unwrap()
}

/// `airlock exec ARGS` run the way an operator would: the admin URL and
/// token in the environment, and the real credentials too (the variables the
/// config names as credential sources), which the child must not get.
fn exec(airlock: &Airlock, args: &[&str]) -> Command {
    exec_with(Command::new(BIN), airlock, args)
}

/// `airlock exec ARGS` as [`exec`] runs it, appended to `command` (which
/// ends with the path of airlock's binary).
fn exec_with(mut command: Command, airlock: &Airlock, args: &[&str]) -> Command {
    command
        .arg("--config")
        .arg(airlock.config_path())
        .arg("exec")
        .args(args)
        .current_dir(airlock.dir())
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
        .env("AIRLOCK_TEST_CRED_OPENAI", OPENAI_KEY)
        .env("AIRLOCK_TEST_CRED_ANTHROPIC", ANTHROPIC_KEY)
        .env("AIRLOCK_AUDIT_KEY", "ab".repeat(32))
        .env("AIRLOCK_MASTER_KEY", "cd".repeat(32))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn session(airlock: &Airlock, id: &str) -> Value {
    let (status, view) = airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{view}");
    view
}

/// Status of a chat call with `token` through the proxy.
async fn call(airlock: &Airlock, token: &str) -> u16 {
    request(
        "POST",
        &format!("{}/openai/v1/chat/completions", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {token}"))],
        r#"{"model":"m","messages":[]}"#,
    )
    .await
    .status
}

/// The next line the child printed, within the deadline.
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("no line from the child in time")
        .unwrap()
        .expect("the child's output ended")
}

async fn wait(child: &mut Child) -> ExitStatus {
    tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("airlock exec did not exit in time")
        .unwrap()
}

fn signal(child: &Child, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap()).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

/// The ids of sessions (active or ended) with label `test=VALUE`.
async fn sessions_labelled(airlock: &Airlock, value: &str) -> Vec<Value> {
    let (_, list) = airlock
        .admin("GET", "/v1/sessions?all=true", None)
        .await
        .unwrap();
    list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["labels"]["test"] == value)
        .cloned()
        .collect()
}

#[tokio::test]
async fn child_sees_the_session_env_never_the_real_credentials_and_its_exit_code_is_kept() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let out = exec(
        &airlock,
        &[
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--ttl",
            "10m",
            "--label",
            "test=env",
            "--",
            "sh",
            "-c",
            r#"echo "$OPENAI_API_KEY $OPENAI_BASE_URL"; env; exit 7"#,
        ],
    )
    // A real key in the operator's shell under the name an SDK reads, for
    // a provider outside the session (its airlock credential comes from
    // elsewhere): the command must not get it.
    .env("ANTHROPIC_API_KEY", SHELL_ANTHROPIC_KEY)
    .env("ANTHROPIC_BASE_URL", "https://api.anthropic.com")
    // Keys of other AI SDKs in the operator's shell.
    .envs(SDK_KEY_VARIABLES.map(|var| (var, SHELL_SDK_KEY)))
    // Base URLs that would send the session's token elsewhere.
    .envs(LEGACY_BASE_URL_VARIABLES.map(|var| (var, ELSEWHERE)))
    .env("AGENT_SETTING", "inherited")
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );

    let first = stdout.lines().next().unwrap();
    let (token, base_url) = first.split_once(' ').unwrap();
    assert!(token.starts_with("sess_") && token.len() >= 48, "{first}");
    assert_eq!(base_url, format!("{}/openai/v1", airlock.proxy_url()));

    let env: Vec<(&str, &str)> = stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once('='))
        .collect();
    let var = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    assert_eq!(var("OPENAI_API_KEY"), Some(token));
    // Only providers in scope get variables.
    assert_eq!(var("ANTHROPIC_API_KEY"), None, "{stdout}");
    assert_eq!(var("ANTHROPIC_BASE_URL"), None, "{stdout}");
    // The real credentials' source variables, the admin API's URL (it may
    // hold a user:password) and token, the audit key and the master key are
    // gone, though airlock's own environment has them.
    for hidden in [
        "AIRLOCK_TEST_CRED_OPENAI",
        "AIRLOCK_TEST_CRED_ANTHROPIC",
        "AIRLOCK_ADMIN_URL",
        "AIRLOCK_ADMIN_TOKEN",
        "AIRLOCK_AUDIT_KEY",
        "AIRLOCK_MASTER_KEY",
    ] {
        assert_eq!(var(hidden), None, "{hidden} leaked into the child");
    }
    for name in SDK_KEY_VARIABLES {
        assert_eq!(var(name), None, "{name} leaked into the child");
    }
    // The legacy base-URL names: the one whose provider is in the session
    // gets the session's base URL; the others are gone.
    assert_eq!(var("OPENAI_API_BASE"), Some(base_url), "{stdout}");
    for name in ["ANTHROPIC_API_URL", "ANTHROPIC_API_BASE"] {
        assert_eq!(var(name), None, "{name} leaked into the child");
    }
    assert!(!stdout.contains(ELSEWHERE), "{stdout}");
    for secret in [
        OPENAI_KEY,
        ANTHROPIC_KEY,
        SHELL_ANTHROPIC_KEY,
        SHELL_SDK_KEY,
        airlock.admin_token(),
    ] {
        assert!(
            !stdout.contains(secret),
            "a secret reached the child:\n{stdout}"
        );
    }
    // The rest of the environment is inherited.
    assert_eq!(var("AGENT_SETTING"), Some("inherited"));

    let id = var("AIRLOCK_SESSION_ID").unwrap();
    let view = session(&airlock, id).await;
    assert_eq!(view["state"], "revoked", "{view}");
    assert_eq!(view["labels"]["test"], "env");
    assert_eq!(call(&airlock, token).await, 401);
}

#[tokio::test]
async fn the_token_works_while_the_child_runs_and_not_after_it_exits() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let mut child = exec(
        &airlock,
        &[
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--allow",
            "anthropic:POST:/v1/messages",
            "--",
            "sh",
            "-c",
            r#"echo "$AIRLOCK_SESSION_ID $OPENAI_API_KEY $ANTHROPIC_API_KEY $ANTHROPIC_BASE_URL"; read reply; echo "bye $reply""#,
        ],
    )
    .stdin(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = next_line(&mut lines).await;
    let parts: Vec<&str> = line.split(' ').collect();
    let [id, token, anthropic_token, anthropic_url] = parts[..] else {
        panic!("{line}");
    };
    assert_eq!(
        token, anthropic_token,
        "one token for every provider in scope"
    );
    assert_eq!(anthropic_url, format!("{}/anthropic", airlock.proxy_url()));

    assert_eq!(session(&airlock, id).await["state"], "active");
    assert_eq!(call(&airlock, token).await, 200);
    assert!(mock.requests()[0]
        .header("authorization")
        .unwrap()
        .contains(OPENAI_KEY));

    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"done\n").await.unwrap();
    drop(stdin);
    assert_eq!(next_line(&mut lines).await, "bye done");
    let status = wait(&mut child).await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(session(&airlock, id).await["state"], "revoked");
    assert_eq!(call(&airlock, token).await, 401);
}

#[tokio::test]
async fn sigterm_to_airlock_reaches_the_child_and_revokes_the_session() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    // The child traps SIGTERM to prove it got it, then exits with its own code.
    let mut child = exec(
        &airlock,
        &[
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--",
            "sh",
            "-c",
            r#"trap 'echo "child got TERM"; exit 3' TERM; echo "$AIRLOCK_SESSION_ID $OPENAI_API_KEY"; while :; do sleep 0.05; done"#,
        ],
    )
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = next_line(&mut lines).await;
    let (id, token) = line.split_once(' ').unwrap();
    assert_eq!(session(&airlock, id).await["state"], "active");

    signal(&child, rustix::process::Signal::TERM);
    assert_eq!(next_line(&mut lines).await, "child got TERM");
    let status = wait(&mut child).await;
    assert_eq!(
        status.code(),
        Some(3),
        "airlock exits with the child's status"
    );
    assert_eq!(session(&airlock, id).await["state"], "revoked");
    assert_eq!(call(&airlock, token).await, 401);
}

#[tokio::test]
async fn a_child_killed_by_the_forwarded_signal_gives_128_plus_the_signal() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    for (signal_to_send, number) in [
        (rustix::process::Signal::TERM, 15),
        (rustix::process::Signal::INT, 2),
    ] {
        // `exec sleep`: the child has the default action, so the signal
        // airlock forwards kills it.
        let mut child = exec(
            &airlock,
            &[
                "--allow",
                "openai:POST:/v1/chat/completions",
                "--",
                "sh",
                "-c",
                r#"echo "$AIRLOCK_SESSION_ID"; exec sleep 600"#,
            ],
        )
        .spawn()
        .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let id = next_line(&mut lines).await;
        // Whether the signal reaches the shell or, after its `exec`, sleep:
        // both die of it.
        assert_eq!(session(&airlock, &id).await["state"], "active");
        signal(&child, signal_to_send);
        let status = wait(&mut child).await;
        assert_eq!(status.code(), Some(128 + number), "{signal_to_send:?}");
        assert_eq!(session(&airlock, &id).await["state"], "revoked");
    }
}

/// A terminal (a pseudo-terminal's far end) that is not the controlling
/// terminal of whoever gets it as stdin, and its leader (the far end is
/// usable while the leader is open).
fn detached_terminal() -> (rustix::fd::OwnedFd, std::fs::File) {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use std::os::unix::fs::OpenOptionsExt;
    let leader = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&leader).unwrap();
    unlockpt(&leader).unwrap();
    let name = ptsname(&leader, Vec::new()).unwrap();
    let far_end = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOCTTY.bits().cast_signed())
        .open(name.to_str().unwrap())
        .unwrap();
    (leader, far_end)
}

#[tokio::test]
async fn sigint_sent_to_airlock_alone_reaches_the_child_even_with_a_terminal_on_stdin() {
    // airlock skips forwarding SIGINT only when its group is the terminal's
    // foreground group (a Ctrl-C there reached the child already). With a
    // terminal on stdin that is not its controlling one — as for a job run
    // in the background — a SIGINT came from `kill` and must be passed on.
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let (_leader, terminal) = detached_terminal();
    let mut child = exec(
        &airlock,
        &[
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--",
            "sh",
            "-c",
            r#"trap 'echo "child got INT"; exit 4' INT; echo "$AIRLOCK_SESSION_ID"; while :; do sleep 0.05; done"#,
        ],
    )
    .stdin(terminal)
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let id = next_line(&mut lines).await;
    assert_eq!(session(&airlock, &id).await["state"], "active");
    signal(&child, rustix::process::Signal::INT);
    assert_eq!(next_line(&mut lines).await, "child got INT");
    assert_eq!(wait(&mut child).await.code(), Some(4));
    assert_eq!(session(&airlock, &id).await["state"], "revoked");
}

#[tokio::test]
async fn a_ctrl_c_at_the_terminal_reaches_the_command_once_when_stdin_is_redirected() {
    // `… | airlock exec -- agent` typed at a shell: stdin is a pipe, but
    // airlock and the command are the terminal's foreground group, so a
    // Ctrl-C reaches the command directly; airlock must not send a second
    // SIGINT (many programs skip their graceful exit on one).
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let (leader, terminal) = detached_terminal();
    // `setsid --ctty` makes the terminal on its stdin the controlling
    // terminal of a new session, whose group is then the foreground one;
    // airlock itself gets /dev/null as stdin.
    let mut wrapper = Command::new("setsid");
    wrapper.args(["--ctty", "sh", "-c", r#"exec "$@" </dev/null"#, "sh", BIN]);
    let mut child = exec_with(
        wrapper,
        &airlock,
        &[
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--",
            "sh",
            "-c",
            r#"trap 'echo INT' INT; trap 'echo TERM; exit 5' TERM; echo "$AIRLOCK_SESSION_ID"; while :; do sleep 0.05; done"#,
        ],
    )
    .env("RUST_LOG", "warn,airlock::commands::exec=debug")
    .stdin(terminal)
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let id = next_line(&mut lines).await;
    assert_eq!(session(&airlock, &id).await["state"], "active");

    // Ctrl-C, typed at the terminal.
    assert_eq!(rustix::io::write(&leader, b"\x03").unwrap(), 1);
    assert_eq!(next_line(&mut lines).await, "INT");
    let decision = loop {
        let line = tokio::time::timeout(DEADLINE, log.next_line())
            .await
            .expect("airlock logged no signal in time")
            .unwrap()
            .expect("airlock's log ended");
        if line.contains("signal received") {
            break line;
        }
    };
    assert!(
        decision.contains("signal=2") && decision.contains("forwarded=false"),
        "{decision}"
    );

    // SIGTERM is passed on; the command's output then shows every signal
    // it got.
    signal(&child, rustix::process::Signal::TERM);
    assert_eq!(wait(&mut child).await.code(), Some(5));
    let mut rest = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        rest.push(line);
    }
    assert_eq!(rest, ["TERM"], "the command got one SIGINT");
    assert_eq!(session(&airlock, &id).await["state"], "revoked");
}

#[tokio::test]
async fn a_missing_command_exits_127_and_its_session_is_revoked() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let out = exec(
        &airlock,
        &[
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--label",
            "test=missing",
            "--",
            "/nonexistent/agent",
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(127));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("airlock: cannot run /nonexistent/agent"),
        "{stderr}"
    );
    let sessions = sessions_labelled(&airlock, "missing").await;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["state"], "revoked");
}

#[tokio::test]
async fn nothing_runs_when_airlock_cannot_open_the_session() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let marker = airlock.dir().join("ran");
    let script = format!("touch {}", marker.display());
    let cases: [(&[&str], &str); 3] = [
        (&["--allow", "openai:POST"], "not PROVIDER:METHODS:PATH"),
        (&["--allow", "nope:POST:/v1/x"], "unknown provider \"nope\""),
        (
            &["--allow", "openai:POST:/v1/x", "--ttl", "forever"],
            "not a duration",
        ),
    ];
    for (args, want) in cases {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--", "sh", "-c", &script]);
        let out = exec(&airlock, &all).output().await.unwrap();
        // Usage errors (an option value airlock or the server refuses) exit
        // 2, as for every command.
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with("airlock: ") && stderr.contains(want),
            "{args:?}: {stderr}"
        );
    }
    // No server to talk to.
    let out = exec(
        &airlock,
        &["--allow", "openai:POST:/v1/x", "--", "sh", "-c", &script],
    )
    .env("AIRLOCK_ADMIN_URL", "http://127.0.0.1:1")
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the airlock admin API"));
    assert!(!marker.exists(), "the command ran without a session");
}

#[tokio::test]
async fn the_command_may_follow_the_options_without_a_double_dash() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    // Everything after the first word of the command is the command's,
    // even when it looks like an airlock option.
    let out = exec(
        &airlock,
        &[
            "--allow",
            "openai:POST:/v1/chat/completions",
            "sh",
            "-c",
            r#"printf '%s|' "$0" "$1"; exit 0"#,
            "--ttl",
            "--allow",
        ],
    )
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "--ttl|--allow|");
}

#[tokio::test]
async fn a_config_that_does_not_load_is_refused_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("airlock.toml");
    std::fs::write(&path, "[proxy]\nlisten = \"nowhere\"\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "--config",
            path.to_str().unwrap(),
            "exec",
            "--allow",
            "openai:POST:/v1/x",
        ])
        .args(["--", "true"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "airlock: invalid config: {}: proxy.listen:",
            path.display()
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_session_that_cannot_be_revoked_is_reported_and_fails_a_successful_run() {
    let mock = MockProvider::start().await;
    let mut airlock = start(&mock).await;
    let mut child = exec(
        &airlock,
        &[
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--",
            "sh",
            "-c",
            r#"echo "$AIRLOCK_SESSION_ID"; read reply"#,
        ],
    )
    .stdin(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let id = next_line(&mut lines).await;
    // The server goes away while the command runs.
    airlock.terminate().await.unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"done\n").await.unwrap();
    drop(stdin);
    let status = wait(&mut child).await;
    assert_eq!(
        status.code(),
        Some(125),
        "the command succeeded, the revocation did not"
    );
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert!(
        stderr.contains(&format!("could not revoke session {id}"))
            && stderr.contains("cannot reach the airlock admin API"),
        "{stderr}"
    );
}

/// The variables of every provider the *server* has are removed, also when
/// the local config does not name that provider (exec run from another
/// host, or without the server's config), and so are the common SDKs' key
/// variables that no provider names.
#[tokio::test]
async fn the_servers_providers_variables_are_removed_whatever_the_local_config() {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(BIN)
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .provider(
            "github",
            &mock.url(),
            "bearer",
            "ghp_real_exec_0123456789",
            "",
        )
        .start()
        .await
        .unwrap();
    let local = tempfile::tempdir().unwrap();
    let config = local.path().join("local.toml");
    std::fs::write(
        &config,
        "[providers.openai]\nupstream = \"https://api.openai.com\"\ncredential = \"env:LOCAL_OPENAI_KEY\"\n\
         env_key = \"OPENAI_API_KEY\"\nenv_base_url = \"OPENAI_BASE_URL\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args([
            "exec",
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--",
            "sh",
            "-c",
            "env",
        ])
        .current_dir(local.path())
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
        .env("GITHUB_API_KEY", "ghp_in_the_shell_0123456789")
        // The server's own credential variables, which the local config
        // does not name: the server says which they are.
        .env("AIRLOCK_TEST_CRED_GITHUB", "ghp_real_exec_0123456789")
        .env("AIRLOCK_TEST_CRED_OPENAI", OPENAI_KEY)
        .env("GITHUB_BASE_URL", "https://api.github.com")
        // Keys for providers neither config names, where SDKs look.
        .env("ANTHROPIC_API_KEY", "sk-ant-in-the-shell-0123456789")
        .env("GEMINI_API_KEY", "AIza-in-the-shell-0123456789")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("OPENAI_API_KEY=sess_"), "{stdout}");
    assert!(!stdout.contains("GITHUB_API_KEY="), "{stdout}");
    assert!(!stdout.contains("GITHUB_BASE_URL="), "{stdout}");
    assert!(!stdout.contains("-in-the-shell-"), "{stdout}");
    assert!(!stdout.contains("ghp_real_exec_"), "{stdout}");
    assert!(!stdout.contains(OPENAI_KEY), "{stdout}");
}

/// `--clean-env` starts the command with only the session's variables and
/// the basic ones, plus those `--pass-env` names (round 28: the operator's
/// GITHUB_TOKEN and cloud keys reached the agent); a credential stays out
/// even when named.
#[tokio::test]
async fn clean_env_passes_only_the_basic_variables_and_those_named() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let out = exec(
        &airlock,
        &[
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--clean-env",
            "--pass-env",
            "AGENT_MODE",
            "--pass-env",
            "AIRLOCK_TEST_CRED_OPENAI",
            "--",
            "sh",
            "-c",
            "env",
        ],
    )
    .env("GITHUB_TOKEN", "ghp_in_the_shell_0123456789")
    .env("AWS_SECRET_ACCESS_KEY", "aws-in-the-shell-0123456789")
    .env("AGENT_MODE", "careful")
    .env("LC_ALL", "C")
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for kept in [
        "PATH",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "AIRLOCK_SESSION_ID",
        "AGENT_MODE",
        "LC_ALL",
    ] {
        assert!(names.contains(&kept), "{kept} missing: {stdout}");
    }
    for gone in [
        "GITHUB_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "AIRLOCK_ADMIN_URL",
        "AIRLOCK_TEST_CRED_OPENAI",
    ] {
        assert!(
            !names.contains(&gone),
            "{gone} reached the command: {stdout}"
        );
    }
    assert!(!stdout.contains(OPENAI_KEY), "{stdout}");
    // The operator is told which --pass-env was not honoured, and only it
    // (round 43: it was dropped silently).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--pass-env AIRLOCK_TEST_CRED_OPENAI: not passed on"),
        "{stderr}"
    );
    assert!(!stderr.contains("--pass-env AGENT_MODE"), "{stderr}");
    // --pass-env without --clean-env is refused.
    let out = exec(
        &airlock,
        &[
            "--allow",
            "openai:POST:/v1/x",
            "--pass-env",
            "X",
            "--",
            "true",
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

//! Starting the line-up of peers in front of the running mock.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{Method, StatusCode};

use super::{progress, Options, Peer};
use crate::audit_metrics::MetricsSource;
use crate::client;
use crate::mock::CHAT_RESPONSE;
use crate::peers::{self, AirlockSpec, Mock, Target, REAL_KEY};
use crate::procs::Proc;
use crate::results::{
    PeerInfo, AIRLOCK_AUDIT_OFF, AIRLOCK_AUDIT_ON, AIRLOCK_POSTGRES, DIRECT, NGINX,
};
use crate::wrk::SMALL_JSON;

/// The peers of one phase and the processes behind them (stopped on drop).
pub(super) struct Lineup {
    /// In table order: direct, nginx, airlock (audit on), airlock (audit off).
    pub list: Vec<Peer>,
    /// The airlock processes by peer name.
    pub airlocks: Vec<(&'static str, peers::Airlock)>,
    /// Other processes (nginx).
    pub others: Vec<Proc>,
}

/// Starts nginx and both airlocks in front of `mock` (data in `dir`), each
/// with a session, and keeps the peers that answer a call correctly.
/// Problems become `notes`.
pub(super) async fn start(
    opts: &Options,
    dir: &Path,
    mock: &Mock,
    nginx_version: &str,
    notes: &mut Vec<String>,
) -> anyhow::Result<Lineup> {
    let mut lineup = Lineup {
        list: vec![direct(mock)],
        airlocks: Vec::new(),
        others: Vec::new(),
    };

    progress("starting airlock (audit on, audit off, PostgreSQL if given)");
    let mut airlocks = vec![
        (AIRLOCK_AUDIT_ON, false, None, "airlock-on"),
        (AIRLOCK_AUDIT_OFF, true, None, "airlock-off"),
    ];
    if let Some(url) = &opts.postgres_url {
        airlocks.push((AIRLOCK_POSTGRES, false, Some(url.clone()), "airlock-pg"));
    }
    for (name, audit_off, store_url, data_dir) in airlocks {
        let store = if store_url.is_some() {
            "PostgreSQL store"
        } else {
            "SQLite store"
        };
        let spec = AirlockSpec {
            bin: opts.airlock_bin.clone(),
            upstream: mock.addr,
            audit_off,
            store_url,
        };
        let data = subdir(dir, data_dir)?;
        let airlock = match peers::start_airlock(&spec, &data) {
            Ok(airlock) => airlock,
            Err(err) => {
                note(notes, &format!("{name} did not start"), &err);
                continue;
            }
        };
        if airlock.audit_key_refused {
            add_note(
                notes,
                format!(
                    "this airlock build refuses `[audit] enabled = false`, so \"{name}\" runs \
                     with the default audit setting: its figures are a second sample of the \
                     same configuration, not audit-off figures"
                ),
            );
        }
        let token = peers::create_session(airlock.admin, &airlock.admin_token).await?;
        let config = if audit_off {
            "`[audit] enabled = false`"
        } else {
            "default config (audit on)"
        };
        lineup.list.push(Peer {
            target: Target {
                name: name.to_owned(),
                addr: airlock.proxy,
                prefix: "/mock".to_owned(),
                authorization: format!("Bearer {token}"),
            },
            pid: airlock.proc.pid(),
            info: PeerInfo {
                name: name.to_owned(),
                description: format!(
                    "`airlock serve` (release build), {config}, {store}, one session"
                ),
                own_process: true,
                idle_rss_kib: None,
            },
            metrics: Some(MetricsSource {
                admin: airlock.admin,
                token: airlock.admin_token.clone(),
            }),
        });
        lineup.airlocks.push((name, airlock));
    }

    if let Some(bin) = &opts.nginx_bin {
        progress("starting nginx");
        match peers::start_nginx(bin, &subdir(dir, "nginx")?, mock.addr) {
            Ok(nginx) => {
                // nginx replaces whatever the client sends: send a session
                // token, as an agent would.
                let authorization = lineup.list.last().map_or_else(
                    || format!("Bearer {REAL_KEY}"),
                    |p| p.target.authorization.clone(),
                );
                let peer = Peer {
                    target: Target {
                        name: NGINX.to_owned(),
                        addr: nginx.addr,
                        prefix: String::new(),
                        authorization,
                    },
                    pid: nginx.proc.pid(),
                    info: PeerInfo {
                        name: NGINX.to_owned(),
                        description: format!(
                            "{nginx_version}, one worker, `keepalive 64` upstream pool, \
                             `proxy_set_header Authorization`, buffering off, logs off"
                        ),
                        own_process: true,
                        idle_rss_kib: None,
                    },
                    metrics: None,
                };
                lineup.list.insert(1, peer);
                lineup.others.push(nginx.proc);
            }
            Err(err) => note(notes, "nginx did not start", &err),
        }
    } else {
        add_note(
            notes,
            "nginx was not found; it is not part of this run".to_owned(),
        );
    }

    progress("checking that every peer answers correctly");
    let mut checked = Vec::new();
    for peer in std::mem::take(&mut lineup.list) {
        match check(&peer.target).await {
            Ok(()) => checked.push(peer),
            Err(err) => note(
                notes,
                &format!("{} answered wrongly and was left out", peer.target.name),
                &err,
            ),
        }
    }
    lineup.list = checked;
    Ok(lineup)
}

fn direct(mock: &Mock) -> Peer {
    Peer {
        target: Target {
            name: DIRECT.to_owned(),
            addr: mock.addr,
            prefix: String::new(),
            authorization: format!("Bearer {REAL_KEY}"),
        },
        pid: mock.proc.pid(),
        info: PeerInfo {
            name: DIRECT.to_owned(),
            description: "the mock provider itself; the client sends the real key".to_owned(),
            own_process: false,
            idle_rss_kib: None,
        },
        metrics: None,
    }
}

/// One small JSON call must come back 200 with the mock's answer (the mock
/// answers 401 unless it got the real key).
async fn check(target: &Target) -> anyhow::Result<()> {
    let body = client::expect(
        target.addr,
        Method::POST,
        &target.target("/v1/chat/completions"),
        Some(&target.authorization),
        Some(Bytes::from_static(SMALL_JSON.as_bytes())),
        StatusCode::OK,
    )
    .await?;
    if body.as_ref() != CHAT_RESPONSE {
        bail!("unexpected body {:?}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

fn subdir(parent: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Adds `what: first line of err` to the notes; the whole error goes to stderr.
pub(super) fn note(notes: &mut Vec<String>, what: &str, err: &anyhow::Error) {
    progress(&format!("{what}: {err:#}"));
    let text = format!("{err:#}");
    add_note(
        notes,
        format!("{what}: {}", text.lines().next().unwrap_or("")),
    );
}

/// Adds a note unless it is already there (the peers start twice).
pub(super) fn add_note(notes: &mut Vec<String>, text: String) {
    if !notes.contains(&text) {
        notes.push(text);
    }
}

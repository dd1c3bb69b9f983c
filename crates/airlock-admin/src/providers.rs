//! `GET /v1/providers`: the providers and the variables agents get for them;
//! `PUT`, `GET` and `DELETE /v1/providers/{name}/credential`: write-only
//! credentials.

use std::sync::Arc;

use airlock_core::audit::format_ts;
use airlock_core::Secret;
use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::sessions::parse_json;
use crate::state::AdminState;

/// `GET /v1/providers`: every provider with the names of the variables a
/// session hands agents for it (`airlock exec` removes them all from its
/// command's environment before setting the session's). Never a credential.
pub async fn list(State(state): State<Arc<AdminState>>) -> Json<Value> {
    let providers: Vec<Value> = state
        .providers
        .iter()
        .map(|(name, env)| {
            json!({
                "name": name,
                "env_key": env.env_key,
                "env_base_url": env.env_base_url,
            })
        })
        .collect();
    Json(json!({ "providers": providers }))
}

/// What the admin API can do with provider credentials. Implemented by the
/// binary, which owns the master key and the providers' live credentials.
#[async_trait]
pub trait CredentialAdmin: Send + Sync {
    /// Seals and stores `value` as `provider`'s credential; the next call
    /// uses it, on every replica sharing the store.
    async fn set(&self, provider: &str, value: Secret) -> Result<(), CredentialAdminError>;
    /// Removes `provider`'s stored credential: the next call to it gets 503
    /// `credential_unavailable`, on every replica sharing the store.
    /// Whether one was stored.
    async fn remove(&self, provider: &str) -> Result<bool, CredentialAdminError>;
    /// Whether `provider` has a credential, where it comes from, and when a
    /// stored one was last set (unix ms). Never the value.
    async fn status(&self, provider: &str) -> Result<CredentialStatus, CredentialAdminError>;
}

/// What may be said about a credential.
#[derive(Clone, Debug)]
pub struct CredentialStatus {
    /// `env:VAR`, `file:PATH` or `store`.
    pub source: String,
    pub set: bool,
    pub updated_at: Option<i64>,
}

/// Why a credential could not be set or read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialAdminError {
    #[error("no provider named {0:?} is configured")]
    UnknownProvider(String),
    #[error("provider {provider} takes its credential from {origin}; set `credential = \"store\"` in its config to manage it here")]
    NotStored { provider: String, origin: String },
    /// A removal asked of a provider whose credential is not stored.
    #[error("provider {provider} takes its credential from {origin}, not the store: to take it out of use, {how}")]
    NotRemovable {
        provider: String,
        origin: String,
        how: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
    /// The store refused or could not be reached (503 when it is out of
    /// reach, see [`airlock_store::StoreError::is_unavailable`]).
    #[error(transparent)]
    Store(#[from] airlock_store::StoreError),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetCredential {
    value: String,
}

impl From<CredentialAdminError> for ApiError {
    fn from(e: CredentialAdminError) -> Self {
        match e {
            CredentialAdminError::UnknownProvider(_) => ApiError::NotFound(e.to_string()),
            CredentialAdminError::NotStored { .. } | CredentialAdminError::NotRemovable { .. } => {
                ApiError::Conflict(e.to_string())
            }
            CredentialAdminError::Invalid(m) => ApiError::BadRequest(m),
            CredentialAdminError::Internal(m) => ApiError::Internal(m),
            CredentialAdminError::Store(e) => e.into(),
        }
    }
}

/// `PUT /v1/providers/{name}/credential` with `{"value": "..."}`.
pub(crate) async fn put_credential(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let SetCredential { value } = parse_json(&body, "credential")?;
    let value = Secret::new(value);
    state.credentials.set(&name, value).await?;
    tracing::info!(provider = %name, "provider credential set");
    show(&state, &name).await
}

/// `DELETE /v1/providers/{name}/credential`: removes a stored credential
/// (after a leak, say, before a new key is at hand). The answer is the
/// credential's state as `GET` gives it, with `removed`: whether one was
/// stored (removing none is no error, so a retry is harmless).
pub(crate) async fn delete_credential(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let removed = state.credentials.remove(&name).await?;
    if removed {
        tracing::info!(provider = %name, "provider credential removed");
    }
    let Json(mut answer) = show(&state, &name).await?;
    answer["removed"] = Value::Bool(removed);
    Ok(Json(answer))
}

/// `GET /v1/providers/{name}/credential`: whether one is set and when.
pub(crate) async fn get_credential(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    show(&state, &name).await
}

async fn show(state: &AdminState, name: &str) -> Result<Json<Value>, ApiError> {
    let status = state.credentials.status(name).await?;
    Ok(Json(json!({
        "provider": name,
        "source": status.source,
        "set": status.set,
        "updated_at": status.updated_at.map(format_ts),
    })))
}

//! The airlock control plane: the admin API of SPEC §4.
//!
//! Every route but `/healthz` and `/readyz` needs `Authorization: Bearer
//! <admin token>`; the token is compared by its SHA-256 hash in constant
//! time, and a refusal is counted and logged (`auth`). Errors use the
//! same JSON shape as the proxy.

mod audit;
mod auth;
mod error;
mod exposition;
mod listing;
mod providers;
mod routes;
mod serve;
mod sessions;
mod state;

pub use audit::{verified_json, AuditAccess, MAX_LIMIT as AUDIT_PAGE_MAX};
pub use auth::AuthFailures;
pub use error::ApiError;
pub use listing::{DEFAULT_LIMIT as SESSION_PAGE_DEFAULT, MAX_LIMIT as SESSION_PAGE_MAX};
pub use providers::{CredentialAdmin, CredentialAdminError, CredentialStatus};
pub use routes::{router, MAX_BODY};
pub use serve::{serve, ServeSettings, MAX_HEADER_LINES};
pub use sessions::{CreateSession, SessionView};
pub use state::{AdminMetrics, AdminState, ProviderEnv, ServerInfo};

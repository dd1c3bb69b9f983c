//! The airlock data plane.
//!
//! Every call goes through the same stages, in this order (see
//! [`handler`]): route to a provider, authenticate the session token (401),
//! validate the path (400), check the scope (403), apply limits (429), swap the
//! token for the real credential, forward and stream the answer back
//! (502/504 on upstream failure). A refused call never reaches the provider.

mod audit;
pub mod body;
pub mod credential_source;
pub mod credentials;
mod cut;
pub mod descriptors;
pub mod error;
pub mod handler;
pub mod headers;
mod in_flight;
mod linger;
pub mod metrics;
pub mod provider;
pub mod redact;
mod request_id;
mod results_url;
pub mod server;
pub mod tls;
pub mod upstream_pool;
pub mod websocket;

pub use error::{Denial, ErrorCode};
pub use handler::{Proxy, ProxySettings};
pub use metrics::ProxyMetrics;
pub use provider::{
    AuthStyle, CredentialFormat, PreparedCredential, Provider, ProviderError, ProviderSpec,
};
pub use server::{DrainControl, InFlight, ProxyServer, ServerSettings};

//! One module per top-level command.

pub mod audit;
pub mod completions;
pub mod config_check;
pub mod credential;
pub mod exec;
pub mod serve;
pub mod session;
pub mod status;

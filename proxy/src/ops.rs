//! The ops listener (plain HTTP, loopback by default): `/metrics`, `/healthz`, `/readyz`. The
//! code is shared with the agent and the Auth server in `postern_ops::http`.

pub use postern_ops::http::{Ready, serve};

//! # postern-benches
//!
//! - `benches/micro.rs`: criterion micro-benches of the hot pieces (control codec, routing table
//!   under contention, certificate checks): `cargo bench -p postern-benches --bench micro`.
//! - [`e2e`] (binary `postern-e2e`): the end-to-end comparison of direct loopback TCP, Postern
//!   (client → proxy → agent → service, real binaries, the agent on SSH and on QUIC) and an
//!   OpenSSH `-R`/`-L` chain through a loopback sshd, in one run, with the isolation and
//!   stalled-stream figures and the flow-control knobs in effect: `benches/compare.sh`.
//! - [`isolation`]: one slow or stalled client against the others and against the proxy's
//!   memory; used by `postern-e2e` and `postern-loadtest --isolation`.
//! - [`proc_stats`]: RSS and CPU of processes, read from `/proc`.

pub mod e2e;
pub mod isolation;
pub mod proc_stats;

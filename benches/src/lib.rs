//! # postern-benches
//!
//! - `benches/micro.rs`: criterion micro-benches of the hot pieces (control codec, routing table
//!   under contention, certificate checks): `cargo bench -p postern-benches --bench micro`.
//! - `src/bin/e2e.rs` (`postern-e2e`): the end-to-end comparison of direct loopback TCP, Postern
//!   (client → proxy → agent → service, real binaries) and an OpenSSH `-R`/`-L` chain through a
//!   loopback sshd, in one run: `benches/compare.sh`.
//! - [`proc_stats`]: RSS and CPU of processes, read from `/proc`.

pub mod proc_stats;

//! CA rotation (`pctl auth rotate`): one phase machine, parameterised by CA kind (SSH host,
//! SSH user or TLS), as Teleport does it.
//!
//! Phases, in order: `standby → init → update_clients → update_servers → standby`, and a
//! rollback: from `init` straight back to `standby` (the new key never signed), from
//! `update_clients` or `update_servers` through a phase of its own, `rollback`, in which both keys
//! stay trusted and the old one signs again, so that whoever renewed from the new key can renew
//! back (agents and proxies are told at once: the signer changed); `--phase standby` then drops
//! the new key. What each means:
//!
//! | phase | trusted keys | signing key |
//! |---|---|---|
//! | `standby` | current | current |
//! | `init`, `rollback` | current, next | current |
//! | `update_clients`, `update_servers` | current, next | next |
//!
//! The TLS CA signs two kinds of certificates: client certificates switch to the new CA at
//! `update_clients`, the Auth server's own serving certificate at `update_servers` (the API
//! listener rebuilds its TLS config without a restart, see [`crate::server_tls`]). Identity
//! files issued during a rotation carry both CA certificates.
//!
//! Completing (`update_servers → standby`) makes `next` the current key and drops the old one from
//! every trust list (the TLS CA's old certificate is kept as `retired`, public part only, so that
//! its client certificates are refused with a reason; a TLS CA rollback keeps the dropped new CA's
//! certificate there likewise). The state of each CA kind is one storage row (kind `ca_rotation`,
//! written conditionally on its revision), so an Auth restart resumes the phase it was in and two
//! Auth servers on one backend cannot both advance it. In automatic mode each phase lasts a third
//! of the grace period; [`run`] advances it. The row holds private keys: its kind is not in the
//! policy change feed, so it never leaves the Auth server.

use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::{LineEnding, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::authority::Authorities;
use crate::storage::{Backend, Condition, StorageError};

mod rpc;
pub use rpc::{list_rpc, rotate_rpc};

/// Storage kind of the rotation rows (one per CA kind, named by [`CaKind::as_str`]).
const ROW_KIND: &str = "ca_rotation";
/// How often [`run`] looks at the stored state.
const TICK: Duration = Duration::from_millis(500);

/// Which CA a rotation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    /// The SSH host CA (agents' and proxies' certificates).
    Host,
    /// The SSH user CA (users' and bots' certificates).
    User,
    /// The TLS CA (client certificates of the Auth API and the Auth server's own).
    Tls,
}

impl CaKind {
    /// Every kind.
    pub const ALL: [CaKind; 3] = [CaKind::Host, CaKind::User, CaKind::Tls];

    /// Its name in `pctl auth rotate --type=…` and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            CaKind::Host => "host",
            CaKind::User => "user",
            CaKind::Tls => "tls",
        }
    }

    /// Parses `host`, `user` or `tls`.
    pub fn parse(s: &str) -> Result<CaKind, RotationError> {
        match s {
            "host" => Ok(CaKind::Host),
            "user" => Ok(CaKind::User),
            "tls" => Ok(CaKind::Tls),
            other => Err(RotationError::Refused(format!(
                "type '{other}' cannot be rotated: give host, user or tls"
            ))),
        }
    }
}

/// A rotation phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No rotation under way: one key, trusted and signing.
    Standby,
    /// A new key is trusted everywhere; the old one still signs.
    Init,
    /// The new key signs renewals and logins; both are trusted.
    UpdateClients,
    /// As `update_clients`; servers (proxies, agents) renew from the new key.
    UpdateServers,
    /// Rolling back: both keys trusted, the old one signs again; `standby` drops the new one.
    Rollback,
}

impl Phase {
    /// Its name, as `pctl` prints and takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Standby => "standby",
            Phase::Init => "init",
            Phase::UpdateClients => "update_clients",
            Phase::UpdateServers => "update_servers",
            Phase::Rollback => "rollback",
        }
    }

    /// The phase after this one in a rotation.
    fn next(self) -> Phase {
        match self {
            Phase::Standby => Phase::Init,
            Phase::Init => Phase::UpdateClients,
            Phase::UpdateClients => Phase::UpdateServers,
            Phase::UpdateServers | Phase::Rollback => Phase::Standby,
        }
    }

    /// Whether the new key signs in this phase.
    fn new_key_signs(self) -> bool {
        matches!(self, Phase::UpdateClients | Phase::UpdateServers)
    }
}

/// A refused or failed rotation request.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The request does not fit the current state (the message says why and what to do).
    #[error("{0}")]
    Refused(String),
    /// Another Auth server changed the rotation at the same time.
    #[error(
        "the rotation was changed concurrently by another Auth server: look at `pctl status` and retry"
    )]
    Conflict,
    /// The stored state does not parse.
    #[error("stored {kind} CA rotation state is corrupt: {message}")]
    Corrupt {
        /// The CA kind.
        kind: &'static str,
        /// What failed.
        message: String,
    },
}

/// The stored state of one CA kind's rotation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationState {
    /// The phase.
    pub phase: Phase,
    /// Manual mode: only `pctl auth rotate --phase` moves it.
    pub manual: bool,
    /// Unix seconds the current rotation started (0: never rotated).
    pub started: u64,
    /// Grace period, seconds (automatic mode: each phase lasts a third of it).
    pub grace_secs: u64,
    /// The current key (OpenSSH private key text; for the TLS CA, the key's and certificate's
    /// PEM).
    current: String,
    /// The new key during a rotation.
    next: Option<String>,
    /// Unix seconds the last rotation completed.
    pub last_rotated: Option<u64>,
    /// The TLS CA certificate (PEM) the last completed rotation retired, or the last rollback
    /// dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retired: Option<String>,
}

impl RotationState {
    /// The unix second at which automatic mode moves to the next phase.
    pub fn deadline(&self) -> Option<u64> {
        let third = self.grace_secs / 3;
        match (self.manual, self.phase) {
            (true, _) | (_, Phase::Standby) | (_, Phase::Rollback) => None,
            (false, Phase::Init) => Some(self.started + third),
            (false, Phase::UpdateClients) => Some(self.started + 2 * third),
            (false, Phase::UpdateServers) => Some(self.started + self.grace_secs),
        }
    }

    /// The keys this state trusts and the one that signs.
    fn keys(&self, kind: CaKind) -> Result<Keys, RotationError> {
        let corrupt = |message: String| RotationError::Corrupt {
            kind: kind.as_str(),
            message,
        };
        if kind == CaKind::Tls {
            let parse = |t: &str| crate::tls_ca::TlsSigner::parse(t).map_err(corrupt);
            return Ok(Keys::Tls {
                current: parse(&self.current)?,
                next: self.next.as_deref().map(parse).transpose()?,
                phase: self.phase,
                completed: self.last_rotated.is_some(),
                retired: self.retired.clone(),
            });
        }
        let parse = |t: &str| PrivateKey::from_openssh(t).map_err(|e| corrupt(e.to_string()));
        let current = parse(&self.current)?;
        let next = self.next.as_deref().map(parse).transpose()?;
        let signer = match (&next, self.phase.new_key_signs()) {
            (Some(n), true) => n.clone(),
            _ => current.clone(),
        };
        let server_signer = match (&next, self.phase) {
            (Some(n), Phase::UpdateServers) => n.clone(),
            _ => current.clone(),
        };
        let mut trusted = vec![current.public_key().clone()];
        trusted.extend(next.iter().map(|n| n.public_key().clone()));
        Ok(Keys::Ssh(CaKeys {
            signer,
            server_signer,
            trusted,
            phase: self.phase,
        }))
    }
}

/// A rotation state's keys, ready to apply to [`Authorities`] (short-lived: its size is no
/// concern).
#[allow(clippy::large_enum_variant)]
enum Keys {
    /// An SSH CA's.
    Ssh(CaKeys),
    /// The TLS CA's (built by [`Authorities`], which holds the migration's certificates).
    Tls {
        current: crate::tls_ca::TlsSigner,
        next: Option<crate::tls_ca::TlsSigner>,
        phase: Phase,
        completed: bool,
        retired: Option<String>,
    },
}

impl Keys {
    /// Whether `a` holds these keys already.
    fn applied(&self, a: &Authorities, kind: CaKind) -> bool {
        match self {
            Keys::Ssh(k) => {
                let now = a.ca_keys(kind);
                now.trusted == k.trusted && now.phase == k.phase
            }
            Keys::Tls {
                current,
                next,
                phase,
                retired,
                ..
            } => {
                let now = a.tls_keys();
                let mut want: Vec<&String> = std::iter::once(&current.cert_pem)
                    .chain(next.iter().map(|n| &n.cert_pem))
                    .collect();
                let mut have: Vec<&String> = now.trusted.iter().collect();
                want.sort();
                have.sort();
                want == have && now.phase == *phase && now.retired == *retired
            }
        }
    }

    /// Makes these the keys `a` trusts and signs with.
    fn apply(self, a: &Authorities, kind: CaKind) {
        match self {
            Keys::Ssh(k) => a.set_ca_keys(kind, k),
            Keys::Tls {
                current,
                next,
                phase,
                completed,
                retired,
            } => a.set_tls_rotation(current, next, phase, completed, retired),
        }
    }
}

/// The keys of one CA in memory: what signs now and what is trusted now.
#[derive(Clone)]
pub struct CaKeys {
    /// The key that signs new certificates.
    pub signer: PrivateKey,
    /// The key that signs servers' certificates (the host CA's, for proxies): the new key only
    /// from `update_servers`, as in Teleport, so that agents hold the new CA (announced by their
    /// renewal at `update_clients`) before any proxy presents a certificate from it.
    pub server_signer: PrivateKey,
    /// Every trusted public key (the signer's among them).
    pub trusted: Vec<PublicKey>,
    /// The rotation phase these keys belong to.
    pub phase: Phase,
}

impl CaKeys {
    /// One key, not rotating.
    pub fn single(key: PrivateKey) -> CaKeys {
        CaKeys {
            trusted: vec![key.public_key().clone()],
            server_signer: key.clone(),
            signer: key,
            phase: Phase::Standby,
        }
    }
}

/// A rotation request, from `pctl auth rotate`.
#[derive(Debug, Clone)]
pub struct RotateRequest {
    /// Which CA.
    pub kind: CaKind,
    /// The phase wanted: `None` starts an automatic rotation; `Some("rollback")` rolls back.
    pub phase: Option<String>,
    /// Manual mode (with `phase`).
    pub manual: bool,
    /// Grace period, seconds.
    pub grace_secs: u64,
}

fn load(
    b: &dyn Backend,
    a: &Authorities,
    kind: CaKind,
) -> Result<(RotationState, Option<u64>), RotationError> {
    match b.get(ROW_KIND, kind.as_str())? {
        Some(item) => serde_json::from_str(&item.value)
            .map(|s| (s, Some(item.revision)))
            .map_err(|e| RotationError::Corrupt {
                kind: kind.as_str(),
                message: e.to_string(),
            }),
        None => Ok((
            RotationState {
                phase: Phase::Standby,
                manual: false,
                started: 0,
                grace_secs: 0,
                current: current_material(a, kind)?,
                next: None,
                last_rotated: None,
                retired: None,
            },
            None,
        )),
    }
}

/// The key `a` signs with now, as a rotation state stores it.
fn current_material(a: &Authorities, kind: CaKind) -> Result<String, RotationError> {
    match kind {
        CaKind::Tls => Ok(a.tls_material()),
        _ => openssh(&a.ca_keys(kind).signer),
    }
}

/// A new key of `kind`, as a rotation state stores it.
fn new_material(a: &Authorities, kind: CaKind) -> Result<String, RotationError> {
    match kind {
        CaKind::Tls => {
            crate::tls_ca::TlsSigner::generate(&a.cluster, crate::authority::BACKDATE_SECS)
                .map(|s| s.material())
                .map_err(|e| RotationError::Refused(format!("cannot make a new TLS CA: {e}")))
        }
        _ => openssh(&postern_dial::mint::generate_key()),
    }
}

fn openssh(k: &PrivateKey) -> Result<String, RotationError> {
    k.to_openssh(LineEnding::LF)
        .map(|z| z.to_string())
        .map_err(|e| RotationError::Refused(format!("cannot encode a CA key: {e}")))
}

fn store(
    b: &dyn Backend,
    kind: CaKind,
    s: &RotationState,
    revision: Option<u64>,
) -> Result<(), RotationError> {
    let json = serde_json::to_string(s).expect("rotation state serializes");
    let cond = match revision {
        Some(r) => Condition::Revision(r),
        None => Condition::Absent,
    };
    match b.put(ROW_KIND, kind.as_str(), &json, cond) {
        Ok(_) => Ok(()),
        Err(StorageError::Exists { .. }) | Err(StorageError::Conflict { .. }) => {
            Err(RotationError::Conflict)
        }
        Err(e) => Err(e.into()),
    }
}

/// The state of `kind`'s rotation, as stored (standby with the loaded key if never rotated).
pub fn status(
    b: &dyn Backend,
    a: &Authorities,
    kind: CaKind,
) -> Result<RotationState, RotationError> {
    Ok(load(b, a, kind)?.0)
}

/// Moves `req.kind`'s rotation as asked, stores it and applies it to `a`; returns the new state.
pub fn rotate(
    b: &dyn Backend,
    a: &Authorities,
    req: &RotateRequest,
    now: u64,
) -> Result<RotationState, RotationError> {
    let (mut s, rev) = load(b, a, req.kind)?;
    let kind = req.kind.as_str();
    match req.phase.as_deref() {
        None | Some("init") if s.phase == Phase::Standby => {
            if req.phase.is_none() && req.manual {
                return Err(RotationError::Refused(
                    "--manual needs --phase (init, update_clients, update_servers, standby or rollback)".into(),
                ));
            }
            if req.grace_secs < 3 && !req.manual {
                return Err(RotationError::Refused(
                    "--grace-period must be at least 3s (each phase lasts a third of it)".into(),
                ));
            }
            s.phase = Phase::Init;
            s.manual = req.manual || req.phase.is_some();
            s.started = now;
            s.grace_secs = req.grace_secs;
            s.next = Some(new_material(a, req.kind)?);
        }
        None | Some("init") => {
            return Err(RotationError::Refused(format!(
                "a {kind} CA rotation is already in phase {}: finish it (--phase {}) or roll it back (--phase rollback)",
                s.phase.as_str(),
                s.phase.next().as_str()
            )));
        }
        Some("rollback") => {
            if s.phase == Phase::Standby {
                return Err(RotationError::Refused(format!(
                    "no {kind} CA rotation to roll back: it is in standby"
                )));
            }
            if s.phase == Phase::Rollback {
                return Err(RotationError::Refused(format!(
                    "the {kind} CA is already rolling back: --phase standby ends it (once everyone renewed from the old key)"
                )));
            }
            if s.phase == Phase::Init {
                // The new key never signed: nothing to renew back from.
                s.phase = Phase::Standby;
                drop_next(&mut s, req.kind);
            } else {
                // Certificates were issued from the new key: it stays trusted while their
                // holders renew from the old one, which signs again; standby drops it.
                s.phase = Phase::Rollback;
                s.manual = true;
            }
        }
        Some(wanted) => {
            let expected = s.phase.next();
            if wanted != expected.as_str() {
                return Err(RotationError::Refused(format!(
                    "the {kind} CA is in phase {}: the next phase is {}, not '{wanted}' (or --phase rollback)",
                    s.phase.as_str(),
                    expected.as_str()
                )));
            }
            advance(&mut s, req.kind, now);
        }
    }
    store(b, req.kind, &s, rev)?;
    s.keys(req.kind)?.apply(a, req.kind);
    info!(ca = kind, phase = s.phase.as_str(), "CA rotation moved");
    Ok(s)
}

/// Drops the new key of a rollback (of a TLS CA, its certificate is kept as `retired`, so that
/// its client certificates are refused with a reason, as an old CA's after a completed rotation).
fn drop_next(s: &mut RotationState, kind: CaKind) {
    let dropped = s.next.take();
    if kind == CaKind::Tls {
        s.retired = dropped.as_deref().and_then(crate::tls_ca::material_cert);
    }
}

/// One step forward; completing makes the new key the current one (of an old TLS CA, its
/// certificate is kept as `retired`); completing a rollback drops the new key.
fn advance(s: &mut RotationState, kind: CaKind, now: u64) {
    if s.phase == Phase::Rollback {
        s.phase = Phase::Standby;
        drop_next(s, kind);
        return;
    }
    s.phase = s.phase.next();
    if s.phase == Phase::Standby {
        if let Some(next) = s.next.take() {
            let old = std::mem::replace(&mut s.current, next);
            if kind == CaKind::Tls {
                s.retired = crate::tls_ca::material_cert(&old);
            }
        }
        s.last_rotated = Some(now);
    }
}

/// Loads every stored rotation into `a` (at start: an Auth restart resumes the phase it was in).
pub fn resume(b: &dyn Backend, a: &Authorities) -> Result<(), RotationError> {
    for kind in CaKind::ALL {
        let (s, rev) = load(b, a, kind)?;
        if rev.is_some() {
            s.keys(kind)?.apply(a, kind);
            info!(
                ca = kind.as_str(),
                phase = s.phase.as_str(),
                "CA rotation state loaded"
            );
        }
    }
    Ok(())
}

/// Until `stop`: advances automatic rotations whose phase is over, and applies what another Auth
/// server on the same backend stored.
pub async fn run(b: Arc<dyn Backend>, a: Arc<Authorities>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.cancelled() => return,
        }
        for kind in CaKind::ALL {
            if let Err(e) = advance_due(b.as_ref(), &a, kind, postern_dial::mint::now_unix()) {
                warn!(ca = kind.as_str(), error = %e, "CA rotation step failed: retrying");
            }
        }
    }
}

/// One step of [`run`] for `kind` at `now`: moves an automatic rotation whose phase is over to
/// the next phase (a conditional write: of two Auth servers, one does it), then applies the
/// stored state to `a`.
pub fn advance_due(
    b: &dyn Backend,
    a: &Authorities,
    kind: CaKind,
    now: u64,
) -> Result<(), RotationError> {
    let (mut s, rev) = load(b, a, kind)?;
    let Some(rev) = rev else { return Ok(()) };
    if s.deadline().is_some_and(|d| now >= d) {
        advance(&mut s, kind, now);
        match store(b, kind, &s, Some(rev)) {
            Ok(()) => info!(
                ca = kind.as_str(),
                phase = s.phase.as_str(),
                "CA rotation advanced"
            ),
            Err(RotationError::Conflict) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    let keys = s.keys(kind)?;
    if !keys.applied(a, kind) {
        keys.apply(a, kind);
    }
    Ok(())
}

//! When a certificate renews, for agents and proxies alike: at two-thirds of the life it had
//! left, or sooner when the cluster's host CA signs with another key than the one that signed it
//! (a rotation reached `update_clients`, or rolled back). Then the renewal comes at a random
//! moment within a spread, so a fleet picks up a rotated CA in that time without every member
//! asking at once.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// What the cluster says about its host CA: the key that signs now, and the spread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerHint {
    /// Fingerprint of the key that signs host certificates now (`SHA256:…`).
    pub fingerprint: String,
    /// Seconds within which to renew, at a random moment, if the certificate's signer differs.
    pub spread_secs: u32,
}

/// Posts `hint`; followers wake only if it changed.
pub fn post(hints: &watch::Sender<Option<SignerHint>>, hint: SignerHint) {
    hints.send_if_modified(|cur| {
        let changed = cur.as_ref() != Some(&hint);
        *cur = Some(hint);
        changed
    });
}

/// Waits until a renewal is due: `d` from now, or sooner, at a random moment within the spread,
/// when a hint names a signer other than `ours` (the current certificate's, `SHA256:…`). Hints
/// already seen do not count again. True when `stop` came first.
pub async fn wait_due(
    stop: &CancellationToken,
    d: Duration,
    mut hints: Option<&mut watch::Receiver<Option<SignerHint>>>,
    ours: &str,
) -> bool {
    let mut due = Instant::now() + d;
    loop {
        let changed = async {
            match hints.as_deref_mut() {
                Some(rx) => match rx.changed().await {
                    Ok(()) => rx.borrow_and_update().clone(),
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return true,
            _ = tokio::time::sleep_until(due) => return false,
            hint = changed => {
                let Some(hint) = hint.filter(|h| h.fingerprint != ours) else {
                    continue;
                };
                let within = Duration::from_millis(rand::random_range(
                    0..=u64::from(hint.spread_secs) * 1000,
                ));
                info!(
                    signer = %hint.fingerprint,
                    ours,
                    renew_in_ms = within.as_millis() as u64,
                    "the cluster's host CA signs with another key now (a rotation): renewing early"
                );
                due = due.min(Instant::now() + within);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(fp: &str, spread_secs: u32) -> SignerHint {
        SignerHint {
            fingerprint: fp.into(),
            spread_secs,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_signer_brings_the_renewal_forward_within_the_spread() {
        let stop = CancellationToken::new();
        let (tx, mut rx) = watch::channel(None);
        let start = Instant::now();
        let waiter = async { wait_due(&stop, Duration::from_secs(3600), Some(&mut rx), "A").await };
        let poster = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            post(&tx, hint("A", 5)); // our own signer: nothing changes
            tokio::time::sleep(Duration::from_secs(1)).await;
            post(&tx, hint("B", 5));
            std::future::pending::<()>().await
        };
        tokio::select! {
            stopped = waiter => assert!(!stopped),
            _ = poster => unreachable!(),
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took <= Duration::from_secs(7),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_hints_it_waits_the_whole_time_and_stop_ends_it() {
        let stop = CancellationToken::new();
        let start = Instant::now();
        assert!(!wait_due(&stop, Duration::from_secs(90), None, "A").await);
        assert_eq!(start.elapsed().as_secs(), 90);
        let (tx, mut rx) = watch::channel(None);
        drop(tx);
        stop.cancel();
        assert!(wait_due(&stop, Duration::from_secs(90), Some(&mut rx), "A").await);
    }
}

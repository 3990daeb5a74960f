//! `pctl get events --type=stream [--user=NAME] [--since=1h] [--format=json]`: the stream access
//! audit the proxies ship.

use clap::Args;
use postern_api::duration;
use postern_api::proto::{ListStreamEventsRequest, StreamEvent};
use postern_client::auth::AuthClient;

/// Filters of `pctl get events`.
#[derive(Args, Default)]
pub struct EventFilter {
    /// `stream`: stream opens, closes and refusals (from the proxies); default: API calls.
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// Only this user's events (with --type=stream).
    #[arg(long)]
    pub user: Option<String>,
    /// Only events this recent (e.g. 1h, 30m; with --type=stream).
    #[arg(long)]
    pub since: Option<String>,
}

fn json(e: &StreamEvent) -> serde_json::Value {
    serde_json::json!({
        "id": e.id, "time_ms": e.time_ms, "type": "stream", "kind": e.kind, "user": e.user,
        "key_id": e.key_id, "source": e.source, "cluster": e.cluster, "target": e.target,
        "proxy_id": e.proxy_id, "transport": e.transport, "bytes_in": e.bytes_in,
        "bytes_out": e.bytes_out, "duration_ms": e.duration_ms, "result": e.result,
        "reason": e.reason,
    })
}

/// Prints stream events, newest first: one JSON object per line, or text.
pub async fn print_stream(
    client: &AuthClient,
    f: &EventFilter,
    as_json: bool,
) -> anyhow::Result<()> {
    let since_ms = match &f.since {
        Some(s) => {
            let secs = duration::parse_secs(s).map_err(anyhow::Error::msg)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64;
            now.saturating_sub(secs * 1000)
        }
        None => 0,
    };
    let events = client
        .list_stream_events(ListStreamEventsRequest {
            user: f.user.clone().unwrap_or_default(),
            since_ms,
            limit: 1000,
        })
        .await?
        .events;
    for e in &events {
        if as_json {
            println!("{}", json(e));
        } else {
            println!(
                "{} {} {} {}.{} from {} via {} ({}) in={} out={} {}ms {} {}",
                e.time_ms,
                e.kind,
                e.user,
                e.target,
                e.cluster,
                e.source,
                e.proxy_id,
                e.transport,
                e.bytes_in,
                e.bytes_out,
                e.duration_ms,
                e.result,
                e.reason
            );
        }
    }
    Ok(())
}

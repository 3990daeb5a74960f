//! `pctl get events [--type=api|stream] [--user=NAME] [--since=1h|RFC3339] [--until=…]
//! [--limit=N] [--format=…]`: the API audit log (default) or the stream access audit the proxies
//! ship, newest first, times in RFC 3339.

use anyhow::Context;
use clap::Args;
use postern_api::duration;
use postern_api::proto::{
    AuditEvent, ListAuditEventsRequest, ListStreamEventsRequest, StreamEvent,
};
use postern_client::auth::AuthClient;
use serde::Serialize;

use crate::output::{self, Format, outln, rfc3339_ms};

/// Filters of `pctl get events`.
#[derive(Args, Default)]
pub struct EventFilter {
    /// `api`: API calls (default); `stream`: stream opens, closes and refusals (from the proxies).
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// Only this user's events.
    #[arg(long)]
    pub user: Option<String>,
    /// Only events at or after this: a duration back from now (`1h`, `2d`) or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only events before this: a duration back from now or an RFC 3339 time.
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many events (newest first).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

/// Most events fetched from the server to filter (its own cap).
const FETCH_MAX: u32 = 10_000;

/// A time bound as Unix milliseconds: `1h` (that long ago) or an RFC 3339 time.
fn bound_ms(flag: &str, text: &str) -> anyhow::Result<u64> {
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok((t.unix_timestamp_nanos() / 1_000_000).max(0) as u64);
    }
    let secs = duration::parse_secs(text)
        .map_err(anyhow::Error::msg)
        .with_context(|| {
            format!("--{flag}: '{text}' is neither a duration (1h, 2d) nor an RFC 3339 time")
        })?;
    Ok(output::now().saturating_sub(secs) * 1000)
}

/// An API call as printed in JSON and YAML.
#[derive(Serialize)]
struct ApiEventDoc<'a> {
    id: u64,
    time: String,
    #[serde(rename = "type")]
    kind: &'static str,
    user: &'a str,
    action: &'a str,
    resource: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    error: &'a str,
    peer: &'a str,
}

/// A stream event as printed in JSON and YAML.
#[derive(Serialize)]
struct StreamEventDoc<'a> {
    id: &'a str,
    time: String,
    #[serde(rename = "type")]
    kind: &'static str,
    /// `open`, `close` or `refused`.
    #[serde(rename = "kind")]
    event: &'a str,
    user: &'a str,
    key_id: &'a str,
    source: &'a str,
    cluster: &'a str,
    target: &'a str,
    proxy_id: &'a str,
    transport: &'a str,
    bytes_in: u64,
    bytes_out: u64,
    duration_ms: u64,
    result: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
}

/// Prints the events `f` selects in `format`.
pub async fn print(client: &AuthClient, f: &EventFilter, format: Format) -> anyhow::Result<()> {
    let since = f
        .since
        .as_deref()
        .map(|t| bound_ms("since", t))
        .transpose()?;
    let until = f
        .until
        .as_deref()
        .map(|t| bound_ms("until", t))
        .transpose()?;
    let in_window = |ms: u64| since.is_none_or(|s| ms >= s) && until.is_none_or(|u| ms < u);
    let limit = f.limit as usize;
    match f.kind.as_deref().unwrap_or("api") {
        "api" => {
            let filtered = f.user.is_some() || since.is_some() || until.is_some();
            let events: Vec<AuditEvent> = client
                .list_audit_events(ListAuditEventsRequest {
                    limit: if filtered {
                        FETCH_MAX
                    } else {
                        f.limit.min(FETCH_MAX)
                    },
                })
                .await?
                .events
                .into_iter()
                .filter(|e| f.user.as_ref().is_none_or(|u| &e.user == u) && in_window(e.time_ms))
                .take(limit)
                .collect();
            api(&events, format)
        }
        "stream" => {
            let events: Vec<StreamEvent> = client
                .list_stream_events(ListStreamEventsRequest {
                    user: f.user.clone().unwrap_or_default(),
                    since_ms: since.unwrap_or(0),
                    limit: FETCH_MAX,
                })
                .await?
                .events
                .into_iter()
                .filter(|e| in_window(e.time_ms))
                .take(limit)
                .collect();
            stream(&events, format)
        }
        other => anyhow::bail!(
            "--type '{other}': use api (API calls, the default) or stream (stream access events)"
        ),
    }
}

fn api(events: &[AuditEvent], format: Format) -> anyhow::Result<()> {
    if format != Format::Text {
        let docs: Vec<_> = events
            .iter()
            .map(|e| ApiEventDoc {
                id: e.id,
                time: rfc3339_ms(e.time_ms),
                kind: "api",
                user: &e.user,
                action: &e.action,
                resource: &e.resource,
                allowed: e.allowed,
                error: &e.error,
                peer: &e.peer,
            })
            .collect();
        return output::list(&docs, format);
    }
    for e in events {
        let verdict = if e.allowed { "allowed" } else { "DENIED" };
        outln!(
            "{} {} {} {} {} {}",
            rfc3339_ms(e.time_ms),
            e.user,
            e.action,
            e.resource,
            verdict,
            e.error
        );
    }
    Ok(())
}

fn stream(events: &[StreamEvent], format: Format) -> anyhow::Result<()> {
    if format != Format::Text {
        let docs: Vec<_> = events
            .iter()
            .map(|e| StreamEventDoc {
                id: &e.id,
                time: rfc3339_ms(e.time_ms),
                kind: "stream",
                event: &e.kind,
                user: &e.user,
                key_id: &e.key_id,
                source: &e.source,
                cluster: &e.cluster,
                target: &e.target,
                proxy_id: &e.proxy_id,
                transport: &e.transport,
                bytes_in: e.bytes_in,
                bytes_out: e.bytes_out,
                duration_ms: e.duration_ms,
                result: &e.result,
                reason: &e.reason,
            })
            .collect();
        return output::list(&docs, format);
    }
    for e in events {
        outln!(
            "{} {} {} {}.{} from {} via {} ({}) in={} out={} {}ms {} {}",
            rfc3339_ms(e.time_ms),
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
    Ok(())
}

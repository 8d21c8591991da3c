//! What tests assert on: every request with its source address and outcome, and counters per path, per
//! resource and per status. The log is a bounded ring (oldest dropped first) so a benchmark cannot grow it
//! without limit; counters are never dropped.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::http::Service;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    /// Increases by one per request, from 1.
    pub seq: u64,
    /// RFC 3339.
    pub time: String,
    pub service: Service,
    /// The local address the request came in on.
    pub listener: String,
    /// The peer address (`ip:port`) as the emulator saw it.
    pub source: String,
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    /// The case-folded resource the request was about: an ARM resource ID, `vault/secret`, a tenant, or for
    /// IMDS the instance the listener stands for.
    pub resource: Option<String>,
    /// For IMDS token requests, the client ID of the identity a token was issued for; for Entra token
    /// requests, the `client_id` the request named (granted or not).
    pub identity: Option<String>,
    /// The fault rule that answered or delayed the request.
    pub fault: Option<u64>,
    pub duration_us: u64,
    /// ARM: the request drew on a throttling bucket whose `Retry-After` window, given to an earlier request,
    /// was still open. A client that waits as told never sends one.
    #[serde(default)]
    pub inside_retry_after: bool,
}

tokio::task_local! {
    /// Whether the request being served was sent inside a `Retry-After` window.
    static INSIDE_RETRY_AFTER: std::cell::Cell<bool>;
}

/// Serves a request with [`note_inside_retry_after`] available to its handler; returns the response and
/// whether the handler noted it.
pub(crate) async fn noting_retry_after<T>(serve: impl Future<Output = T>) -> (T, bool) {
    INSIDE_RETRY_AFTER
        .scope(std::cell::Cell::new(false), async {
            let out = serve.await;
            (out, INSIDE_RETRY_AFTER.with(std::cell::Cell::get))
        })
        .await
}

/// Notes that the request being served was sent inside a `Retry-After` window.
pub(crate) fn note_inside_retry_after() {
    let _ = INSIDE_RETRY_AFTER.try_with(|flag| flag.set(true));
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    pub total: u64,
    pub by_service: BTreeMap<String, u64>,
    /// Keyed by `METHOD /path` with the path case-folded.
    pub by_path: BTreeMap<String, u64>,
    pub by_resource: BTreeMap<String, u64>,
    pub by_status: BTreeMap<String, u64>,
}

/// Which records to return.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LogFilter {
    pub service: Option<Service>,
    /// Only records with `seq` greater than this.
    pub since: Option<u64>,
    /// Only records whose source IP (without port) is this.
    pub source_ip: Option<String>,
    pub path_contains: Option<String>,
    pub status: Option<u16>,
}

impl LogFilter {
    fn keeps(&self, r: &RequestRecord) -> bool {
        self.service.is_none_or(|s| s == r.service)
            && self.since.is_none_or(|s| r.seq > s)
            && self.status.is_none_or(|s| s == r.status)
            && self
                .source_ip
                .as_deref()
                .is_none_or(|ip| source_ip(&r.source) == ip)
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| r.path.to_ascii_lowercase().contains(&p.to_ascii_lowercase()))
    }
}

/// The IP part of `ip:port` or `[v6]:port`.
pub fn source_ip(source: &str) -> &str {
    match source.rsplit_once(':') {
        Some((ip, _)) => ip.trim_start_matches('[').trim_end_matches(']'),
        None => source,
    }
}

#[derive(Debug)]
pub struct RequestLog {
    capacity: usize,
    next_seq: u64,
    records: VecDeque<RequestRecord>,
    counters: Counters,
}

impl RequestLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            next_seq: 1,
            records: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    /// Stores a record, giving it its sequence number.
    pub fn push(&mut self, mut r: RequestRecord) -> u64 {
        r.seq = self.next_seq;
        self.next_seq += 1;
        let c = &mut self.counters;
        c.total += 1;
        *c.by_service.entry(r.service.as_str().to_owned()).or_default() += 1;
        *c.by_path
            .entry(format!("{} {}", r.method, r.path.to_ascii_lowercase()))
            .or_default() += 1;
        *c.by_status.entry(r.status.to_string()).or_default() += 1;
        if let Some(res) = &r.resource {
            *c.by_resource.entry(res.clone()).or_default() += 1;
        }
        if self.records.len() == self.capacity {
            self.records.pop_front();
        }
        self.records.push_back(r);
        self.next_seq - 1
    }

    pub fn query(&self, f: &LogFilter) -> Vec<RequestRecord> {
        self.records.iter().filter(|r| f.keeps(r)).cloned().collect()
    }

    pub fn counters(&self) -> Counters {
        self.counters.clone()
    }

    /// The sequence number of the latest record (0 when none); pass as `since` to see only what follows.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Empties log and counters; sequence numbers keep increasing.
    pub fn clear(&mut self) {
        self.records.clear();
        self.counters = Counters::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &str, status: u16, source: &str) -> RequestRecord {
        RequestRecord {
            seq: 0,
            time: String::new(),
            service: Service::Imds,
            listener: "127.0.0.1:80".into(),
            source: source.into(),
            method: "GET".into(),
            path: path.into(),
            query: String::new(),
            status,
            resource: Some("/r".into()),
            identity: None,
            fault: None,
            duration_us: 1,
            inside_retry_after: false,
        }
    }

    #[test]
    fn ring_drops_oldest_but_counters_keep_everything() {
        let mut log = RequestLog::new(2);
        for n in 0..3 {
            log.push(rec(&format!("/P{n}"), 200 + n, "10.0.0.1:5"));
        }
        let all = log.query(&LogFilter::default());
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 3]);
        let c = log.counters();
        assert_eq!(c.total, 3);
        assert_eq!(c.by_path["GET /p0"], 1);
        assert_eq!(c.by_resource["/r"], 3);
        assert_eq!(c.by_status["202"], 1);
        assert_eq!(log.last_seq(), 3);
    }

    #[test]
    fn filters_by_source_ip_sequence_and_status() {
        let mut log = RequestLog::new(10);
        log.push(rec("/a", 200, "10.0.0.1:5"));
        log.push(rec("/a", 400, "[::1]:7"));
        log.push(rec("/b", 200, "10.0.0.2:5"));
        let f = |f: LogFilter| log.query(&f).into_iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(
            f(LogFilter {
                source_ip: Some("::1".into()),
                ..LogFilter::default()
            }),
            vec![2]
        );
        assert_eq!(
            f(LogFilter {
                since: Some(1),
                status: Some(200),
                ..LogFilter::default()
            }),
            vec![3]
        );
        assert_eq!(
            f(LogFilter {
                path_contains: Some("A".into()),
                ..LogFilter::default()
            }),
            vec![1, 2]
        );
    }
}

//! Prometheus metrics, all prefixed `pod_identity_`. Every label takes values from a small fixed set
//! (routes, status codes, outcomes, kinds): pod and namespace names go to logs and Events, never to
//! labels, so the series count does not grow with the pods of the cluster. The one exception is the
//! `identity` of [`Metrics::first_token`]: its values are AzureIdentity objects an administrator created
//! and bound to pods of this node, which no pod can add to.

use std::sync::OnceLock;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of served requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route (`token`, `instance`, `variant`...).
    pub route: &'static str,
    /// HTTP status code.
    pub code: u16,
}

/// A route label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route.
    pub route: &'static str,
}

/// A decision or outcome label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// Outcome.
    pub result: &'static str,
}

/// Labels of upstream calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// `imds` or `entra`.
    pub upstream: &'static str,
    /// `ok` or the error class.
    pub result: &'static str,
}

/// Upstream label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamOnly {
    /// `imds` or `entra`.
    pub upstream: &'static str,
}

/// Why something was shed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `per_source` or `total`.
    pub reason: &'static str,
}

/// The AzureIdentity a pod was served, as `namespace/name`, or `node` for a pod excepted by an
/// `AzurePodIdentityException` (which gets the node's identities).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    /// `namespace/name` of the AzureIdentity, or `node`.
    pub identity: String,
}

/// Object kind label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Kubernetes kind, lower case.
    pub kind: &'static str,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route and status code.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to answer, by route.
    pub request_duration: Family<RouteLabels, Histogram>,
    /// Identity decisions for token requests.
    pub decisions: Family<ResultLabels, Counter>,
    /// Token cache lookups by outcome.
    pub cache: Family<ResultLabels, Counter>,
    /// Entries in the token cache.
    pub cache_entries: Gauge,
    /// Upstream calls by upstream and result.
    pub upstream: Family<UpstreamLabels, Counter>,
    /// Upstream call latency.
    pub upstream_duration: Family<UpstreamOnly, Histogram>,
    /// Time requests waited for an assignment or a pod to appear.
    pub wait_duration: Histogram,
    /// Time from pod creation to the first token of each of its identities.
    pub first_token: Family<IdentityLabels, Histogram>,
    /// Rule checks by result (`unchanged`, `repaired`, `error`).
    pub rule_syncs: Family<ResultLabels, Counter>,
    /// 1 while every interception rule is in place.
    pub rules_in_place: Gauge,
    /// 1 while the agent is ready.
    pub ready: Gauge,
    /// Objects the watches hold, by kind.
    pub objects: Family<KindLabels, Gauge>,
    /// Kubernetes Events emitted, by result.
    pub events: Family<ResultLabels, Counter>,
    /// Connections shed at accept, by reason (`per_source`, `total`).
    pub connections_shed: Family<ReasonLabels, Counter>,
    /// Connections open to the endpoint.
    pub open_connections: Gauge,
    /// Callers attested, by what they were found to be (`pod`, `node`, `spoofed`, `unknown`).
    pub attestations: Family<ResultLabels, Counter>,
    /// Time to attest a caller, by kind of lookup (`host`, `pod_network`).
    pub attestation_duration: Family<KindLabels, Histogram>,
    /// Audit records by result (`written`, `folded`, `dropped`, `failed`).
    pub audit_records: Family<ResultLabels, Counter>,
    /// Token requests waiting now for their pod to be known or their identity to be assigned.
    pub waiting_requests: Gauge,
    /// The series every served cached token counts in, looked up once.
    served: ServedSeries,
}

/// The series of a token answered from the cache, each looked up in its family on first use and kept:
/// the requests of a busy node count in them without hashing their labels or taking the family's lock
/// each time. A series still appears when first counted, as any other.
#[derive(Debug, Default)]
struct ServedSeries {
    /// `requests{route="token",code="200"}`.
    answered: OnceLock<Counter>,
    /// `request_duration_seconds{route="token"}`.
    duration: OnceLock<Histogram>,
    /// `token_decisions{result="served"}`.
    served: OnceLock<Counter>,
    /// `token_cache_lookups{result="hit"}`.
    hit: OnceLock<Counter>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

fn slow_buckets() -> impl Iterator<Item = f64> {
    [
        0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ]
    .into_iter()
}

impl Metrics {
    /// All metrics, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pod_identity");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests to the metadata address, by route and status code",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "request_duration_seconds",
            "Time to answer a request, by route",
            request_duration.clone(),
        );
        let decisions = Family::<ResultLabels, Counter>::default();
        registry.register(
            "token_decisions",
            "Token requests by decision (served, denied, excepted, timeout, upstream_error, invalid)",
            decisions.clone(),
        );
        let cache = Family::<ResultLabels, Counter>::default();
        registry.register(
            "token_cache_lookups",
            "Token cache lookups by outcome (hit, miss, coalesced, recent_failure)",
            cache.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "token_cache_entries",
            "Entries in the token cache",
            cache_entries.clone(),
        );
        let upstream = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Calls to IMDS and Entra, by upstream and result",
            upstream.clone(),
        );
        let upstream_duration =
            Family::<UpstreamOnly, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "upstream_duration_seconds",
            "Latency of calls to IMDS and Entra",
            upstream_duration.clone(),
        );
        let wait_duration = Histogram::new(slow_buckets());
        registry.register(
            "wait_duration_seconds",
            "Time token requests waited for an assignment or for their pod to be known",
            wait_duration.clone(),
        );
        let first_token =
            Family::<IdentityLabels, Histogram>::new_with_constructor(|| Histogram::new(slow_buckets()));
        registry.register(
            "pod_first_token_seconds",
            "Time from a pod's creation to the first token it was served of an identity, by identity \
             (namespace/name of the AzureIdentity; node for a pod excepted by an AzurePodIdentityException)",
            first_token.clone(),
        );
        let rule_syncs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "iptables_syncs",
            "Checks of the interception rules by result (unchanged, repaired, error)",
            rule_syncs.clone(),
        );
        let rules_in_place = Gauge::default();
        registry.register(
            "iptables_rules_in_place",
            "1 while every interception rule is in place",
            rules_in_place.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 while the agent is ready", ready.clone());
        let objects = Family::<KindLabels, Gauge>::default();
        registry.register(
            "watched_objects",
            "Objects the agent's watches hold, by kind",
            objects.clone(),
        );
        let events = Family::<ResultLabels, Counter>::default();
        registry.register(
            "kubernetes_events",
            "Kubernetes Events emitted about refused pods, by result (sent, suppressed, failed)",
            events.clone(),
        );
        let connections_shed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_shed",
            "Connections to the endpoint closed at once with 503 because a limit was reached, by reason \
             (per_source: the source address holds its share; total: all callers do)",
            connections_shed.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Connections open to the endpoint",
            open_connections.clone(),
        );
        let attestations = Family::<ResultLabels, Counter>::default();
        registry.register(
            "caller_attestations",
            "Callers attested from the kernel's view of their sockets, by result (pod, node, spoofed, unknown)",
            attestations.clone(),
        );
        let attestation_duration =
            Family::<KindLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "caller_attestation_duration_seconds",
            "Time to attest a caller, by lookup (host: the process holding a host socket; pod_network: the \
             socket in the pod its address names)",
            attestation_duration.clone(),
        );
        let audit_records = Family::<ResultLabels, Counter>::default();
        registry.register(
            "audit_records",
            "Token decisions given to the audit stream, by result (written; folded into a window's closing \
             record; dropped because the queue was full; failed to write)",
            audit_records.clone(),
        );
        let waiting_requests = Gauge::default();
        registry.register(
            "waiting_requests",
            "Token requests waiting now for their pod to be known or their identity to be assigned",
            waiting_requests.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            decisions,
            cache,
            cache_entries,
            upstream,
            upstream_duration,
            wait_duration,
            first_token,
            rule_syncs,
            rules_in_place,
            ready,
            objects,
            events,
            connections_shed,
            open_connections,
            attestations,
            attestation_duration,
            audit_records,
            waiting_requests,
            served: ServedSeries::default(),
        }
    }

    /// Counts an answered request of `route` with status `code`, and the time it took.
    pub fn answered(&self, route: &'static str, code: u16, seconds: f64) {
        if route == "token" && code == 200 {
            let served = &self.served;
            let duration = served.duration.get_or_init(|| {
                self.request_duration
                    .get_or_create(&RouteLabels { route })
                    .clone()
            });
            duration.observe(seconds);
            let answered = served.answered.get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels { route, code })
                    .clone()
            });
            answered.inc();
            return;
        }
        self.request_duration
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
        self.requests.get_or_create(&RequestLabels { route, code }).inc();
    }

    /// Counts a token decision (`served`, `denied`, `excepted`...).
    pub fn decided(&self, result: &'static str) {
        count(&self.decisions, result, ("served", &self.served.served));
    }

    /// Counts a token cache lookup by outcome (`hit`, `miss`...).
    pub fn looked_up(&self, result: &'static str) {
        count(&self.cache, result, ("hit", &self.served.hit));
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Counts `result` in `family`; the `kept` result through its series kept on first use.
fn count(family: &Family<ResultLabels, Counter>, result: &'static str, kept: (&str, &OnceLock<Counter>)) {
    let (kept_result, series) = kept;
    if result == kept_result {
        series
            .get_or_init(|| family.get_or_create(&ResultLabels { result }).clone())
            .inc();
    } else {
        family.get_or_create(&ResultLabels { result }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_the_prefix_and_bounded_labels() {
        let metrics = Metrics::new();
        metrics
            .requests
            .get_or_create(&RequestLabels {
                route: "token",
                code: 200,
            })
            .inc();
        metrics.cache.get_or_create(&ResultLabels { result: "hit" }).inc();
        metrics
            .request_duration
            .get_or_create(&RouteLabels { route: "token" })
            .observe(0.000_2);
        let text = metrics.render();
        assert!(
            text.contains("pod_identity_requests_total{route=\"token\",code=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pod_identity_token_cache_lookups_total{result=\"hit\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE pod_identity_request_duration_seconds histogram"));
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            assert!(line.starts_with("pod_identity_"), "{line}");
        }
    }

    #[test]
    fn series_counted_through_the_kept_handles_are_the_familys_and_appear_when_first_counted() {
        let metrics = Metrics::new();
        let before = metrics.render();
        assert!(!before.contains("route=\"token\""), "{before}");
        assert!(!before.contains("result=\"served\""), "{before}");
        assert!(!before.contains("result=\"hit\""), "{before}");
        for _ in 0..3 {
            metrics.answered("token", 200, 0.000_2);
            metrics.decided("served");
            metrics.looked_up("hit");
        }
        metrics.answered("token", 403, 0.000_2);
        metrics.answered("instance", 200, 0.002);
        metrics.decided("denied");
        metrics.looked_up("miss");
        let text = metrics.render();
        for line in [
            "pod_identity_requests_total{route=\"token\",code=\"200\"} 3",
            "pod_identity_requests_total{route=\"token\",code=\"403\"} 1",
            "pod_identity_requests_total{route=\"instance\",code=\"200\"} 1",
            "pod_identity_request_duration_seconds_count{route=\"token\"} 4",
            "pod_identity_request_duration_seconds_count{route=\"instance\"} 1",
            "pod_identity_token_decisions_total{result=\"served\"} 3",
            "pod_identity_token_decisions_total{result=\"denied\"} 1",
            "pod_identity_token_cache_lookups_total{result=\"hit\"} 3",
            "pod_identity_token_cache_lookups_total{result=\"miss\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}

//! Prometheus metrics, all prefixed `pod_identity_`. Labels are bounded: operations and outcomes are
//! fixed words, never object names or URLs.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Labels of ARM calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ArmLabels {
    /// `vmss_get`, `vmss_patch`, `vm_get`, `vm_patch`.
    pub operation: String,
    /// `ok` or the kind of failure (`throttled`, `transient`, `identity_rejected`...).
    pub status: String,
}

/// Labels of Kubernetes writes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeLabels {
    /// `create`, `patch`, `release`.
    pub operation: String,
    /// `ok`, `conflict`, `not_found`, `error`.
    pub result: String,
}

/// Labels naming what was reconciled.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `plan` (the whole cluster) or `machine` (one worker round).
    pub kind: String,
}

/// Labels of ARM operations alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// As in [`ArmLabels::operation`].
    pub operation: String,
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    /// From pod scheduled to its assignment `Assigned`.
    pub assignment_latency: Histogram,
    /// ARM calls by operation and outcome.
    pub arm_requests: Family<ArmLabels, Counter>,
    /// ARM calls answered with 429.
    pub arm_throttled: Family<OperationLabels, Counter>,
    /// Machines with work pending (changed and not yet reconciled, or waiting to retry).
    pub queue_depth: Gauge,
    /// Duration of planning passes and machine rounds.
    pub reconcile_duration: Family<KindLabels, Histogram>,
    /// Identities in quarantine.
    pub quarantined_identities: Gauge,
    /// Identities someone removed that the drift check put back.
    pub drift_repairs: Counter,
    /// Writes of assignment objects.
    pub kube_writes: Family<KubeLabels, Counter>,
    /// 1 while this replica leads.
    pub leader: Gauge,
    /// How often this replica became leader.
    pub leader_acquisitions: Counter,
    /// Events not published because the queue was full.
    pub events_dropped: Counter,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("pod_identity");
        let assignment_latency = Histogram::new(exponential_buckets(0.25, 2.0, 14));
        registry.register(
            "assignment_latency_seconds",
            "Time from a pod being scheduled to its identity assignment becoming Assigned",
            assignment_latency.clone(),
        );
        let arm_requests = Family::<ArmLabels, Counter>::default();
        registry.register(
            "arm_requests",
            "ARM calls by operation and outcome",
            arm_requests.clone(),
        );
        let arm_throttled = Family::<OperationLabels, Counter>::default();
        registry.register(
            "arm_throttled",
            "ARM calls answered with 429 Too Many Requests",
            arm_throttled.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "work_queue_depth",
            "Machines (VMs or scale sets) with work pending",
            queue_depth.clone(),
        );
        let reconcile_duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 18))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Duration of planning passes over the cluster and of machine rounds",
            reconcile_duration.clone(),
        );
        let quarantined_identities = Gauge::default();
        registry.register(
            "quarantined_identities",
            "Identities ARM refused as missing or not assignable, left out of requests for now",
            quarantined_identities.clone(),
        );
        let drift_repairs = Counter::default();
        registry.register(
            "drift_repairs",
            "Identities removed from a machine by someone else and added back",
            drift_repairs.clone(),
        );
        let kube_writes = Family::<KubeLabels, Counter>::default();
        registry.register(
            "kube_writes",
            "Writes of AzureAssignedIdentity objects by operation and result",
            kube_writes.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica is the leader", leader.clone());
        let leader_acquisitions = Counter::default();
        registry.register(
            "leader_acquisitions",
            "How often this replica became the leader",
            leader_acquisitions.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Kubernetes Events not published because too many were queued",
            events_dropped.clone(),
        );
        Arc::new(Self {
            registry,
            assignment_latency,
            arm_requests,
            arm_throttled,
            queue_depth,
            reconcile_duration,
            quarantined_identities,
            drift_repairs,
            kube_writes,
            leader,
            leader_acquisitions,
            events_dropped,
        })
    }

    /// Counts one ARM call.
    pub fn arm_call(&self, operation: &str, status: &str) {
        self.arm_requests
            .get_or_create(&ArmLabels {
                operation: operation.to_owned(),
                status: status.to_owned(),
            })
            .inc();
        if status == "throttled" {
            self.arm_throttled
                .get_or_create(&OperationLabels {
                    operation: operation.to_owned(),
                })
                .inc();
        }
    }

    /// Counts one Kubernetes write.
    pub fn kube_write(&self, operation: &str, result: &str) {
        self.kube_writes
            .get_or_create(&KubeLabels {
                operation: operation.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Records how long a pass took.
    pub fn reconciled(&self, kind: &str, seconds: f64) {
        self.reconcile_duration
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .observe(seconds);
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_the_prefix() {
        let metrics = Metrics::new();
        metrics.arm_call("vmss_patch", "throttled");
        metrics.assignment_latency.observe(1.5);
        let text = metrics.render();
        assert!(
            text.contains("pod_identity_arm_requests_total{operation=\"vmss_patch\",status=\"throttled\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pod_identity_arm_throttled_total{operation=\"vmss_patch\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pod_identity_assignment_latency_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("pod_identity_work_queue_depth"), "{text}");
    }
}

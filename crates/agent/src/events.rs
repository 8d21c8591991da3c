//! Kubernetes Events on pods whose token requests are refused, so that `kubectl describe pod` says why
//! a workload gets no token. Published off the request path through a bounded queue, and at most one per
//! pod and reason per interval: a client retrying in a loop must not turn into a stream of API writes.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use pod_identity_api::ObjectKey;
use tokio::sync::mpsc;

use crate::metrics::{Metrics, ResultLabels};

/// Why a pod was refused, as the Event's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No binding gives the pod the identity it asked for.
    IdentityDenied,
    /// The identity was not assigned to the node in time.
    IdentityNotAssigned,
    /// IMDS or Entra refused or failed.
    TokenUpstreamError,
    /// A connection from the pod's address came from outside the pod: its address was forged.
    CallerSpoofed,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Self::IdentityDenied => "IdentityDenied",
            Self::IdentityNotAssigned => "IdentityNotAssigned",
            Self::TokenUpstreamError => "TokenUpstreamError",
            Self::CallerSpoofed => "CallerSpoofed",
        }
    }
}

/// One Event to publish.
#[derive(Clone, Debug)]
pub struct Notice {
    /// The pod.
    pub pod: ObjectKey,
    /// Its UID.
    pub uid: Option<String>,
    /// Why.
    pub reason: Reason,
    /// What the pod was told.
    pub message: String,
}

/// Where the request path drops notices; never blocks.
#[derive(Clone, Debug)]
pub struct Events {
    queue: Option<mpsc::Sender<Notice>>,
    metrics: Arc<Metrics>,
}

impl Events {
    /// A sink that publishes nothing (no API server, or Events turned off).
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Self { queue: None, metrics }
    }

    /// A sink publishing through `client` as the agent of `node`, at most once per pod and reason per
    /// `interval`.
    pub fn start(client: kube::Client, node: &str, interval: Duration, metrics: Arc<Metrics>) -> Self {
        let (queue, mut notices) = mpsc::channel::<Notice>(256);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "pod-identity-agent".into(),
                instance: Some(node.to_owned()),
            },
        );
        let task_metrics = metrics.clone();
        tokio::spawn(async move {
            let mut last: HashMap<(ObjectKey, Reason), Instant> = HashMap::new();
            while let Some(notice) = notices.recv().await {
                let now = Instant::now();
                last.retain(|_, at| now.duration_since(*at) < interval);
                let key = (notice.pod.clone(), notice.reason);
                if last.contains_key(&key) {
                    task_metrics
                        .events
                        .get_or_create(&ResultLabels { result: "suppressed" })
                        .inc();
                    continue;
                }
                last.insert(key, now);
                let reference = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    namespace: Some(notice.pod.namespace.clone()),
                    name: Some(notice.pod.name.clone()),
                    uid: notice.uid.clone(),
                    ..Default::default()
                };
                let event = Event {
                    type_: EventType::Warning,
                    reason: notice.reason.as_str().into(),
                    note: Some(note_of(&notice.message)),
                    action: "GetToken".into(),
                    secondary: None,
                };
                let result = match recorder.publish(&event, &reference).await {
                    Ok(()) => "sent",
                    Err(error) => {
                        tracing::warn!(pod = %notice.pod, %error, "could not publish an Event");
                        "failed"
                    }
                };
                task_metrics.events.get_or_create(&ResultLabels { result }).inc();
            }
        });
        Self {
            queue: Some(queue),
            metrics,
        }
    }

    /// Queues an Event; dropped (and counted) when the queue is full.
    pub fn refused(&self, notice: Notice) {
        let Some(queue) = &self.queue else { return };
        if queue.try_send(notice).is_err() {
            self.metrics
                .events
                .get_or_create(&ResultLabels { result: "dropped" })
                .inc();
        }
    }
}

/// The Event note for what a pod was told: cut to the API's limit on a character boundary (the message
/// carries text from the pod's request and from upstream errors, in any script).
pub fn note_of(message: &str) -> String {
    pod_identity_api::text::truncate(message, pod_identity_api::text::EVENT_NOTE_MAX_BYTES).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_whose_limit_falls_inside_a_character_is_cut_before_it() {
        // A deny message quoting a client_id of 990 ASCII characters followed by multi-byte ones: byte
        // 1000 falls inside a character, where `String::truncate` panicked and took the task down.
        let message = format!(
            "client_id {}{} is not an identity of this pod",
            "a".repeat(981),
            "é".repeat(30)
        );
        assert!(!message.is_char_boundary(1000));
        let note = note_of(&message);
        assert!(note.len() <= 1000, "{}", note.len());
        assert!(note.ends_with('…'));
        assert_eq!(note_of("short"), "short");
    }
}

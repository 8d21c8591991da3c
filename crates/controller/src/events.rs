//! Kubernetes Events on pods, bindings and identities. Publishing goes through a bounded queue drained
//! by one task, so a slow API server never holds up a worker; when the queue is full the event is
//! dropped and counted.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use pod_identity_api::{ObjectKey, text};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// The controller name Events are reported under.
pub const REPORTER: &str = "pod-identity-controller";
const QUEUE: usize = 4096;

/// What an Event is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A pod.
    Pod(ObjectKey),
    /// An `AzureIdentityBinding`.
    Binding(ObjectKey),
    /// An `AzureIdentity`.
    Identity(ObjectKey),
}

impl Subject {
    fn reference(&self) -> ObjectReference {
        let (api_version, kind, key) = match self {
            Self::Pod(key) => ("v1", "Pod", key),
            Self::Binding(key) => ("aadpodidentity.k8s.io/v1", "AzureIdentityBinding", key),
            Self::Identity(key) => ("aadpodidentity.k8s.io/v1", "AzureIdentity", key),
        };
        ObjectReference {
            api_version: Some(api_version.to_owned()),
            kind: Some(kind.to_owned()),
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            ..ObjectReference::default()
        }
    }
}

/// One Event to publish.
#[derive(Clone, Debug)]
pub struct Notice {
    /// What it is about.
    pub subject: Subject,
    /// Warning or normal.
    pub warning: bool,
    /// Short reason in PascalCase.
    pub reason: &'static str,
    /// The action taken, in PascalCase.
    pub action: &'static str,
    /// Human-readable detail.
    pub note: String,
}

/// Queues Events for publishing.
#[derive(Clone)]
pub struct Events {
    tx: Option<mpsc::Sender<Notice>>,
    metrics: Arc<Metrics>,
}

impl Events {
    /// Events published with `client`; returns the handle and the task that publishes.
    pub fn new(client: Client, instance: String, metrics: Arc<Metrics>) -> (Self, impl Future<Output = ()>) {
        let (tx, mut rx) = mpsc::channel::<Notice>(QUEUE);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: REPORTER.to_owned(),
                instance: Some(instance),
            },
        );
        let task = async move {
            while let Some(notice) = rx.recv().await {
                let event = Event {
                    type_: if notice.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: notice.reason.to_owned(),
                    note: Some(text::truncate(&notice.note, text::EVENT_NOTE_MAX_BYTES).into_owned()),
                    action: notice.action.to_owned(),
                    secondary: None,
                };
                if let Err(err) = recorder.publish(&event, &notice.subject.reference()).await {
                    tracing::debug!(error = %err, reason = notice.reason, "event not published");
                }
            }
        };
        (
            Self {
                tx: Some(tx),
                metrics,
            },
            task,
        )
    }

    /// Events that go nowhere (unit tests).
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Self { tx: None, metrics }
    }

    /// Queues an Event.
    pub fn publish(&self, notice: Notice) {
        if let Some(tx) = &self.tx
            && tx.try_send(notice).is_err()
        {
            self.metrics.events_dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_the_kind_and_group() {
        let r = Subject::Binding(ObjectKey::new("ns", "b")).reference();
        assert_eq!(r.kind.as_deref(), Some("AzureIdentityBinding"));
        assert_eq!(r.api_version.as_deref(), Some("aadpodidentity.k8s.io/v1"));
        assert_eq!(r.namespace.as_deref(), Some("ns"));
    }
}

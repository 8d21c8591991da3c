//! Waiting for the Azure configuration instead of dying without it.
//!
//! On a node that is not an Azure node (or an AKS node whose `azure.json` moved), the controller has no
//! configuration. A crash loop would only say so in the last log of a restarting container; the
//! controller instead stays up, unready, says what is missing and which chart value provides it (in its
//! log and as a Warning Event on its own pod), and reads the configuration again until it is there.

use std::{path::Path, time::Duration};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    Api, Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use pod_identity_azure::AzureConfig;

use crate::events::REPORTER;

/// How often a missing configuration is read again.
pub const RETRY: Duration = Duration::from_secs(20);

/// What to tell the operator when the configuration cannot be read: the error, and what provides the
/// configuration (the chart's values, or the flags and variables of a hand-written manifest).
pub fn explain(path: Option<&Path>, error: &str) -> String {
    match path {
        Some(path) => format!(
            "no usable Azure configuration at {}: {error}. This node has no azure.json there (it is not an \
             AKS or aks-engine node, or the file moved). With the Helm chart, set azureConfig.existingSecret \
             to a Secret holding an azure.json key, or set the adminsecret.* values (tenantID, clientID, \
             clientSecret, subscriptionID, resourceGroup); without it, pass --cloudconfig=<file> or unset it \
             and set TENANT_ID, SUBSCRIPTION_ID, RESOURCE_GROUP, CLIENT_ID and CLIENT_SECRET (or USE_MSI=true)",
            path.display()
        ),
        None => format!(
            "no usable Azure configuration in the environment: {error}. With the Helm chart, set the \
             adminsecret.* values (tenantID, clientID, clientSecret, subscriptionID, resourceGroup) or \
             azureConfig.existingSecret; without it, set TENANT_ID, SUBSCRIPTION_ID, RESOURCE_GROUP, CLIENT_ID \
             and CLIENT_SECRET (or USE_MSI=true), or pass --cloudconfig=<azure.json>"
        ),
    }
}

/// The controller's own pod, for Events about it (from the downward API's `POD_NAME` and `POD_NAMESPACE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnPod {
    /// Namespace of the pod.
    pub namespace: String,
    /// Name of the pod.
    pub name: String,
}

/// Reads the configuration; while it cannot, logs why, publishes a Warning Event `AzureConfigMissing`
/// on `own_pod` (once per distinct reason), and tries again every [`RETRY`]. Returns once it reads.
pub async fn wait_for(path: Option<&Path>, client: &Client, own_pod: Option<&OwnPod>) -> AzureConfig {
    let mut last_reason = String::new();
    loop {
        match AzureConfig::load(path) {
            Ok(config) => {
                if !last_reason.is_empty() {
                    tracing::info!("the Azure configuration is there now");
                }
                return config;
            }
            Err(error) => {
                let reason = explain(path, &error.to_string());
                tracing::error!(reason = %reason, "cannot start without the Azure configuration; retrying");
                if reason != last_reason
                    && let Some(pod) = own_pod
                {
                    publish(client, pod, &reason).await;
                }
                last_reason = reason;
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn publish(client: &Client, pod: &OwnPod, note: &str) {
    let uid = Api::<Pod>::namespaced(client.clone(), &pod.namespace)
        .get_opt(&pod.name)
        .await
        .ok()
        .flatten()
        .and_then(|p| p.metadata.uid);
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.name.clone()),
        namespace: Some(pod.namespace.clone()),
        uid,
        ..ObjectReference::default()
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: REPORTER.into(),
            instance: Some(pod.name.clone()),
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "AzureConfigMissing".into(),
        note: Some(note.to_owned()),
        action: "Start".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &reference).await {
        tracing::warn!(%error, "could not publish the AzureConfigMissing Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_names_the_chart_values_that_provide_it() {
        let text = explain(
            Some(Path::new("/etc/kubernetes/azure.json")),
            "reading /etc/kubernetes/azure.json: No such file or directory (os error 2)",
        );
        assert!(text.contains("/etc/kubernetes/azure.json"), "{text}");
        assert!(text.contains("azureConfig.existingSecret"), "{text}");
        assert!(text.contains("adminsecret"), "{text}");
    }

    #[test]
    fn missing_variables_name_them() {
        let text = explain(None, "tenantId, subscriptionId missing");
        assert!(
            text.contains("TENANT_ID") && text.contains("adminsecret"),
            "{text}"
        );
    }
}

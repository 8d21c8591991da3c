//! The watches that fill the world: this node's pods (field selector `spec.nodeName`), this node's
//! assignments (label `nodename`, standard mode), and bindings, identities and exceptions of every
//! namespace. Each change is applied whole and wakes waiting requests; a relist replaces a kind's objects
//! at once, so a request never sees half a list.

use std::{fmt::Debug, sync::Arc};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
};
use pod_identity_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException, NODENAME_LABEL,
    answer::AssignedView,
};
use serde::de::DeserializeOwned;

use crate::{
    metrics::{KindLabels, Metrics},
    resolve::Mode,
    world::{self, PodRecord, Shared, World},
};

/// How one kind's objects enter the world.
trait Kind: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static {
    /// Adds or replaces one object.
    fn apply(world: &mut World, object: Self);
    /// Removes one object.
    fn delete(world: &mut World, object: &Self);
    /// Replaces every object (a relist) and marks the kind synced.
    fn replace(world: &mut World, objects: Vec<Self>);
}

impl Kind for Pod {
    fn apply(world: &mut World, object: Self) {
        world.upsert_pod(PodRecord::from_pod(&object));
    }
    fn delete(world: &mut World, object: &Self) {
        world.remove_pod(&world::key_of(object));
    }
    fn replace(world: &mut World, objects: Vec<Self>) {
        world.replace_pods(objects.iter().map(PodRecord::from_pod).collect());
        world.synced.pods = true;
    }
}

impl Kind for AzureAssignedIdentity {
    fn apply(world: &mut World, object: Self) {
        world.upsert_assigned(AssignedView::from_assigned(&object));
    }
    fn delete(world: &mut World, object: &Self) {
        world.remove_assigned(&world::key_of(object));
    }
    fn replace(world: &mut World, objects: Vec<Self>) {
        world.replace_assigned(objects.iter().map(AssignedView::from_assigned).collect());
        world.synced.assigned = true;
    }
}

impl Kind for AzureIdentityBinding {
    fn apply(world: &mut World, object: Self) {
        world.matching.upsert_binding(object);
    }
    fn delete(world: &mut World, object: &Self) {
        world.matching.remove_binding(&world::key_of(object));
    }
    fn replace(world: &mut World, objects: Vec<Self>) {
        world.matching.replace_bindings(objects);
        world.synced.bindings = true;
    }
}

impl Kind for AzureIdentity {
    fn apply(world: &mut World, object: Self) {
        world.matching.upsert_identity(object);
    }
    fn delete(world: &mut World, object: &Self) {
        world.matching.remove_identity(&world::key_of(object));
    }
    fn replace(world: &mut World, objects: Vec<Self>) {
        world.matching.replace_identities(objects);
        world.synced.identities = true;
    }
}

impl Kind for AzurePodIdentityException {
    fn apply(world: &mut World, object: Self) {
        world.matching.upsert_exception(object);
    }
    fn delete(world: &mut World, object: &Self) {
        world.matching.remove_exception(&world::key_of(object));
    }
    fn replace(world: &mut World, objects: Vec<Self>) {
        world.matching.replace_exceptions(objects);
        world.synced.exceptions = true;
    }
}

/// Kubectl's copy of the object as last applied, which nothing here reads.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what the agent never reads and every token request would otherwise copy with the identity it
/// serves: the managed-fields bookkeeping and kubectl's last-applied copy (together often larger than the
/// object itself).
fn trim<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
    if let Some(annotations) = object.meta_mut().annotations.as_mut() {
        annotations.remove(LAST_APPLIED_ANNOTATION);
    }
}

/// Starts every watch the mode needs; they run until the process ends, retrying with backoff.
pub fn spawn_all(client: &Client, node: &str, mode: Mode, shared: &Arc<Shared>, metrics: &Arc<Metrics>) {
    let pods = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    spawn::<Pod>(Api::all(client.clone()), pods, shared, metrics);
    match mode {
        Mode::Standard => {
            let assigned = watcher::Config::default().labels(&format!("{NODENAME_LABEL}={node}"));
            spawn::<AzureAssignedIdentity>(Api::all(client.clone()), assigned, shared, metrics);
        }
        Mode::Managed => {}
    }
    spawn::<AzureIdentityBinding>(
        Api::all(client.clone()),
        watcher::Config::default(),
        shared,
        metrics,
    );
    spawn::<AzureIdentity>(
        Api::all(client.clone()),
        watcher::Config::default(),
        shared,
        metrics,
    );
    spawn::<AzurePodIdentityException>(
        Api::all(client.clone()),
        watcher::Config::default(),
        shared,
        metrics,
    );
}

fn spawn<K>(api: Api<K>, config: watcher::Config, shared: &Arc<Shared>, metrics: &Arc<Metrics>)
where
    K: Kind,
    K::DynamicType: Default,
{
    let shared = shared.clone();
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let kind = K::kind(&K::DynamicType::default()).to_string();
        let mut relist: Vec<K> = Vec::new();
        let mut events = watcher(api, config)
            .default_backoff()
            .modify(trim)
            .into_stream()
            .boxed();
        loop {
            let event = match events.try_next().await {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(kind, %error, "watch failed; retrying");
                    continue;
                }
            };
            match event {
                watcher::Event::Init => relist.clear(),
                watcher::Event::InitApply(object) => relist.push(object),
                watcher::Event::InitDone => {
                    let objects = std::mem::take(&mut relist);
                    let count = objects.len();
                    shared.update(|world| K::replace(world, objects));
                    tracing::info!(kind, count, "watch synced");
                }
                watcher::Event::Apply(object) => shared.update(|world| K::apply(world, object)),
                watcher::Event::Delete(object) => shared.update(|world| K::delete(world, &object)),
            }
            let world = shared.read();
            for (kind, count) in world.counts() {
                metrics
                    .objects
                    .get_or_create(&KindLabels { kind })
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
        tracing::error!(kind, "watch ended");
    });
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;
    use pod_identity_api::AzureIdentitySpec;

    use super::*;

    #[test]
    fn what_nothing_reads_is_dropped_and_every_other_annotation_kept() {
        let mut identity = AzureIdentity {
            metadata: ObjectMeta {
                name: Some("id".into()),
                annotations: Some(
                    [
                        (LAST_APPLIED_ANNOTATION.to_owned(), "{...}".to_owned()),
                        (
                            "aadpodidentity.k8s.io/Behavior".to_owned(),
                            "namespaced".to_owned(),
                        ),
                    ]
                    .into(),
                ),
                managed_fields: Some(vec![Default::default()]),
                ..Default::default()
            },
            spec: AzureIdentitySpec::default(),
            status: None,
        };
        trim(&mut identity);
        assert_eq!(identity.metadata.managed_fields, None);
        let annotations = identity.metadata.annotations.unwrap();
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            ["aadpodidentity.k8s.io/Behavior"]
        );
    }
}

//! The `IdentityReady` condition of this node's pods: `True` once every identity bound to the pod is
//! usable on this node (its AzureAssignedIdentity `Assigned`, in standard mode) and the agent has
//! fetched a token of each, `False` with a reason while not. A pod that lists the condition in its
//! `spec.readinessGates` counts as Ready only once it is `True` (KEP-580), so a Service sends it no
//! traffic before it can authenticate: the 40–60 s between a pod landing and its identity reaching the
//! scale set (aad-pod-identity #770, #472, #738) is spent not Ready instead of failing requests.
//!
//! Fetching a token proves what the assignment only promises (the identity is on the machine and IMDS
//! or Entra gives its tokens), and fills the node's cache, so that the pod's first request for a
//! prefetched resource is a cache hit. Only pods that carry the gate are written to: a pod without it
//! would not wait for the condition, and an unrequested write to every pod's status is API load for
//! nothing.
//!
//! [`condition`] decides from plain data; [`keep`] prefetches, and patches `pods/status` only when the
//! decision differs from what the pod's status says.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use pod_identity_api::{
    ObjectKey,
    pod::Life,
    readiness::{Condition, IDENTITY_READY_CONDITION},
};
use serde_json::{Value, json};

use crate::{
    health::AdminState,
    resolve::{self, Grant, PodIdentities, Principal},
    tokens::TokenService,
    world::PodRecord,
};

/// Longest condition message written, in bytes (refusals quote selectors and binding names).
pub use pod_identity_api::readiness::MAX_CONDITION_MESSAGE_BYTES as MAX_MESSAGE_BYTES;

/// Where the agent stands with a principal's tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenState {
    /// Not asked yet, or being fetched.
    Fetching,
    /// Fetched for every prefetched resource.
    Fetched,
    /// The last fetch failed, with why.
    Failed(String),
}

/// The condition a pod with these identities should have, given the agent's tokens.
///
/// Reasons: `IdentitiesReady` (True); `Excepted` (True: an AzurePodIdentityException pod uses the
/// node's identities, which need nothing from the agent); `IdentityNotBound` (no binding gives the pod
/// an identity), `IdentityNotAssigned` (an identity is not usable on this node yet), `TokenFetchFailed`,
/// `TokenNotFetched` (False).
pub fn condition(identities: &PodIdentities, tokens: &dyn Fn(&Principal) -> TokenState) -> Condition {
    let identities = match identities {
        PodIdentities::Excepted => {
            return Condition::new(
                true,
                "Excepted",
                "an AzurePodIdentityException matches the pod: it uses the node's identities".into(),
            );
        }
        PodIdentities::Refused(why) => return Condition::new(false, "IdentityNotBound", why.clone()),
        PodIdentities::Identities(identities) => identities,
    };
    if let Some((_, Some(pending))) = identities.iter().find(|(_, pending)| pending.is_some()) {
        return Condition::new(false, "IdentityNotAssigned", pending.to_string());
    }
    let mut failed = Vec::new();
    let mut fetching = Vec::new();
    for (grant, _) in identities {
        match tokens(&grant.principal) {
            TokenState::Fetched => {}
            TokenState::Fetching => fetching.push(grant.identity.to_string()),
            TokenState::Failed(why) => failed.push(format!("{}: {why}", grant.identity)),
        }
    }
    if !failed.is_empty() {
        return Condition::new(
            false,
            "TokenFetchFailed",
            format!("no token yet for {}", failed.join("; ")),
        );
    }
    if !fetching.is_empty() {
        return Condition::new(
            false,
            "TokenNotFetched",
            format!("fetching a first token for {}", fetching.join(", ")),
        );
    }
    let names: Vec<String> = identities.iter().map(|(g, _)| g.identity.to_string()).collect();
    Condition::new(
        true,
        "IdentitiesReady",
        format!(
            "{} usable on this node; a token of each was fetched",
            names.join(", ")
        ),
    )
}

/// Whether the agent keeps the condition of this pod: it carries the gate and runs (or is about to).
pub fn wanted(pod: &PodRecord) -> bool {
    pod.gate.gated && pod.view.life() == Life::Active
}

/// The `pods/status` strategic merge patch that sets `desired`, from `current`: the transition time
/// moves only when the status does (Kubernetes' condition convention). The UID pins the pod: a pod
/// deleted and recreated under the same name is not written to.
pub fn patch(
    uid: Option<&str>,
    desired: &Condition,
    current: Option<&Condition>,
    now: jiff::Timestamp,
) -> Value {
    let mut condition = json!({
        "type": IDENTITY_READY_CONDITION,
        "status": if desired.status { "True" } else { "False" },
        "reason": desired.reason,
        "message": desired.message,
    });
    if current.is_none_or(|current| current.status != desired.status) {
        condition["lastTransitionTime"] = json!(now.to_string());
    }
    let mut body = json!({"status": {"conditions": [condition]}});
    if let Some(uid) = uid {
        body["metadata"] = json!({"uid": uid});
    }
    body
}

/// A pod by name and UID: a pod recreated under the same name is another pod.
type PodId = (ObjectKey, Option<String>);

/// What one pass found to do.
#[derive(Debug, Default)]
struct Pass {
    /// Whether every list has arrived; nothing is decided before.
    synced: bool,
    patches: Vec<(PodId, Condition, Option<Condition>)>,
    prefetch: Vec<Arc<Grant>>,
    principals: HashSet<Principal>,
}

/// The resource prefetched when none is configured: Azure Resource Manager, which every identity may
/// get a token for.
pub const DEFAULT_PREFETCH_RESOURCE: &str = "https://management.azure.com/";

/// How long a failed prefetch waits before the next try (the cache answers a retry within its own
/// failure memory anyway).
const RETRY_FAILED: Duration = Duration::from_secs(10);

/// Keeps the condition of this node's gated pods until the process ends: prefetches the tokens of
/// their usable identities for `resources`, and patches a pod's status when its condition changes.
/// Starts once the agent is ready (`True` promises that requests reach this agent and are answered);
/// woken by every change of the world and every prefetch that ends.
pub async fn keep(client: Client, admin: AdminState, tokens: Arc<TokenService>, resources: Vec<String>) {
    let mut resources: Vec<String> = resources.into_iter().filter(|r| !r.is_empty()).collect();
    if resources.is_empty() {
        // A token must be fetched to prove the identity works; without a resource, ARM's.
        resources.push(DEFAULT_PREFETCH_RESOURCE.to_owned());
    }
    admin.until_ready().await;
    let shared = admin.shared.clone();
    let policy = admin.policy;
    let mut changes = shared.subscribe();
    let woken = Arc::new(tokio::sync::Notify::new());
    let states: Arc<std::sync::Mutex<HashMap<Principal, (TokenState, Instant)>>> = Arc::default();
    // No memory of what was patched: the watched status is the truth, so a condition someone else
    // changed or wiped is put back. A pass between a patch and its echo through the watch writes the
    // same condition again, which changes nothing.
    let mut ticker = tokio::time::interval(Duration::from_secs(30));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let pass = {
            let world = shared.read();
            let states = states.lock().unwrap_or_else(|p| p.into_inner());
            let state_of = |principal: &Principal| {
                states
                    .get(principal)
                    .map_or(TokenState::Fetching, |(state, _)| state.clone())
            };
            let mut pass = Pass {
                synced: resolve::synced(&world, policy),
                ..Pass::default()
            };
            for pod in world.pods().filter(|pod| pass.synced && wanted(pod)) {
                let id = (pod.view.key.clone(), pod.view.uid.clone());
                let Some(identities) = resolve::pod_identities(&world, policy, pod) else {
                    break;
                };
                if let PodIdentities::Identities(list) = &identities {
                    for (grant, pending) in list {
                        pass.principals.insert(grant.principal.clone());
                        let due = match states.get(&grant.principal) {
                            None => true,
                            Some((TokenState::Failed(_), at)) => at.elapsed() >= RETRY_FAILED,
                            Some(_) => false,
                        };
                        if pending.is_none() && due {
                            pass.prefetch.push(grant.clone());
                        }
                    }
                }
                let desired = condition(&identities, &state_of);
                if pod.gate.condition.as_ref() != Some(&desired) {
                    pass.patches.push((id, desired, pod.gate.condition.clone()));
                }
            }
            pass
        };
        if pass.synced {
            // Principals no gated pod uses any more start afresh when one does again.
            let mut states = states.lock().unwrap_or_else(|p| p.into_inner());
            states.retain(|principal, _| pass.principals.contains(principal));
            for grant in &pass.prefetch {
                states
                    .entry(grant.principal.clone())
                    .and_modify(|(_, at)| *at = Instant::now())
                    .or_insert((TokenState::Fetching, Instant::now()));
            }
        }
        for grant in pass.prefetch {
            tokio::spawn(prefetch(
                grant,
                resources.clone(),
                tokens.clone(),
                states.clone(),
                woken.clone(),
            ));
        }
        for ((key, uid), desired, current) in pass.patches {
            let body = patch(uid.as_deref(), &desired, current.as_ref(), jiff::Timestamp::now());
            let api = Api::<Pod>::namespaced(client.clone(), &key.namespace);
            match api
                .patch_status(&key.name, &PatchParams::default(), &Patch::Strategic(&body))
                .await
            {
                Ok(_) => {
                    tracing::info!(pod = %key.name, namespace = %key.namespace, status = desired.status, reason = %desired.reason, "set the pod's IdentityReady condition");
                }
                Err(error) => {
                    // Retried by the next pass (the next change, prefetch or tick).
                    tracing::warn!(pod = %key.name, namespace = %key.namespace, %error, "could not set the pod's IdentityReady condition");
                }
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = woken.notified() => {}
            _ = ticker.tick() => {}
        }
    }
}

async fn prefetch(
    grant: Arc<Grant>,
    resources: Vec<String>,
    tokens: Arc<TokenService>,
    states: Arc<std::sync::Mutex<HashMap<Principal, (TokenState, Instant)>>>,
    woken: Arc<tokio::sync::Notify>,
) {
    let mut state = TokenState::Fetched;
    for resource in &resources {
        let (result, outcome) = tokens
            .tokens(&grant.principal, Some(&*grant.object), resource)
            .await;
        match result {
            Ok(_) => {
                tracing::info!(identity = %grant.identity, resource, cache = outcome.label(), "prefetched a token for a gated pod");
            }
            Err(error) => {
                tracing::warn!(identity = %grant.identity, resource, %error, "prefetching a token failed");
                state = TokenState::Failed(error.to_string());
                break;
            }
        }
    }
    states
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(grant.principal.clone(), (state.clone(), Instant::now()));
    woken.notify_one();
    if matches!(state, TokenState::Failed(_)) {
        // Nothing else may change before the retry is due: wake the loop for it.
        tokio::time::sleep(RETRY_FAILED).await;
        woken.notify_one();
    }
}

#[cfg(test)]
mod tests;

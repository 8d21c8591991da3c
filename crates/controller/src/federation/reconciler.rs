//! The I/O around [`super`]'s decisions: watches of identities and of the subjects, one pass per change
//! (debounced) or when a retry or re-check is due, and the writes: subjects (ServiceAccounts), federated
//! identity credentials (ARM, one identity at a time, since ARM refuses concurrent writes under one
//! identity with 409), the identity's status annotation and its Events.
//!
//! ARM is read only when something changed for an identity (its user-assigned identity, the issuer, its
//! subject), after a failure, or once per re-check period: MSI's limits are a few requests per second.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use pod_identity_api::{
    AzureIdentity, ObjectKey,
    federation::{
        CREDENTIAL_STATUS_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, SUBJECT_IDENTITY_ANNOTATION, subject,
    },
};
use pod_identity_azure::retry::Backoff;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::{sync::Notify, time::Instant};
use tracing::{debug, info, warn};

use super::{
    CREDENTIAL_ID_ANNOTATION, CredentialDecision, CredentialsApi, Federated, FederationConfig, Subject,
    credential_id, decide_credential, plan_subjects, split_credential_id,
};
use crate::{
    events::{Events, Notice, Subject as EventSubject},
    metrics::{ArmLabels, Metrics},
};

/// How long a burst of changes gathers before a pass.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Where an identity's credential stands, so that ARM is not read again for nothing.
#[derive(Clone, Debug)]
struct Checked {
    /// User-assigned identity, issuer and subject it was checked for.
    wanted: (String, String, String),
    /// When to check again.
    due: Instant,
    /// The status last reported.
    status: String,
}

/// Keeps subjects and (opted in) federated identity credentials of federated identities, watching
/// identities of `watch_namespace` (all when `None`); runs until dropped. Does nothing without a subjects
/// namespace.
pub async fn run(
    client: Client,
    config: FederationConfig,
    watch_namespace: Option<String>,
    events: Events,
    metrics: Arc<Metrics>,
) {
    let Some(namespace) = config.namespace.clone() else {
        return;
    };
    let notify = Arc::new(Notify::new());
    let identities_api = match &watch_namespace {
        Some(ns) => Api::<AzureIdentity>::namespaced(client.clone(), ns),
        None => Api::<AzureIdentity>::all(client.clone()),
    };
    let (identities, identities_task) = reflect(identities_api, watcher::Config::default(), notify.clone());
    let (accounts, accounts_task) = reflect(
        Api::<ServiceAccount>::namespaced(client.clone(), &namespace),
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
        notify.clone(),
    );
    let retry = config.retry;
    let mut reconciler = Reconciler {
        client,
        namespace,
        issuer: config.issuer.clone(),
        config,
        events,
        metrics,
        checked: HashMap::new(),
        backoff: retry.backoff(),
        retries: HashMap::new(),
    };
    let control = async move {
        if identities.wait_until_ready().await.is_err() || accounts.wait_until_ready().await.is_err() {
            return;
        }
        info!(namespace = %reconciler.namespace, manage_credentials = reconciler.config.credentials.is_some(), "keeping the subjects of federated identities");
        loop {
            let due = reconciler.pass(&identities, &accounts).await;
            tokio::select! {
                () = notify.notified() => tokio::time::sleep(DEBOUNCE).await,
                () = tokio::time::sleep_until(due) => {}
            }
        }
    };
    tokio::join!(identities_task, accounts_task, control);
}

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    notify: Arc<Notify>,
) -> (Store<K>, impl Future<Output = ()>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer);
    let task = stream.for_each(move |event| {
        match event {
            Ok(_) => notify.notify_one(),
            Err(err) => warn!(error = %err, "federation watch failed; retrying"),
        }
        std::future::ready(())
    });
    (store, task)
}

struct Reconciler {
    client: Client,
    namespace: String,
    issuer: Option<String>,
    config: FederationConfig,
    events: Events,
    metrics: Arc<Metrics>,
    checked: HashMap<ObjectKey, Checked>,
    /// Waits after failed passes (subjects, the issuer).
    backoff: Backoff,
    /// Waits after an identity's credential failed or could not be made usable, until it is.
    retries: HashMap<ObjectKey, Backoff>,
}

impl Reconciler {
    /// One pass over every federated identity and subject; returns when the next one is due at the latest.
    async fn pass(&mut self, identities: &Store<AzureIdentity>, accounts: &Store<ServiceAccount>) -> Instant {
        let now = Instant::now();
        let mut due = now + self.config.recheck;
        let mut failed = false;
        let objects: Vec<AzureIdentity> = identities.state().iter().map(|i| (**i).clone()).collect();
        let subjects: Vec<Subject> = accounts
            .state()
            .iter()
            .filter_map(|a| Subject::from_account(a))
            .collect();
        let plan = plan_subjects(&objects, &subjects);
        for federated in &plan.create {
            if let Err(error) = self.create_subject(federated).await {
                warn!(identity = %federated.identity, %error, "could not create the subject of a federated identity");
                failed = true;
            }
        }
        if let Some(api) = self.config.credentials.clone() {
            match self.issuer().await {
                Ok(issuer) => {
                    for federated in &plan.federated {
                        let recorded = subjects
                            .iter()
                            .find(|s| s.account == federated.account)
                            .and_then(|s| s.credential.clone());
                        let current = objects
                            .iter()
                            .find(|o| key(o) == federated.identity)
                            .and_then(|o| o.metadata.annotations.as_ref())
                            .and_then(|a| a.get(CREDENTIAL_STATUS_ANNOTATION))
                            .cloned();
                        let next = self
                            .credential(api.as_ref(), federated, &issuer, recorded, current)
                            .await;
                        due = due.min(next);
                    }
                }
                Err(error) => {
                    warn!(%error, "the cluster's service-account issuer is not known: federated identity credentials wait");
                    failed = true;
                }
            }
        }
        self.checked
            .retain(|identity, _| plan.federated.iter().any(|f| &f.identity == identity));
        self.retries
            .retain(|identity, _| plan.federated.iter().any(|f| &f.identity == identity));
        for orphan in &plan.orphans {
            if let Err(error) = self.remove_subject(orphan, &objects).await {
                warn!(subject = %orphan.account, %error, "could not remove the subject of an identity that is no longer federated");
                failed = true;
            }
        }
        if failed {
            due = due.min(now + self.backoff.next(None));
        } else {
            self.backoff.reset();
        }
        due
    }

    /// The wait before the credential of `identity` is tried again: its backoff's next step.
    fn retry_wait(&mut self, identity: &ObjectKey) -> Duration {
        let retry = self.config.retry;
        self.retries
            .entry(identity.clone())
            .or_insert_with(|| retry.backoff())
            .next(None)
    }

    /// The issuer federated credentials name: configured, or the API server's discovery document's.
    async fn issuer(&mut self) -> Result<String, String> {
        if let Some(issuer) = &self.issuer {
            return Ok(issuer.clone());
        }
        let request = http::Request::get("/.well-known/openid-configuration")
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        let text = self
            .client
            .request_text(request)
            .await
            .map_err(|e| format!("reading /.well-known/openid-configuration: {e}"))?;
        let document: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let issuer = document["issuer"]
            .as_str()
            .filter(|i| !i.is_empty())
            .ok_or("the API server's discovery document names no issuer")?
            .to_owned();
        info!(%issuer, "the cluster's service-account issuer, from its discovery document");
        self.issuer = Some(issuer.clone());
        Ok(issuer)
    }

    async fn create_subject(&self, federated: &Federated) -> Result<(), kube::Error> {
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(federated.account.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_owned(),
                    MANAGED_BY.to_owned(),
                )])),
                annotations: Some(BTreeMap::from([(
                    SUBJECT_IDENTITY_ANNOTATION.to_owned(),
                    federated.identity.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            // Its tokens are for the agent to exchange; no pod mounts them.
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        };
        match self.accounts().create(&PostParams::default(), &account).await {
            Ok(_) => {
                info!(identity = %federated.identity, subject = %federated.account, namespace = %self.namespace, "created the subject of a federated identity");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(error) => Err(error),
        }
    }

    async fn remove_subject(&mut self, orphan: &Subject, identities: &[AzureIdentity]) -> Result<(), String> {
        if let Some(recorded) = &orphan.credential {
            match (&self.config.credentials, split_credential_id(recorded)) {
                (Some(api), Some((identity_id, name))) => {
                    let deleted = api.delete(identity_id, name).await;
                    self.count("fic_delete", &deleted);
                    deleted.map_err(|e| format!("deleting federated identity credential {recorded}: {e}"))?;
                    info!(credential = %recorded, subject = %orphan.account, "deleted the federated identity credential created for a subject no identity needs");
                }
                (None, _) => {
                    warn!(credential = %recorded, subject = %orphan.account, "left a federated identity credential pod-identity created: credential management is off")
                }
                (Some(_), None) => {
                    warn!(credential = %recorded, "a subject records an unreadable credential ID; nothing deleted")
                }
            }
        }
        if let Some(identity) = &orphan.identity {
            let annotated = identities.iter().any(|i| {
                key(i) == *identity
                    && i.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key(CREDENTIAL_STATUS_ANNOTATION))
            });
            if annotated {
                let _ = self.annotate(identity, None).await;
            }
        }
        match self
            .accounts()
            .delete(&orphan.account, &DeleteParams::default())
            .await
        {
            Ok(_) => {
                info!(subject = %orphan.account, "removed a subject no federated identity needs");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Makes sure a credential trusts the identity's subject; returns when to look again.
    async fn credential(
        &mut self,
        api: &dyn CredentialsApi,
        federated: &Federated,
        issuer: &str,
        recorded: Option<String>,
        current_status: Option<String>,
    ) -> Instant {
        let now = Instant::now();
        let subject = subject(&self.namespace, &federated.account);
        let wanted = (federated.resource_id.clone(), issuer.to_owned(), subject.clone());
        if let Some(checked) = self.checked.get(&federated.identity)
            && checked.wanted == wanted
            && checked.due > now
        {
            return checked.due;
        }
        let result = self
            .ensure_credential(api, federated, issuer, &subject, recorded)
            .await;
        let (status, usable, next) = match result {
            Ok(decision) => (
                decision.status(&federated.resource_id, issuer, &subject),
                decision.usable(),
                if decision.usable() {
                    self.retries.remove(&federated.identity);
                    now + self.config.recheck
                } else {
                    now + self.retry_wait(&federated.identity)
                },
            ),
            Err(error) => (
                format!("failed: {error}; retrying"),
                false,
                now + self.retry_wait(&federated.identity),
            ),
        };
        let changed = self
            .checked
            .get(&federated.identity)
            .is_none_or(|c| c.status != status);
        if changed {
            let reason = if usable {
                "FederatedCredentialReady"
            } else if status.starts_with("not created") {
                "FederatedCredentialLimit"
            } else {
                "FederatedCredentialFailed"
            };
            if usable {
                info!(identity = %federated.identity, %status, "federated identity credential in order");
            } else {
                warn!(identity = %federated.identity, %status, "federated identity credential not in order");
            }
            self.events.publish(Notice {
                subject: EventSubject::Identity(federated.identity.clone()),
                warning: !usable,
                reason,
                action: "ManageFederatedCredential",
                note: status.clone(),
            });
        }
        if current_status.as_deref() != Some(status.as_str())
            && let Err(error) = self.annotate(&federated.identity, Some(&status)).await
        {
            debug!(identity = %federated.identity, %error, "could not annotate the identity");
        }
        self.checked.insert(
            federated.identity.clone(),
            Checked {
                wanted,
                due: next,
                status,
            },
        );
        next
    }

    async fn ensure_credential(
        &self,
        api: &dyn CredentialsApi,
        federated: &Federated,
        issuer: &str,
        subject: &str,
        recorded: Option<String>,
    ) -> Result<CredentialDecision, String> {
        let identity_id = federated.resource_id.as_str();
        // A credential recorded for another user-assigned identity, issuer or subject is the controller's
        // own, and nothing needs it any more.
        let wanted_id = credential_id(
            identity_id,
            &pod_identity_api::federation::credential_name(issuer, subject),
        );
        if let Some(recorded) = recorded
            .as_deref()
            .filter(|r| !r.eq_ignore_ascii_case(&wanted_id))
            && let Some((old_identity, old_name)) = split_credential_id(recorded)
        {
            let deleted = api.delete(old_identity, old_name).await;
            self.count("fic_delete", &deleted);
            deleted.map_err(|e| format!("deleting the earlier credential {recorded}: {e}"))?;
            self.record(&federated.account, None).await?;
        }
        let listed = api.list(identity_id).await;
        self.count("fic_list", &listed);
        let existing = listed
            .map_err(|e| format!("listing the federated identity credentials of {identity_id}: {e}"))?;
        let decision = decide_credential(&existing, issuer, subject);
        match &decision {
            CredentialDecision::Create { name } | CredentialDecision::Rewrite { name } => {
                let written = api.put(identity_id, name, issuer, subject).await;
                self.count("fic_put", &written);
                written.map_err(|e| {
                    format!("writing federated identity credential {name} on {identity_id}: {e}")
                })?;
                info!(identity = %federated.identity, credential = %name, "wrote the federated identity credential of a federated identity");
                self.record(&federated.account, Some(&credential_id(identity_id, name)))
                    .await?;
            }
            CredentialDecision::Present { name, ours: true } if recorded.as_deref() != Some(&wanted_id) => {
                self.record(&federated.account, Some(&credential_id(identity_id, name)))
                    .await?;
            }
            _ => {}
        }
        Ok(decision)
    }

    /// Records (or clears) on the subject the credential created for it.
    async fn record(&self, account: &str, credential: Option<&str>) -> Result<(), String> {
        let patch = json!({"metadata": {"annotations": {CREDENTIAL_ID_ANNOTATION: credential}}});
        self.accounts()
            .patch(account, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| format!("recording the credential on subject {account}: {e}"))
    }

    /// Sets (or removes) the identity's credential status annotation.
    async fn annotate(&self, identity: &ObjectKey, status: Option<&str>) -> Result<(), kube::Error> {
        let patch = json!({"metadata": {"annotations": {CREDENTIAL_STATUS_ANNOTATION: status}}});
        Api::<AzureIdentity>::namespaced(self.client.clone(), &identity.namespace)
            .patch(&identity.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    }

    fn accounts(&self) -> Api<ServiceAccount> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn count<T>(&self, operation: &str, result: &Result<T, pod_identity_azure::AzureError>) {
        let status = match result {
            Ok(_) => "ok".to_owned(),
            Err(pod_identity_azure::AzureError::Throttled { .. }) => "throttled".to_owned(),
            Err(error) if error.is_retryable() => "transient".to_owned(),
            Err(_) => "error".to_owned(),
        };
        self.metrics
            .arm_requests
            .get_or_create(&ArmLabels {
                operation: operation.to_owned(),
                status,
            })
            .inc();
    }
}

fn key(identity: &AzureIdentity) -> ObjectKey {
    ObjectKey::new(
        identity.metadata.namespace.clone().unwrap_or_default(),
        identity.metadata.name.clone().unwrap_or_default(),
    )
}

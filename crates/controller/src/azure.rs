//! [`ComputeApi`] over the ARM client of `pod-identity-azure`, and building that client from the
//! cloud configuration (`azure.json` or the original's environment variables) with a service principal
//! or a managed identity for the controller's own access.
//!
//! The client is used without retries of its own: the workers own retrying, so that every ARM request
//! is one the controller decided to send (and counted), and a `Retry-After` holds the whole machine, not
//! one request.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use futures::future::BoxFuture;
use pod_identity_azure::{
    ArmClient, ArmConfig, AzureConfig, AzureError, ClientCredential, Credential, EntraClient, HttpConfig,
    IdentityDelta, ImdsClient, Machine, ManagedIdentity, ResourceIdentity, RetryPolicy,
    imds::IdentitySelector,
    token::{CachedTokens, TokenSource},
};

use crate::arm::{ComputeApi, Observed, ObservedIdentity};

/// ARM through `pod-identity-azure`: one client per machine, because Compute throttles per VM or scale
/// set and the client holds back every call of its kind after a 429 until `Retry-After` passes. One
/// throttled scale set must not stop the others.
pub struct ArmCompute {
    http: reqwest::Client,
    config: ArmConfig,
    tokens: Arc<dyn TokenSource>,
    clients: Mutex<HashMap<String, Arc<ArmClient>>>,
}

impl ArmCompute {
    /// Clients that share one connection pool and one token cache.
    pub fn new(http: reqwest::Client, config: ArmConfig, tokens: Arc<dyn TokenSource>) -> Self {
        Self {
            http,
            config,
            tokens,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// A client for user-assigned identities (their federated identity credentials), sharing these
    /// clients' connections and tokens; Microsoft.ManagedIdentity throttles apart from Compute.
    pub fn identity_client(&self) -> ArmClient {
        ArmClient::new(self.http.clone(), self.config.clone(), self.tokens.clone())
    }

    fn client(&self, machine: &Machine) -> Arc<ArmClient> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients
            .entry(machine.key())
            .or_insert_with(|| {
                Arc::new(ArmClient::new(
                    self.http.clone(),
                    self.config.clone(),
                    self.tokens.clone(),
                ))
            })
            .clone()
    }
}

fn observed(identity: ResourceIdentity) -> Observed {
    Observed {
        identities: identity
            .user_assigned
            .into_iter()
            .map(|(key, assigned)| {
                (
                    key,
                    ObservedIdentity {
                        id: assigned.id,
                        client_id: assigned.client_id,
                    },
                )
            })
            .collect(),
        system_assigned: identity.kind.system,
        provisioning_state: identity.provisioning_state,
        etag: identity.etag,
        absent: None,
    }
}

impl ComputeApi for ArmCompute {
    fn get(&self, machine: &Machine) -> BoxFuture<'_, Result<Observed, AzureError>> {
        let client = self.client(machine);
        let machine = machine.clone();
        Box::pin(async move { client.get_identity(&machine).await.map(observed) })
    }

    fn patch<'a>(
        &'a self,
        machine: &'a Machine,
        delta: &'a IdentityDelta,
        if_match: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Observed, AzureError>> {
        let client = self.client(machine);
        Box::pin(async move {
            client
                .patch_identity(machine, delta, if_match)
                .await
                .map(observed)
        })
    }
}

/// Where ARM and Entra are, and which TLS roots to trust besides the system's.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    /// ARM's URL; from the cloud (or `AZURE_ENVIRONMENT_FILEPATH`) when `None`.
    pub arm: Option<String>,
    /// Entra's URL; from the cloud when `None`.
    pub authority: Option<String>,
    /// IMDS, for a managed identity.
    pub imds: Option<String>,
    /// PEM certificates to trust in addition to the system roots.
    pub extra_ca_pem: Option<String>,
}

/// Why the ARM client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up Azure access: {0}")]
pub struct SetupError(#[from] AzureError);

/// ARM access as the configuration says: a managed identity (through IMDS) or a service principal.
pub fn connect(config: &AzureConfig, endpoints: &Endpoints) -> Result<ArmCompute, SetupError> {
    let environment_file = std::env::var_os("AZURE_ENVIRONMENT_FILEPATH");
    let cloud = config.endpoints(environment_file.as_deref().map(Path::new))?;
    let mut http = HttpConfig::default();
    if let Some(pem) = &endpoints.extra_ca_pem {
        http = http.with_ca_pem(pem);
    }
    let http = http.build()?;
    let audience = cloud.management_audience.clone();
    let tokens: Arc<dyn TokenSource> = match config.credential()? {
        Credential::ManagedIdentity { client_id } => {
            let imds = ImdsClient::new(
                endpoints
                    .imds
                    .as_deref()
                    .unwrap_or(pod_identity_azure::imds::DEFAULT_ENDPOINT),
            )?;
            Arc::new(CachedTokens::new(ManagedIdentity {
                client: imds,
                selector: client_id.map_or(IdentitySelector::Default, IdentitySelector::ClientId),
            }))
        }
        Credential::ClientSecret { client_id, secret } => Arc::new(CachedTokens::new(EntraClient::new(
            http.clone(),
            endpoints.authority.as_deref().unwrap_or(&cloud.active_directory),
            &config.tenant_id,
            &client_id,
            ClientCredential::Secret(secret),
        )?)),
        Credential::ClientCertificate { client_id, path, .. } => {
            let pem = std::fs::read_to_string(&path)
                .map_err(|e| AzureError::Config(format!("reading {path}: {e}")))?;
            Arc::new(CachedTokens::new(EntraClient::new(
                http.clone(),
                endpoints.authority.as_deref().unwrap_or(&cloud.active_directory),
                &config.tenant_id,
                &client_id,
                ClientCredential::Certificate(pod_identity_azure::ClientCertificate::from_pem(&pem)?),
            )?))
        }
    };
    let arm = ArmConfig {
        endpoint: endpoints.arm.clone().unwrap_or(cloud.resource_manager),
        audience,
        retry: RetryPolicy::none(),
        ..ArmConfig::default()
    };
    Ok(ArmCompute::new(http, arm, tokens))
}

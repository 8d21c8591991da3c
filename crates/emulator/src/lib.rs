//! A local Azure that the official SDKs cannot tell from the real one, for tests of everything that talks to
//! Azure: the Instance Metadata Service (plain HTTP, one listener per VM or scale-set instance), and over one
//! TLS listener Azure Resource Manager (VM and scale-set identities, long-running operations, throttling,
//! user-assigned identities and their federated identity credentials), Entra ID (client credentials with a
//! secret, a certificate or a federated token from an external issuer, v2 and v1) and Key Vault (secrets
//! behind the 401 challenge). A generated CA signs the TLS certificate; clients trust its PEM.
//!
//! Tests start it in-process with [`Emulator::start`], or run the `pod-identity-emulator` binary (for network
//! namespaces) and drive it over its admin API. Both give: the bound addresses, the CA, the request log and
//! counters, fault injection (status, `Retry-After`, latency per service, method, path or query), and
//! reading or replacing the state (seeded from a [`Seed`]).

// Request gates return the complete refusal as their error; a response is 128 bytes, built once per
// refused request, so boxing it would buy nothing.
#![allow(clippy::result_large_err)]

mod admin;
mod arm;
mod arm_federated_credentials;
mod assertion;
mod entra;
pub mod faults;
pub mod federated_credentials;
pub mod federation;
pub mod http;
pub mod identity_merge;
mod imds;
mod issuer;
mod keyvault;
pub mod observe;
pub mod seed;
mod server;
pub mod settings;
mod shared;
pub mod state;
mod subscriptions;
pub mod throttle;
mod tls;
pub mod tokens;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use crate::faults::{Fault, FaultSpec};
pub use crate::http::Service;
pub use crate::observe::{Counters, LogFilter, RequestRecord};
pub use crate::seed::Seed;
pub use crate::settings::Settings;
pub use crate::tokens::Claims;

use crate::observe::RequestLog;
use crate::server::{Handler, serve_request, spawn_listener};
use crate::shared::{Shared, lock, read, write};
use crate::state::State;
use pod_identity_azure::resource_id::{ResourceId, ResourceType};

/// An IMDS listener and the VM (`.../virtualMachines/{vm}`) or scale-set instance
/// (`.../virtualMachineScaleSets/{ss}/virtualMachines/{instanceId}`) whose IMDS it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImdsListener {
    pub addr: SocketAddr,
    pub instance: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub seed: Seed,
    pub imds: Vec<ImdsListener>,
    /// The TLS listener for ARM, Entra and Key Vault.
    pub azure_addr: SocketAddr,
    /// The plain-HTTP admin API; none when `None` (in-process users call the library instead).
    pub admin_addr: Option<SocketAddr>,
    /// Names and IP addresses the TLS certificate must carry besides localhost, 127.0.0.1, ::1,
    /// management.azure.com, login.microsoftonline.com and *.vault.azure.net.
    pub tls_names: Vec<String>,
    pub settings: Settings,
    /// How many requests the log keeps (the oldest go first; counters keep counting).
    pub log_capacity: usize,
}

impl Config {
    /// Everything on loopback with ports the system picks; no IMDS listener and no admin API.
    pub fn new(seed: Seed) -> Self {
        Self {
            seed,
            imds: Vec::new(),
            azure_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: None,
            tls_names: Vec::new(),
            settings: Settings::default(),
            log_capacity: 100_000,
        }
    }

    /// Adds an IMDS listener on a system-picked loopback port for `instance`.
    pub fn with_imds(mut self, instance: &str) -> Self {
        self.imds.push(ImdsListener {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            instance: instance.to_owned(),
        });
        self
    }
}

/// Where the emulator listens; the binary prints this as its ready line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Addresses {
    pub imds: Vec<ImdsListener>,
    pub azure: SocketAddr,
    pub admin: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Seed(#[from] seed::SeedError),
    #[error("IMDS listener instance '{0}' is not a VM or scale-set instance ID")]
    BadInstance(String),
    #[error("IMDS listener instance '{0}' is not in the seed")]
    UnknownInstance(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Key(#[from] tokens::KeyError),
}

/// A running emulator. Dropping it stops every listener.
pub struct Emulator {
    shared: Arc<Shared>,
    addresses: Addresses,
    ca_pem: String,
    ca_der: Vec<u8>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

fn check_instance(st: &State, instance: &str) -> Result<Arc<ResourceId>, StartError> {
    let id = ResourceId::parse(instance.trim_end_matches('/'))
        .filter(|i| {
            matches!(
                i.kind,
                ResourceType::VirtualMachine | ResourceType::ScaleSetInstance
            )
        })
        .ok_or_else(|| StartError::BadInstance(instance.to_owned()))?;
    let known = st
        .machines
        .get(&id.parent().key())
        .is_some_and(|c| match &id.child {
            Some(child) => c
                .instances
                .iter()
                .any(|i| i.instance_id.eq_ignore_ascii_case(child)),
            None => true,
        });
    if !known {
        return Err(StartError::UnknownInstance(instance.to_owned()));
    }
    Ok(Arc::new(id))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

impl Emulator {
    #[tracing::instrument(skip_all, fields(imds = config.imds.len()))]
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let state = State::from_seed(&config.seed)?;
        let instances = config
            .imds
            .iter()
            .map(|l| check_instance(&state, &l.instance))
            .collect::<Result<Vec<_>, _>>()?;
        let pki = tls::generate(&config.tls_names)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            settings: RwLock::new(config.settings.clone()),
            throttler: Mutex::default(),
            faults: Mutex::default(),
            log: Mutex::new(RequestLog::new(config.log_capacity)),
            signer: tokens::Signer::generate()?,
            imds_cache: Mutex::default(),
            issuers: issuer::IssuerCache::default(),
        });
        let (shutdown, rx) = watch::channel(false);
        let handler: Handler = {
            let sh = shared.clone();
            Arc::new(move |req, conn| Box::pin(serve_request(sh.clone(), req, conn)))
        };
        let mut tasks = Vec::new();
        let mut imds = Vec::new();
        for (l, instance) in config.imds.iter().zip(instances) {
            let listener = bind(l.addr).await?;
            let addr = listener
                .local_addr()
                .map_err(|source| StartError::Bind { addr: l.addr, source })?;
            imds.push(ImdsListener {
                addr,
                instance: l.instance.clone(),
            });
            tasks.push(spawn_listener(
                listener,
                None,
                Some(instance),
                handler.clone(),
                rx.clone(),
            ));
        }
        let listener = bind(config.azure_addr).await?;
        let azure = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.azure_addr,
            source,
        })?;
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
        tasks.push(spawn_listener(
            listener,
            Some(acceptor),
            None,
            handler,
            rx.clone(),
        ));
        let mut addresses = Addresses {
            imds,
            azure,
            admin: None,
        };
        if let Some(admin_addr) = config.admin_addr {
            let listener = bind(admin_addr).await?;
            addresses.admin = Some(listener.local_addr().map_err(|source| StartError::Bind {
                addr: admin_addr,
                source,
            })?);
            let ctx = admin::AdminCtx {
                shared: shared.clone(),
                addresses: addresses.clone(),
                ca_pem: pki.ca_pem.clone(),
            };
            tasks.push(admin::spawn(listener, ctx, rx));
        }
        tracing::info!(azure = %addresses.azure, admin = ?addresses.admin, "emulator started");
        Ok(Self {
            shared,
            addresses,
            ca_pem: pki.ca_pem,
            ca_der: pki.ca_der.to_vec(),
            shutdown,
            tasks,
        })
    }

    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    /// `http://addr` of the `n`th IMDS listener.
    pub fn imds_url(&self, n: usize) -> Option<String> {
        self.addresses.imds.get(n).map(|l| format!("http://{}", l.addr))
    }

    /// `https://127.0.0.1:port` (or the bound address) of ARM, Entra and Key Vault.
    pub fn azure_url(&self) -> String {
        format!("https://{}", self.addresses.azure)
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    pub fn requests(&self, filter: &LogFilter) -> Vec<RequestRecord> {
        lock(&self.shared.log).query(filter)
    }

    pub fn counters(&self) -> Counters {
        lock(&self.shared.log).counters()
    }

    /// The sequence number of the latest request; use as [`LogFilter::since`].
    pub fn last_seq(&self) -> u64 {
        lock(&self.shared.log).last_seq()
    }

    pub fn clear_log(&self) {
        lock(&self.shared.log).clear();
    }

    /// Adds a fault rule; returns its ID.
    pub fn inject(&self, spec: FaultSpec) -> u64 {
        lock(&self.shared.faults).add(spec)
    }

    pub fn remove_fault(&self, id: u64) -> bool {
        lock(&self.shared.faults).remove(id)
    }

    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    pub fn faults(&self) -> Vec<Fault> {
        lock(&self.shared.faults).list()
    }

    /// The current state as a seed document.
    pub fn snapshot(&self) -> Seed {
        lock(&self.shared.state).to_seed()
    }

    /// Replaces the whole state; IMDS forgets the tokens it cached and Entra the issuer keys it fetched.
    pub fn replace_state(&self, seed: &Seed) -> Result<(), seed::SeedError> {
        let st = State::from_seed(seed)?;
        *lock(&self.shared.state) = st;
        lock(&self.shared.imds_cache).clear();
        self.shared.issuers.clear();
        Ok(())
    }

    /// Reads or changes the state directly.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut lock(&self.shared.state))
    }

    /// Adds and removes user-assigned identities of a VM or scale set behind ARM's back, effective at once.
    pub fn set_identities_directly(&self, resource: &str, add: &[String], remove: &[String]) -> bool {
        let Some(id) = ResourceId::parse(resource.trim_end_matches('/')) else {
            return false;
        };
        lock(&self.shared.state).set_identities_directly(&id.key(), add, remove)
    }

    pub fn settings(&self) -> Settings {
        read(&self.shared.settings).clone()
    }

    pub fn update_settings(&self, f: impl FnOnce(&mut Settings)) {
        f(&mut write(&self.shared.settings));
    }

    /// Refills every throttling bucket.
    pub fn reset_throttling(&self) {
        lock(&self.shared.throttler).reset();
    }

    /// Signs arbitrary claims with this emulator's key (for tests of expired or misdirected tokens).
    pub fn mint_token(&self, claims: &Claims) -> String {
        self.shared.signer.sign(claims)
    }

    /// Stops every listener and waits for them to go.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

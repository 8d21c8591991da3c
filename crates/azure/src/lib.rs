//! The Azure model of pod-identity and the Azure calls it makes, and nothing else.
//!
//! The model, always built and free of dependencies: ARM resource IDs ([`resource_id`]) and the VM or
//! scale set that holds a node's identities ([`Machine`]). The API types, the controller, the agent and
//! the emulator all read IDs through it.
//!
//! The clients, behind the default feature `client`: ARM identity GET/PATCH on VMs and scale sets (with
//! long-running operations, throttling, `If-Match` and 150-per-request chunks), the federated identity
//! credentials of user-assigned identities, the IMDS token call, Entra's client-credentials grant (with a
//! secret, a certificate or a federated token), and reading `azure.json`. Errors say what the caller should do
//! ([`AzureError`]); retrying is one policy ([`RetryPolicy`]).
//!
//! reqwest is built without a TLS provider of its own; the workspace uses ring. Clients built here install
//! ring as the process default when none is installed.

pub mod machine;
pub mod resource_id;

pub use crate::machine::{Machine, MachineKind};
pub use crate::resource_id::{ResourceId, ResourceType};

#[cfg(feature = "client")]
pub mod arm;
#[cfg(feature = "client")]
pub mod config;
#[cfg(feature = "client")]
pub mod entra;
#[cfg(feature = "client")]
pub mod error;
#[cfg(feature = "client")]
pub mod http;
#[cfg(feature = "client")]
pub mod identity;
#[cfg(feature = "client")]
pub mod imds;
#[cfg(feature = "client")]
pub mod imds_http;
#[cfg(feature = "client")]
pub mod retry;
#[cfg(feature = "client")]
pub mod token;

#[cfg(feature = "client")]
pub use crate::{
    arm::{ArmClient, ArmConfig, ThrottleScope, UpdateOutcome, UserAssignedIdentity},
    config::{AzureConfig, CloudEndpoints, Credential},
    entra::{ClientCertificate, ClientCredential, EntraClient},
    error::AzureError,
    http::HttpConfig,
    identity::{IdentityDelta, IdentityType, MAX_IDENTITIES_PER_REQUEST, ResourceIdentity},
    imds::{IdentitySelector, ImdsClient, ImdsToken, ManagedIdentity},
    retry::RetryPolicy,
    token::{AccessToken, CachedTokens, StaticToken, TokenSource},
};

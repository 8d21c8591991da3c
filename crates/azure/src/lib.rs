//! The Azure calls pod-identity makes, and nothing else: ARM identity GET/PATCH on VMs and scale sets (with
//! long-running operations, throttling and 150-per-request chunks), the federated identity credentials of
//! user-assigned identities, the IMDS token call, Entra's client-credentials grant (with a secret, a
//! certificate or a federated token), and reading `azure.json`. Errors say what the caller should do
//! ([`AzureError`]).
//!
//! reqwest is built without a TLS provider of its own; the workspace uses ring. Clients built here install
//! ring as the process default when none is installed.

pub mod arm;
pub mod config;
pub mod entra;
pub mod error;
pub mod http;
pub mod identity;
pub mod imds;
pub mod retry;
pub mod token;

pub use crate::arm::{
    ArmClient, ArmConfig, ComputeKind, ComputeResource, UpdateOutcome, UserAssignedIdentity,
};
pub use crate::config::{AzureConfig, CloudEndpoints, Credential};
pub use crate::entra::{ClientCertificate, ClientCredential, EntraClient};
pub use crate::error::AzureError;
pub use crate::http::HttpConfig;
pub use crate::identity::{IdentityPatch, IdentityType, ResourceIdentity};
pub use crate::imds::{IdentitySelector, ImdsClient, ImdsToken, ManagedIdentity};
pub use crate::retry::RetryPolicy;
pub use crate::token::{AccessToken, CachedTokens, StaticToken, TokenSource};

//! Federated identity credentials of a user-assigned identity
//! (`.../userAssignedIdentities/{name}/federatedIdentityCredentials[/{credential}]`, Microsoft.ManagedIdentity
//! api-version 2023-01-31 and later): list (paged through `nextLink`), PUT and DELETE. ARM answers a PUT with
//! 201 or 200, a DELETE with 200 or 204 when there was nothing to delete, and 409
//! `ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity` to a write under an identity while
//! another one runs, which is worth retrying ([`is_concurrent_write`]).

use reqwest::Method;
use serde_json::{Value, json};

use super::ArmClient;
use crate::error::AzureError;

/// ARM's code for a credential write refused because another one under the same identity is running.
pub const CONCURRENT_WRITES: &str = "ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity";

/// A federated identity credential as ARM describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedCredential {
    /// Its ARM ID.
    pub id: String,
    /// Its name (3-120 letters, digits, `-` and `_`).
    pub name: String,
    /// The issuer whose tokens it trusts.
    pub issuer: String,
    /// The `sub` it trusts.
    pub subject: String,
    /// The audiences it trusts (ARM allows exactly one).
    pub audiences: Vec<String>,
}

impl FederatedCredential {
    fn from_resource(body: &Value) -> Result<Self, AzureError> {
        let text = |v: &Value, k: &str| {
            v[k].as_str().map(str::to_owned).ok_or_else(|| {
                AzureError::InvalidResponse(format!("federated identity credential without {k}"))
            })
        };
        let properties = &body["properties"];
        Ok(Self {
            id: text(body, "id")?,
            name: text(body, "name")?,
            issuer: text(properties, "issuer")?,
            subject: text(properties, "subject")?,
            audiences: properties["audiences"]
                .as_array()
                .map(|list| list.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default(),
        })
    }
}

/// Whether ARM refused a credential write because another write under the same identity was running (a
/// busy 409, which [`AzureError::is_retryable`] retries).
pub fn is_concurrent_write(error: &AzureError) -> bool {
    matches!(error, AzureError::Conflict { status: 409, .. })
}

impl ArmClient {
    fn credentials_path(identity_id: &str) -> String {
        format!(
            "{}/federatedIdentityCredentials",
            identity_id.trim_end_matches('/')
        )
    }

    /// Every federated identity credential of the user-assigned identity `identity_id`.
    #[tracing::instrument(skip(self))]
    pub async fn list_federated_credentials(
        &self,
        identity_id: &str,
    ) -> Result<Vec<FederatedCredential>, AzureError> {
        let mut url = self.url(&Self::credentials_path(identity_id), &self.cfg.msi_api_version);
        let mut credentials = Vec::new();
        // ARM pages at most a few hundred; an identity holds at most 20. The bound only guards against a
        // `nextLink` that never ends.
        for _ in 0..100 {
            let page = self.send(Method::GET, &url, None, None).await?.body;
            for item in page["value"].as_array().into_iter().flatten() {
                credentials.push(FederatedCredential::from_resource(item)?);
            }
            match page["nextLink"].as_str().filter(|link| !link.is_empty()) {
                Some(next) => url = next.to_owned(),
                None => return Ok(credentials),
            }
        }
        Err(AzureError::InvalidResponse(format!(
            "the federated identity credentials of {identity_id} never stopped paging"
        )))
    }

    /// Creates (or updates) credential `name` trusting `issuer`, `subject` and `audience`.
    #[tracing::instrument(skip(self))]
    pub async fn put_federated_credential(
        &self,
        identity_id: &str,
        name: &str,
        issuer: &str,
        subject: &str,
        audience: &str,
    ) -> Result<FederatedCredential, AzureError> {
        let url = self.url(
            &format!("{}/{name}", Self::credentials_path(identity_id)),
            &self.cfg.msi_api_version,
        );
        let body = json!({"properties": {"issuer": issuer, "subject": subject, "audiences": [audience]}});
        let answer = self.send(Method::PUT, &url, Some(&body), None).await?;
        FederatedCredential::from_resource(&answer.body)
    }

    /// Deletes credential `name`; whether it existed (ARM's 200, rather than 204).
    #[tracing::instrument(skip(self))]
    pub async fn delete_federated_credential(
        &self,
        identity_id: &str,
        name: &str,
    ) -> Result<bool, AzureError> {
        let url = self.url(
            &format!("{}/{name}", Self::credentials_path(identity_id)),
            &self.cfg.msi_api_version,
        );
        let answer = self.send(Method::DELETE, &url, None, None).await?;
        Ok(answer.status != 204)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_is_read_from_arms_resource_body() {
        let body = json!({
            "id": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u/federatedIdentityCredentials/c",
            "name": "c",
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
            "properties": {"issuer": "https://i", "subject": "system:serviceaccount:n:a", "audiences": ["api://AzureADTokenExchange"]},
        });
        let credential = FederatedCredential::from_resource(&body).unwrap();
        assert_eq!(credential.name, "c");
        assert_eq!(credential.audiences, ["api://AzureADTokenExchange"]);
        assert!(FederatedCredential::from_resource(&json!({"id": "x", "name": "c"})).is_err());
    }

    #[test]
    fn concurrent_writes_are_recognised() {
        let error = super::super::classify(
            409,
            &json!({"error": {"code": CONCURRENT_WRITES, "message": "Too many"}}),
            None,
        );
        assert!(is_concurrent_write(&error), "{error:?}");
        assert!(error.is_retryable(), "another write ends by itself");
        let other = super::super::classify(400, &json!({"error": {"code": "BadRequest"}}), None);
        assert!(!is_concurrent_write(&other));
    }
}

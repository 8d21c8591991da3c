//! The cloud-provider configuration (`/etc/kubernetes/azure.json`) and its environment-variable fallback, as
//! aad-pod-identity's controller read them. Keys match case-insensitively (the original went through Go's
//! JSON decoding, so `tenantID` and `tenantId` both worked); without a file, the variables `CLOUD`,
//! `TENANT_ID`, `CLIENT_ID`, `CLIENT_SECRET`, `SUBSCRIPTION_ID`, `RESOURCE_GROUP`, `VM_TYPE`, `USE_MSI` and
//! `USER_ASSIGNED_MSI_CLIENT_ID` are read instead. A custom cloud's endpoints come from the JSON file named by
//! `AZURE_ENVIRONMENT_FILEPATH`.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::AzureError;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AzureConfig {
    pub cloud: String,
    pub tenant_id: String,
    pub subscription_id: String,
    pub resource_group: String,
    pub location: String,
    pub vm_type: String,
    pub aad_client_id: String,
    pub aad_client_secret: String,
    pub aad_client_cert_path: String,
    pub aad_client_cert_password: String,
    pub use_managed_identity_extension: bool,
    /// The client ID of the user-assigned identity to use with `use_managed_identity_extension`.
    pub user_assigned_identity_id: String,
    pub security_group_name: String,
    pub vnet_name: String,
    pub subnet_name: String,
    pub use_instance_metadata: bool,
}

/// How the controller authenticates to ARM, in the original's precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// Through IMDS; `client_id` names a user-assigned identity, `None` the system-assigned one.
    ManagedIdentity {
        client_id: Option<String>,
    },
    ClientSecret {
        client_id: String,
        secret: String,
    },
    ClientCertificate {
        client_id: String,
        path: String,
        password: String,
    },
}

/// Where a cloud's services are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEndpoints {
    pub name: String,
    pub resource_manager: String,
    pub active_directory: String,
    /// The ARM token audience.
    pub management_audience: String,
    pub key_vault_dns_suffix: String,
}

fn lowered(obj: &Map<String, Value>) -> Map<String, Value> {
    obj.iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect()
}

fn string_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn bool_of(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

impl AzureConfig {
    pub fn from_json(text: &str) -> Result<Self, AzureError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| AzureError::Config(format!("azure.json: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| AzureError::Config("azure.json is not a JSON object".into()))?;
        let m = lowered(obj);
        let s = |k: &str| string_of(m.get(k));
        Ok(Self {
            cloud: s("cloud"),
            tenant_id: s("tenantid"),
            subscription_id: s("subscriptionid"),
            resource_group: s("resourcegroup"),
            location: s("location"),
            vm_type: s("vmtype"),
            aad_client_id: s("aadclientid"),
            aad_client_secret: s("aadclientsecret"),
            aad_client_cert_path: s("aadclientcertpath"),
            aad_client_cert_password: s("aadclientcertpassword"),
            use_managed_identity_extension: bool_of(m.get("usemanagedidentityextension")),
            user_assigned_identity_id: s("userassignedidentityid"),
            security_group_name: s("securitygroupname"),
            vnet_name: s("vnetname"),
            subnet_name: s("subnetname"),
            use_instance_metadata: bool_of(m.get("useinstancemetadata")),
        })
    }

    /// The environment fallback; `get` looks a variable up (`std::env::var(..).ok()` in production).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Self {
        let s = |k: &str| get(k).unwrap_or_default();
        Self {
            cloud: s("CLOUD"),
            tenant_id: s("TENANT_ID"),
            subscription_id: s("SUBSCRIPTION_ID"),
            resource_group: s("RESOURCE_GROUP"),
            vm_type: s("VM_TYPE"),
            aad_client_id: s("CLIENT_ID"),
            aad_client_secret: s("CLIENT_SECRET"),
            use_managed_identity_extension: s("USE_MSI").eq_ignore_ascii_case("true"),
            user_assigned_identity_id: s("USER_ASSIGNED_MSI_CLIENT_ID"),
            ..Self::default()
        }
    }

    /// Reads the file when given, the environment otherwise, and checks the result.
    pub fn load(path: Option<&Path>) -> Result<Self, AzureError> {
        let cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| AzureError::Config(format!("reading {}: {e}", p.display())))?;
                Self::from_json(&text)?
            }
            None => Self::from_env(|k| std::env::var(k).ok()),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), AzureError> {
        let missing: Vec<&str> = [
            ("tenantId", &self.tenant_id),
            ("subscriptionId", &self.subscription_id),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_empty())
        .map(|(k, _)| k)
        .collect();
        if !missing.is_empty() {
            return Err(AzureError::Config(format!(
                "azure configuration lacks {}",
                missing.join(" and ")
            )));
        }
        self.credential().map(|_| ())
    }

    /// Managed identity first, then a client secret, then a client certificate.
    pub fn credential(&self) -> Result<Credential, AzureError> {
        if self.use_managed_identity_extension {
            return Ok(Credential::ManagedIdentity {
                client_id: Some(self.user_assigned_identity_id.clone()).filter(|c| !c.is_empty()),
            });
        }
        if !self.aad_client_id.is_empty() && !self.aad_client_secret.is_empty() {
            return Ok(Credential::ClientSecret {
                client_id: self.aad_client_id.clone(),
                secret: self.aad_client_secret.clone(),
            });
        }
        if !self.aad_client_id.is_empty() && !self.aad_client_cert_path.is_empty() {
            return Ok(Credential::ClientCertificate {
                client_id: self.aad_client_id.clone(),
                path: self.aad_client_cert_path.clone(),
                password: self.aad_client_cert_password.clone(),
            });
        }
        Err(AzureError::Config(
            "azure configuration names no credential: set useManagedIdentityExtension, or aadClientId with aadClientSecret or aadClientCertPath".into(),
        ))
    }

    /// The endpoints of `cloud`; a custom cloud's come from the `AZURE_ENVIRONMENT_FILEPATH` file.
    pub fn endpoints(&self, environment_file: Option<&Path>) -> Result<CloudEndpoints, AzureError> {
        if let Some(p) = environment_file {
            let text = std::fs::read_to_string(p)
                .map_err(|e| AzureError::Config(format!("reading {}: {e}", p.display())))?;
            return environment_from_json(&text);
        }
        known_cloud(if self.cloud.is_empty() {
            "AzurePublicCloud"
        } else {
            &self.cloud
        })
    }
}

/// The endpoints of the clouds the original knew by name.
pub fn known_cloud(name: &str) -> Result<CloudEndpoints, AzureError> {
    let (rm, ad, aud, kv) = match name.to_ascii_lowercase().as_str() {
        "azurepubliccloud" | "azurecloud" => (
            "https://management.azure.com/",
            "https://login.microsoftonline.com/",
            "https://management.azure.com/",
            "vault.azure.net",
        ),
        "azureusgovernmentcloud" | "azureusgovernment" => (
            "https://management.usgovcloudapi.net/",
            "https://login.microsoftonline.us/",
            "https://management.usgovcloudapi.net/",
            "vault.usgovcloudapi.net",
        ),
        "azurechinacloud" => (
            "https://management.chinacloudapi.cn/",
            "https://login.chinacloudapi.cn/",
            "https://management.chinacloudapi.cn/",
            "vault.azure.cn",
        ),
        _ => {
            return Err(AzureError::Config(format!(
                "unknown cloud '{name}'; name a custom one with AZURE_ENVIRONMENT_FILEPATH"
            )));
        }
    };
    Ok(CloudEndpoints {
        name: name.to_owned(),
        resource_manager: rm.to_owned(),
        active_directory: ad.to_owned(),
        management_audience: aud.to_owned(),
        key_vault_dns_suffix: kv.to_owned(),
    })
}

/// Reads a go-autorest environment file (`resourceManagerEndpoint`, `activeDirectoryEndpoint`,
/// `tokenAudience` or `serviceManagementEndpoint`, `keyVaultDNSSuffix`).
pub fn environment_from_json(text: &str) -> Result<CloudEndpoints, AzureError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| AzureError::Config(format!("environment file: {e}")))?;
    let m = lowered(
        v.as_object()
            .ok_or_else(|| AzureError::Config("environment file is not a JSON object".into()))?,
    );
    let s = |k: &str| string_of(m.get(k));
    let rm = s("resourcemanagerendpoint");
    let ad = s("activedirectoryendpoint");
    if rm.is_empty() || ad.is_empty() {
        return Err(AzureError::Config(
            "environment file needs resourceManagerEndpoint and activeDirectoryEndpoint".into(),
        ));
    }
    let audience = [s("tokenaudience"), s("resourcemanagerendpoint")]
        .into_iter()
        .find(|a| !a.is_empty())
        .unwrap_or_default();
    Ok(CloudEndpoints {
        name: s("name"),
        resource_manager: rm,
        active_directory: ad,
        management_audience: audience,
        key_vault_dns_suffix: s("keyvaultdnssuffix"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn keys_match_in_any_case_as_the_original_did() {
        let a = AzureConfig::from_json(r#"{"tenantId":"t","subscriptionId":"s","aadClientId":"c","aadClientSecret":"x","resourceGroup":"MC_rg","vmType":"vmss","useManagedIdentityExtension":false}"#).unwrap();
        let b = AzureConfig::from_json(r#"{"tenantID":"t","SubscriptionID":"s","aadClientID":"c","AADClientSecret":"x","resourcegroup":"MC_rg","VMType":"vmss"}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.credential().unwrap(),
            Credential::ClientSecret {
                client_id: "c".into(),
                secret: "x".into()
            }
        );
    }

    #[test]
    fn managed_identity_wins_over_a_secret() {
        let c = AzureConfig::from_json(r#"{"tenantId":"t","subscriptionId":"s","aadClientId":"c","aadClientSecret":"x","useManagedIdentityExtension":true,"userAssignedIdentityID":"kubelet"}"#).unwrap();
        assert_eq!(
            c.credential().unwrap(),
            Credential::ManagedIdentity {
                client_id: Some("kubelet".into())
            }
        );
        let c = AzureConfig::from_json(
            r#"{"tenantId":"t","subscriptionId":"s","useManagedIdentityExtension":"true"}"#,
        )
        .unwrap();
        assert_eq!(
            c.credential().unwrap(),
            Credential::ManagedIdentity { client_id: None }
        );
    }

    #[test]
    fn environment_fallback_reads_the_original_variables() {
        let env: HashMap<&str, &str> = HashMap::from([
            ("TENANT_ID", "t"),
            ("SUBSCRIPTION_ID", "s"),
            ("RESOURCE_GROUP", "rg"),
            ("USE_MSI", "True"),
            ("USER_ASSIGNED_MSI_CLIENT_ID", "u"),
            ("CLOUD", "AzureChinaCloud"),
        ]);
        let c = AzureConfig::from_env(|k| env.get(k).map(|v| (*v).to_string()));
        assert!(c.validate().is_ok());
        assert_eq!(
            c.credential().unwrap(),
            Credential::ManagedIdentity {
                client_id: Some("u".into())
            }
        );
        assert_eq!(
            c.endpoints(None).unwrap().resource_manager,
            "https://management.chinacloudapi.cn/"
        );
    }

    #[test]
    fn missing_fields_and_credentials_are_reported() {
        let err = AzureConfig::from_json(r#"{"tenantId":"t"}"#)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("subscriptionId"), "{err}");
        let err = AzureConfig::from_json(r#"{"tenantId":"t","subscriptionId":"s"}"#)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("no credential"), "{err}");
        assert!(AzureConfig::from_json("[1]").is_err());
    }

    #[test]
    fn custom_cloud_from_an_environment_file() {
        let e = environment_from_json(r#"{"name":"Local","resourceManagerEndpoint":"https://127.0.0.1:8443/","activeDirectoryEndpoint":"https://127.0.0.1:8443/","tokenAudience":"https://management.azure.com/","keyVaultDNSSuffix":"vault.azure.net"}"#).unwrap();
        assert_eq!(e.resource_manager, "https://127.0.0.1:8443/");
        assert_eq!(e.management_audience, "https://management.azure.com/");
        assert!(environment_from_json(r#"{"name":"x"}"#).is_err());
        assert!(known_cloud("Nowhere").is_err());
    }
}

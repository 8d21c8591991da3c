//! Checks of identity and binding specs, with messages that say what is wrong and how to fix it.
//!
//! The CRDs carry the same rules as CEL, so the API server refuses new bad objects. These functions
//! catch objects stored before the rules existed (or written with validation bypassed), so that the
//! controller and the agent can report them instead of acting on them.

use std::fmt;

use pod_identity_azure::ResourceId;

use crate::{AzureIdentityBindingSpec, AzureIdentitySpec, IdentityType};

/// One problem of a spec: the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// JSON name of the field within `spec`, or a path from the object's root starting with `metadata.`
    /// (an annotation).
    pub field: &'static str,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl SpecError {
    pub(crate) fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }

    /// A problem of an annotation; `path` is `metadata.annotations[<key>]`.
    pub(crate) fn annotation(path: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: path,
            message: message.into(),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.starts_with("metadata.") {
            write!(f, "{}: {}", self.field, self.message)
        } else {
            write!(f, "spec.{}: {}", self.field, self.message)
        }
    }
}

/// Whether `value` is a GUID in its usual 8-4-4-4-12 hexadecimal form.
pub fn is_guid(value: &str) -> bool {
    // Groups of 8, 4, 4, 4 and 12 hex digits: hyphens at these offsets, 36 bytes in all. Checked on
    // every token request's resource, so without allocating.
    const HYPHENS: [usize; 4] = [8, 13, 18, 23];
    let bytes = value.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(at, b)| {
            if HYPHENS.contains(&at) {
                *b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        })
}

/// Whether `value` may be the value of a Kubernetes label (empty is allowed there, but never matches).
pub fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    let inner_ok = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let ends_ok = match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric(),
        _ => true,
    };
    value.len() <= 63 && inner_ok && ends_ok
}

pub(crate) fn identity_spec_errors(spec: &AzureIdentitySpec) -> Vec<SpecError> {
    let mut errors = Vec::new();
    let kind = match spec.identity_type() {
        Ok(kind) => Some(kind),
        Err(err) => {
            errors.push(err);
            None
        }
    };
    match spec.client_id.as_deref() {
        None | Some("") => errors.push(SpecError::new(
            "clientID",
            "clientID is required: the client (application) ID of the identity",
        )),
        Some(id) if !is_guid(id) => errors.push(SpecError::new(
            "clientID",
            format!("clientID must be a GUID (the client ID of the identity), not {id:?}"),
        )),
        Some(_) => {}
    }
    match kind {
        Some(IdentityType::UserAssignedManagedIdentity) => match spec.resource_id.as_deref() {
            None | Some("") => errors.push(SpecError::new(
                "resourceID",
                "resourceID is required for a user-assigned managed identity (type 0)",
            )),
            Some(id) if ResourceId::user_assigned_identity(id).is_none() => errors.push(SpecError::new(
                "resourceID",
                format!(
                    "resourceID must be the ID of a user-assigned managed identity, /subscriptions/<subscription>/\
                     resourceGroups/<group>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>, not {id:?}"
                ),
            )),
            Some(_) => {}
        },
        Some(IdentityType::ServicePrincipalSecret | IdentityType::ServicePrincipalCertificate) => {
            if spec.tenant_id.as_deref().is_none_or(str::is_empty) {
                errors.push(SpecError::new("tenantID", "tenantID is required for a service principal (type 1 or 2)"));
            }
            let secret_named = spec
                .client_password
                .as_ref()
                .and_then(|secret| secret.name.as_deref())
                .is_some_and(|name| !name.is_empty());
            if !secret_named {
                errors.push(SpecError::new(
                    "clientPassword",
                    "clientPassword.name must name the Secret holding the service principal's credential (type 1 or 2)",
                ));
            }
        }
        None => {}
    }
    if let Some(endpoint) = spec
        .ad_endpoint
        .as_deref()
        .filter(|e| !e.is_empty() && !e.starts_with("https://"))
    {
        errors.push(SpecError::new(
            "adEndpoint",
            format!("adEndpoint must be an https:// URL of an Entra ID authority, not {endpoint:?}"),
        ));
    }
    errors
}

pub(crate) fn binding_spec_errors(spec: &AzureIdentityBindingSpec) -> Vec<SpecError> {
    let mut errors = Vec::new();
    if spec.azure_identity.as_deref().is_none_or(str::is_empty) {
        errors.push(SpecError::new(
            "azureIdentity",
            "azureIdentity must name an AzureIdentity in the binding's namespace",
        ));
    }
    match spec.selector.as_deref() {
        None | Some("") => errors.push(SpecError::new(
            "selector",
            "selector must be set: pods use this binding by carrying the label aadpodidbinding=<selector>",
        )),
        Some(selector) if !is_label_value(selector) => errors.push(SpecError::new(
            "selector",
            format!(
                "selector {selector:?} can never match: it must be a valid label value (at most 63 letters, \
                 digits, '-', '_' or '.', starting and ending with a letter or digit)"
            ),
        )),
        Some(_) => {}
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretReference;

    const RESOURCE_ID: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app-id";
    const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";

    fn user_assigned() -> AzureIdentitySpec {
        AzureIdentitySpec {
            type_: Some(0),
            resource_id: Some(RESOURCE_ID.into()),
            client_id: Some(CLIENT_ID.into()),
            ..Default::default()
        }
    }

    fn fields(errors: &[SpecError]) -> Vec<&'static str> {
        errors.iter().map(|e| e.field).collect()
    }

    #[test]
    fn valid_user_assigned_identity_has_no_errors() {
        assert_eq!(user_assigned().validate(), vec![]);
    }

    #[test]
    fn absent_type_means_user_assigned() {
        let spec = AzureIdentitySpec {
            type_: None,
            ..user_assigned()
        };
        assert_eq!(
            spec.identity_type(),
            Ok(IdentityType::UserAssignedManagedIdentity)
        );
        assert_eq!(spec.validate(), vec![]);
    }

    #[test]
    fn unknown_type_is_named_in_the_error() {
        let spec = AzureIdentitySpec {
            type_: Some(7),
            ..user_assigned()
        };
        let errors = spec.validate();
        assert_eq!(fields(&errors), vec!["type"]);
        assert!(errors[0].message.contains("not 7"), "{}", errors[0]);
    }

    #[test]
    fn resource_id_of_another_resource_type_is_rejected() {
        let vm = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm";
        let spec = AzureIdentitySpec {
            resource_id: Some(vm.into()),
            ..user_assigned()
        };
        let errors = spec.validate();
        assert_eq!(fields(&errors), vec!["resourceID"]);
        assert!(
            errors[0]
                .to_string()
                .starts_with("spec.resourceID: resourceID must be the ID of a user-assigned")
        );
    }

    #[test]
    fn resource_id_is_compared_case_insensitively() {
        let spec = AzureIdentitySpec {
            resource_id: Some(RESOURCE_ID.to_uppercase()),
            ..user_assigned()
        };
        assert_eq!(spec.validate(), vec![]);
    }

    #[test]
    fn resource_id_with_extra_or_missing_segments_is_rejected() {
        for bad in [
            format!("{RESOURCE_ID}/extra"),
            format!("{RESOURCE_ID}/"),
            RESOURCE_ID.trim_start_matches('/').to_owned(),
            "/subscriptions//resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x"
                .to_owned(),
        ] {
            let spec = AzureIdentitySpec {
                resource_id: Some(bad.clone()),
                ..user_assigned()
            };
            assert_eq!(fields(&spec.validate()), vec!["resourceID"], "{bad}");
        }
    }

    #[test]
    fn missing_resource_id_for_user_assigned_is_rejected() {
        let spec = AzureIdentitySpec {
            resource_id: None,
            ..user_assigned()
        };
        assert_eq!(fields(&spec.validate()), vec!["resourceID"]);
    }

    #[test]
    fn client_id_must_be_a_guid() {
        let spec = AzureIdentitySpec {
            client_id: Some(RESOURCE_ID.into()),
            ..user_assigned()
        };
        assert_eq!(fields(&spec.validate()), vec!["clientID"]);
        let spec = AzureIdentitySpec {
            client_id: None,
            ..user_assigned()
        };
        assert_eq!(fields(&spec.validate()), vec!["clientID"]);
    }

    #[test]
    fn service_principal_needs_tenant_and_secret() {
        let spec = AzureIdentitySpec {
            type_: Some(1),
            client_id: Some(CLIENT_ID.into()),
            ..Default::default()
        };
        assert_eq!(fields(&spec.validate()), vec!["tenantID", "clientPassword"]);
        let spec = AzureIdentitySpec {
            tenant_id: Some("tenant".into()),
            client_password: Some(SecretReference {
                name: Some("sp-secret".into()),
                namespace: None,
            }),
            ..spec
        };
        assert_eq!(spec.validate(), vec![]);
    }

    #[test]
    fn plain_http_authority_is_rejected() {
        let spec = AzureIdentitySpec {
            ad_endpoint: Some("http://login.example".into()),
            ..user_assigned()
        };
        assert_eq!(fields(&spec.validate()), vec!["adEndpoint"]);
    }

    #[test]
    fn binding_needs_identity_and_selector() {
        let spec = AzureIdentityBindingSpec::default();
        assert_eq!(fields(&spec.validate()), vec!["azureIdentity", "selector"]);
    }

    #[test]
    fn binding_selector_must_be_a_label_value() {
        let spec = AzureIdentityBindingSpec {
            azure_identity: Some("id".into()),
            selector: Some("my app".into()),
            weight: None,
        };
        let errors = spec.validate();
        assert_eq!(fields(&errors), vec!["selector"]);
        assert!(errors[0].message.contains("can never match"));
    }

    #[test]
    fn label_values() {
        assert!(is_label_value("demo"));
        assert!(is_label_value("a.b_c-d"));
        assert!(!is_label_value("-demo"));
        assert!(!is_label_value("demo-"));
        assert!(!is_label_value(&"a".repeat(64)));
        assert!(is_label_value(&"a".repeat(63)));
    }

    #[test]
    fn guids() {
        assert!(is_guid(CLIENT_ID));
        assert!(is_guid("ABCDEF01-2345-6789-abcd-ef0123456789"));
        assert!(!is_guid("11111111-2222-3333-4444-55555555555"));
        assert!(!is_guid("1111111g-2222-3333-4444-555555555555"));
        // Hyphens in the wrong places, or doubled, though the length is right.
        for wrong in [
            "111111112-222-3333-4444-555555555555",
            "11111111-2222-3333-4444--55555555555",
            "11111111+2222-3333-4444-555555555555",
            "111111111222233334444555555555555555",
            "11111111-2222-3333-4444-55555555555é",
            "",
        ] {
            assert!(!is_guid(wrong), "{wrong}");
        }
    }
}

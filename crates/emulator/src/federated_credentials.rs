//! Federated identity credentials on user-assigned identities (ARM `Microsoft.ManagedIdentity/
//! userAssignedIdentities/federatedIdentityCredentials`) and on app registrations: the rules a write must
//! pass, and listing in pages. Plain functions over plain data; `arm_federated_credentials` serves them over
//! HTTP and the seed loader applies the same rules.
//!
//! Sources: the MSI resource provider's spec (`specification/msi/resource-manager/Microsoft.ManagedIdentity/
//! ManagedIdentity/stable/2024-11-30/ManagedIdentity.json`: name pattern, `$top`/`$skiptoken`), and Entra's
//! "Important considerations and restrictions for federated identity credentials" (20 per identity, unique
//! issuer and subject, exactly one audience, 600 characters per field, its error table).

use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};

use crate::seed::FederatedCredentialSeed;
use pod_identity_azure::resource_id::ResourceId;

/// At most this many credentials on one identity or application.
pub const MAX_PER_IDENTITY: usize = 20;
/// Longest issuer, subject or audience.
pub const MAX_FIELD_CHARS: usize = 600;
pub const ARM_TYPE: &str = "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials";

/// A credential as the emulator holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedCredential {
    /// As first written; compared case-insensitively, like every ARM resource name.
    pub name: String,
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    /// Before this instant Entra does not know the credential yet (propagation); `None` once it does.
    pub visible_at: Option<Instant>,
}

impl FederatedCredential {
    pub fn from_seed(s: &FederatedCredentialSeed) -> Self {
        Self {
            name: s.name.clone(),
            issuer: s.issuer.clone(),
            subject: s.subject.clone(),
            audiences: s.audiences.clone(),
            visible_at: None,
        }
    }

    pub fn to_seed(&self) -> FederatedCredentialSeed {
        FederatedCredentialSeed {
            name: self.name.clone(),
            issuer: self.issuer.clone(),
            subject: self.subject.clone(),
            audiences: self.audiences.clone(),
        }
    }

    /// Whether Entra matches tokens against it at `now`.
    pub fn propagated(&self, now: Instant) -> bool {
        self.visible_at.is_none_or(|t| t <= now)
    }

    /// ARM's JSON for the credential on `identity`. The spec's examples spell the segment `resourcegroups`.
    pub fn render(&self, identity: &ResourceId) -> Value {
        json!({
            "id": format!(
                "/subscriptions/{}/resourcegroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{}/federatedIdentityCredentials/{}",
                identity.subscription, identity.resource_group, identity.name, self.name
            ),
            "name": self.name,
            "type": ARM_TYPE,
            "properties": {
                "issuer": self.issuer,
                "subject": self.subject,
                "audiences": self.audiences,
            },
        })
    }
}

/// The writable part of a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Properties {
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
}

/// Why a write or a list request is refused. Messages are the ones Entra's documentation lists, prefixed
/// "The request format was unexpected." as the resource provider answers (observed: "The request format
/// was unexpected. Federated Identity Credential must specify 'issuer', 'subject' and 'audience'.",
/// terraform-provider-azurerm users, 2024). Where no source gives a text ([`Self::TooMany`], the field
/// limits, `$top`), it is worded the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("Federated Identity Credential name '{0}' is invalid.")]
    InvalidName(String),
    #[error("Federated Identity Credential from HTTP body has empty properties")]
    EmptyProperties,
    #[error(
        "The request format was unexpected. Federated Identity Credential must specify 'issuer', 'subject' and 'audience'."
    )]
    MissingProperty,
    #[error("Federated identity credentials must have exactly one audience.")]
    AudienceCount,
    #[error(
        "The request format was unexpected. Federated Identity Credential property '{0}' must be at most 600 characters long."
    )]
    TooLong(&'static str),
    #[error(
        "The request format was unexpected. Federated Identity Credential issuer '{0}' is not a valid https URL."
    )]
    IssuerNotUrl(String),
    #[error("Issuer and subject combination already exists for this Managed Identity.")]
    Duplicate,
    #[error(
        "The request format was unexpected. The managed identity already has the maximum of 20 federated identity credentials."
    )]
    TooMany,
    #[error("The request format was unexpected. The value of '$top' must be an integer of at least 1.")]
    BadTop,
    #[error("The request format was unexpected. The value of '$skiptoken' is not valid.")]
    BadSkipToken,
}

impl RuleError {
    /// ARM's status and error code. Entra's table gives 400 for every rule; the duplicate's code `Conflict`
    /// is observed (Azure/bicep-types-az#2054 and deployment logs quote "Conflict: Issuer and subject
    /// combination already exists ..."), the others answer `BadRequest` as the observed missing-property
    /// error does.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Duplicate => "Conflict",
            _ => "BadRequest",
        }
    }
}

/// The name pattern `^[a-zA-Z0-9]{1}[a-zA-Z0-9-_]{2,119}$`.
pub fn validate_name(name: &str) -> Result<(), RuleError> {
    let b = name.as_bytes();
    let ok = (3..=120).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(RuleError::InvalidName(name.to_owned()))
    }
}

/// Reads a PUT body (`{"properties":{"issuer","subject","audiences":[...]}}`); unknown fields are ignored
/// as ARM ignores them.
pub fn parse_properties(body: &Value) -> Result<Properties, RuleError> {
    let props = match body.get("properties") {
        Some(Value::Object(p)) if !p.is_empty() => p,
        Some(Value::Object(_)) | Some(Value::Null) | None => return Err(RuleError::EmptyProperties),
        Some(_) => return Err(RuleError::MissingProperty),
    };
    let text = |k: &str| props.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    let (Some(issuer), Some(subject)) = (text("issuer"), text("subject")) else {
        return Err(RuleError::MissingProperty);
    };
    let audiences: Vec<String> = match props.get("audiences") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or(RuleError::MissingProperty))
            .collect::<Result<_, _>>()?,
        _ => return Err(RuleError::MissingProperty),
    };
    let p = Properties {
        issuer: issuer.to_owned(),
        subject: subject.to_owned(),
        audiences,
    };
    validate_properties(&p)?;
    Ok(p)
}

fn validate_properties(p: &Properties) -> Result<(), RuleError> {
    if p.audiences.len() != 1 || p.audiences[0].is_empty() {
        return Err(RuleError::AudienceCount);
    }
    for (field, value) in [
        ("issuer", &p.issuer),
        ("subject", &p.subject),
        ("audiences", &p.audiences[0]),
    ] {
        if value.chars().count() > MAX_FIELD_CHARS {
            return Err(RuleError::TooLong(field));
        }
    }
    let host = p.issuer.strip_prefix("https://").unwrap_or("");
    if host.is_empty() || host.starts_with('/') || p.issuer.chars().any(char::is_whitespace) {
        return Err(RuleError::IssuerNotUrl(p.issuer.clone()));
    }
    Ok(())
}

/// What a successful [`upsert`] did; ARM answers 201 for a new credential and 200 for a changed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    Created,
    Updated,
}

/// Creates credential `name` or replaces its properties, keeping the list's rules: at most
/// [`MAX_PER_IDENTITY`], issuer and subject unique (compared exactly, as Entra matches them).
pub fn upsert(
    list: &mut Vec<FederatedCredential>,
    name: &str,
    props: Properties,
    visible_at: Option<Instant>,
) -> Result<Upserted, RuleError> {
    validate_name(name)?;
    validate_properties(&props)?;
    let existing = list.iter().position(|c| c.name.eq_ignore_ascii_case(name));
    let clash = list
        .iter()
        .enumerate()
        .any(|(i, c)| Some(i) != existing && c.issuer == props.issuer && c.subject == props.subject);
    if clash {
        return Err(RuleError::Duplicate);
    }
    match existing {
        Some(i) => {
            let c = &mut list[i];
            c.issuer = props.issuer;
            c.subject = props.subject;
            c.audiences = props.audiences;
            c.visible_at = visible_at;
            Ok(Upserted::Updated)
        }
        None if list.len() >= MAX_PER_IDENTITY => Err(RuleError::TooMany),
        None => {
            list.push(FederatedCredential {
                name: name.to_owned(),
                issuer: props.issuer,
                subject: props.subject,
                audiences: props.audiences,
                visible_at,
            });
            Ok(Upserted::Created)
        }
    }
}

/// Removes credential `name`; whether it was there (ARM answers 200, or 204 when it was not).
pub fn remove(list: &mut Vec<FederatedCredential>, name: &str) -> bool {
    let before = list.len();
    list.retain(|c| !c.name.eq_ignore_ascii_case(name));
    list.len() != before
}

/// A seed's credentials, checked by the same rules as ARM writes.
pub fn from_seeds(seeds: &[FederatedCredentialSeed]) -> Result<Vec<FederatedCredential>, RuleError> {
    let mut list = Vec::new();
    for s in seeds {
        if list
            .iter()
            .any(|c: &FederatedCredential| c.name.eq_ignore_ascii_case(&s.name))
        {
            return Err(RuleError::Duplicate);
        }
        let props = Properties {
            issuer: s.issuer.clone(),
            subject: s.subject.clone(),
            audiences: s.audiences.clone(),
        };
        upsert(&mut list, &s.name, props, None)?;
    }
    Ok(list)
}

/// One page of a list, ordered by name (case-folded). `top` is `$top` as sent; `skip_token` the
/// `$skiptoken` of the previous page's `nextLink`, which names the last credential it returned (so a
/// credential deleted between pages shifts nothing). The second value is the next page's `$skiptoken`.
pub fn page<'a>(
    list: &'a [FederatedCredential],
    top: Option<&str>,
    skip_token: Option<&str>,
) -> Result<(Vec<&'a FederatedCredential>, Option<String>), RuleError> {
    let top = match top {
        None => None,
        Some(t) => Some(
            t.parse::<usize>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or(RuleError::BadTop)?,
        ),
    };
    let after = match skip_token {
        None => None,
        Some(t) => Some(
            B64.decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or(RuleError::BadSkipToken)?,
        ),
    };
    let mut sorted: Vec<&FederatedCredential> = list
        .iter()
        .filter(|c| {
            after
                .as_deref()
                .is_none_or(|a| c.name.to_ascii_lowercase().as_str() > a)
        })
        .collect();
    sorted.sort_by_key(|c| c.name.to_ascii_lowercase());
    match top {
        Some(n) if sorted.len() > n => {
            sorted.truncate(n);
            let last = sorted.last().map(|c| B64.encode(c.name.to_ascii_lowercase()));
            Ok((sorted, last))
        }
        _ => Ok((sorted, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(issuer: &str, subject: &str) -> Properties {
        Properties {
            issuer: issuer.into(),
            subject: subject.into(),
            audiences: vec!["api://AzureADTokenExchange".into()],
        }
    }

    #[test]
    fn names_follow_the_spec_pattern() {
        for good in ["abc", "a-_", "0fic", &"a".repeat(120)] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        for bad in ["ab", "-abc", "_abc", "a.bc", "a b", "ünï", &"a".repeat(121), ""] {
            assert_eq!(
                validate_name(bad),
                Err(RuleError::InvalidName(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn bodies_need_all_three_properties_and_one_audience() {
        let ok = json!({"properties": {"issuer": "https://i", "subject": "s", "audiences": ["a"]}});
        assert_eq!(parse_properties(&ok).unwrap().audiences, vec!["a".to_string()]);
        let cases = [
            (json!({}), RuleError::EmptyProperties),
            (json!({"properties": {}}), RuleError::EmptyProperties),
            (json!({"properties": null}), RuleError::EmptyProperties),
            (json!({"properties": "x"}), RuleError::MissingProperty),
            (
                json!({"properties": {"issuer": "https://i", "subject": "s"}}),
                RuleError::MissingProperty,
            ),
            (
                json!({"properties": {"issuer": "https://i", "audiences": ["a"]}}),
                RuleError::MissingProperty,
            ),
            (
                json!({"properties": {"issuer": "", "subject": "s", "audiences": ["a"]}}),
                RuleError::MissingProperty,
            ),
            (
                json!({"properties": {"issuer": "https://i", "subject": "s", "audiences": []}}),
                RuleError::AudienceCount,
            ),
            (
                json!({"properties": {"issuer": "https://i", "subject": "s", "audiences": ["a", "b"]}}),
                RuleError::AudienceCount,
            ),
            (
                json!({"properties": {"issuer": "https://i", "subject": "s", "audiences": [1]}}),
                RuleError::MissingProperty,
            ),
            (
                json!({"properties": {"issuer": "http://i", "subject": "s", "audiences": ["a"]}}),
                RuleError::IssuerNotUrl("http://i".into()),
            ),
            (
                json!({"properties": {"issuer": " https://i", "subject": "s", "audiences": ["a"]}}),
                RuleError::IssuerNotUrl(" https://i".into()),
            ),
            (
                json!({"properties": {"issuer": "https://i", "subject": "s".repeat(601), "audiences": ["a"]}}),
                RuleError::TooLong("subject"),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(parse_properties(&body), Err(want), "{body}");
        }
    }

    #[test]
    fn upsert_creates_updates_and_keeps_the_limits() {
        let mut list = Vec::new();
        assert_eq!(
            upsert(&mut list, "one", props("https://i", "a"), None),
            Ok(Upserted::Created)
        );
        assert_eq!(
            upsert(&mut list, "ONE", props("https://i", "b"), None),
            Ok(Upserted::Updated)
        );
        assert_eq!(
            (list.len(), list[0].name.as_str(), list[0].subject.as_str()),
            (1, "one", "b")
        );
        // Rewriting a credential with its own issuer and subject is no clash.
        assert_eq!(
            upsert(&mut list, "one", props("https://i", "b"), None),
            Ok(Upserted::Updated)
        );
        assert_eq!(
            upsert(&mut list, "two", props("https://i", "b"), None),
            Err(RuleError::Duplicate)
        );
        // Matching is exact: another case or a trailing slash is another credential.
        assert!(upsert(&mut list, "two", props("https://i/", "b"), None).is_ok());
        assert!(upsert(&mut list, "three", props("https://i", "B"), None).is_ok());
        for n in 3..MAX_PER_IDENTITY {
            upsert(
                &mut list,
                &format!("n{n:02}"),
                props("https://i", &format!("s{n}")),
                None,
            )
            .unwrap();
        }
        assert_eq!(list.len(), MAX_PER_IDENTITY);
        assert_eq!(
            upsert(&mut list, "n99", props("https://i", "s99"), None),
            Err(RuleError::TooMany)
        );
        // At the limit an existing one can still change.
        assert!(upsert(&mut list, "n03", props("https://i", "s99"), None).is_ok());
        assert!(remove(&mut list, "N03"));
        assert!(!remove(&mut list, "n03"));
        assert!(upsert(&mut list, "n99", props("https://i", "s100"), None).is_ok());
    }

    #[test]
    fn seeds_obey_the_same_rules() {
        let s = |name: &str, subject: &str| FederatedCredentialSeed {
            name: name.into(),
            issuer: "https://i".into(),
            subject: subject.into(),
            audiences: vec!["api://AzureADTokenExchange".into()],
        };
        assert_eq!(from_seeds(&[s("one", "a"), s("two", "b")]).unwrap().len(), 2);
        assert_eq!(
            from_seeds(&[s("one", "a"), s("ONE", "b")]),
            Err(RuleError::Duplicate)
        );
        assert_eq!(
            from_seeds(&[s("one", "a"), s("two", "a")]),
            Err(RuleError::Duplicate)
        );
        assert_eq!(
            from_seeds(&[s("x", "a")]),
            Err(RuleError::InvalidName("x".into()))
        );
    }

    #[test]
    fn pages_follow_the_skip_token_and_survive_deletes() {
        let mut list = Vec::new();
        for n in ["c", "a", "e", "b", "d"] {
            upsert(&mut list, &format!("fic-{n}"), props("https://i", n), None).unwrap();
        }
        let names = |p: &[&FederatedCredential]| p.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        let (all, next) = page(&list, None, None).unwrap();
        assert_eq!(names(&all), ["fic-a", "fic-b", "fic-c", "fic-d", "fic-e"]);
        assert_eq!(next, None);
        let (first, next) = page(&list, Some("2"), None).unwrap();
        assert_eq!(names(&first), ["fic-a", "fic-b"]);
        remove(&mut list, "fic-c");
        let (second, next) = page(&list, Some("2"), next.as_deref()).unwrap();
        assert_eq!(names(&second), ["fic-d", "fic-e"]);
        assert_eq!(next, None, "no further page when the rest fits");
        for bad in ["0", "-1", "x", ""] {
            assert_eq!(page(&list, Some(bad), None), Err(RuleError::BadTop), "{bad}");
        }
        assert_eq!(page(&list, None, Some("%%%")), Err(RuleError::BadSkipToken));
    }

    #[test]
    fn rendering_matches_the_spec_example() {
        let id = ResourceId::parse(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id",
        )
        .unwrap();
        let c = FederatedCredential {
            name: "fic".into(),
            issuer: "https://i".into(),
            subject: "sub".into(),
            audiences: vec!["api://AzureADTokenExchange".into()],
            visible_at: None,
        };
        assert_eq!(
            c.render(&id),
            json!({
                "id": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id/federatedIdentityCredentials/fic",
                "name": "fic",
                "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
                "properties": {"issuer": "https://i", "subject": "sub", "audiences": ["api://AzureADTokenExchange"]}
            })
        );
    }
}

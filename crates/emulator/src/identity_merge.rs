//! What a PATCH of `identity` does to a VM or scale set, as Compute applies it: the `userAssignedIdentities`
//! map is merged (`{}` adds, `null` removes, unmentioned identities stay), `type` decides whether the system
//! identity and the user-assigned ones survive, keys compare case-insensitively, and one request may carry at
//! most 150 entries. Pure over plain data so every rule is tested without a server.

use serde_json::Value;

use pod_identity_azure::resource_id::{ResourceId, ResourceType, fold};

/// Compute's per-request limit on `userAssignedIdentities` entries.
pub const MAX_IDENTITIES_PER_REQUEST: usize = 150;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityType {
    pub system: bool,
    pub user: bool,
}

impl IdentityType {
    pub const NONE: Self = Self {
        system: false,
        user: false,
    };

    /// Parses leniently, as the SDKs and CRP do: any case, with or without the space after the comma.
    pub fn parse(s: &str) -> Option<Self> {
        let norm: String = s
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        match norm.as_str() {
            "none" => Some(Self::NONE),
            "systemassigned" => Some(Self {
                system: true,
                user: false,
            }),
            "userassigned" => Some(Self {
                system: false,
                user: true,
            }),
            "systemassigned,userassigned" | "userassigned,systemassigned" => Some(Self {
                system: true,
                user: true,
            }),
            _ => None,
        }
    }

    /// The canonical spelling ARM returns.
    pub fn as_str(self) -> &'static str {
        match (self.system, self.user) {
            (false, false) => "None",
            (true, false) => "SystemAssigned",
            (false, true) => "UserAssigned",
            (true, true) => "SystemAssigned, UserAssigned",
        }
    }
}

/// The `identity` object of a PATCH body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentityPatch {
    /// `None` when the body leaves `type` out.
    pub kind: Option<IdentityType>,
    /// Entries in body order: the identity ID as sent, and whether it is added (`{}`) or removed (`null`).
    pub entries: Vec<(String, bool)>,
}

/// The identities a resource has now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CurrentIdentity {
    pub system: bool,
    /// User-assigned identity IDs, spelled as first assigned.
    pub user: Vec<String>,
}

/// The outcome of a valid PATCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    pub system: bool,
    pub user: Vec<String>,
    /// Identities that were not assigned before (they must exist and the caller must be allowed to assign them).
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl Merged {
    pub fn kind(&self) -> IdentityType {
        IdentityType {
            system: self.system,
            user: !self.user.is_empty(),
        }
    }
}

/// Why Compute refuses a PATCH; each maps to the error code and message CRP returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("The request content was invalid and could not be deserialized: '{0}'.")]
    Malformed(String),
    #[error(
        "The value '{0}' of parameter 'identity.type' is invalid. Allowed values are 'SystemAssigned', \
         'UserAssigned', 'SystemAssigned, UserAssigned', 'None'."
    )]
    InvalidType(String),
    #[error(
        "User Assigned Identities Number '{0}' Assign exceed limit '{MAX_IDENTITIES_PER_REQUEST}' in one request."
    )]
    TooMany(usize),
    #[error("Resource identity identityId '{0}' cannot be duplicated in the provided identityIds list.")]
    Duplicate(String),
    #[error(
        "Property id '{0}' at path 'identity.userAssignedIdentities' is invalid. Expect fully qualified \
         resource Id that start with '/subscriptions/{{subscriptionId}}' or '/providers/{{resourceProviderNamespace}}/'."
    )]
    InvalidId(String),
    #[error("ResourceIdentity identityIds should not be provided if the type is \"{0}\".")]
    IdsWithType(&'static str),
    #[error(
        "The identity type 'UserAssigned' requires at least one user assigned identity in 'userAssignedIdentities'."
    )]
    UserAssignedWithoutIds,
}

impl MergeError {
    /// The ARM error code and the `target` CRP puts on it.
    pub fn code_and_target(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::Malformed(_) => ("InvalidRequestContent", None),
            Self::InvalidType(_) => ("InvalidParameter", Some("identity.type")),
            Self::TooMany(_) => ("BadRequest", None),
            Self::Duplicate(_) => ("InvalidParameter", Some("resourceIdentity.identityIds")),
            Self::InvalidId(_) => ("LinkedInvalidPropertyId", None),
            Self::IdsWithType(_) => ("InvalidParameter", Some("resourceIdentity.identityIds")),
            Self::UserAssignedWithoutIds => ("InvalidParameter", Some("identity.userAssignedIdentities")),
        }
    }
}

/// Reads the `identity` member of a PATCH body. `Ok(None)` when the body has no `identity` (the PATCH then
/// leaves identities alone).
pub fn parse_patch(body: &Value) -> Result<Option<IdentityPatch>, MergeError> {
    let Some(obj) = body.as_object() else {
        return Err(MergeError::Malformed(
            "Error converting value to type 'VirtualMachineScaleSetUpdate'. Path ''".into(),
        ));
    };
    let identity = match obj.get("identity") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(MergeError::Malformed(
                "Error converting value to type 'VirtualMachineScaleSetIdentity'. Path 'identity'".into(),
            ));
        }
    };
    let kind = match identity.get("type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            Some(IdentityType::parse(s).ok_or_else(|| MergeError::InvalidType(s.clone()))?)
        }
        Some(other) => return Err(MergeError::InvalidType(other.to_string())),
    };
    let mut entries = Vec::new();
    match identity.get("userAssignedIdentities") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (id, v) in map {
                match v {
                    Value::Null => entries.push((id.clone(), false)),
                    Value::Object(_) => entries.push((id.clone(), true)),
                    _ => {
                        return Err(MergeError::Malformed(format!(
                            "Error converting value to type 'UserAssignedIdentitiesValue'. Path \
                             'identity.userAssignedIdentities['{id}']'"
                        )));
                    }
                }
            }
        }
        Some(_) => {
            return Err(MergeError::Malformed(
                "Error converting value to type 'Dictionary`2'. Path 'identity.userAssignedIdentities'"
                    .into(),
            ));
        }
    }
    Ok(Some(IdentityPatch { kind, entries }))
}

/// Applies a PATCH to the current identities.
pub fn merge(current: &CurrentIdentity, patch: &IdentityPatch) -> Result<Merged, MergeError> {
    if patch.entries.len() > MAX_IDENTITIES_PER_REQUEST {
        return Err(MergeError::TooMany(patch.entries.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for (id, _) in &patch.entries {
        if !seen.insert(fold(id)) {
            return Err(MergeError::Duplicate(id.clone()));
        }
        match ResourceId::parse(id.trim_end_matches('/')) {
            Some(r) if r.kind == ResourceType::UserAssignedIdentity => {}
            _ => return Err(MergeError::InvalidId(id.clone())),
        }
    }
    let keeps_user = patch.kind.is_none_or(|k| k.user);
    if let Some(k) = patch.kind
        && !k.user
        && patch.entries.iter().any(|(_, add)| *add)
    {
        return Err(MergeError::IdsWithType(k.as_str()));
    }
    let mut user: Vec<String> = if keeps_user {
        current.user.clone()
    } else {
        Vec::new()
    };
    if keeps_user {
        for (id, add) in &patch.entries {
            let pos = user.iter().position(|u| fold(u) == fold(id));
            match (add, pos) {
                (true, None) => user.push(id.clone()),
                (false, Some(i)) => {
                    user.remove(i);
                }
                _ => {}
            }
        }
    }
    if patch.kind.is_some_and(|k| k.user) && user.is_empty() {
        return Err(MergeError::UserAssignedWithoutIds);
    }
    let has = |list: &[String], id: &str| list.iter().any(|u| fold(u) == fold(id));
    Ok(Merged {
        system: patch.kind.map_or(current.system, |k| k.system),
        added: user.iter().filter(|u| !has(&current.user, u)).cloned().collect(),
        removed: current.user.iter().filter(|u| !has(&user, u)).cloned().collect(),
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn uami(n: usize) -> String {
        format!(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id{n}"
        )
    }

    fn patch(v: Value) -> IdentityPatch {
        parse_patch(&v).unwrap().unwrap()
    }

    #[test]
    fn type_parsing_is_lenient_and_output_canonical() {
        for s in [
            "SystemAssigned, UserAssigned",
            "SystemAssigned,UserAssigned",
            "systemassigned, userAssigned",
        ] {
            assert_eq!(
                IdentityType::parse(s).unwrap().as_str(),
                "SystemAssigned, UserAssigned"
            );
        }
        assert_eq!(
            IdentityType::parse("userAssigned").unwrap().as_str(),
            "UserAssigned"
        );
        assert_eq!(IdentityType::parse("none"), Some(IdentityType::NONE));
        assert_eq!(IdentityType::parse("Both"), None);
    }

    #[test]
    fn empty_object_adds_and_unmentioned_identities_stay() {
        let cur = CurrentIdentity {
            system: true,
            user: vec![uami(1)],
        };
        let m = merge(
            &cur,
            &patch(json!({"identity": {"type": "SystemAssigned, UserAssigned",
            "userAssignedIdentities": {uami(2): {}}}})),
        )
        .unwrap();
        assert_eq!(m.user, vec![uami(1), uami(2)]);
        assert!(m.system);
        assert_eq!(m.added, vec![uami(2)]);
        assert!(m.removed.is_empty());
    }

    #[test]
    fn null_removes_case_insensitively() {
        let cur = CurrentIdentity {
            system: false,
            user: vec![uami(1), uami(2)],
        };
        let m = merge(
            &cur,
            &patch(json!({"identity": {"type": "UserAssigned",
                "userAssignedIdentities": {uami(1).to_uppercase().replace("SUBSCRIPTIONS", "subscriptions"): null}}})),
        )
        .unwrap();
        assert_eq!(m.user, vec![uami(2)]);
        assert_eq!(m.removed, vec![uami(1)]);
    }

    #[test]
    fn adding_an_assigned_identity_in_other_case_keeps_the_first_spelling() {
        let cur = CurrentIdentity {
            system: false,
            user: vec![uami(1)],
        };
        let m = merge(
            &cur,
            &patch(json!({"identity": {"userAssignedIdentities": {uami(1).to_lowercase(): {}}}})),
        )
        .unwrap();
        assert_eq!(m.user, vec![uami(1)]);
        assert!(m.added.is_empty());
    }

    #[test]
    fn type_none_removes_everything_and_system_assigned_keeps_only_the_system_identity() {
        let cur = CurrentIdentity {
            system: true,
            user: vec![uami(1)],
        };
        let none = merge(&cur, &patch(json!({"identity": {"type": "None"}}))).unwrap();
        assert_eq!(none.kind(), IdentityType::NONE);
        assert_eq!(none.removed, vec![uami(1)]);
        let sys = merge(&cur, &patch(json!({"identity": {"type": "SystemAssigned"}}))).unwrap();
        assert_eq!(sys.kind().as_str(), "SystemAssigned");
        assert!(sys.user.is_empty());
    }

    #[test]
    fn user_assigned_type_drops_the_system_identity() {
        let cur = CurrentIdentity {
            system: true,
            user: vec![uami(1)],
        };
        let m = merge(&cur, &patch(json!({"identity": {"type": "UserAssigned"}}))).unwrap();
        assert!(!m.system);
        assert_eq!(m.user, vec![uami(1)]);
    }

    #[test]
    fn removing_the_last_identity_without_type_leaves_type_none() {
        let cur = CurrentIdentity {
            system: false,
            user: vec![uami(1)],
        };
        let m = merge(
            &cur,
            &patch(json!({"identity": {"userAssignedIdentities": {uami(1): null}}})),
        )
        .unwrap();
        assert_eq!(m.kind(), IdentityType::NONE);
    }

    #[test]
    fn removing_the_last_identity_with_type_user_assigned_is_refused() {
        let cur = CurrentIdentity {
            system: false,
            user: vec![uami(1)],
        };
        let err = merge(
            &cur,
            &patch(json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {uami(1): null}}})),
        )
        .unwrap_err();
        assert_eq!(err, MergeError::UserAssignedWithoutIds);
    }

    #[test]
    fn ids_with_system_assigned_type_are_refused_with_the_crp_message() {
        let err = merge(
            &CurrentIdentity::default(),
            &patch(json!({"identity": {"type": "SystemAssigned", "userAssignedIdentities": {uami(1): {}}}})),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "ResourceIdentity identityIds should not be provided if the type is \"SystemAssigned\"."
        );
        assert_eq!(
            err.code_and_target(),
            ("InvalidParameter", Some("resourceIdentity.identityIds"))
        );
    }

    #[test]
    fn at_most_150_entries_per_request() {
        let map: serde_json::Map<String, Value> = (0..150).map(|n| (uami(n), json!({}))).collect();
        assert!(
            merge(
                &CurrentIdentity::default(),
                &patch(json!({"identity": {"userAssignedIdentities": map}}))
            )
            .is_ok()
        );
        let map: serde_json::Map<String, Value> = (0..151).map(|n| (uami(n), json!({}))).collect();
        let err = merge(
            &CurrentIdentity::default(),
            &patch(json!({"identity": {"userAssignedIdentities": map}})),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "User Assigned Identities Number '151' Assign exceed limit '150' in one request."
        );
    }

    #[test]
    fn duplicates_differing_in_case_are_refused() {
        let err = merge(
            &CurrentIdentity::default(),
            &patch(
                json!({"identity": {"userAssignedIdentities": {uami(1): {}, uami(1).to_lowercase(): {}}}}),
            ),
        )
        .unwrap_err();
        assert!(matches!(err, MergeError::Duplicate(_)));
    }

    #[test]
    fn malformed_ids_and_types_are_refused() {
        assert!(matches!(
            merge(
                &CurrentIdentity::default(),
                &patch(json!({"identity": {"userAssignedIdentities": {"id1": {}}}}))
            ),
            Err(MergeError::InvalidId(_))
        ));
        assert!(matches!(
            parse_patch(&json!({"identity": {"type": "Both"}})),
            Err(MergeError::InvalidType(_))
        ));
        assert!(matches!(parse_patch(&json!([1])), Err(MergeError::Malformed(_))));
        assert!(matches!(
            parse_patch(&json!({"identity": {"userAssignedIdentities": [uami(1)]}})),
            Err(MergeError::Malformed(_))
        ));
        assert!(matches!(
            parse_patch(&json!({"identity": {"userAssignedIdentities": {uami(1): true}}})),
            Err(MergeError::Malformed(_))
        ));
    }

    #[test]
    fn a_body_without_identity_changes_nothing() {
        assert_eq!(parse_patch(&json!({"tags": {}})).unwrap(), None);
    }
}

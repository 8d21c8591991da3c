//! Names of the objects the system writes, compatible with aad-pod-identity 1.8.

use std::fmt;

/// Longest name the API server accepts for an object of a custom resource (a DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// Namespace and name of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Namespace of the object.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Name of the `AzureAssignedIdentity` of a pod and an identity: `<pod>-<podNamespace>-<identity>`, as
/// the original named it, so its objects are recognised and adopted.
///
/// The original failed to create the object when that name was longer than the API server allows. Such
/// names are cut and end in a hash of the full name instead, which keeps them unique and stable.
pub fn assigned_identity_name(pod: &str, pod_namespace: &str, identity: &str) -> String {
    let full = format!("{pod}-{pod_namespace}-{identity}");
    if full.len() <= MAX_NAME_LEN {
        return full;
    }
    let suffix = format!("{:016x}", fnv1a64(full.as_bytes()));
    let keep = MAX_NAME_LEN - suffix.len() - 1;
    // Names are ASCII (DNS subdomains), so cutting at a byte offset is safe; a label may not end
    // in '-' or '.', so neither may the cut prefix.
    let prefix = full[..keep].trim_end_matches(['-', '.']);
    format!("{prefix}-{suffix}")
}

/// FNV-1a: a hash with a fixed definition, so that names stay the same across versions and builds.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_those_of_the_original() {
        assert_eq!(
            assigned_identity_name("web-0", "shop", "payments-id"),
            "web-0-shop-payments-id"
        );
    }

    #[test]
    fn long_names_are_cut_to_the_limit_and_stay_unique() {
        let pod = "p".repeat(200);
        let a = assigned_identity_name(&pod, "ns", &"a".repeat(100));
        let b = assigned_identity_name(&pod, "ns", &format!("{}b", "a".repeat(99)));
        assert_eq!(a.len(), MAX_NAME_LEN);
        assert_eq!(b.len(), MAX_NAME_LEN);
        assert_ne!(a, b);
        assert_eq!(a, assigned_identity_name(&pod, "ns", &"a".repeat(100)), "stable");
    }

    #[test]
    fn cut_names_never_leave_a_dot_or_dash_before_the_hash() {
        let pod = format!("{}.x", "p".repeat(236));
        let name = assigned_identity_name(&pod, "ns", &"i".repeat(40));
        assert!(!name.contains(".-") && !name.contains("--"), "{name}");
        assert!(name.len() <= MAX_NAME_LEN);
    }

    #[test]
    fn hash_is_the_published_fnv1a() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}

//! What a request to the metadata address asks for, decided from its raw path, headers and query before
//! anything else happens.
//!
//! IMDS matches paths loosely (case-insensitively, and some front ends fold `\` into `/` or decode `%2F`),
//! so a variant of the token path that the agent forwarded untouched could reach IMDS's token endpoint
//! with the node's identities (CVE-2022-23551 in the original). Every path is therefore brought to a
//! canonical form first; a path whose canonical form names an identity endpoint is either exactly the
//! token path (served here) or refused, and only clean paths are ever forwarded.

use std::net::IpAddr;

/// The token endpoint, the only path the agent mints tokens on.
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
/// The endpoint host-network callers name a pod on (behind a flag).
pub const HOST_TOKEN_PATH: &str = "/host/token";

/// Where a request goes, decided by its path alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Exactly the token path.
    Token,
    /// Exactly `/host/token`.
    HostToken,
    /// `/metadata/instance` and below, with a clean path.
    Instance,
    /// Another `/metadata/...` path with a clean path (`/metadata/versions`, scheduled events, ...).
    OtherMetadata,
    /// A variant of an identity or token path: refused, never forwarded.
    Variant(&'static str),
    /// Nothing IMDS serves.
    NotFound,
}

impl Route {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::HostToken => "host_token",
            Self::Instance => "instance",
            Self::OtherMetadata => "metadata",
            Self::Variant(_) => "variant",
            Self::NotFound => "not_found",
        }
    }
}

/// Classifies a raw request path (as it came on the wire, still percent-encoded).
pub fn classify(raw_path: &str) -> Route {
    let canonical = match canonicalize(raw_path) {
        Ok(canonical) => canonical,
        Err(reason) => return Route::Variant(reason),
    };
    let clean = raw_path == canonical_spelling(raw_path);
    if canonical == TOKEN_PATH {
        return if raw_path == TOKEN_PATH {
            Route::Token
        } else {
            Route::Variant("a spelling of the token path other than /metadata/identity/oauth2/token")
        };
    }
    if canonical == HOST_TOKEN_PATH {
        return if raw_path == HOST_TOKEN_PATH {
            Route::HostToken
        } else {
            Route::Variant("a spelling of /host/token other than the exact one")
        };
    }
    // Anything naming identity or token endpoints, however spelt, is never forwarded: IMDS answers more
    // identity paths than the token one and may answer new ones tomorrow.
    if canonical.starts_with("/metadata/identity")
        || canonical.contains("oauth2")
        || canonical.contains("token")
    {
        return Route::Variant("an identity or token path other than /metadata/identity/oauth2/token");
    }
    if !clean {
        return Route::Variant("a path with encoded characters, backslashes, empty or dot segments");
    }
    if canonical == "/metadata/instance" || canonical.starts_with("/metadata/instance/") {
        Route::Instance
    } else if canonical.starts_with("/metadata/") {
        Route::OtherMetadata
    } else {
        Route::NotFound
    }
}

/// The path as IMDS would understand it: percent-decoded, `\` taken as `/`, empty and `.` segments
/// dropped, `..` applied, lower case, no trailing slash. Errors on what no client sends (invalid
/// encoding, control characters, `..` above the root).
pub fn canonicalize(raw_path: &str) -> Result<String, &'static str> {
    // Decoding twice catches double encoding (`%252F`), which some front ends decode twice.
    let once = decode(raw_path)?;
    let decoded = if once.contains('%') { decode(&once)? } else { once };
    if decoded.chars().any(|c| c.is_control()) {
        return Err("a path with control characters");
    }
    let mut segments: Vec<String> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err("a path that climbs above the root");
                }
            }
            other => segments.push(other.to_lowercase()),
        }
    }
    Ok(format!("/{}", segments.join("/")))
}

/// The raw path as a clean client writes it: the same bytes when nothing is encoded, doubled or folded.
fn canonical_spelling(raw_path: &str) -> String {
    if raw_path.contains(['%', '\\', ';']) {
        return String::new();
    }
    let segments: Vec<&str> = raw_path.split('/').skip(1).collect();
    if segments.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        // Empty segments are allowed only as a trailing slash.
        let trailing_only = segments.iter().enumerate().all(|(i, s)| {
            !s.is_empty() && *s != "." && *s != ".." || (s.is_empty() && i + 1 == segments.len())
        });
        if !trailing_only {
            return String::new();
        }
    }
    raw_path.to_owned()
}

fn decode(text: &str) -> Result<String, &'static str> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| "a path that does not decode to UTF-8")
}

/// Which identity a token request names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    /// None: the pod's default identity.
    Default,
    /// `client_id`.
    ClientId(String),
    /// `object_id`.
    ObjectId(String),
    /// `msi_res_id` or `mi_res_id`.
    ResourceId(String),
}

impl Selector {
    /// The query parameter as IMDS takes it, for forwarding.
    pub fn query_pair(&self) -> Option<(&'static str, &str)> {
        match self {
            Self::Default => None,
            Self::ClientId(id) => Some(("client_id", id)),
            Self::ObjectId(id) => Some(("object_id", id)),
            Self::ResourceId(id) => Some(("msi_res_id", id)),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("the default identity"),
            Self::ClientId(id) => write!(f, "client_id {id}"),
            Self::ObjectId(id) => write!(f, "object_id {id}"),
            Self::ResourceId(id) => write!(f, "resource ID {id}"),
        }
    }
}

/// A token request that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenQuery {
    /// The audience.
    pub resource: String,
    /// The identity asked for.
    pub selector: Selector,
}

/// Why a token request is refused before any lookup, with the IMDS error it gets (always 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// No `resource`, or an empty one.
    #[error("Required query variable 'resource' is missing")]
    MissingResource,
    /// A parameter given twice; IMDS refuses those, and two values invite two interpretations.
    #[error("Query parameter '{0}' is specified more than once")]
    Duplicate(String),
    /// More than one of `client_id`, `object_id`, `msi_res_id`/`mi_res_id`.
    #[error("Only one of client_id, object_id or msi_res_id may be specified in the token request")]
    SeveralIdentities,
}

/// Parses the query of a token request.
pub fn parse_token_query(query: &str) -> Result<TokenQuery, QueryError> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    for (index, (name, _)) in pairs.iter().enumerate() {
        if pairs[..index]
            .iter()
            .any(|(other, _)| other.eq_ignore_ascii_case(name))
        {
            return Err(QueryError::Duplicate(name.clone()));
        }
    }
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim())
            .filter(|value| !value.is_empty())
    };
    let resource = get("resource").ok_or(QueryError::MissingResource)?.to_owned();
    let mut selectors = Vec::new();
    if let Some(id) = get("client_id") {
        selectors.push(Selector::ClientId(id.to_owned()));
    }
    if let Some(id) = get("object_id") {
        selectors.push(Selector::ObjectId(id.to_owned()));
    }
    // `mi_res_id` is the App Service spelling; the original accepted it as a fallback.
    if let Some(id) = get("msi_res_id").or_else(|| get("mi_res_id")) {
        selectors.push(Selector::ResourceId(id.to_owned()));
    }
    if get("msi_res_id").is_some() && get("mi_res_id").is_some_and(|mi| Some(mi) != get("msi_res_id")) {
        return Err(QueryError::SeveralIdentities);
    }
    let selector = match selectors.len() {
        0 => Selector::Default,
        1 => selectors.remove(0),
        _ => return Err(QueryError::SeveralIdentities),
    };
    Ok(TokenQuery { resource, selector })
}

/// Why a request is refused by its headers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// A forwarding header: IMDS refuses proxied requests, and a pod must not pose as a proxy.
    #[error("Request with X-Forwarded-For header is not allowed")]
    Forwarded,
    /// No `Metadata: true`; browsers and SSRF-prone servers cannot add it.
    #[error("Required metadata header not specified")]
    MissingMetadata,
}

/// The header checks of every request: forwarding headers refused; `Metadata: true` (name and value
/// case-insensitive, as SDKs differ) when required.
pub fn check_headers(headers: &http::HeaderMap, metadata_required: bool) -> Result<(), HeaderError> {
    if headers.contains_key("x-forwarded-for") || headers.contains_key(http::header::FORWARDED) {
        return Err(HeaderError::Forwarded);
    }
    if metadata_required {
        let mut values = headers.get_all("metadata").iter();
        let ok = match (values.next(), values.next()) {
            (Some(value), None) => value
                .to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")),
            _ => false,
        };
        if !ok {
            return Err(HeaderError::MissingMetadata);
        }
    }
    Ok(())
}

/// Whether the peer is the node itself, the only caller `/host/token` accepts.
pub fn is_loopback(peer: IpAddr) -> bool {
    match peer {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// The pod's address as the watch stores it: IPv4 addresses mapped into IPv6 are unmapped.
pub fn caller_ip(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_path_is_the_token_route() {
        assert_eq!(classify("/metadata/identity/oauth2/token"), Route::Token);
    }

    #[test]
    fn variants_of_the_token_path_are_refused() {
        for path in [
            "/metadata/identity/oauth2/token/",
            "/Metadata/identity/oauth2/token",
            "/METADATA/IDENTITY/OAUTH2/TOKEN",
            "/metadata/identity\\oauth2\\token",
            "/metadata/identity\\oauth2\\token/",
            "/metadata/identity%2Foauth2%2Ftoken",
            "/metadata/identity%2foauth2%2ftoken",
            "/metadata/identity%252Foauth2%252Ftoken",
            "/metadata%2Fidentity/oauth2/token",
            "//metadata/identity/oauth2/token",
            "/metadata//identity/oauth2/token",
            "/metadata/./identity/oauth2/token",
            "/metadata/instance/../identity/oauth2/token",
            "/metadata/identity/oauth2/token/.",
            "/metadata/identity/oauth2/%74oken",
            "/metadata/identity/oauth2/token;x=1",
            "/metadata/identity/info",
            "/metadata/identity",
            "/metadata/identity/oauth2/tokenx",
            "/metadata/instance/compute/../../identity/oauth2/token",
            "/foo/oauth2/token",
        ] {
            assert!(
                matches!(classify(path), Route::Variant(_)),
                "{path}: {:?}",
                classify(path)
            );
        }
    }

    #[test]
    fn paths_that_cannot_be_decoded_or_climb_out_are_refused() {
        for path in [
            "/metadata/%ff",
            "/metadata/%00",
            "/../metadata/instance",
            "/metadata/%0a",
        ] {
            assert!(matches!(classify(path), Route::Variant(_)), "{path}");
        }
    }

    #[test]
    fn clean_instance_and_other_metadata_paths_are_told_apart() {
        assert_eq!(classify("/metadata/instance"), Route::Instance);
        assert_eq!(classify("/metadata/instance/compute/location"), Route::Instance);
        assert_eq!(classify("/metadata/instance/"), Route::Instance);
        assert_eq!(classify("/metadata/versions"), Route::OtherMetadata);
        assert_eq!(classify("/metadata/scheduledevents"), Route::OtherMetadata);
        assert_eq!(classify("/"), Route::NotFound);
        assert_eq!(classify("/latest/meta-data"), Route::NotFound);
    }

    #[test]
    fn encoded_or_folded_spellings_of_forwarded_paths_are_refused() {
        for path in [
            "/metadata/instance%2Fcompute",
            "/metadata\\instance",
            "/metadata//instance",
            "/metadata/./instance",
        ] {
            assert!(matches!(classify(path), Route::Variant(_)), "{path}");
        }
    }

    #[test]
    fn host_token_needs_its_exact_path() {
        assert_eq!(classify("/host/token"), Route::HostToken);
        assert!(matches!(classify("/HOST/token"), Route::Variant(_)));
        assert!(matches!(classify("/host%2Ftoken"), Route::Variant(_)));
    }

    #[test]
    fn canonical_form_is_what_imds_would_see() {
        assert_eq!(
            canonicalize("/Metadata\\Identity%2FOAuth2/./Token/").unwrap(),
            "/metadata/identity/oauth2/token"
        );
    }

    #[test]
    fn query_needs_a_resource() {
        assert_eq!(
            parse_token_query("api-version=2018-02-01"),
            Err(QueryError::MissingResource)
        );
        assert_eq!(parse_token_query("resource="), Err(QueryError::MissingResource));
    }

    #[test]
    fn query_names_at_most_one_identity() {
        let q = parse_token_query("resource=https%3A%2F%2Fvault.azure.net&client_id=abc").unwrap();
        assert_eq!(q.resource, "https://vault.azure.net");
        assert_eq!(q.selector, Selector::ClientId("abc".into()));
        assert_eq!(
            parse_token_query("resource=r&object_id=o").unwrap().selector,
            Selector::ObjectId("o".into())
        );
        assert_eq!(
            parse_token_query("resource=r&mi_res_id=/x").unwrap().selector,
            Selector::ResourceId("/x".into())
        );
        assert_eq!(
            parse_token_query("resource=r&msi_res_id=/x&mi_res_id=/x")
                .unwrap()
                .selector,
            Selector::ResourceId("/x".into())
        );
        assert_eq!(
            parse_token_query("resource=r&client_id=a&object_id=b"),
            Err(QueryError::SeveralIdentities)
        );
        assert_eq!(
            parse_token_query("resource=r&msi_res_id=/x&mi_res_id=/y"),
            Err(QueryError::SeveralIdentities)
        );
        assert_eq!(
            parse_token_query("resource=r").unwrap().selector,
            Selector::Default
        );
        assert_eq!(
            parse_token_query("resource=r&client_id=").unwrap().selector,
            Selector::Default
        );
    }

    #[test]
    fn duplicate_parameters_are_refused() {
        assert_eq!(
            parse_token_query("resource=a&client_id=x&CLIENT_ID=y"),
            Err(QueryError::Duplicate("CLIENT_ID".into()))
        );
    }

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn metadata_header_is_required_in_any_case() {
        assert_eq!(check_headers(&headers(&[("Metadata", "true")]), true), Ok(()));
        assert_eq!(check_headers(&headers(&[("metadata", "True")]), true), Ok(()));
        assert_eq!(
            check_headers(&headers(&[]), true),
            Err(HeaderError::MissingMetadata)
        );
        assert_eq!(
            check_headers(&headers(&[("Metadata", "yes")]), true),
            Err(HeaderError::MissingMetadata)
        );
        assert_eq!(
            check_headers(&headers(&[("Metadata", "true"), ("Metadata", "false")]), true),
            Err(HeaderError::MissingMetadata)
        );
        assert_eq!(check_headers(&headers(&[]), false), Ok(()));
    }

    #[test]
    fn forwarding_headers_are_refused_even_without_the_metadata_requirement() {
        for name in ["X-Forwarded-For", "x-forwarded-for", "Forwarded"] {
            assert_eq!(
                check_headers(&headers(&[("Metadata", "true"), (name, "10.0.0.1")]), false),
                Err(HeaderError::Forwarded)
            );
        }
    }

    #[test]
    fn mapped_addresses_are_unmapped() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(caller_ip(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1".parse().unwrap()));
    }
}

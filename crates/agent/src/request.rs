//! What a request to the metadata address asks for, decided from its raw path, headers and query before
//! anything else happens.
//!
//! IMDS matches paths loosely (case-insensitively, and some front ends fold `\` into `/` or decode `%2F`),
//! so a variant of the token path that the agent forwarded untouched could reach IMDS's token endpoint
//! with the node's identities (CVE-2022-23551 in the original). Every path is therefore brought to a
//! canonical form first; a path whose canonical form names an identity endpoint is either exactly the
//! token path (served here) or refused, and only clean paths are ever forwarded.

use std::{borrow::Cow, net::IpAddr};

/// The token endpoint, the only path the agent mints tokens on.
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
/// The endpoint host-network callers name a pod on (behind a flag).
pub const HOST_TOKEN_PATH: &str = "/host/token";
/// The spellings of [`HOST_TOKEN_PATH`] that are served. The Key Vault CSI driver's provider in
/// pod-identity mode (and the FlexVolume before it) calls `http://localhost:2579/host/token/?resource=…`,
/// which the original's `PathPrefix("/host/token")` served; the path is never forwarded anywhere, so a
/// trailing slash is a client's spelling, not an attack. Other spellings (case, encoding, doubled or dot
/// segments, suffixes) are still refused: no client sends them.
pub const HOST_TOKEN_SPELLINGS: [&str; 2] = [HOST_TOKEN_PATH, "/host/token/"];

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
    // What nearly every request is, and its own canonical form: no need to build one.
    if raw_path == TOKEN_PATH {
        return Route::Token;
    }
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
        return if HOST_TOKEN_SPELLINGS.contains(&raw_path) {
            Route::HostToken
        } else {
            Route::Variant("a spelling of /host/token other than /host/token or /host/token/")
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

/// Longest `resource` accepted, in bytes. App ID URIs are short (Entra caps identifier URIs at a few
/// hundred characters); anything longer is not one, and would only fill logs and Events.
pub const MAX_RESOURCE_BYTES: usize = 1024;
/// Longest `msi_res_id`/`mi_res_id` accepted, in bytes (an ARM ID of a user-assigned identity is about
/// 300).
pub const MAX_RESOURCE_ID_BYTES: usize = 1024;

/// Why a token request is refused before any lookup, with the IMDS error it gets (always 400, which no
/// SDK retries: asking again with the same parameters cannot succeed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// No `resource`, or an empty one.
    #[error("Required query variable 'resource' is missing")]
    MissingResource,
    /// A `resource` that is neither an App ID URI nor an application ID (control characters, spaces,
    /// no scheme, too long). IMDS passes such a value to Entra, which refuses it as `invalid_resource`.
    #[error(
        "AADSTS500011: The resource principal named in the request was not found: 'resource' must be an \
         App ID URI (such as https://vault.azure.net) or an application ID"
    )]
    InvalidResource,
    /// A parameter given twice; IMDS refuses those, and two values invite two interpretations.
    #[error("Query parameter '{0}' is specified more than once")]
    Duplicate(String),
    /// More than one of `client_id`, `object_id`, `msi_res_id`/`mi_res_id`.
    #[error("Only one of client_id, object_id or msi_res_id may be specified in the token request")]
    SeveralIdentities,
    /// A `client_id` or `object_id` that is not a GUID, or a `msi_res_id` that is not an ARM ID: no
    /// identity has it, which is what IMDS answers.
    #[error("Identity not found")]
    InvalidIdentity,
    /// An `api-version` that is not a date (`2018-02-01`, optionally `-preview`).
    #[error("Invalid api-version; use a supported version such as 2018-02-01")]
    InvalidApiVersion,
}

impl QueryError {
    /// The `error` code of IMDS's answer.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidResource => "invalid_resource",
            _ => "invalid_request",
        }
    }
}

/// Parses and validates the query of a token request. Nothing in it reaches IMDS, Entra, a log or an
/// Event before it passed here: `resource` is an App ID URI or a GUID of printable characters,
/// identity selectors are GUIDs or an ARM ID, `api-version` (optional, as the original ignored it) is
/// a date. Unknown parameters are ignored and never forwarded.
pub fn parse_token_query(query: &str) -> Result<TokenQuery, QueryError> {
    let pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = query_pairs(query).collect();
    if let Some(repeated) = first_repeated(&pairs) {
        return Err(QueryError::Duplicate(pairs[repeated].0.clone().into_owned()));
    }
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_ref())
            .filter(|value| !value.is_empty())
    };
    if let Some(version) = get("api-version")
        && !is_api_version(version)
    {
        return Err(QueryError::InvalidApiVersion);
    }
    let resource = get("resource").ok_or(QueryError::MissingResource)?;
    if !is_resource(resource) {
        return Err(QueryError::InvalidResource);
    }
    let mut selectors = Vec::new();
    if let Some(id) = get("client_id") {
        selectors.push(Selector::ClientId(guid(id)?));
    }
    if let Some(id) = get("object_id") {
        selectors.push(Selector::ObjectId(guid(id)?));
    }
    // `mi_res_id` is the App Service spelling; the original accepted it as a fallback.
    let msi = get("msi_res_id").map(arm_id).transpose()?;
    let mi = get("mi_res_id").map(arm_id).transpose()?;
    if let (Some(msi), Some(mi)) = (&msi, &mi)
        && !msi.eq_ignore_ascii_case(mi)
    {
        return Err(QueryError::SeveralIdentities);
    }
    if let Some(id) = msi.or(mi) {
        selectors.push(Selector::ResourceId(id));
    }
    let selector = match selectors.len() {
        0 => Selector::Default,
        1 => selectors.remove(0),
        _ => return Err(QueryError::SeveralIdentities),
    };
    Ok(TokenQuery {
        resource: resource.to_owned(),
        selector,
    })
}

/// The query's `name=value` pairs, exactly as `application/x-www-form-urlencoded` parsing gives them
/// (`form_urlencoded::parse`: split at `&`, empty pieces skipped, split at the first `=`, `+` read as a
/// space, percent-decoded, invalid UTF-8 replaced), but borrowed from the query where there is nothing
/// to decode: most pieces, and on a cached token's path all but the resource.
fn query_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    let mut rest = query;
    std::iter::from_fn(move || {
        loop {
            if rest.is_empty() {
                return None;
            }
            // Found with `memchr` rather than by walking the characters: on the token path this is most
            // of what reading the query costs.
            let end = memchr::memchr(b'&', rest.as_bytes()).unwrap_or(rest.len());
            // `&` and `=` are ASCII: every cut below is on a character boundary.
            let piece = &rest[..end];
            rest = rest.get(end + 1..).unwrap_or("");
            if piece.is_empty() {
                continue;
            }
            if memchr::memchr2(b'%', b'+', piece.as_bytes()).is_some() {
                // The piece holds no `&`, so it is exactly one pair to the decoder.
                return Some(
                    form_urlencoded::parse(piece.as_bytes())
                        .next()
                        .unwrap_or((Cow::Borrowed(""), Cow::Borrowed(""))),
                );
            }
            let (name, value) = match memchr::memchr(b'=', piece.as_bytes()) {
                Some(at) => (&piece[..at], &piece[at + 1..]),
                None => (piece, ""),
            };
            return Some((Cow::Borrowed(name), Cow::Borrowed(value)));
        }
    })
}

/// Query parameters compared pairwise at most: beyond, names are sorted instead, so that a query of
/// thousands of parameters (a request head may hold 16 KiB of them) costs a sort, not millions of
/// comparisons.
const PAIRWISE_PARAMETERS: usize = 16;

/// The position of the first parameter whose name (in any case) an earlier one has, if any.
fn first_repeated<V>(pairs: &[(Cow<'_, str>, V)]) -> Option<usize> {
    if pairs.len() <= PAIRWISE_PARAMETERS {
        return (0..pairs.len()).find(|&index| {
            pairs[..index]
                .iter()
                .any(|(other, _)| other.eq_ignore_ascii_case(&pairs[index].0))
        });
    }
    let mut names: Vec<(String, usize)> = pairs
        .iter()
        .enumerate()
        .map(|(index, (name, _))| (name.to_ascii_lowercase(), index))
        .collect();
    names.sort_unstable();
    // In each run of one name, sorted by position, the second is that name's first repeat.
    names
        .windows(2)
        .filter(|pair| pair[0].0 == pair[1].0)
        .map(|pair| pair[1].1)
        .min()
}

/// `YYYY-MM-DD`, optionally followed by `-preview`.
fn is_api_version(version: &str) -> bool {
    let date = version.strip_suffix("-preview").unwrap_or(version).as_bytes();
    date.len() == 10
        && date.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
}

fn guid(text: &str) -> Result<String, QueryError> {
    if pod_identity_api::validation::is_guid(text) {
        Ok(text.to_owned())
    } else {
        Err(QueryError::InvalidIdentity)
    }
}

/// Characters no identifier carries: controls (line breaks that would forge log lines, `\0`) and
/// whitespace.
fn has_stray_characters(text: &str) -> bool {
    // Printable ASCII without spaces, what clients send, has none: told by bytes, without decoding
    // characters.
    if text.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return false;
    }
    text.chars().any(|c| c.is_control() || c.is_whitespace())
}

fn arm_id(text: &str) -> Result<String, QueryError> {
    let prefix = "/subscriptions/";
    let ok = text.len() <= MAX_RESOURCE_ID_BYTES
        && text
            .get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
        && !has_stray_characters(text);
    if ok {
        Ok(text.to_owned())
    } else {
        Err(QueryError::InvalidIdentity)
    }
}

/// An App ID URI (`scheme:rest`, such as `https://vault.azure.net` or `api://app`) or an application
/// ID (a GUID), of at most [`MAX_RESOURCE_BYTES`] without controls or whitespace.
pub fn is_resource(resource: &str) -> bool {
    if resource.len() > MAX_RESOURCE_BYTES || has_stray_characters(resource) {
        return false;
    }
    if pod_identity_api::validation::is_guid(resource) {
        return true;
    }
    let bytes = resource.as_bytes();
    let Some(colon) = bytes.iter().position(|b| *b == b':') else {
        return false;
    };
    let (scheme, rest) = (&bytes[..colon], &bytes[colon + 1..]);
    scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        && !rest.is_empty()
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

/// The header checks of every request: forwarding headers refused; `Metadata: true` when required, the
/// name in any case (HTTP header names are case-insensitive, and the Rust SDK sends `metadata`), the
/// value exactly `true` as IMDS requires ("must be set to `true`, in all lower case"; IMDS answers
/// `Metadata: True` with 400, as open-telemetry-collector-contrib #46281 found on AKS nodes).
pub fn check_headers(headers: &http::HeaderMap, metadata_required: bool) -> Result<(), HeaderError> {
    // Names made once, not parsed from text on every request.
    const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
    const METADATA: http::HeaderName = http::HeaderName::from_static("metadata");
    if headers.contains_key(X_FORWARDED_FOR) || headers.contains_key(http::header::FORWARDED) {
        return Err(HeaderError::Forwarded);
    }
    if metadata_required {
        let mut values = headers.get_all(METADATA).iter();
        let ok = match (values.next(), values.next()) {
            (Some(value), None) => value.to_str().is_ok_and(|v| v.trim() == "true"),
            _ => false,
        };
        if !ok {
            return Err(HeaderError::MissingMetadata);
        }
    }
    Ok(())
}

/// The pod a `/host/token` caller names with the headers `podns` and `podname`, if both are there and
/// are Kubernetes object names (a namespace is a DNS label, a pod name a DNS subdomain): anything else
/// names no pod, and is not worth a lookup, a log line or an echo.
pub fn host_token_pod(headers: &http::HeaderMap) -> Option<pod_identity_api::ObjectKey> {
    let header = |name: &str| {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => value.to_str().ok().map(str::trim),
            _ => None,
        }
    };
    let namespace = header("podns").filter(|n| is_dns_name(n, 63, false))?;
    let name = header("podname").filter(|n| is_dns_name(n, pod_identity_api::naming::MAX_NAME_LEN, true))?;
    Some(pod_identity_api::ObjectKey::new(namespace, name))
}

/// Lower-case alphanumerics and `-` (and `.` between labels when `dots`), starting and ending with an
/// alphanumeric, at most `max` bytes.
fn is_dns_name(text: &str, max: usize, dots: bool) -> bool {
    let bytes = text.as_bytes();
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    bytes.len() <= max
        && edge(bytes.first())
        && edge(bytes.last())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || (dots && *b == b'.'))
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
        // The shortcut for the exact path decides as the canonical form does.
        assert_eq!(canonicalize(TOKEN_PATH).as_deref(), Ok(TOKEN_PATH));
        assert_eq!(canonical_spelling(TOKEN_PATH), TOKEN_PATH);
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
    fn host_token_is_served_as_its_clients_spell_it_and_no_other_way() {
        assert_eq!(classify("/host/token"), Route::HostToken);
        // The Key Vault CSI driver's provider in pod-identity mode.
        assert_eq!(classify("/host/token/"), Route::HostToken);
        for path in [
            "/HOST/token",
            "/host/TOKEN/",
            "/host%2Ftoken",
            "/host/token%2F",
            "/host/token//",
            "//host/token/",
            "/host//token",
            "/host/./token/",
            "/host/token/.",
            "/host\\token",
            "/host/token\\",
            "/host/x/../token/",
            "/host/token/x",
            "/host/tokenx",
        ] {
            assert!(
                matches!(classify(path), Route::Variant(_) | Route::NotFound),
                "{path}: {:?}",
                classify(path)
            );
            assert_ne!(classify(path), Route::HostToken, "{path}");
        }
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

    const R: &str = "https://vault.azure.net";
    const G1: &str = "aaaaaaaa-1111-4111-8111-111111111111";
    const G2: &str = "bbbbbbbb-2222-4222-8222-222222222222";
    const ID_X: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x";

    #[test]
    fn query_names_at_most_one_identity() {
        let q = parse_token_query(&format!("resource=https%3A%2F%2Fvault.azure.net&client_id={G1}")).unwrap();
        assert_eq!(q.resource, "https://vault.azure.net");
        assert_eq!(q.selector, Selector::ClientId(G1.into()));
        assert_eq!(
            parse_token_query(&format!("resource={R}&object_id={G2}"))
                .unwrap()
                .selector,
            Selector::ObjectId(G2.into())
        );
        assert_eq!(
            parse_token_query(&format!("resource={R}&mi_res_id={ID_X}"))
                .unwrap()
                .selector,
            Selector::ResourceId(ID_X.into())
        );
        assert_eq!(
            parse_token_query(&format!("resource={R}&msi_res_id={ID_X}&mi_res_id={ID_X}"))
                .unwrap()
                .selector,
            Selector::ResourceId(ID_X.into())
        );
        assert_eq!(
            parse_token_query(&format!("resource={R}&client_id={G1}&object_id={G2}")),
            Err(QueryError::SeveralIdentities)
        );
        assert_eq!(
            parse_token_query(&format!("resource={R}&msi_res_id={ID_X}&mi_res_id={ID_X}y")),
            Err(QueryError::SeveralIdentities)
        );
        assert_eq!(
            parse_token_query(&format!("resource={R}")).unwrap().selector,
            Selector::Default
        );
        assert_eq!(
            parse_token_query(&format!("resource={R}&client_id="))
                .unwrap()
                .selector,
            Selector::Default
        );
    }

    #[test]
    fn duplicate_parameters_are_refused() {
        assert_eq!(
            parse_token_query("resource=https://a&client_id=x&CLIENT_ID=y"),
            Err(QueryError::Duplicate("CLIENT_ID".into()))
        );
    }

    #[test]
    fn stray_characters_are_the_same_by_bytes_and_by_chars() {
        for byte in 0u8..=0x7f {
            let c = char::from(byte);
            let text = format!("api://a{c}b");
            assert_eq!(
                has_stray_characters(&text),
                c.is_control() || c.is_whitespace(),
                "{byte:#04x}"
            );
        }
        for text in ["api://a\u{a0}b", "api://a\u{2028}b", "api://a\u{85}b"] {
            assert!(has_stray_characters(text), "{text:?}");
        }
        assert!(!has_stray_characters("api://café"));
    }

    #[test]
    fn a_query_of_thousands_of_parameters_is_checked_as_a_short_one_is() {
        // Long queries are checked by sorting names: the first repeat found is the one a pairwise
        // check finds, whatever the length.
        let padding: Vec<String> = (0..5000).map(|i| format!("p{i}=")).collect();
        let padding = padding.join("&");
        for (query, repeated) in [
            (format!("resource=https://a&{padding}"), None),
            (format!("resource=https://a&{padding}&P17=&p4999="), Some("P17")),
            (
                format!("{padding}&Resource=https://a&resource=https://b&p3="),
                Some("resource"),
            ),
            (format!("x=&X=&{padding}&p1="), Some("X")),
        ] {
            match repeated {
                None => assert!(parse_token_query(&query).is_ok()),
                Some(name) => assert_eq!(
                    parse_token_query(&query),
                    Err(QueryError::Duplicate(name.into())),
                    "{name}"
                ),
            }
        }
        for length in 0..=40 {
            let pairs: Vec<(Cow<'_, str>, ())> = (0..length)
                .map(|i| (Cow::Owned(format!("n{}", (i * 7) % 23)), ()))
                .collect();
            let pairwise = (0..pairs.len()).find(|&i| {
                pairs[..i]
                    .iter()
                    .any(|(other, _)| other.eq_ignore_ascii_case(&pairs[i].0))
            });
            assert_eq!(first_repeated(&pairs), pairwise, "{length} parameters");
        }
    }

    #[test]
    fn query_pairs_are_those_of_form_urlencoded_parsing() {
        // Every query of up to 5 characters over an alphabet of the characters that matter (separators,
        // escapes, a multi-byte character), and a few longer ones.
        const ALPHABET: [&str; 8] = ["a", "=", "&", "%", "2", "+", "f", "é"];
        let mut queries: Vec<String> = vec![String::new()];
        let mut last = queries.clone();
        for _ in 0..5 {
            last = last
                .iter()
                .flat_map(|q| ALPHABET.iter().map(move |c| format!("{q}{c}")))
                .collect();
            queries.extend(last.iter().cloned());
        }
        queries.extend(
            [
                "api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net%2F",
                "resource=https://vault.azure.net&client_id=11111111-2222-3333-4444-555555555555",
                "a%3Db=c%26d&%ff%fe=%zz&x+y=1+2&&=&=v&n",
            ]
            .map(String::from),
        );
        for query in &queries {
            let ours: Vec<_> = query_pairs(query).collect();
            let theirs: Vec<_> = form_urlencoded::parse(query.as_bytes()).collect();
            assert_eq!(ours, theirs, "{query:?}");
        }
    }

    #[test]
    fn resources_are_app_id_uris_or_application_ids() {
        for resource in [
            "https://vault.azure.net",
            "https://management.azure.com/",
            "https://management.core.windows.net/",
            "api://my-app",
            "urn:example:app",
            "00000003-0000-0000-c000-000000000000",
            "https://storage.azure.com/.default-ignored?x=1",
        ] {
            let query = format!(
                "resource={}",
                form_urlencoded::byte_serialize(resource.as_bytes()).collect::<String>()
            );
            assert_eq!(
                parse_token_query(&query).map(|q| q.resource),
                Ok(resource.to_owned()),
                "{resource}"
            );
        }
    }

    #[test]
    fn resources_that_are_no_identifier_are_refused_before_anything_goes_upstream() {
        for query in [
            // The examples: a NUL, and a line break that forged a log line through the echoed error.
            "resource=%00",
            "resource=x%0A2026-11-30T00:00:00Z%20INFO%20forged%20line",
            "resource=https://vault.azure.net%0D%0AX-Injected:%201",
            "resource=https://vault.azure.net%09",
            "resource=https://vault%20.azure.net",
            "resource=vault.azure.net",
            "resource=:nothing",
            "resource=1https://x",
            "resource=https:",
            "resource=https://x%E2%80%A8y",
            "resource=https://x%C2%85y",
        ] {
            let error = parse_token_query(query).unwrap_err();
            assert_eq!(error, QueryError::InvalidResource, "{query}");
            assert_eq!(error.code(), "invalid_resource");
        }
        let long = format!("resource=https://{}", "a".repeat(MAX_RESOURCE_BYTES));
        assert_eq!(parse_token_query(&long), Err(QueryError::InvalidResource));
    }

    #[test]
    fn identity_selectors_and_the_api_version_are_checked_too() {
        // The example of the Events panic: 990 ASCII characters then multi-byte ones.
        let long = format!("{}{}", "a".repeat(990), "é".repeat(20));
        for query in [
            format!("resource={R}&client_id={long}"),
            format!("resource={R}&client_id=abc"),
            format!("resource={R}&client_id={G1}%0Ax"),
            format!("resource={R}&object_id=not-a-guid"),
            format!("resource={R}&object_id={}", "g".repeat(36)),
            format!("resource={R}&msi_res_id=/resourceGroups/rg"),
            format!("resource={R}&msi_res_id={ID_X}%0A"),
            format!("resource={R}&mi_res_id={ID_X}%20x"),
            format!(
                "resource={R}&msi_res_id=/subscriptions/{}",
                "s".repeat(MAX_RESOURCE_ID_BYTES)
            ),
        ] {
            assert_eq!(
                parse_token_query(&query),
                Err(QueryError::InvalidIdentity),
                "{query}"
            );
        }
        for version in ["2018-02-01", "2019-08-01", "2023-07-01", "2021-12-13-preview"] {
            assert!(
                parse_token_query(&format!("api-version={version}&resource={R}")).is_ok(),
                "{version}"
            );
        }
        for version in [
            "latest",
            "2018-2-01",
            "2018-02-01%0A",
            "20180201xx",
            "2018-02-01-beta",
        ] {
            assert_eq!(
                parse_token_query(&format!("api-version={version}&resource={R}")),
                Err(QueryError::InvalidApiVersion),
                "{version}"
            );
        }
        assert!(parse_token_query(&format!("resource={R}&authority=x%0Ay&other=%00")).is_ok());
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
    fn metadata_header_name_in_any_case_value_exactly_true() {
        assert_eq!(check_headers(&headers(&[("Metadata", "true")]), true), Ok(()));
        assert_eq!(check_headers(&headers(&[("metadata", "true")]), true), Ok(()));
        assert_eq!(check_headers(&headers(&[("METADATA", "true")]), true), Ok(()));
        for value in ["True", "TRUE", "tRue", "1", "true, true", "\"true\""] {
            assert_eq!(
                check_headers(&headers(&[("Metadata", value)]), true),
                Err(HeaderError::MissingMetadata),
                "{value}"
            );
        }
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
    fn host_token_callers_name_a_pod_with_kubernetes_names() {
        let key = host_token_pod(&headers(&[("podns", "default"), ("podname", "web-7d4b9.x")])).unwrap();
        assert_eq!(key, pod_identity_api::ObjectKey::new("default", "web-7d4b9.x"));
        // Go's client canonicalises the names to Podns/Podname.
        assert!(host_token_pod(&headers(&[("Podns", "ns"), ("Podname", "p")])).is_some());
        let long = "a".repeat(254);
        for pairs in [
            vec![("podns", "ns")],
            vec![("podname", "p")],
            vec![("podns", "ns"), ("podname", "")],
            vec![("podns", "NS"), ("podname", "p")],
            vec![("podns", "ns"), ("podname", "p_q")],
            vec![("podns", "ns"), ("podname", "p q")],
            vec![("podns", "a.b"), ("podname", "p")],
            vec![("podns", "ns"), ("podname", "-p")],
            vec![("podns", "ns"), ("podname", long.as_str())],
            vec![("podns", "ns"), ("podname", "p"), ("podname", "q")],
        ] {
            assert_eq!(host_token_pod(&headers(&pairs)), None, "{pairs:?}");
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

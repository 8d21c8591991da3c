//! Workload identity federation as Entra checks it: a token an external issuer signed (a Kubernetes
//! service-account token, a CI system's OIDC token) presented as the `client_assertion` of an app
//! registration or a user-assigned identity. Pure functions over (assertion, credentials, keys, now); the
//! issuer's keys come from [`crate::issuer`], the HTTP answer from `entra`.
//!
//! The order is Entra's ("How it works", workload-identity-federation.md): first the trust (a federated
//! credential whose issuer, subject and audience match), then the token against the issuer's published keys
//! and its time window. So a token from an issuer nobody trusts never makes Entra fetch anything.
//!
//! Codes, statuses and texts are the ones observed from Entra since 2024 (issuer, subject and audience
//! mismatches split into AADSTS700211/700213/700212; see `shared` reference federation.md §1.4 for each
//! source). Where no source gives one, the choice is named at its variant.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;

/// The audience Azure's documentation and every SDK use for tokens meant for this exchange.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// Entra refuses external tokens living longer than `1.01:00:00` (AADSTS70023).
pub const MAX_LIFETIME_SECS: i64 = 25 * 3600;
/// Clock skew allowed on `nbf` and `exp`: Entra's is undocumented; five minutes is what Microsoft's token
/// validation library allows by default.
pub const CLOCK_SKEW_SECS: i64 = 300;
/// Entra keeps only the first 100 signing keys of an issuer (workload-identity-federation.md).
pub const MAX_KEYS: usize = 100;
const DOCS: &str = "https://learn.microsoft.com/entra/workload-id/workload-identity-federation";

/// A decoded assertion. Nothing in it is trusted until [`verify_signature`] says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assertion {
    pub alg: String,
    pub kid: Option<String>,
    pub iss: String,
    pub sub: String,
    /// `aud` as a string or an array (Kubernetes sends an array).
    pub aud: Vec<String>,
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
    signing_input: String,
    signature: Vec<u8>,
}

impl Assertion {
    /// Decodes a compact JWS. Anything that is not three base64url parts, a JSON header with `alg` and
    /// JSON claims with `iss` and `sub` is AADSTS50027.
    pub fn parse(jwt: &str) -> Result<Self, Rejection> {
        let mut parts = jwt.trim().split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Rejection::Malformed);
        };
        let decode = |x: &str| {
            B64.decode(x.trim_end_matches('='))
                .map_err(|_| Rejection::Malformed)
        };
        let header: Value = serde_json::from_slice(&decode(h)?).map_err(|_| Rejection::Malformed)?;
        let claims: Value = serde_json::from_slice(&decode(p)?).map_err(|_| Rejection::Malformed)?;
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let (Some(alg), Some(iss), Some(sub)) =
            (text(&header, "alg"), text(&claims, "iss"), text(&claims, "sub"))
        else {
            return Err(Rejection::Malformed);
        };
        let aud = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        let number = |k: &str| claims.get(k).and_then(Value::as_i64);
        Ok(Self {
            alg,
            kid: text(&header, "kid"),
            iss,
            sub,
            aud,
            exp: number("exp"),
            nbf: number("nbf"),
            iat: number("iat"),
            signing_input: format!("{h}.{p}"),
            signature: decode(s)?,
        })
    }
}

/// A federated credential as Entra matches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trusted {
    pub name: String,
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    /// False while a new credential has not reached Entra yet.
    pub propagated: bool,
}

/// Why Entra refuses a federated assertion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the assertion is not a well-formed JWT")]
    Malformed,
    #[error("no federated credential has issuer '{0}'")]
    NoIssuer(String),
    #[error("no federated credential of the issuer has subject '{0}'")]
    NoSubject(String),
    #[error("subject '{0}' matches a federated credential only when case is ignored")]
    SubjectCase(String),
    #[error("the federated credential for the issuer and subject does not list audience '{0}'")]
    NoAudience(String),
    #[error("the only federated credential that matches has not propagated yet")]
    NotPropagated { iss: String, sub: String, aud: String },
    #[error("'{0}' is not a supported signature algorithm")]
    Algorithm(String),
    #[error("the assertion lives longer than 25 hours (issued at {iat}, expires {exp})")]
    Lifetime { iat: i64, exp: i64 },
    #[error("the assertion is not within its valid time range")]
    Expired { now: i64, from: i64, exp: i64 },
    #[error("the issuer's OpenID configuration or keys could not be fetched")]
    Unreachable,
    #[error("the issuer's signing keys could not be parsed")]
    BadKeys,
    #[error("the issuer '{issuer}' publishes no key '{kid}'")]
    UnknownKey { kid: String, issuer: String },
    #[error("the assertion's signature does not verify")]
    BadSignature,
}

/// Entra's answer to a refused assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aadsts {
    pub status: u16,
    pub error: &'static str,
    pub code: u32,
    pub message: String,
    /// Whether the body carries `error_uri` (observed bodies of 90061 and 900612 have none).
    pub error_uri: bool,
}

fn stamp(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .map(|t| format!("{}.0000000Z", t.strftime("%Y-%m-%dT%H:%M:%S")))
        .unwrap_or_default()
}

impl Rejection {
    pub fn aadsts(&self) -> Aadsts {
        let client = |code: u32, message: String| Aadsts {
            status: 401,
            error: "invalid_client",
            code,
            message,
            error_uri: true,
        };
        let request = |code: u32, message: String, error_uri: bool| Aadsts {
            status: 400,
            error: "invalid_request",
            code,
            message,
            error_uri,
        };
        match self {
            Self::Malformed => request(50027, "JWT token is invalid or malformed.".into(), true),
            Self::NoIssuer(iss) => client(
                700211,
                format!(
                    "No matching federated identity record found for presented assertion issuer '{iss}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. {DOCS}"
                ),
            ),
            Self::NoSubject(sub) => client(
                700213,
                format!(
                    "No matching federated identity record found for presented assertion subject '{sub}'. Check your federated identity credential Subject, Audience and Issuer against the presented assertion. {DOCS}"
                ),
            ),
            Self::SubjectCase(sub) => client(
                7002138,
                format!(
                    "No matching federated identity record found for presented assertion subject '{sub}'. The subject matches with case-insensitive comparison, but not with case-sensitive comparison. Check your federated identity credential Subject, Audience and Issuer against the presented assertion. See documentation at: {DOCS}. See breaking change notification and remediation at: https://learn.microsoft.com/en-us/entra/identity-platform/reference-breaking-changes#august-2024."
                ),
            ),
            Self::NoAudience(aud) => client(
                700212,
                format!(
                    "No matching federated identity record found for presented assertion audience '{aud}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. {DOCS}"
                ),
            ),
            Self::NotPropagated { iss, sub, aud } => client(
                70021,
                format!(
                    "No matching federated identity record found for presented assertion. Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{aud}'. https://docs.microsoft.com/en-us/azure/active-directory/develop/workload-identity-federation"
                ),
            ),
            // Status not observed; the AADSTS50027x family ("Invalid JWT token") answers 400 invalid_request.
            Self::Algorithm(alg) => request(
                5002738,
                format!("Invalid JWT token. '{alg}' is not a supported signature algorithm."),
                true,
            ),
            // Observed as 400 invalid_request (2022) and as invalid_client (2023); the newer is kept.
            Self::Lifetime { iat, exp } => client(
                70023,
                format!(
                    "External OIDC Provider token must have a lifetime of less than or equal to 1.01:00:00. Token issued at {iat}. Token expires on {exp}."
                ),
            ),
            Self::Expired { now, from, exp } => client(
                700024,
                format!(
                    "Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}. Review the documentation at https://docs.microsoft.com/azure/active-directory/develop/active-directory-certificate-credentials .",
                    stamp(*now),
                    stamp(*from),
                    stamp(*exp)
                ),
            ),
            Self::Unreachable => request(90061, "Request to External OIDC endpoint failed.".into(), false),
            Self::BadKeys => request(900612, "Failed to parse provider signing keys.".into(), false),
            Self::UnknownKey { kid, issuer } => client(
                7000272,
                format!(
                    "The certificate with identifier {kid} used to sign the federated credential could not be found in the metadata of identity provider {issuer}. Please validate that your Identity Provider's metadata exposes the key used to sign the incoming token."
                ),
            ),
            // No observation of a known key with a bad signature; AADSTS50027's documented reasons include
            // "External ID token from issuer failed signature verification".
            Self::BadSignature => request(
                50027,
                "Invalid JWT token. External ID token from issuer failed signature verification.".into(),
                true,
            ),
        }
    }
}

/// The credential that trusts the assertion: issuer, then subject, then audience, each compared exactly
/// (case-sensitive since Entra's August 2024 change). A credential that has not propagated counts only for
/// telling AADSTS70021 (what Entra answers then) from a plain mismatch.
pub fn match_trust<'a>(a: &Assertion, creds: &'a [Trusted]) -> Result<&'a Trusted, Rejection> {
    let find = |propagated_only: bool| -> Result<&'a Trusted, Rejection> {
        let usable = || creds.iter().filter(|c| c.propagated || !propagated_only);
        let by_issuer: Vec<&Trusted> = usable().filter(|c| c.issuer == a.iss).collect();
        if by_issuer.is_empty() {
            return Err(Rejection::NoIssuer(a.iss.clone()));
        }
        let Some(cred) = by_issuer.iter().copied().find(|c| c.subject == a.sub) else {
            return Err(
                if by_issuer.iter().any(|c| c.subject.eq_ignore_ascii_case(&a.sub)) {
                    Rejection::SubjectCase(a.sub.clone())
                } else {
                    Rejection::NoSubject(a.sub.clone())
                },
            );
        };
        if cred.audiences.iter().any(|x| a.aud.contains(x)) {
            Ok(cred)
        } else {
            Err(Rejection::NoAudience(a.aud.join(",")))
        }
    };
    match find(true) {
        Ok(c) => Ok(c),
        Err(e) => match find(false) {
            Ok(_) => Err(Rejection::NotPropagated {
                iss: a.iss.clone(),
                sub: a.sub.clone(),
                aud: a.aud.join(","),
            }),
            Err(_) => Err(e),
        },
    }
}

pub fn check_algorithm(a: &Assertion, allowed: &[String]) -> Result<(), Rejection> {
    if allowed.contains(&a.alg) && verifier(&a.alg).is_some() {
        Ok(())
    } else {
        Err(Rejection::Algorithm(a.alg.clone()))
    }
}

/// `iat` present and at most 25 hours before `exp`, and `now` within [`nbf` (or `iat`), `exp`] give or
/// take [`CLOCK_SKEW_SECS`].
pub fn check_lifetime(a: &Assertion, now: i64) -> Result<(), Rejection> {
    let exp = a.exp.ok_or(Rejection::Malformed)?;
    let iat = a.iat.unwrap_or(0);
    if exp.saturating_sub(iat) > MAX_LIFETIME_SECS {
        return Err(Rejection::Lifetime { iat, exp });
    }
    let from = a.nbf.unwrap_or(iat);
    if now + CLOCK_SKEW_SECS < from || now - CLOCK_SKEW_SECS >= exp {
        return Err(Rejection::Expired { now, from, exp });
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyMaterial {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed point (`04 ‖ x ‖ y`) on `crv`.
    Ec {
        crv: String,
        point: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Jwk {
    kid: Option<String>,
    key: KeyMaterial,
}

/// An issuer's signing keys (its `jwks_uri` document), RSA and EC; other key types are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<Jwk>,
}

impl Jwks {
    /// Parses a JWKS document, keeping the first [`MAX_KEYS`]. A document that is not `{"keys":[...]}` or a
    /// key whose numbers are not base64url is AADSTS900612.
    pub fn parse(body: &[u8]) -> Result<Self, Rejection> {
        let doc: Value = serde_json::from_slice(body).map_err(|_| Rejection::BadKeys)?;
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(Rejection::BadKeys)?;
        let mut keys = Vec::new();
        for k in list.iter().take(MAX_KEYS) {
            let field = |name: &str| -> Result<Vec<u8>, Rejection> {
                k.get(name)
                    .and_then(Value::as_str)
                    .and_then(|v| B64.decode(v.trim_end_matches('=')).ok())
                    .filter(|v| !v.is_empty())
                    .ok_or(Rejection::BadKeys)
            };
            let key = match k.get("kty").and_then(Value::as_str) {
                Some("RSA") => KeyMaterial::Rsa {
                    n: field("n")?,
                    e: field("e")?,
                },
                Some("EC") => {
                    let crv = k.get("crv").and_then(Value::as_str).ok_or(Rejection::BadKeys)?;
                    let mut point = vec![4];
                    point.extend(field("x")?);
                    point.extend(field("y")?);
                    KeyMaterial::Ec {
                        crv: crv.to_owned(),
                        point,
                    }
                }
                Some(_) => continue,
                None => return Err(Rejection::BadKeys),
            };
            keys.push(Jwk {
                kid: k.get("kid").and_then(Value::as_str).map(str::to_owned),
                key,
            });
        }
        Ok(Self { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

enum Verifier {
    Rsa(&'static signature::RsaParameters),
    /// The algorithm and the curve (`crv`) its key must be on.
    Ec(&'static signature::EcdsaVerificationAlgorithm, &'static str),
}

fn verifier(alg: &str) -> Option<Verifier> {
    Some(match alg {
        "RS256" => Verifier::Rsa(&signature::RSA_PKCS1_2048_8192_SHA256),
        "RS384" => Verifier::Rsa(&signature::RSA_PKCS1_2048_8192_SHA384),
        "RS512" => Verifier::Rsa(&signature::RSA_PKCS1_2048_8192_SHA512),
        "PS256" => Verifier::Rsa(&signature::RSA_PSS_2048_8192_SHA256),
        "PS384" => Verifier::Rsa(&signature::RSA_PSS_2048_8192_SHA384),
        "PS512" => Verifier::Rsa(&signature::RSA_PSS_2048_8192_SHA512),
        "ES256" => Verifier::Ec(&signature::ECDSA_P256_SHA256_FIXED, "P-256"),
        "ES384" => Verifier::Ec(&signature::ECDSA_P384_SHA384_FIXED, "P-384"),
        _ => return None,
    })
}

fn verifies(a: &Assertion, key: &KeyMaterial) -> bool {
    let (msg, sig) = (a.signing_input.as_bytes(), a.signature.as_slice());
    match (verifier(&a.alg), key) {
        (Some(Verifier::Rsa(params)), KeyMaterial::Rsa { n, e }) => {
            RsaPublicKeyComponents { n, e }.verify(params, msg, sig).is_ok()
        }
        (Some(Verifier::Ec(alg, want)), KeyMaterial::Ec { crv, point }) if crv == want => {
            UnparsedPublicKey::new(alg, point).verify(msg, sig).is_ok()
        }
        _ => false,
    }
}

/// Checks the signature with the issuer's key named by `kid` (every key when the assertion names none).
pub fn verify_signature(a: &Assertion, keys: &Jwks, issuer: &str) -> Result<(), Rejection> {
    let candidates: Vec<&Jwk> = keys
        .keys
        .iter()
        .filter(|k| a.kid.is_none() || k.kid == a.kid)
        .collect();
    if candidates.is_empty() {
        return Err(Rejection::UnknownKey {
            kid: a.kid.clone().unwrap_or_default(),
            issuer: issuer.to_owned(),
        });
    }
    if candidates.iter().any(|k| verifies(a, &k.key)) {
        Ok(())
    } else {
        Err(Rejection::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RsaKeyPair};
    use rustls_pki_types::pem::PemObject;
    use serde_json::json;

    const ISS: &str = "https://issuer.example";
    const SUB: &str = "system:serviceaccount:ns:sa";
    const RSA_PKCS8_PEM: &str = include_str!("../tests/fixtures/issuer-rsa.pem");

    fn rsa_key() -> RsaKeyPair {
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(RSA_PKCS8_PEM.as_bytes()).unwrap();
        RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap()
    }

    fn rsa_jwk(key: &RsaKeyPair, kid: &str) -> Value {
        let public: RsaPublicKeyComponents<Vec<u8>> = key.public().into();
        json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": B64.encode(&public.n), "e": B64.encode(&public.e)})
    }

    fn sign_rs256(key: &RsaKeyPair, kid: &str, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(json!({"alg": "RS256", "kid": kid}).to_string()),
            B64.encode(claims.to_string())
        );
        let mut sig = vec![0; key.public().modulus_len()];
        key.sign(
            &signature::RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .unwrap();
        format!("{input}.{}", B64.encode(sig))
    }

    fn claims(now: i64) -> Value {
        json!({"iss": ISS, "sub": SUB, "aud": [TOKEN_EXCHANGE_AUDIENCE], "iat": now, "nbf": now, "exp": now + 3600})
    }

    fn trusted(issuer: &str, subject: &str, audience: &str) -> Trusted {
        Trusted {
            name: "fic".into(),
            issuer: issuer.into(),
            subject: subject.into(),
            audiences: vec![audience.into()],
            propagated: true,
        }
    }

    fn parsed(c: &Value) -> Assertion {
        Assertion::parse(&format!(
            "{}.{}.c2ln",
            B64.encode(json!({"alg": "RS256", "kid": "k"}).to_string()),
            B64.encode(c.to_string())
        ))
        .unwrap()
    }

    #[test]
    fn malformed_assertions_are_50027() {
        let h = B64.encode(json!({"alg": "RS256"}).to_string());
        let c = B64.encode(json!({"iss": ISS}).to_string());
        for bad in ["", "a.b", "a.b.c.d", "!!.!!.!!", &format!("{h}.{c}.AA")] {
            assert_eq!(Assertion::parse(bad), Err(Rejection::Malformed), "{bad}");
        }
        assert_eq!(Rejection::Malformed.aadsts().code, 50027);
    }

    #[test]
    fn trust_is_matched_by_issuer_then_subject_then_audience_exactly() {
        let a = parsed(&claims(1000));
        let creds = vec![
            trusted("https://other", SUB, TOKEN_EXCHANGE_AUDIENCE),
            trusted(ISS, SUB, TOKEN_EXCHANGE_AUDIENCE),
        ];
        assert_eq!(match_trust(&a, &creds).unwrap().issuer, ISS);
        let only = |c: Trusted| match_trust(&a, &[c]).map(|_| ()).unwrap_err();
        assert_eq!(
            only(trusted(&format!("{ISS}/"), SUB, TOKEN_EXCHANGE_AUDIENCE)),
            Rejection::NoIssuer(ISS.into())
        );
        assert_eq!(
            only(trusted(&ISS.to_uppercase(), SUB, TOKEN_EXCHANGE_AUDIENCE)),
            Rejection::NoIssuer(ISS.into())
        );
        assert_eq!(
            only(trusted(
                ISS,
                "system:serviceaccount:ns:other",
                TOKEN_EXCHANGE_AUDIENCE
            )),
            Rejection::NoSubject(SUB.into())
        );
        assert_eq!(
            only(trusted(ISS, &SUB.to_uppercase(), TOKEN_EXCHANGE_AUDIENCE)),
            Rejection::SubjectCase(SUB.into())
        );
        assert_eq!(
            only(trusted(ISS, SUB, "api://other")),
            Rejection::NoAudience(TOKEN_EXCHANGE_AUDIENCE.into())
        );
        assert_eq!(match_trust(&a, &[]).unwrap_err(), Rejection::NoIssuer(ISS.into()));
        let codes: Vec<u32> = [
            Rejection::NoIssuer(ISS.into()),
            Rejection::NoSubject(SUB.into()),
            Rejection::NoAudience("a".into()),
        ]
        .iter()
        .map(|r| r.aadsts().code)
        .collect();
        assert_eq!(codes, [700211, 700213, 700212]);
    }

    #[test]
    fn a_credential_still_propagating_gives_70021_only_when_it_alone_would_match() {
        let a = parsed(&claims(1000));
        let mut pending = trusted(ISS, SUB, TOKEN_EXCHANGE_AUDIENCE);
        pending.propagated = false;
        let err = match_trust(&a, std::slice::from_ref(&pending)).unwrap_err();
        assert!(matches!(err, Rejection::NotPropagated { .. }), "{err:?}");
        let body = err.aadsts();
        assert_eq!(
            (body.status, body.error, body.code),
            (401, "invalid_client", 70021)
        );
        assert!(
            body.message.contains(&format!("Assertion Subject: '{SUB}'")),
            "{}",
            body.message
        );
        // A credential Entra does not know yet matches nothing: it is as if it were not there.
        let mut other = pending.clone();
        other.subject = "someone-else".into();
        assert_eq!(
            match_trust(&a, &[other]).unwrap_err(),
            Rejection::NoIssuer(ISS.into())
        );
    }

    #[test]
    fn lifetime_and_time_window_are_checked_with_skew() {
        let now = 10_000_000;
        let at = |iat: Option<i64>, nbf: Option<i64>, exp: Option<i64>| {
            let mut a = parsed(&claims(now));
            (a.iat, a.nbf, a.exp) = (iat, nbf, exp);
            check_lifetime(&a, now)
        };
        assert_eq!(at(Some(now), Some(now), Some(now + 3600)), Ok(()));
        assert_eq!(
            at(Some(now - 3600), None, Some(now - 1)),
            Ok(()),
            "within the skew"
        );
        assert_eq!(
            at(Some(now - 7200), Some(now - 7200), Some(now - 3600)),
            Err(Rejection::Expired {
                now,
                from: now - 7200,
                exp: now - 3600
            })
        );
        assert!(matches!(
            at(Some(now + 600), Some(now + 600), Some(now + 1200)),
            Err(Rejection::Expired { .. })
        ));
        assert_eq!(
            at(Some(now), Some(now), Some(now + MAX_LIFETIME_SECS + 1)),
            Err(Rejection::Lifetime {
                iat: now,
                exp: now + MAX_LIFETIME_SECS + 1
            })
        );
        assert_eq!(
            at(None, Some(now), Some(now + 3600)),
            Err(Rejection::Lifetime {
                iat: 0,
                exp: now + 3600
            }),
            "no iat reads as issued at 0"
        );
        assert_eq!(at(Some(now), Some(now), None), Err(Rejection::Malformed));
        let msg = Rejection::Expired {
            now: 0,
            from: 0,
            exp: 0,
        }
        .aadsts()
        .message;
        assert!(
            msg.contains("Current time: 1970-01-01T00:00:00.0000000Z"),
            "{msg}"
        );
    }

    #[test]
    fn only_listed_algorithms_pass() {
        let allowed = vec!["RS256".to_string()];
        let mut a = parsed(&claims(1000));
        assert_eq!(check_algorithm(&a, &allowed), Ok(()));
        a.alg = "ES256".into();
        assert_eq!(
            check_algorithm(&a, &allowed),
            Err(Rejection::Algorithm("ES256".into()))
        );
        a.alg = "none".into();
        assert_eq!(
            check_algorithm(&a, &["none".to_string()]),
            Err(Rejection::Algorithm("none".into()))
        );
        assert_eq!(Rejection::Algorithm("ES256".into()).aadsts().code, 5002738);
    }

    #[test]
    fn rsa_signatures_verify_against_the_published_key_only() {
        let key = rsa_key();
        let jwks = Jwks::parse(json!({"keys": [rsa_jwk(&key, "k1")]}).to_string().as_bytes()).unwrap();
        let tok = sign_rs256(&key, "k1", &claims(1000));
        let a = Assertion::parse(&tok).unwrap();
        assert_eq!(a.aud, vec![TOKEN_EXCHANGE_AUDIENCE.to_string()]);
        assert_eq!(verify_signature(&a, &jwks, ISS), Ok(()));
        let unknown = Assertion::parse(&sign_rs256(&key, "k2", &claims(1000))).unwrap();
        assert_eq!(
            verify_signature(&unknown, &jwks, ISS),
            Err(Rejection::UnknownKey {
                kid: "k2".into(),
                issuer: ISS.into()
            })
        );
        let mut forged = claims(1000);
        forged["sub"] = json!("system:serviceaccount:kube-system:admin");
        let parts: Vec<&str> = tok.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], B64.encode(forged.to_string()), parts[2]);
        assert_eq!(
            verify_signature(&Assertion::parse(&tampered).unwrap(), &jwks, ISS),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn ec_keys_verify_es256_and_reject_a_wrong_curve_or_key_type() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let point = key.public_key().as_ref();
        let jwk = |crv: &str| json!({"kty": "EC", "crv": crv, "kid": "ec", "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..])});
        let input = format!(
            "{}.{}",
            B64.encode(json!({"alg": "ES256", "kid": "ec"}).to_string()),
            B64.encode(claims(1000).to_string())
        );
        let sig = key.sign(&rng, input.as_bytes()).unwrap();
        let a = Assertion::parse(&format!("{input}.{}", B64.encode(sig.as_ref()))).unwrap();
        let good = Jwks::parse(json!({"keys": [jwk("P-256")]}).to_string().as_bytes()).unwrap();
        assert_eq!(verify_signature(&a, &good, ISS), Ok(()));
        let wrong_curve = Jwks::parse(json!({"keys": [jwk("P-384")]}).to_string().as_bytes()).unwrap();
        assert_eq!(
            verify_signature(&a, &wrong_curve, ISS),
            Err(Rejection::BadSignature)
        );
        let rsa = Jwks::parse(
            json!({"keys": [rsa_jwk(&rsa_key(), "ec")]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(verify_signature(&a, &rsa, ISS), Err(Rejection::BadSignature));
    }

    #[test]
    fn key_sets_parse_or_are_900612() {
        for bad in [
            "not json",
            "{}",
            r#"{"keys": {}}"#,
            r#"{"keys": [{"n": "AQAB", "e": "AQAB"}]}"#,
            r#"{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}"#,
            r#"{"keys": [{"kty": "EC", "x": "AQAB", "y": "AQAB"}]}"#,
        ] {
            assert_eq!(Jwks::parse(bad.as_bytes()), Err(Rejection::BadKeys), "{bad}");
        }
        let many: Vec<Value> = (0..150)
            .map(|n| json!({"kty": "RSA", "kid": format!("k{n}"), "n": "AQAB", "e": "AQAB"}))
            .collect();
        let jwks = Jwks::parse(json!({"keys": many}).to_string().as_bytes()).unwrap();
        assert_eq!(jwks.len(), MAX_KEYS);
        assert!(jwks.has_kid("k99") && !jwks.has_kid("k100"));
        let other = Jwks::parse(br#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AQAB"}]}"#).unwrap();
        assert!(other.is_empty(), "unsupported key types are skipped");
        let body = Rejection::BadKeys.aadsts();
        assert_eq!((body.status, body.code, body.error_uri), (400, 900612, false));
    }
}

//! Access tokens: real, signed JWTs with the claims Azure services read (`aud`, `iss`, `tid`, `oid`, `appid`,
//! `exp`, and `xms_mirid` for managed identities), so ARM and Key Vault here decide on the token alone and a
//! token from another emulator instance, a forged or an expired one is refused as Azure would.
//!
//! Signed with ES256 (P-256) through ring: no SDK checks an access token's signature (only the resource does),
//! ring cannot generate RSA keys, and an RSA key generated in a debug build would dominate start-up. The key
//! is published as a JWKS like Entra's.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub aud: String,
    pub iss: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub tid: String,
    pub oid: String,
    pub sub: String,
    pub appid: String,
    /// 0 for managed identities, 1 for a client secret, 2 for a certificate.
    pub appidacr: String,
    pub idtyp: String,
    pub ver: String,
    /// The managed identity's resource ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xms_mirid: Option<String>,
    pub uti: String,
}

impl Claims {
    /// Claims of a v1 app-only token, the kind ARM and Key Vault accept from both token endpoints.
    pub fn app(
        aud: &str,
        tid: &str,
        oid: &str,
        appid: &str,
        appidacr: &str,
        now: i64,
        lifetime: i64,
    ) -> Self {
        Self {
            aud: aud.to_owned(),
            iss: format!("https://sts.windows.net/{tid}/"),
            iat: now,
            nbf: now,
            exp: now + lifetime,
            tid: tid.to_owned(),
            oid: oid.to_owned(),
            sub: oid.to_owned(),
            appid: appid.to_owned(),
            appidacr: appidacr.to_owned(),
            idtyp: "app".to_owned(),
            ver: "1.0".to_owned(),
            xms_mirid: None,
            uti: B64.encode(uuid::Uuid::new_v4().as_bytes()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token expired at {0}")]
    Expired(i64),
    #[error("the token is not valid before {0}")]
    NotYetValid(i64),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot create the token signing key")]
pub struct KeyError;

pub struct Signer {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn generate() -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(|_| KeyError)?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| KeyError)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref());
        let kid = B64.encode(&digest.as_ref()[..20]);
        Ok(Self { key, kid, rng })
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let header = json!({"typ": "JWT", "alg": "ES256", "kid": self.kid, "x5t": self.kid});
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(json!(claims).to_string())
        );
        // Signing with a valid key only fails if the system RNG does; an unsigned token would then be refused
        // by every verifier, which is the failure a test would see.
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map(|s| B64.encode(s.as_ref()))
            .unwrap_or_default();
        format!("{signing_input}.{sig}")
    }

    /// Checks signature and lifetime; what the claims must say is the caller's business.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, VerifyError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(VerifyError::Malformed);
        };
        let sig = B64.decode(s).map_err(|_| VerifyError::Malformed)?;
        let header: Value = serde_json::from_slice(&B64.decode(h).map_err(|_| VerifyError::Malformed)?)
            .map_err(|_| VerifyError::Malformed)?;
        if header["alg"] != "ES256" {
            return Err(VerifyError::BadSignature);
        }
        ring::signature::UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, self.key.public_key().as_ref())
            .verify(format!("{h}.{p}").as_bytes(), &sig)
            .map_err(|_| VerifyError::BadSignature)?;
        let claims: Claims = serde_json::from_slice(&B64.decode(p).map_err(|_| VerifyError::Malformed)?)
            .map_err(|_| VerifyError::Malformed)?;
        if claims.exp <= now {
            return Err(VerifyError::Expired(claims.exp));
        }
        // Entra allows five minutes of clock skew.
        if claims.nbf > now + 300 {
            return Err(VerifyError::NotYetValid(claims.nbf));
        }
        Ok(claims)
    }

    /// The public key as Entra's `discovery/keys` document.
    pub fn jwks(&self) -> Value {
        let point = self.key.public_key().as_ref();
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
            "kid": self.kid, "x5t": self.kid,
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        }]})
    }
}

/// Reads the claims of a JWT without checking anything; for logs and tests.
pub fn peek(token: &str) -> Option<Claims> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&B64.decode(payload).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> Claims {
        Claims::app("https://vault.azure.net", "t", "o", "a", "0", now, 3600)
    }

    #[test]
    fn signed_token_verifies_and_carries_its_claims() {
        let s = Signer::generate().unwrap();
        let c = claims(1000);
        let tok = s.sign(&c);
        assert_eq!(s.verify(&tok, 1001).unwrap(), c);
        assert_eq!(peek(&tok).unwrap().iss, "https://sts.windows.net/t/");
        assert_eq!(s.jwks()["keys"][0]["kty"], "EC");
    }

    #[test]
    fn expired_forged_and_foreign_tokens_are_refused() {
        let s = Signer::generate().unwrap();
        let tok = s.sign(&claims(1000));
        assert_eq!(s.verify(&tok, 4600), Err(VerifyError::Expired(4600)));
        let other = Signer::generate().unwrap();
        assert_eq!(other.verify(&tok, 1001), Err(VerifyError::BadSignature));
        let mut forged = claims(1000);
        forged.oid = "admin".into();
        let parts: Vec<&str> = tok.split('.').collect();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(json!(forged).to_string()),
            parts[2]
        );
        assert_eq!(s.verify(&tampered, 1001), Err(VerifyError::BadSignature));
        assert_eq!(s.verify("abc", 1001), Err(VerifyError::Malformed));
        assert_eq!(s.verify("a.b.c", 1001), Err(VerifyError::Malformed));
    }
}

//! Client assertions (certificate credentials): a JWT the client signs with the key of a certificate
//! registered on its application, naming the certificate by thumbprint (`x5t`, SHA-1, or `x5t#S256`).
//! Entra checks the signature against that certificate, the issuer and subject (the client ID), the audience
//! (its token endpoint) and the time window.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;

use crate::seed::ApplicationSeed;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("the client assertion is not a well-formed JWT")]
    Malformed,
    #[error("no certificate registered on the application has the assertion's thumbprint")]
    UnknownCertificate,
    #[error("the client assertion's signature does not verify")]
    BadSignature,
    #[error("the client assertion's issuer or subject is not the client ID")]
    WrongIssuer,
    #[error("the client assertion's audience is not this token endpoint")]
    WrongAudience,
    #[error("the client assertion is not within its valid time range")]
    Expired,
}

impl AssertionError {
    /// Entra's AADSTS code and message.
    pub fn aadsts(&self) -> (u32, String) {
        match self {
            Self::Malformed => (50027, "JWT token is invalid or malformed.".into()),
            Self::UnknownCertificate => (
                700027,
                "The certificate with identifier used to sign the client assertion is not registered on application.".into(),
            ),
            Self::BadSignature => (700027, "Client assertion failed signature validation.".into()),
            Self::WrongIssuer => (
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.".into(),
            ),
            Self::WrongAudience => (700212, "The client assertion has an invalid audience claim.".into()),
            Self::Expired => (700024, "Client assertion is not within its valid time range.".into()),
        }
    }
}

/// A JWS ES256 signature is r‖s; webpki wants the ASN.1 DER form.
fn ecdsa_fixed_to_der(sig: &[u8]) -> Option<Vec<u8>> {
    if sig.len() != 64 {
        return None;
    }
    let int = |b: &[u8]| {
        let trimmed: Vec<u8> = b.iter().copied().skip_while(|x| *x == 0).collect();
        let mut v = if trimmed.first().is_none_or(|x| x & 0x80 != 0) {
            vec![0]
        } else {
            Vec::new()
        };
        v.extend(trimmed);
        let mut out = vec![0x02, v.len() as u8];
        out.extend(v);
        out
    };
    let (r, s) = (int(&sig[..32]), int(&sig[32..]));
    let mut out = vec![0x30, (r.len() + s.len()) as u8];
    out.extend(r);
    out.extend(s);
    Some(out)
}

fn thumbprints(der: &[u8]) -> (String, String) {
    let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der);
    let sha256 = ring::digest::digest(&ring::digest::SHA256, der);
    (B64.encode(sha1.as_ref()), B64.encode(sha256.as_ref()))
}

pub fn verify(
    assertion: &str,
    app: &ApplicationSeed,
    audiences: &[String],
    now: i64,
) -> Result<(), AssertionError> {
    let mut parts = assertion.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(AssertionError::Malformed);
    };
    let decode = |x: &str| {
        B64.decode(x.trim_end_matches('='))
            .map_err(|_| AssertionError::Malformed)
    };
    let header: Value = serde_json::from_slice(&decode(h)?).map_err(|_| AssertionError::Malformed)?;
    let claims: Value = serde_json::from_slice(&decode(p)?).map_err(|_| AssertionError::Malformed)?;
    let sig = decode(s)?;
    let x5t = header["x5t"].as_str().map(|t| t.trim_end_matches('='));
    let x5t256 = header["x5t#S256"].as_str().map(|t| t.trim_end_matches('='));
    let cert = app
        .certificates
        .iter()
        .filter_map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).ok())
        .find(|der| {
            let (t1, t256) = thumbprints(der);
            x5t == Some(t1.as_str()) || x5t256 == Some(t256.as_str())
        })
        .ok_or(AssertionError::UnknownCertificate)?;
    let ee = webpki::EndEntityCert::try_from(&cert).map_err(|_| AssertionError::UnknownCertificate)?;
    let msg = format!("{h}.{p}");
    let verified = match header["alg"].as_str() {
        Some("ES256") => ecdsa_fixed_to_der(&sig).is_some_and(|der| {
            ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, msg.as_bytes(), &der)
                .is_ok()
        }),
        Some("RS256") => ee
            .verify_signature(webpki::ring::RSA_PKCS1_2048_8192_SHA256, msg.as_bytes(), &sig)
            .is_ok(),
        Some("PS256") => ee
            .verify_signature(
                webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
                msg.as_bytes(),
                &sig,
            )
            .is_ok(),
        _ => false,
    };
    if !verified {
        return Err(AssertionError::BadSignature);
    }
    let is_client = |v: &Value| v.as_str().is_some_and(|x| x.eq_ignore_ascii_case(&app.client_id));
    if !is_client(&claims["iss"]) || !is_client(&claims["sub"]) {
        return Err(AssertionError::WrongIssuer);
    }
    let aud_ok = |a: &str| {
        audiences.iter().any(|x| {
            x.trim_end_matches('/')
                .eq_ignore_ascii_case(a.trim_end_matches('/'))
        })
    };
    let aud_matches = match &claims["aud"] {
        Value::String(a) => aud_ok(a),
        Value::Array(list) => list.iter().filter_map(Value::as_str).any(aud_ok),
        _ => false,
    };
    if !aud_matches {
        return Err(AssertionError::WrongAudience);
    }
    let exp = claims["exp"].as_i64().ok_or(AssertionError::Malformed)?;
    let nbf = claims["nbf"].as_i64().unwrap_or(i64::MIN);
    if exp <= now || nbf > now + 300 {
        return Err(AssertionError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    use serde_json::json;

    fn app_and_key() -> (ApplicationSeed, EcdsaKeyPair, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &SystemRandom::new(),
        )
        .unwrap();
        let app = ApplicationSeed {
            client_id: "app".into(),
            certificates: vec![cert.pem()],
            ..ApplicationSeed::default()
        };
        (app, signer, thumbprints(cert.der()).0)
    }

    fn sign(key: &EcdsaKeyPair, x5t: &str, claims: Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(json!({"alg": "ES256", "typ": "JWT", "x5t": x5t}).to_string()),
            B64.encode(claims.to_string())
        );
        let sig = key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", B64.encode(sig.as_ref()))
    }

    const AUD: &str = "https://login/t/oauth2/v2.0/token";

    #[test]
    fn valid_assertion_verifies_and_each_defect_is_named() {
        let (app, key, x5t) = app_and_key();
        let auds = vec![AUD.to_string()];
        let good = json!({"iss": "app", "sub": "app", "aud": AUD, "exp": 2000, "nbf": 1000, "jti": "x"});
        assert_eq!(verify(&sign(&key, &x5t, good.clone()), &app, &auds, 1500), Ok(()));
        assert_eq!(
            verify(&sign(&key, &x5t, good.clone()), &app, &auds, 2000),
            Err(AssertionError::Expired)
        );
        let mut c = good.clone();
        c["iss"] = json!("other");
        assert_eq!(
            verify(&sign(&key, &x5t, c), &app, &auds, 1500),
            Err(AssertionError::WrongIssuer)
        );
        let mut c = good.clone();
        c["aud"] = json!("https://elsewhere");
        assert_eq!(
            verify(&sign(&key, &x5t, c), &app, &auds, 1500),
            Err(AssertionError::WrongAudience)
        );
        assert_eq!(
            verify(&sign(&key, "AAAA", good.clone()), &app, &auds, 1500),
            Err(AssertionError::UnknownCertificate)
        );
        let (_, other_key, _) = app_and_key();
        assert_eq!(
            verify(&sign(&other_key, &x5t, good), &app, &auds, 1500),
            Err(AssertionError::BadSignature)
        );
        assert_eq!(verify("x.y", &app, &auds, 1500), Err(AssertionError::Malformed));
    }
}

//! The webhook's certificates: a certificate authority whose bundle the API server trusts (the
//! `caBundle` of the `MutatingWebhookConfiguration`), and a serving certificate it signs for the
//! Service's names. Plain functions over PEM text and a clock: [`assess`] says whether what is kept
//! still serves, [`issue`] makes what replaces it, [`renewal_due`] says when to look again.
//!
//! Rotation never leaves the API server without trust in what a replica serves:
//! - the serving certificate is renewed when a third of its validity is left, under the same authority,
//!   so the bundle does not change and replicas still serving the old one stay trusted;
//! - the authority is replaced when less than one serving validity is left of it; the new one goes
//!   first in the bundle and the old one stays in it until it expires, so a replica that has not yet
//!   loaded the new serving certificate is still trusted.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, pem::Pem};

/// Certificates are valid from this long before they are made, for clocks behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// What the serving certificate must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSettings {
    /// Names the API server may dial: DNS names (the Service's `<name>.<namespace>.svc`) and IP
    /// addresses, in any order; the first is also the common name.
    pub names: Vec<String>,
    /// How long a serving certificate is valid; renewed when a third of it is left.
    pub validity: Duration,
    /// How long an authority is valid; replaced when less than one `validity` is left.
    pub authority_validity: Duration,
}

/// The PEM texts kept in the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    /// Certificates the API server trusts: the current authority first, then older ones that have
    /// not expired.
    pub ca_bundle: String,
    /// Private key of the current authority (PKCS#8).
    pub ca_key: String,
    /// The serving certificate.
    pub cert: String,
    /// Its private key (PKCS#8).
    pub key: String,
}

/// What to do with the kept material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It serves: keep it.
    Keep,
    /// A new serving certificate under the same authority, for the reason given.
    Renew(String),
    /// A new authority and serving certificate, for the reason given.
    NewAuthority(String),
}

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused.
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The kept authority is unreadable (only when renewing under it).
    #[error("the kept certificate authority is unreadable: {0}")]
    Authority(String),
}

/// Whether `material` (none when nothing is kept) still serves `settings` at `now`.
pub fn assess(material: Option<&Material>, settings: &CertSettings, now: SystemTime) -> Verdict {
    let Some(material) = material else {
        return Verdict::NewAuthority("no certificate authority is kept yet".to_owned());
    };
    let bundle = pems(&material.ca_bundle);
    let Some(authority) = bundle.first().and_then(|pem| pem.parse_x509().ok()) else {
        return Verdict::NewAuthority("the kept certificate authority is unreadable".to_owned());
    };
    if !authority.is_ca() || !key_matches(&material.ca_key, &authority) {
        return Verdict::NewAuthority("the kept authority key does not match its certificate".to_owned());
    }
    if remaining(&authority, now) < settings.validity {
        return Verdict::NewAuthority(
            "the certificate authority expires within one serving validity".to_owned(),
        );
    }
    let serving = pems(&material.cert);
    let Some(cert) = serving.first().and_then(|pem| pem.parse_x509().ok()) else {
        return Verdict::Renew("the serving certificate is unreadable".to_owned());
    };
    if !key_matches(&material.key, &cert) {
        return Verdict::Renew("the serving key does not match its certificate".to_owned());
    }
    if cert.verify_signature(Some(authority.public_key())).is_err() {
        return Verdict::Renew("the serving certificate is not signed by the current authority".to_owned());
    }
    let mut have = names(&cert);
    let mut want: Vec<String> = settings.names.iter().map(|n| canonical(n)).collect();
    have.sort();
    have.dedup();
    want.sort();
    want.dedup();
    if have != want {
        return Verdict::Renew(format!("the serving certificate names {have:?}, not {want:?}"));
    }
    if not_before(&cert) > now + CLOCK_SKEW {
        return Verdict::Renew("the serving certificate is not valid yet".to_owned());
    }
    if remaining(&cert, now) < settings.validity / 3 {
        return Verdict::Renew("a third of the serving certificate's validity is left".to_owned());
    }
    Verdict::Keep
}

/// When [`assess`] will stop saying [`Verdict::Keep`] for `material` by the passing of time alone;
/// `None` when the material is unreadable (assess says so at once).
pub fn renewal_due(material: &Material, settings: &CertSettings) -> Option<SystemTime> {
    let authority = pems(&material.ca_bundle)
        .first()?
        .parse_x509()
        .ok()
        .map(|c| not_after(&c))?;
    let cert = pems(&material.cert)
        .first()?
        .parse_x509()
        .ok()
        .map(|c| not_after(&c))?;
    let authority_due = authority.checked_sub(settings.validity)?;
    let cert_due = cert.checked_sub(settings.validity / 3)?;
    Some(authority_due.min(cert_due))
}

/// New material after `verdict` (`Renew` or `NewAuthority`; `Keep` returns `previous` unchanged):
/// a serving certificate for `settings.names`, signed by the kept authority or by a new one that goes
/// first in the bundle. Expired authorities leave the bundle.
///
/// Errors: [`CertError::Authority`] when asked to renew under an authority that cannot be read.
pub fn issue(
    previous: Option<&Material>,
    settings: &CertSettings,
    now: SystemTime,
    verdict: &Verdict,
) -> Result<Material, CertError> {
    let kept_bundle: Vec<Pem> = previous.map(|m| pems(&m.ca_bundle)).unwrap_or_default();
    let still_valid = |pem: &Pem| pem.parse_x509().is_ok_and(|c| c.is_ca() && not_after(&c) > now);
    let (issuer, ca_key, bundle) = match (verdict, previous) {
        (Verdict::Keep, Some(previous)) => return Ok(previous.clone()),
        (Verdict::Renew(_), Some(previous)) => {
            let first = kept_bundle
                .first()
                .ok_or_else(|| CertError::Authority("the bundle is empty".to_owned()))?;
            let key = KeyPair::from_pem(&previous.ca_key).map_err(|e| CertError::Authority(e.to_string()))?;
            let issuer = Issuer::from_ca_cert_der(&first.contents.clone().into(), key)
                .map_err(|e| CertError::Authority(e.to_string()))?;
            let bundle: Vec<Vec<u8>> = kept_bundle
                .iter()
                .filter(|p| still_valid(p))
                .map(|p| p.contents.clone())
                .collect();
            (issuer, previous.ca_key.clone(), bundle)
        }
        _ => {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params
                .distinguished_name
                .push(DnType::CommonName, "pod-identity webhook CA");
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
            params.not_before = (now - CLOCK_SKEW).into();
            params.not_after = (now + settings.authority_validity).into();
            let key = KeyPair::generate()?;
            let ca_key = key.serialize_pem();
            let cert = params.self_signed(&key)?;
            let mut bundle = vec![cert.der().to_vec()];
            bundle.extend(
                kept_bundle
                    .iter()
                    .filter(|p| still_valid(p))
                    .map(|p| p.contents.clone()),
            );
            (Issuer::new(params, key), ca_key, bundle)
        }
    };
    let mut params = CertificateParams::default();
    params.subject_alt_names = settings
        .names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    if let Some(first) = settings.names.first() {
        params.distinguished_name.push(DnType::CommonName, first.as_str());
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + settings.validity).into();
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Material {
        ca_bundle: bundle.iter().map(|der| pem_encode(der)).collect(),
        ca_key,
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The certificates of a PEM text (other blocks and unreadable ones skipped).
fn pems(text: &str) -> Vec<Pem> {
    Pem::iter_from_buffer(text.as_bytes())
        .filter_map(Result::ok)
        .filter(|pem| pem.label == "CERTIFICATE")
        .collect()
}

fn key_matches(key_pem: &str, cert: &X509Certificate<'_>) -> bool {
    KeyPair::from_pem(key_pem)
        .is_ok_and(|key| key.public_key_raw() == &*cert.public_key().subject_public_key.data)
}

fn names(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(canonical(dns)),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Names compare as the certificate holds them: DNS names lower-case, addresses in their shortest form.
fn canonical(name: &str) -> String {
    match name.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => name.to_ascii_lowercase(),
    }
}

fn at(seconds: i64) -> SystemTime {
    match u64::try_from(seconds) {
        Ok(after) => SystemTime::UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

fn not_after(cert: &X509Certificate<'_>) -> SystemTime {
    at(cert.validity().not_after.timestamp())
}

fn not_before(cert: &X509Certificate<'_>) -> SystemTime {
    at(cert.validity().not_before.timestamp())
}

fn remaining(cert: &X509Certificate<'_>, now: SystemTime) -> Duration {
    not_after(cert).duration_since(now).unwrap_or_default()
}

fn pem_encode(der: &[u8]) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn settings() -> CertSettings {
        CertSettings {
            names: vec![
                "ctl-webhook.pod-identity.svc".into(),
                "ctl-webhook.pod-identity.svc.cluster.local".into(),
                "127.0.0.1".into(),
            ],
            validity: 30 * DAY,
            authority_validity: 360 * DAY,
        }
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn first_new(now: SystemTime) -> Material {
        let verdict = assess(None, &settings(), now);
        assert!(matches!(verdict, Verdict::NewAuthority(_)), "{verdict:?}");
        issue(None, &settings(), now, &verdict).unwrap()
    }

    fn bundle_len(material: &Material) -> usize {
        pems(&material.ca_bundle).len()
    }

    /// The serving chain verifies under the bundle with webpki, as a TLS client would check it.
    fn trusted(material: &Material, now: SystemTime, name: &str) -> bool {
        use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
        let anchors: Vec<_> = pems(&material.ca_bundle)
            .iter()
            .map(|p| CertificateDer::from(p.contents.clone()))
            .collect();
        let anchors: Vec<_> = anchors.iter().map(|der| webpki_anchor(der)).collect();
        let leaf_der = CertificateDer::from(pems(&material.cert)[0].contents.clone());
        let leaf = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
        let time = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        let verified = leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            time,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        );
        verified.is_ok()
            && leaf
                .verify_is_valid_for_subject_name(&ServerName::try_from(name.to_owned()).unwrap())
                .is_ok()
    }

    fn webpki_anchor(
        der: &rustls_pki_types::CertificateDer<'static>,
    ) -> rustls_pki_types::TrustAnchor<'static> {
        webpki::anchor_from_trusted_cert(der).unwrap().to_owned()
    }

    #[test]
    fn a_first_issue_serves_every_name_and_is_then_kept() {
        let material = first_new(t0());
        assert_eq!(bundle_len(&material), 1);
        assert_eq!(assess(Some(&material), &settings(), t0()), Verdict::Keep);
        for name in [
            "ctl-webhook.pod-identity.svc",
            "ctl-webhook.pod-identity.svc.cluster.local",
            "127.0.0.1",
        ] {
            assert!(trusted(&material, t0(), name), "{name}");
        }
        assert!(!trusted(&material, t0(), "elsewhere.example"));
    }

    #[test]
    fn the_serving_certificate_is_renewed_under_the_same_authority_with_a_third_left() {
        let material = first_new(t0());
        let due = renewal_due(&material, &settings()).unwrap();
        assert_eq!(due, t0() + 20 * DAY, "two thirds into its validity");
        assert_eq!(assess(Some(&material), &settings(), due - DAY), Verdict::Keep);
        let verdict = assess(Some(&material), &settings(), due + Duration::from_secs(1));
        assert!(matches!(verdict, Verdict::Renew(_)), "{verdict:?}");
        let renewed = issue(Some(&material), &settings(), due, &verdict).unwrap();
        assert_eq!(
            renewed.ca_bundle, material.ca_bundle,
            "the published bundle does not change"
        );
        assert_eq!(renewed.ca_key, material.ca_key);
        assert_ne!(renewed.cert, material.cert);
        assert_ne!(renewed.key, material.key);
        assert_eq!(assess(Some(&renewed), &settings(), due), Verdict::Keep);
        assert!(trusted(&renewed, due, "127.0.0.1"));
        assert!(
            trusted(&material, due, "127.0.0.1"),
            "the old certificate is still trusted meanwhile"
        );
    }

    #[test]
    fn a_new_authority_keeps_the_old_one_trusted_until_it_expires() {
        let first = first_new(t0());
        // Renew the serving certificate until the authority has less than one serving validity left.
        let mut material = first.clone();
        let mut now;
        loop {
            now = renewal_due(&material, &settings()).unwrap() + Duration::from_secs(1);
            let verdict = assess(Some(&material), &settings(), now);
            if let Verdict::NewAuthority(_) = verdict {
                let next = issue(Some(&material), &settings(), now, &verdict).unwrap();
                assert_eq!(bundle_len(&next), 2, "new authority first, old one kept");
                assert!(next.ca_bundle.ends_with(&material.ca_bundle));
                assert_ne!(next.ca_key, material.ca_key);
                assert!(
                    trusted(&next, now, "127.0.0.1"),
                    "the new serving certificate is trusted"
                );
                let mut old_served = next.clone();
                old_served.cert = material.cert.clone();
                assert!(
                    trusted(&old_served, now, "127.0.0.1"),
                    "a replica still serving the old one is trusted"
                );
                material = next;
                break;
            }
            assert!(matches!(verdict, Verdict::Renew(_)), "{verdict:?}");
            material = issue(Some(&material), &settings(), now, &verdict).unwrap();
            assert!(now < t0() + 360 * DAY, "the authority was never replaced");
        }
        assert!(
            now > t0() + 330 * DAY && now < t0() + 360 * DAY,
            "replaced within its last serving validity"
        );
        // Once the old authority has expired, the next issue drops it from the bundle.
        let later = t0() + 361 * DAY;
        let verdict = Verdict::Renew("test".into());
        let renewed = issue(Some(&material), &settings(), later, &verdict).unwrap();
        assert_eq!(bundle_len(&renewed), 1);
        assert!(trusted(&renewed, later, "127.0.0.1"));
    }

    #[test]
    fn changed_names_foreign_keys_and_garbage_are_replaced() {
        let material = first_new(t0());
        let mut more = settings();
        more.names.push("other.pod-identity.svc".into());
        assert!(matches!(assess(Some(&material), &more, t0()), Verdict::Renew(_)));
        let mut reordered = settings();
        reordered.names.reverse();
        reordered.names.push("CTL-WEBHOOK.pod-identity.svc".into());
        assert_eq!(
            assess(Some(&material), &reordered, t0()),
            Verdict::Keep,
            "order and case do not matter"
        );

        let other = first_new(t0());
        let mut swapped_key = material.clone();
        swapped_key.key = other.key.clone();
        assert!(matches!(
            assess(Some(&swapped_key), &settings(), t0()),
            Verdict::Renew(_)
        ));
        let mut foreign_cert = material.clone();
        foreign_cert.cert = other.cert.clone();
        foreign_cert.key = other.key.clone();
        assert!(
            matches!(assess(Some(&foreign_cert), &settings(), t0()), Verdict::Renew(_)),
            "signed by another authority"
        );
        let mut foreign_ca_key = material.clone();
        foreign_ca_key.ca_key = other.ca_key.clone();
        assert!(matches!(
            assess(Some(&foreign_ca_key), &settings(), t0()),
            Verdict::NewAuthority(_)
        ));

        for garbage in [
            "",
            "not pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            let mut bad = material.clone();
            bad.cert = garbage.to_owned();
            assert!(
                matches!(assess(Some(&bad), &settings(), t0()), Verdict::Renew(_)),
                "{garbage:?}"
            );
            let renewed = issue(
                Some(&bad),
                &settings(),
                t0(),
                &assess(Some(&bad), &settings(), t0()),
            )
            .unwrap();
            assert_eq!(assess(Some(&renewed), &settings(), t0()), Verdict::Keep);
            let mut bad = material.clone();
            bad.ca_bundle = garbage.to_owned();
            let verdict = assess(Some(&bad), &settings(), t0());
            assert!(matches!(verdict, Verdict::NewAuthority(_)), "{garbage:?}");
            let replaced = issue(Some(&bad), &settings(), t0(), &verdict).unwrap();
            assert_eq!(assess(Some(&replaced), &settings(), t0()), Verdict::Keep);
            assert_eq!(bundle_len(&replaced), 1, "nothing unreadable is carried over");
        }
        let expired = t0() + 400 * DAY;
        assert!(matches!(
            assess(Some(&material), &settings(), expired),
            Verdict::NewAuthority(_)
        ));
    }
}

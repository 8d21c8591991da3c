//! Certificates for one control plane: a CA that signs the server's certificate and any number of
//! client certificates (the API server maps CN to the user and O to its groups).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

/// The CA of a control plane, able to issue more client certificates while tests run.
pub(crate) struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub service_account_key: PathBuf,
    pub service_account_public_key: PathBuf,
}

/// Files of one client certificate.
pub(crate) struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub(crate) fn create(dir: &Path) -> Result<Self> {
        Self::create_for(dir, &[], &[])
    }

    /// A CA and a server certificate valid for loopback, `kubernetes.default.svc` and the extra names and
    /// addresses (a node's address, the `kubernetes` Service's cluster IP).
    pub(crate) fn create_for(dir: &Path, extra_names: &[&str], extra_ips: &[IpAddr]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = name("pod-identity test CA", None);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let mut names = vec!["localhost".to_owned(), "kubernetes.default.svc".to_owned()];
        names.extend(extra_names.iter().map(|n| (*n).to_owned()));
        let mut server = CertificateParams::new(names)?;
        let mut ips = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        ];
        ips.extend(
            extra_ips
                .iter()
                .filter(|ip| !ips.contains(ip))
                .copied()
                .collect::<Vec<_>>(),
        );
        server
            .subject_alt_names
            .extend(ips.into_iter().map(SanType::IpAddress));
        server.distinguished_name = name("kube-apiserver", None);
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &ca)?;

        let pki = Self {
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("apiserver.crt"),
            server_key: dir.join("apiserver.key"),
            service_account_key: dir.join("sa.key"),
            service_account_public_key: dir.join("sa.pub"),
            dir: dir.to_owned(),
            ca,
        };
        write(&pki.ca_cert, &ca_cert.pem())?;
        write(&pki.server_cert, &server_cert.pem())?;
        write(&pki.server_key, &server_key.serialize_pem())?;
        service_account_key(&pki.service_account_key, &pki.service_account_public_key)?;
        Ok(pki)
    }

    /// A client certificate for `user`, member of `group`, written next to the CA.
    pub(crate) fn client(&self, user: &str, group: Option<&str>) -> Result<ClientCert> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(user, group);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.ca)?;
        let stem: String = user
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let files = ClientCert {
            cert: self.dir.join(format!("client-{stem}.crt")),
            key: self.dir.join(format!("client-{stem}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}

/// The key kube-apiserver signs service-account tokens with: RSA (2048 bits), so that tokens are RS256 as
/// Entra ID wants them for workload identity federation (it refuses ES256 with AADSTS5002738). rcgen on
/// ring cannot generate RSA keys; `openssl genpkey` does, in a fraction of a second.
fn service_account_key(private: &Path, public: &Path) -> Result<()> {
    let openssl = |args: &[&std::ffi::OsStr]| -> Result<()> {
        let output = std::process::Command::new("openssl")
            .args(args)
            .output()
            .context("running openssl (install the openssl package): it makes the service-account RSA key")?;
        anyhow::ensure!(
            output.status.success(),
            "openssl {:?}: {}",
            args,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    openssl(&[
        "genpkey".as_ref(),
        "-algorithm".as_ref(),
        "RSA".as_ref(),
        "-pkeyopt".as_ref(),
        "rsa_keygen_bits:2048".as_ref(),
        "-out".as_ref(),
        private.as_os_str(),
    ])?;
    openssl(&[
        "pkey".as_ref(),
        "-in".as_ref(),
        private.as_os_str(),
        "-pubout".as_ref(),
        "-out".as_ref(),
        public.as_os_str(),
    ])
}

/// A subject with at most one organisation: rcgen keeps one value per attribute type.
fn name(common_name: &str, group: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(group) = group {
        dn.push(DnType::OrganizationName, group);
    }
    dn
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

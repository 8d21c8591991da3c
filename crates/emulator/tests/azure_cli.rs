//! Fidelity with the Azure CLI (tools/azure-cli-requirements.txt, a venv of its own): `az login
//! --identity` takes a managed identity's token from IMDS and lists the identity's subscriptions from
//! ARM; `az account get-access-token` then hands out the identity's ARM token. The CLI is unchanged:
//! IMDS is named by `AZURE_POD_IDENTITY_AUTHORITY_HOST` (which MSAL reads), ARM by the active cloud's
//! `endpoint_resource_manager` in its own config directory, the CA by `REQUESTS_CA_BUNDLE`.
//!
//! The interpreter is the venv `bash tools/setup-python.sh tools/azure-cli-requirements.txt` makes
//! (`POD_IDENTITY_AZ` names an `az` to use instead).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use pod_identity_emulator::{Emulator, LogFilter, Service};
use serde_json::{Value, json};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `az` of the pinned Azure CLI venv.
pub fn az() -> &'static Path {
    static AZ: OnceLock<PathBuf> = OnceLock::new();
    AZ.get_or_init(|| {
        if let Some(path) = std::env::var_os("POD_IDENTITY_AZ") {
            return PathBuf::from(path);
        }
        let root = repo_root();
        let output = std::process::Command::new("bash")
            .arg(root.join("tools/setup-python.sh"))
            .arg(root.join("tools/azure-cli-requirements.txt"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run tools/setup-python.sh: {e}"));
        assert!(
            output.status.success(),
            "no Azure CLI: `bash tools/setup-python.sh tools/azure-cli-requirements.txt` failed ({}):\n{}\n\
             Run it by hand (it needs python3 with venv and access to PyPI), or set POD_IDENTITY_AZ.",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()).join("bin/az")
    })
}

/// A CLI configuration directory whose AzureCloud's ARM endpoint is the emulator.
struct CliConfig {
    dir: tempfile::TempDir,
    ca: PathBuf,
    imds: String,
}

impl CliConfig {
    fn new(em: &Emulator, imds_listener: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("clouds.config"),
            format!("[AzureCloud]\nendpoint_resource_manager = {}/\n", em.azure_url()),
        )
        .unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, em.ca_pem()).unwrap();
        Self {
            ca,
            imds: em.imds_url(imds_listener).unwrap(),
            dir,
        }
    }

    /// Runs `az args… --output json`; its JSON output.
    async fn az(&self, args: &[&str]) -> Value {
        let mut command = tokio::process::Command::new(az());
        command.args(args).args(["--output", "json"]).env_clear();
        for key in ["PATH", "HOME", "LANG"] {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        command
            .env("AZURE_CONFIG_DIR", self.dir.path())
            .env("AZURE_CORE_COLLECT_TELEMETRY", "false")
            .env("AZURE_CORE_SURVEY_MESSAGE", "false")
            .env("AZURE_POD_IDENTITY_AUTHORITY_HOST", &self.imds)
            .env("REQUESTS_CA_BUNDLE", &self.ca);
        let output = command.output().await.unwrap();
        assert!(
            output.status.success(),
            "az {args:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "az {args:?} printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }
}

fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn az_login_identity_lists_the_identitys_subscriptions_and_hands_out_its_token() {
    // id-a is on scale-set instance 0, and may read the resource group.
    let em = start_with(|c| {
        c.seed.role_assignments.push(
            serde_json::from_value(json!({
                "principalId": principal_of("id-a"), "scope": rg_id(), "roleDefinitionName": "Reader",
            }))
            .unwrap(),
        );
    })
    .await;
    let cli = CliConfig::new(&em, 0);
    let accounts = cli
        .az(&["login", "--identity", "--client-id", &client_of("id-a")])
        .await;
    assert_eq!(accounts.as_array().map(Vec::len), Some(1), "{accounts}");
    assert_eq!(accounts[0]["id"], SUB, "{accounts}");
    assert_eq!(accounts[0]["name"], "test");
    assert_eq!(accounts[0]["tenantId"], TENANT);
    assert_eq!(accounts[0]["state"], "Enabled");
    assert_eq!(accounts[0]["user"]["type"], "servicePrincipal");
    assert_eq!(
        accounts[0]["user"]["assignedIdentityInfo"],
        format!("MSIClient-{}", client_of("id-a"))
    );

    let token = cli.az(&["account", "get-access-token"]).await;
    assert_eq!(token["subscription"], SUB, "{token}");
    assert_eq!(token["tenant"], TENANT);
    let claims = claims(token["accessToken"].as_str().unwrap());
    assert_eq!(claims["oid"], principal_of("id-a"));
    assert_eq!(claims["aud"], "https://management.core.windows.net/");

    let arm = em.requests(&LogFilter {
        service: Some(Service::Arm),
        ..LogFilter::default()
    });
    assert!(
        arm.iter()
            .any(|r| r.method == "GET" && r.path == "/subscriptions" && r.status == 200),
        "{arm:?}"
    );
    let imds = em.requests(&LogFilter {
        service: Some(Service::Imds),
        ..LogFilter::default()
    });
    assert!(imds.iter().all(|r| r.status == 200), "{imds:?}");
}

#[tokio::test]
async fn az_login_identity_without_subscriptions_needs_allow_no_subscriptions() {
    // id-a is on scale-set instance 0 and holds no role anywhere.
    let em = start().await;
    let cli = CliConfig::new(&em, 0);
    let accounts = cli
        .az(&[
            "login",
            "--identity",
            "--client-id",
            &client_of("id-a"),
            "--allow-no-subscriptions",
        ])
        .await;
    assert_eq!(accounts.as_array().map(Vec::len), Some(1), "{accounts}");
    assert_eq!(accounts[0]["id"], TENANT, "a tenant-level account: {accounts}");
    assert_eq!(accounts[0]["name"], "N/A(tenant level account)");
    let token = cli.az(&["account", "get-access-token"]).await;
    assert_eq!(token["tenant"], TENANT, "{token}");
    assert_eq!(
        claims(token["accessToken"].as_str().unwrap())["oid"],
        principal_of("id-a")
    );
    // The subscription list was asked for, and was empty.
    let listed = em.requests(&LogFilter {
        service: Some(Service::Arm),
        ..LogFilter::default()
    });
    assert!(
        listed
            .iter()
            .any(|r| r.path == "/subscriptions" && r.status == 200),
        "{listed:?}"
    );
}

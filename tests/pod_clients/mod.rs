//! The SDK clients pods run in end-to-end tests, unchanged: Python `azure-identity` (from the venv
//! `tools/setup-python.sh` builds) and Rust `azure_identity`, each inside a pod's network namespace with no
//! endpoint of its own, so that they reach the metadata address exactly as on Azure.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

use pod_identity_test_support::netns::PodNet;

use crate::netns_harness::{Harness, in_netns, repo_root};

/// The Python interpreter of the SDK venv: `POD_IDENTITY_PYTHON`, or the one `tools/setup-python.sh`
/// builds (or finds cached).
pub fn python_binary() -> String {
    if let Ok(python) = std::env::var("POD_IDENTITY_PYTHON") {
        return python;
    }
    let script = repo_root().join("tools/setup-python.sh");
    let output = Command::new("bash").arg(&script).output().unwrap();
    assert!(
        output.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    format!("{}/bin/python", String::from_utf8_lossy(&output.stdout).trim())
}

/// Runs a Python script in a pod, trusting the emulator's CA and resolving the vault to the node.
pub fn python(h: &Harness, pod: &PodNet, script: &str) -> String {
    h.set_pod_hosts(pod, &[(pod.gateway, "testvault.vault.azure.net")]);
    let output = Command::new("ip")
        .args(["netns", "exec", &pod.netns, &python_binary(), "-c", script])
        .env("SSL_CERT_FILE", &h.ca_file)
        .env("REQUESTS_CA_BUNDLE", &h.ca_file)
        .env_remove("AZURE_POD_IDENTITY_AUTHORITY_HOST")
        .env_remove("IDENTITY_ENDPOINT")
        .env_remove("MSI_ENDPOINT")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "python failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A token from the Rust SDK's `ManagedIdentityCredential`, run on a thread inside the pod's namespace.
pub async fn rust_sdk_token(pod: &PodNet, scope: &str) -> String {
    let netns = pod.netns.clone();
    let scope = scope.to_owned();
    tokio::task::spawn_blocking(move || {
        in_netns(&netns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let credential = azure_identity::ManagedIdentityCredential::new(None).unwrap();
                let token = azure_core::credentials::TokenCredential::get_token(
                    &*credential,
                    &[scope.as_str()],
                    None,
                )
                .await
                .unwrap();
                token.token.secret().to_owned()
            })
        })
    })
    .await
    .unwrap()
}

//! Fidelity with clients nobody here wrote: the pinned Python Azure SDKs (tools/python-requirements.txt) run
//! the scripts in tests/python against an emulator started in this process. The interpreter is
//! `POD_IDENTITY_PYTHON`, or the venv that tools/setup-python.sh makes; without either the tests fail and say
//! what to run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use pod_identity_emulator::{Emulator, LogFilter, Service};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        if let Some(p) = std::env::var_os("POD_IDENTITY_PYTHON") {
            return PathBuf::from(p);
        }
        let script = repo_root().join("tools/setup-python.sh");
        let out = std::process::Command::new("bash").arg(&script).output();
        match out {
            Ok(o) if o.status.success() => {
                PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("bin/python")
            }
            Ok(o) => panic!(
                "no Python with the pinned Azure SDKs: `bash tools/setup-python.sh` failed ({}):\n{}\n\
                 Run it by hand (it needs python3 with venv and access to PyPI), or set POD_IDENTITY_PYTHON to a \
                 python that has tools/python-requirements.txt installed.",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!(
                "no Python with the pinned Azure SDKs: cannot run {}: {e}. Run `bash tools/setup-python.sh`, or \
                 set POD_IDENTITY_PYTHON to a python that has tools/python-requirements.txt installed.",
                script.display()
            ),
        }
    })
}

/// Runs a script under tests/python with `env`; its stdout as JSON.
async fn run(script: &str, env: &[(&str, String)]) -> Value {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(repo_root().join("tests/python").join(script)).env_clear();
    for key in ["PATH", "HOME", "LANG"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn ca_file(em: &Emulator) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), em.ca_pem()).unwrap();
    f
}

#[tokio::test]
async fn python_managed_identity_credential_gets_user_assigned_tokens_three_ways() {
    let em = start().await;
    let out = run(
        "managed_identity.py",
        &[
            ("MODE", "user".into()),
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", em.imds_url(0).unwrap()),
            ("CLIENT_ID", client_of("id-a")),
            ("OBJECT_ID", principal_of("id-a")),
            ("RESOURCE_ID", uami("id-a")),
            ("OTHER_CLIENT_ID", client_of("id-b")),
        ],
    )
    .await;
    for how in ["client_id", "object_id", "resource_id"] {
        assert_eq!(out[how]["oid"], principal_of("id-a"), "{how}: {out}");
        assert_eq!(out[how]["aud"], "https://vault.azure.net", "{how}");
    }
    assert!(
        out["unassigned"]["message"]
            .as_str()
            .unwrap()
            .contains("Identity not found"),
        "{out}"
    );
    let log = em.requests(&LogFilter {
        service: Some(Service::Imds),
        ..LogFilter::default()
    });
    let queries: Vec<&str> = log.iter().map(|r| r.query.as_str()).collect();
    assert!(queries.iter().any(|q| q.contains("client_id=")), "{queries:?}");
    assert!(queries.iter().any(|q| q.contains("object_id=")), "{queries:?}");
    assert!(queries.iter().any(|q| q.contains("msi_res_id=")), "{queries:?}");
    assert!(log.iter().all(|r| r.query.contains("api-version=2018-02-01")));
}

#[tokio::test]
async fn python_managed_identity_credential_gets_the_system_assigned_token() {
    let em = start().await;
    let out = run(
        "managed_identity.py",
        &[
            ("MODE", "system".into()),
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", em.imds_url(2).unwrap()),
        ],
    )
    .await;
    assert_eq!(out["system"]["oid"], VM_SYS_PRINCIPAL, "{out}");
    assert_eq!(out["system"]["appid"], VM_SYS_CLIENT);
}

#[tokio::test]
async fn python_mgmt_compute_reads_and_updates_scale_set_identities() {
    let em = start_with(|c| c.settings.lro_duration_ms = 200).await;
    let ca = ca_file(&em);
    let out = run(
        "mgmt_compute.py",
        &[
            ("AZURE_URL", em.azure_url()),
            ("TENANT_ID", TENANT.into()),
            ("CLIENT_ID", CTL_CLIENT.into()),
            ("CLIENT_SECRET", CTL_SECRET.into()),
            ("SUBSCRIPTION_ID", SUB.into()),
            ("RESOURCE_GROUP", RG.into()),
            ("VMSS_NAME", VMSS.into()),
            ("ADD_ID", uami("id-b")),
            ("REMOVE_ID", uami("id-a")),
            ("REQUESTS_CA_BUNDLE", ca.path().display().to_string()),
        ],
    )
    .await;
    assert_eq!(out["read"]["ids"], serde_json::json!([uami("id-a")]), "{out}");
    assert_eq!(
        out["added"]["ids"],
        serde_json::json!([uami("id-a"), uami("id-b")]),
        "{out}"
    );
    assert_eq!(
        out["added"]["provisioning_state"], "Succeeded",
        "the SDK waited for the operation"
    );
    assert_eq!(out["removed"]["ids"], serde_json::json!([uami("id-b")]), "{out}");
    let arm = em.requests(&LogFilter {
        service: Some(Service::Arm),
        ..LogFilter::default()
    });
    assert_eq!(arm.iter().filter(|r| r.method == "PATCH").count(), 2);
    assert!(
        arm.iter().any(|r| r.path.contains("/operations/")),
        "the SDK polled Azure-AsyncOperation"
    );
    let entra = em.requests(&LogFilter {
        service: Some(Service::Entra),
        ..LogFilter::default()
    });
    assert!(
        entra
            .iter()
            .any(|r| r.path.ends_with("/v2.0/.well-known/openid-configuration"))
    );
    assert!(
        entra
            .iter()
            .any(|r| r.path.ends_with("/oauth2/v2.0/token") && r.status == 200)
    );
}

#[tokio::test]
async fn python_keyvault_reads_a_secret_with_a_managed_identity_token() {
    let em = start().await;
    let ca = ca_file(&em);
    let out = run(
        "keyvault_secret.py",
        &[
            ("VAULT_URL", em.azure_url()),
            ("SECRET_NAME", "db-password".into()),
            ("CLIENT_ID", client_of("id-a")),
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", em.imds_url(0).unwrap()),
            ("REQUESTS_CA_BUNDLE", ca.path().display().to_string()),
        ],
    )
    .await;
    assert_eq!(out["value"], SECRET_VALUE, "{out}");
    assert_eq!(out["name"], "db-password");
    let kv = em.requests(&LogFilter {
        service: Some(Service::KeyVault),
        ..LogFilter::default()
    });
    assert_eq!(
        kv.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![401, 200],
        "challenge, then the secret"
    );
}

#[tokio::test]
async fn python_mgmt_compute_deletes_a_vm_scale_set_instances_and_the_scale_set() {
    let em = start_with(|c| c.settings.lro_duration_ms = 300).await;
    let ca = ca_file(&em);
    let out = run(
        "mgmt_compute_delete.py",
        &[
            ("AZURE_URL", em.azure_url()),
            ("TENANT_ID", TENANT.into()),
            ("CLIENT_ID", CTL_CLIENT.into()),
            ("CLIENT_SECRET", CTL_SECRET.into()),
            ("SUBSCRIPTION_ID", SUB.into()),
            ("RESOURCE_GROUP", RG.into()),
            ("VMSS_NAME", VMSS.into()),
            ("VM_NAME", VM.into()),
            ("REQUESTS_CA_BUNDLE", ca.path().display().to_string()),
        ],
    )
    .await;
    assert_eq!(out["vm_while_deleting"], "Deleting", "{out}");
    assert_eq!(out["vm_poller"], "Succeeded", "{out}");
    assert_eq!(out["vm_after"]["status"], 404, "{out}");
    assert_eq!(out["vm_after"]["code"], "ResourceNotFound", "{out}");
    assert_eq!(out["capacity_after_scale_in"], 0, "{out}");
    assert_eq!(
        out["identities_after_scale_in"],
        serde_json::json!([uami("id-a")]),
        "scale-in leaves the scale set's identities: {out}"
    );
    assert_eq!(out["vmss_after"]["code"], "ResourceNotFound", "{out}");
    let arm = em.requests(&LogFilter {
        service: Some(Service::Arm),
        ..LogFilter::default()
    });
    assert_eq!(
        arm.iter().filter(|r| r.method == "DELETE").count(),
        3,
        "VM, instance, scale set"
    );
    assert!(
        arm.iter()
            .any(|r| r.method == "POST" && r.path.ends_with("/delete"))
    );
    assert!(
        arm.iter().any(|r| r.path.contains("/operations/")),
        "the SDK polled Azure-AsyncOperation"
    );
}

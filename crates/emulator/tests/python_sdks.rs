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
async fn python_mgmt_compute_waits_out_the_retry_after_of_each_429_and_is_never_marked_early() {
    // One read of the scale set per 2 s (Compute's per-resource GetVMScaleSet bucket, scaled down).
    let em = start_with(|c| {
        let p = c
            .settings
            .throttling
            .compute
            .get_mut(&pod_identity_emulator::throttle::Policy::GetVmss)
            .unwrap();
        p.per_resource = pod_identity_emulator::throttle::BucketLimit::new(30.0, 1.0);
    })
    .await;
    let ca = ca_file(&em);
    let out = run(
        "mgmt_compute_throttled.py",
        &[
            ("AZURE_URL", em.azure_url()),
            ("TENANT_ID", TENANT.into()),
            ("CLIENT_ID", CTL_CLIENT.into()),
            ("CLIENT_SECRET", CTL_SECRET.into()),
            ("SUBSCRIPTION_ID", SUB.into()),
            ("RESOURCE_GROUP", RG.into()),
            ("VMSS_NAME", VMSS.into()),
            ("READS", "3".into()),
            ("REQUESTS_CA_BUNDLE", ca.path().display().to_string()),
        ],
    )
    .await;
    assert_eq!(out["reads"], 3, "{out}");
    let reads = em.requests(&LogFilter {
        service: Some(Service::Arm),
        path_contains: Some(VMSS.into()),
        ..LogFilter::default()
    });
    let statuses: Vec<u16> = reads.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 429, 200, 429, 200], "{reads:#?}");
    assert!(
        reads.iter().all(|r| !r.inside_retry_after),
        "an official client that waits as told is never marked: {reads:#?}"
    );
    assert!(out["seconds"].as_f64().unwrap() >= 4.0, "{out}");
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

const TOKEN_EXCHANGE: &str = "api://AzureADTokenExchange";

/// Lets anonymous clients read the API server's issuer discovery documents, as a cluster whose issuer
/// Entra must reach does (Entra fetches without credentials). Cluster-wide and idempotent.
async fn allow_anonymous_issuer_discovery(client: &kube::Client) {
    use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
    let binding = ClusterRoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some("pod-identity-test-anonymous-issuer-discovery".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "system:service-account-issuer-discovery".into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Group".into(),
            name: "system:unauthenticated".into(),
            namespace: None,
        }]),
    };
    match kube::Api::<ClusterRoleBinding>::all(client.clone())
        .create(&kube::api::PostParams::default(), &binding)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("binding issuer discovery to system:unauthenticated: {e}"),
    }
}

/// A service-account token from the API server's TokenRequest API, optionally bound to a pod.
async fn service_account_token(
    client: &kube::Client,
    ns: &str,
    account: &str,
    audience: &str,
    pod: Option<&k8s_openapi::api::core::v1::Pod>,
) -> String {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    let mut spec = serde_json::json!({"audiences": [audience], "expirationSeconds": 3600});
    if let Some(p) = pod {
        spec["boundObjectRef"] = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "name": p.metadata.name, "uid": p.metadata.uid,
        });
    }
    let request: TokenRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec,
    }))
    .unwrap();
    kube::Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(account, &kube::api::PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

/// Signs `claims` as ES256 with the PKCS#8 P-256 key `pem`, naming key `kid`.
fn sign_es256(pem: &str, kid: &str, claims: &Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let der = rcgen::KeyPair::from_pem(pem).unwrap().serialize_der();
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng).unwrap();
    let input = format!(
        "{}.{}",
        B64.encode(serde_json::json!({"alg": "ES256", "kid": kid}).to_string()),
        B64.encode(claims.to_string())
    );
    let sig = key.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

/// Signs `claims` as RS256 with the PKCS#8 RSA key `pem` (the test cluster's service-account key), naming
/// key `kid`.
fn sign_rs256(pem: &str, kid: &str, claims: &Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
    use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let key = match &der {
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).unwrap(),
        other => panic!("expected a PKCS#8 RSA key, got {other:?}"),
    };
    let input = format!(
        "{}.{}",
        B64.encode(serde_json::json!({"alg": "RS256", "kid": kid}).to_string()),
        B64.encode(claims.to_string())
    );
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", B64.encode(sig))
}

fn jwt_part(token: &str, n: usize) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(n).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

/// What each `CASES` entry of workload_identity.py got, for one emulator and one set of token files.
async fn workload_identity(em: &Emulator, cases: &[(&str, &str, String, &Path)]) -> Value {
    let ca = ca_file(em);
    let cases: Vec<Value> = cases
        .iter()
        .map(|(name, credential, client_id, file)| {
            serde_json::json!({"name": name, "credential": credential, "client_id": client_id, "token_file": file})
        })
        .collect();
    run(
        "workload_identity.py",
        &[
            ("AZURE_TENANT_ID", TENANT.into()),
            ("AZURE_AUTHORITY_HOST", em.azure_url()),
            ("REQUESTS_CA_BUNDLE", ca.path().display().to_string()),
            ("CASES", Value::Array(cases).to_string()),
        ],
    )
    .await
}

#[tokio::test]
async fn python_workload_identity_credential_exchanges_a_kubernetes_token() {
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    use pod_identity_emulator::seed::{ApplicationSeed, FederatedCredentialSeed};
    let cp = pod_identity_test_support::ControlPlane::shared().await;
    let ns = cp.namespace().await.unwrap();
    allow_anonymous_issuer_discovery(&ns.client).await;
    let pp = kube::api::PostParams::default();
    for account in ["workload", "other"] {
        let sa: ServiceAccount =
            serde_json::from_value(serde_json::json!({"metadata": {"name": account}})).unwrap();
        kube::Api::<ServiceAccount>::namespaced(ns.client.clone(), &ns.name)
            .create(&pp, &sa)
            .await
            .unwrap();
    }
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "app"},
        "spec": {"serviceAccountName": "workload", "containers": [{"name": "app", "image": "example.invalid/app:1"}]},
    }))
    .unwrap();
    let pod = kube::Api::<Pod>::namespaced(ns.client.clone(), &ns.name)
        .create(&pp, &pod)
        .await
        .unwrap();
    let client = &ns.client;
    let token = service_account_token(client, &ns.name, "workload", TOKEN_EXCHANGE, Some(&pod)).await;
    let claims = jwt_part(&token, 1);
    assert_eq!(
        claims["kubernetes.io"]["pod"]["name"], "app",
        "bound to the pod: {claims}"
    );
    let issuer = cp.server_url().to_owned();
    assert_eq!(claims["iss"], issuer.as_str());
    let subject = format!("system:serviceaccount:{}:workload", ns.name);
    // The test cluster's CA, and its service-account key for a token the issuer really signed but that has
    // expired (TokenRequest cannot issue one: 10 minutes is its shortest lifetime).
    let pki = cp.admin_kubeconfig().parent().unwrap().join("pki");
    let ca_pem = std::fs::read_to_string(pki.join("ca.crt")).unwrap();
    let sa_key = std::fs::read_to_string(pki.join("sa.key")).unwrap();
    let kid = jwt_part(&token, 0)["kid"].as_str().unwrap().to_owned();
    let now = jiff::Timestamp::now().as_second();
    let mut old = claims.clone();
    (old["iat"], old["nbf"], old["exp"]) = (
        serde_json::json!(now - 7200),
        serde_json::json!(now - 7200),
        serde_json::json!(now - 3600),
    );
    let p256_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, content: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    let files = [
        ("token", token.clone()),
        (
            "other",
            service_account_token(client, &ns.name, "other", TOKEN_EXCHANGE, None).await,
        ),
        (
            "audience",
            service_account_token(client, &ns.name, "workload", "api://other", None).await,
        ),
        ("expired", sign_rs256(&sa_key, &kid, &old)),
        ("unpublished", sign_rs256(&sa_key, "unpublished", &claims)),
        ("es256", sign_es256(&p256_key, &kid, &claims)),
    ]
    .map(|(n, t)| file(n, &t));
    let [
        token_file,
        other_file,
        audience_file,
        expired_file,
        unpublished_file,
        es256_file,
    ] = files.each_ref().map(|p| p.as_path());

    let em = start_with(|c| c.settings.federation.issuer_ca_pems = vec![ca_pem]).await;
    let fic = |issuer: &str| FederatedCredentialSeed {
        name: "kubernetes".into(),
        issuer: issuer.into(),
        subject: subject.clone(),
        audiences: vec![TOKEN_EXCHANGE.into()],
    };
    let app_client = "a0000000-0000-0000-0000-00000000000a";
    em.with_state(|s| {
        let set = |s: &mut pod_identity_emulator::state::State, id: &str, c: FederatedCredentialSeed| {
            s.uami_mut(&uami(id)).unwrap().federated_credentials =
                pod_identity_emulator::federated_credentials::from_seeds(&[c]).unwrap();
        };
        set(s, "id-a", fic(&issuer));
        // The classic mistake: the issuer with a trailing slash.
        set(s, "id-b", fic(&format!("{issuer}/")));
        for t in s.tenants.values_mut() {
            t.applications.push(ApplicationSeed {
                display_name: "federated-app".into(),
                client_id: app_client.into(),
                object_id: "a0000000-0000-0000-0000-0000000000fa".into(),
                federated_identity_credentials: vec![fic(&issuer)],
                ..ApplicationSeed::default()
            });
        }
    });

    // Test clusters sign with RSA, as Entra wants; a token signed with a P-256 key is refused
    // (AADSTS5002738) before any key is looked up.
    assert_eq!(jwt_part(&token, 0)["alg"], "RS256");
    let out = workload_identity(
        &em,
        &[
            ("managed_identity", "workload", client_of("id-a"), token_file),
            (
                "via_managed_identity_credential",
                "managed",
                client_of("id-a"),
                token_file,
            ),
            ("app_registration", "workload", app_client.into(), token_file),
            (
                "no_credential_for_subject",
                "workload",
                client_of("id-a"),
                other_file,
            ),
            ("wrong_issuer", "workload", client_of("id-b"), token_file),
            ("wrong_audience", "workload", client_of("id-a"), audience_file),
            ("expired", "workload", client_of("id-a"), expired_file),
            ("unpublished_key", "workload", client_of("id-a"), unpublished_file),
            ("es256", "workload", client_of("id-a"), es256_file),
            (
                "unknown_client",
                "workload",
                "deadbeef-0000-0000-0000-000000000000".into(),
                token_file,
            ),
        ],
    )
    .await;
    for case in ["managed_identity", "via_managed_identity_credential"] {
        assert_eq!(out[case]["oid"], principal_of("id-a"), "{case}: {out}");
        assert_eq!(out[case]["xms_mirid"], uami("id-a"), "{case}");
        assert_eq!(out[case]["aud"], "https://vault.azure.net", "{case}");
    }
    assert_eq!(out["app_registration"]["appid"], app_client, "{out}");
    for (case, code) in [
        ("no_credential_for_subject", "AADSTS700213"),
        ("wrong_issuer", "AADSTS700211"),
        ("wrong_audience", "AADSTS700212"),
        ("expired", "AADSTS700024"),
        ("unpublished_key", "AADSTS7000272"),
        ("es256", "AADSTS5002738"),
        ("unknown_client", "AADSTS700016"),
    ] {
        assert_eq!(out[case]["error"], "ClientAuthenticationError", "{case}: {out}");
        let message = out[case]["message"].as_str().unwrap();
        assert!(message.contains(code), "{case}: {message}");
    }
    assert!(
        out["no_credential_for_subject"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("system:serviceaccount:{}:other", ns.name)),
        "the error names the subject: {out}"
    );
    let entra = em.requests(&LogFilter {
        service: Some(Service::Entra),
        ..LogFilter::default()
    });
    assert!(
        entra.iter().all(|r| r.path.ends_with("/oauth2/v2.0/token")),
        "WorkloadIdentityCredential makes no discovery request: {entra:?}"
    );
}

#[tokio::test]
async fn python_mgmt_msi_manages_federated_identity_credentials() {
    let em = start().await;
    em.with_state(|s| {
        s.role_assignments
            .push(pod_identity_emulator::seed::RoleAssignmentSeed {
                principal_id: CTL_OBJECT.into(),
                scope: rg_id(),
                role_definition_name: "Owner".into(),
            })
    });
    let ca = ca_file(&em);
    let out = run(
        "mgmt_msi.py",
        &[
            ("AZURE_URL", em.azure_url()),
            ("TENANT_ID", TENANT.into()),
            ("CLIENT_ID", CTL_CLIENT.into()),
            ("CLIENT_SECRET", CTL_SECRET.into()),
            ("SUBSCRIPTION_ID", SUB.into()),
            ("RESOURCE_GROUP", RG.into()),
            ("IDENTITY_NAME", "id-a".into()),
            ("ISSUER", "https://oidc.example/cluster/".into()),
            ("REQUESTS_CA_BUNDLE", ca.path().display().to_string()),
        ],
    )
    .await;
    assert_eq!(out["created"].as_array().unwrap().len(), 3, "{out}");
    assert_eq!(
        out["created"][0]["type"],
        "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials"
    );
    assert_eq!(
        out["created"][0]["audiences"],
        serde_json::json!([TOKEN_EXCHANGE])
    );
    assert_eq!(
        out["pages"],
        serde_json::json!([["fic-0", "fic-1"], ["fic-2"]]),
        "the SDK followed nextLink"
    );
    assert_eq!(out["read"]["subject"], "system:serviceaccount:apps:sa-1");
    assert_eq!(
        (&out["duplicate"]["status"], &out["duplicate"]["code"]),
        (&serde_json::json!(400), &serde_json::json!("Conflict")),
        "{out}"
    );
    assert_eq!(out["after_delete"], serde_json::json!([]));
    assert_eq!(out["read_deleted"]["status"], 404, "{out}");
    let arm = em.requests(&LogFilter {
        service: Some(Service::Arm),
        path_contains: Some("federatedIdentityCredentials".into()),
        ..LogFilter::default()
    });
    assert!(
        arm.iter().all(|r| r.query.contains("api-version=2024-11-30")),
        "azure-mgmt-msi's default api-version"
    );
    assert_eq!(
        arm.iter()
            .filter(|r| r.method == "DELETE")
            .map(|r| r.status)
            .collect::<Vec<_>>(),
        [200, 200, 200, 204]
    );
}

//! A small tenant for the emulator's tests, and helpers to talk to a running emulator.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use pod_identity_emulator::{Config, Emulator, Seed};
use serde_json::{Value, json};

pub const TENANT: &str = "11111111-1111-1111-1111-111111111111";
pub const SUB: &str = "22222222-2222-2222-2222-222222222222";
pub const RG: &str = "rg-nodes";
pub const VMSS: &str = "aks-nodepool1-vmss";
pub const VM: &str = "aks-vm-0";
pub const VAULT: &str = "kv-pod";
pub const SECRET_VALUE: &str = "correct horse battery staple";

/// App registrations: the controller (writes compute, may assign identities), a reader, and one without roles.
pub const CTL_CLIENT: &str = "c0000000-0000-0000-0000-000000000001";
pub const CTL_OBJECT: &str = "c0000000-0000-0000-0000-0000000000f1";
pub const CTL_SECRET: &str = "controller-secret";
pub const READER_CLIENT: &str = "c0000000-0000-0000-0000-000000000002";
pub const READER_OBJECT: &str = "c0000000-0000-0000-0000-0000000000f2";
pub const NOBODY_CLIENT: &str = "c0000000-0000-0000-0000-000000000003";
pub const NOBODY_OBJECT: &str = "c0000000-0000-0000-0000-0000000000f3";
pub const SECRET: &str = "s3cret";
/// The VM's system-assigned identity.
pub const VM_SYS_CLIENT: &str = "5e500000-0000-0000-0000-000000000001";
pub const VM_SYS_PRINCIPAL: &str = "5e500000-0000-0000-0000-0000000000f1";

pub fn rg_id() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/{RG}")
}

pub fn vmss_id() -> String {
    format!(
        "{}/providers/Microsoft.Compute/virtualMachineScaleSets/{VMSS}",
        rg_id()
    )
}

pub fn vm_id() -> String {
    format!("{}/providers/Microsoft.Compute/virtualMachines/{VM}", rg_id())
}

pub fn instance_id(n: u32) -> String {
    format!("{}/virtualMachines/{n}", vmss_id())
}

/// User-assigned identity `name`: `id-a`, `id-b`, `id-c` or `bulk-000`..`bulk-199`.
pub fn uami(name: &str) -> String {
    format!(
        "{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}",
        rg_id()
    )
}

pub fn client_of(name: &str) -> String {
    format!("{:0>8}-0000-4000-8000-000000000000", hex(name))
}

pub fn principal_of(name: &str) -> String {
    format!("{:0>8}-0000-4000-8000-0000000000ff", hex(name))
}

fn hex(name: &str) -> String {
    let h = name
        .bytes()
        .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("{h:08x}")
}

pub fn seed() -> Seed {
    let mut identities: Vec<Value> = ["id-a", "id-b", "id-c"]
        .iter()
        .map(|n| json!({"name": n, "clientId": client_of(n), "principalId": principal_of(n)}))
        .collect();
    identities.extend((0..200).map(|n| {
        let name = format!("bulk-{n:03}");
        json!({"name": name, "clientId": client_of(&name), "principalId": principal_of(&name)})
    }));
    let app = |name: &str, client: &str, object: &str, secret: &str| json!({"displayName": name, "clientId": client, "objectId": object, "secrets": [secret]});
    let seed = json!({
        "tenants": [{"id": TENANT, "applications": [
            app("controller", CTL_CLIENT, CTL_OBJECT, CTL_SECRET),
            app("reader", READER_CLIENT, READER_OBJECT, SECRET),
            app("nobody", NOBODY_CLIENT, NOBODY_OBJECT, SECRET),
        ]}],
        "subscriptions": [{"id": SUB, "tenantId": TENANT, "displayName": "test", "resourceGroups": [{
            "name": RG, "location": "westeurope",
            "userAssignedIdentities": identities,
            "virtualMachineScaleSets": [{"name": VMSS, "vmSize": "Standard_D4s_v5",
                "identity": {"userAssignedIdentities": [uami("id-a")]},
                "instances": [{"instanceId": "0", "privateIpAddress": "10.224.0.4"}, {"instanceId": "1"}]}],
            "virtualMachines": [{"name": VM, "privateIpAddress": "10.224.0.9",
                "identity": {"systemAssigned": {"principalId": VM_SYS_PRINCIPAL, "clientId": VM_SYS_CLIENT}}}],
            "keyVaults": [{"name": VAULT, "secrets": [
                    {"name": "db-password", "value": "old", "version": "0123456789abcdef0123456789abcdef"},
                    {"name": "db-password", "value": SECRET_VALUE}],
                "accessPolicies": [{"objectId": principal_of("id-a"), "permissions": {"secrets": ["get", "list"]}},
                                   {"objectId": CTL_OBJECT, "permissions": {"secrets": ["Get"]}}]}]
        }]}],
        "roleAssignments": [
            {"principalId": CTL_OBJECT, "scope": rg_id(), "roleDefinitionName": "Virtual Machine Contributor"},
            {"principalId": CTL_OBJECT, "scope": rg_id(), "roleDefinitionName": "Managed Identity Operator"},
            {"principalId": READER_OBJECT, "scope": format!("/subscriptions/{SUB}"), "roleDefinitionName": "Reader"},
            {"principalId": NOBODY_OBJECT, "scope": vmss_id(), "roleDefinitionName": "Virtual Machine Contributor"}
        ]
    });
    serde_json::from_value(seed).expect("test seed is valid")
}

/// An emulator with IMDS listeners for scale-set instance 0, instance 1 and the VM, in that order.
pub async fn start() -> Emulator {
    start_with(|_| {}).await
}

pub async fn start_with(f: impl FnOnce(&mut Config)) -> Emulator {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut cfg = Config::new(seed())
        .with_imds(&instance_id(0))
        .with_imds(&instance_id(1))
        .with_imds(&vm_id());
    f(&mut cfg);
    Emulator::start(cfg).await.expect("emulator starts")
}

/// A client that trusts the emulator's CA and never retries.
pub fn client(em: &Emulator) -> reqwest::Client {
    pod_identity_azure::HttpConfig::default()
        .with_ca_pem(em.ca_pem())
        .build()
        .expect("client")
}

/// A plain-HTTP client that never uses a proxy, as IMDS callers are.
pub fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("client")
}

/// A v2 token for `resource` from the emulator's Entra, as the app with `client_id`.
pub async fn entra_token(em: &Emulator, client_id: &str, secret: &str, resource: &str) -> String {
    let resp = client(em)
        .post(format!("{}/{TENANT}/oauth2/v2.0/token", em.azure_url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
            ("scope", &format!("{}/.default", resource.trim_end_matches('/'))),
        ])
        .send()
        .await
        .expect("token request");
    assert_eq!(resp.status(), 200, "token request refused");
    let body: Value = resp.json().await.expect("json");
    body["access_token"].as_str().expect("access_token").to_owned()
}

pub async fn ctl_token(em: &Emulator) -> String {
    entra_token(em, CTL_CLIENT, CTL_SECRET, "https://management.azure.com/").await
}

/// A response's status, headers and JSON body (Null when not JSON).
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

pub async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

//! The emulated tenant's resources and the rules that read them: which identities a VM or scale set has, how
//! a long-running update completes, who may do what. Plain data behind one lock; the HTTP layers only render it.
//!
//! Identities are kept twice per VM or scale set: `model` is what ARM returns (changed as soon as a PATCH is
//! accepted), `effective` is what its instances can get tokens for (changed when the update's long-running
//! operation completes), so a client that does not wait for the operation sees IMDS refuse the identity, as
//! on Azure.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::federated_credentials::{self, FederatedCredential};
use crate::identity_merge::{CurrentIdentity, IdentityType, Merged};
use crate::seed::{
    AccessPolicySeed, ApplicationSeed, IdentitySeed, InstanceSeed, KeyVaultSeed, ResourceGroupSeed,
    RoleAssignmentSeed, ScaleSetSeed, SecretSeed, Seed, SeedError, SubscriptionSeed, SystemIdentitySeed,
    TenantSeed, UserAssignedIdentitySeed, VirtualMachineSeed,
};
use pod_identity_azure::resource_id::{ResourceId, ResourceType, fold};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub principal_id: String,
    pub client_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identities {
    pub system: Option<SystemIdentity>,
    /// IDs spelled as first assigned.
    pub user: Vec<String>,
}

impl Identities {
    pub fn current(&self) -> CurrentIdentity {
        CurrentIdentity {
            system: self.system.is_some(),
            user: self.user.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    Succeeded,
    Updating,
    /// A DELETE is running; the resource goes when its operation completes.
    Deleting,
}

impl Provisioning {
    fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "Succeeded",
            Self::Updating => "Updating",
            Self::Deleting => "Deleting",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Machine {
    pub id: ResourceId,
    pub location: String,
    pub vm_size: String,
    pub tenant_id: String,
    pub unique_id: String,
    pub model: Identities,
    pub effective: Identities,
    pub provisioning: Provisioning,
    pub etag: u64,
    /// Scale-set instances; empty for a VM.
    pub instances: Vec<InstanceSeed>,
    pub private_ip_address: String,
    pub pending_operation: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Uami {
    pub id: ResourceId,
    pub location: String,
    pub client_id: String,
    pub principal_id: String,
    pub tenant_id: String,
    pub federated_credentials: Vec<FederatedCredential>,
    /// A federated credential write on this identity runs until then; another one meanwhile is refused
    /// with 409, as the resource provider refuses concurrent writes under one identity.
    pub credential_write_until: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct SecretVersion {
    pub version: String,
    pub value: String,
    pub content_type: Option<String>,
    pub created: i64,
}

#[derive(Debug, Clone)]
pub struct Secret {
    pub name: String,
    pub versions: Vec<SecretVersion>,
}

#[derive(Debug, Clone)]
pub struct Vault {
    pub id: ResourceId,
    pub location: String,
    pub tenant_id: String,
    pub rbac: bool,
    pub secrets: BTreeMap<String, Secret>,
    pub access_policies: Vec<AccessPolicySeed>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationStatus {
    InProgress,
    Succeeded,
}

/// What a long-running operation does to its resource when it completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The instances get the model's identities.
    Update,
    /// The VM or scale set goes.
    Delete,
    /// These instances of the scale set go (scale-in).
    DeleteInstances(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Operation {
    pub name: String,
    pub resource_key: String,
    pub effect: Effect,
    pub subscription: String,
    pub location: String,
    pub start: jiff::Timestamp,
    pub end: Option<jiff::Timestamp>,
    pub due: Instant,
    pub status: OperationStatus,
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: String,
    pub tenant_id: String,
    pub display_name: String,
    /// Keyed by folded name.
    pub resource_groups: BTreeMap<String, (String, String)>,
}

/// Who is asking for a token at IMDS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Default,
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

/// The identity a token is issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant_id: String,
    pub client_id: String,
    pub object_id: String,
    /// The managed identity's resource ID (`xms_mirid`); the VM or scale set for a system identity.
    pub mi_res_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    NotFound,
    Multiple,
}

/// What a role lets a principal do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    ComputeRead,
    ComputeWrite,
    ComputeDelete,
    IdentityRead,
    IdentityAssign,
    FederatedCredentialRead,
    FederatedCredentialWrite,
    FederatedCredentialDelete,
    SecretsRead,
}

impl Action {
    pub fn arm_action(self, kind: ResourceType) -> &'static str {
        match (self, kind) {
            (Self::ComputeWrite, ResourceType::VirtualMachine) => "Microsoft.Compute/virtualMachines/write",
            (Self::ComputeWrite, _) => "Microsoft.Compute/virtualMachineScaleSets/write",
            (Self::ComputeDelete, ResourceType::VirtualMachine) => "Microsoft.Compute/virtualMachines/delete",
            (Self::ComputeDelete, _) => "Microsoft.Compute/virtualMachineScaleSets/delete",
            (Self::ComputeRead, ResourceType::VirtualMachine) => "Microsoft.Compute/virtualMachines/read",
            (Self::ComputeRead, _) => "Microsoft.Compute/virtualMachineScaleSets/read",
            (Self::IdentityRead, _) => "Microsoft.ManagedIdentity/userAssignedIdentities/read",
            (Self::IdentityAssign, _) => "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action",
            (Self::FederatedCredentialRead, _) => {
                "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/read"
            }
            (Self::FederatedCredentialWrite, _) => {
                "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/write"
            }
            (Self::FederatedCredentialDelete, _) => {
                "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials/delete"
            }
            (Self::SecretsRead, _) => "Microsoft.KeyVault/vaults/secrets/getSecret/action",
        }
    }
}

fn role_allows(role: &str, action: Action) -> bool {
    let role = role.to_ascii_lowercase();
    match role.as_str() {
        "owner" | "contributor" => action != Action::SecretsRead,
        "reader" => matches!(
            action,
            Action::ComputeRead | Action::IdentityRead | Action::FederatedCredentialRead
        ),
        "virtual machine contributor" => matches!(
            action,
            Action::ComputeRead | Action::ComputeWrite | Action::ComputeDelete
        ),
        // Its `userAssignedIdentities/*/read` covers the credentials below an identity.
        "managed identity operator" => matches!(
            action,
            Action::IdentityRead | Action::IdentityAssign | Action::FederatedCredentialRead
        ),
        "key vault secrets user" | "key vault secrets officer" | "key vault administrator" => {
            action == Action::SecretsRead
        }
        _ => false,
    }
}

/// Whether `scope` covers `resource` (equal, or an ancestor at a segment boundary).
fn scope_covers(scope: &str, resource: &str) -> bool {
    let (s, r) = (fold(scope), fold(resource));
    r == s || (r.starts_with(&s) && r.as_bytes().get(s.len()) == Some(&b'/'))
}

fn new_guid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn or_guid(s: &str) -> String {
    if s.is_empty() { new_guid() } else { s.to_owned() }
}

#[derive(Debug, Clone, Default)]
pub struct State {
    pub tenants: BTreeMap<String, TenantSeed>,
    pub subscriptions: BTreeMap<String, Subscription>,
    pub identities: BTreeMap<String, Uami>,
    pub machines: BTreeMap<String, Machine>,
    /// Keyed by folded vault name (vault names are global on Azure).
    pub vaults: BTreeMap<String, Vault>,
    pub role_assignments: Vec<RoleAssignmentSeed>,
    pub operations: HashMap<String, Operation>,
}

impl State {
    pub fn from_seed(seed: &Seed) -> Result<Self, SeedError> {
        let mut st = Self {
            role_assignments: seed.role_assignments.clone(),
            ..Self::default()
        };
        for t in &seed.tenants {
            if t.id.is_empty() {
                return Err(SeedError::Invalid("a tenant has no id".into()));
            }
            for app in &t.applications {
                federated_credentials::from_seeds(&app.federated_identity_credentials).map_err(|e| {
                    SeedError::Invalid(format!(
                        "application {}: federated identity credentials: {e}",
                        app.client_id
                    ))
                })?;
            }
            st.tenants.insert(fold(&t.id), t.clone());
        }
        for sub in &seed.subscriptions {
            if sub.id.is_empty() || sub.tenant_id.is_empty() {
                return Err(SeedError::Invalid("a subscription needs id and tenantId".into()));
            }
            st.tenants
                .entry(fold(&sub.tenant_id))
                .or_insert_with(|| TenantSeed {
                    id: sub.tenant_id.clone(),
                    applications: Vec::new(),
                });
            let mut rgs = BTreeMap::new();
            for rg in &sub.resource_groups {
                rgs.insert(fold(&rg.name), (rg.name.clone(), rg.location.clone()));
            }
            st.subscriptions.insert(
                fold(&sub.id),
                Subscription {
                    id: sub.id.clone(),
                    tenant_id: sub.tenant_id.clone(),
                    display_name: sub.display_name.clone(),
                    resource_groups: rgs,
                },
            );
            for rg in &sub.resource_groups {
                st.load_group(sub, rg)?;
            }
        }
        for c in st.machines.values() {
            for u in &c.model.user {
                if !st.identities.contains_key(&fold(u)) {
                    return Err(SeedError::Invalid(format!(
                        "{} is assigned identity {u}, which the seed does not define",
                        c.id
                    )));
                }
            }
        }
        Ok(st)
    }

    fn load_group(&mut self, sub: &SubscriptionSeed, rg: &ResourceGroupSeed) -> Result<(), SeedError> {
        let loc = |l: &Option<String>| l.clone().unwrap_or_else(|| rg.location.clone());
        for u in &rg.user_assigned_identities {
            let id = ResourceId::new(&sub.id, &rg.name, ResourceType::UserAssignedIdentity, &u.name);
            let federated_credentials = federated_credentials::from_seeds(&u.federated_identity_credentials)
                .map_err(|e| SeedError::Invalid(format!("{id}: federated identity credentials: {e}")))?;
            self.identities.insert(
                id.key(),
                Uami {
                    id,
                    location: loc(&u.location),
                    client_id: or_guid(&u.client_id),
                    principal_id: or_guid(&u.principal_id),
                    tenant_id: sub.tenant_id.clone(),
                    federated_credentials,
                    credential_write_until: None,
                },
            );
        }
        let identities = |s: &IdentitySeed| Identities {
            system: s.system_assigned.as_ref().map(|sys| SystemIdentity {
                principal_id: or_guid(&sys.principal_id),
                client_id: or_guid(&sys.client_id),
            }),
            user: s.user_assigned_identities.clone(),
        };
        let mut add = |id: ResourceId, location, vm_size: &str, ident: Identities, instances, ip: &str| {
            let vm_size = if vm_size.is_empty() {
                "Standard_D2s_v3"
            } else {
                vm_size
            };
            self.machines.insert(
                id.key(),
                Machine {
                    id,
                    location,
                    vm_size: vm_size.to_owned(),
                    tenant_id: sub.tenant_id.clone(),
                    unique_id: new_guid(),
                    effective: ident.clone(),
                    model: ident,
                    provisioning: Provisioning::Succeeded,
                    etag: 1,
                    instances,
                    private_ip_address: ip.to_owned(),
                    pending_operation: None,
                },
            );
        };
        for ss in &rg.virtual_machine_scale_sets {
            let id = ResourceId::new(&sub.id, &rg.name, ResourceType::VirtualMachineScaleSet, &ss.name);
            let instances = ss
                .instances
                .iter()
                .map(|i| InstanceSeed {
                    name: if i.name.is_empty() {
                        format!("{}_{}", ss.name, i.instance_id)
                    } else {
                        i.name.clone()
                    },
                    ..i.clone()
                })
                .collect();
            add(
                id,
                loc(&ss.location),
                &ss.vm_size,
                identities(&ss.identity),
                instances,
                "",
            );
        }
        for vm in &rg.virtual_machines {
            let id = ResourceId::new(&sub.id, &rg.name, ResourceType::VirtualMachine, &vm.name);
            add(
                id,
                loc(&vm.location),
                &vm.vm_size,
                identities(&vm.identity),
                Vec::new(),
                &vm.private_ip_address,
            );
        }
        for kv in &rg.key_vaults {
            let id = ResourceId::new(&sub.id, &rg.name, ResourceType::KeyVault, &kv.name);
            let mut secrets: BTreeMap<String, Secret> = BTreeMap::new();
            for (n, s) in kv.secrets.iter().enumerate() {
                let entry = secrets.entry(fold(&s.name)).or_insert_with(|| Secret {
                    name: s.name.clone(),
                    versions: Vec::new(),
                });
                entry.versions.push(SecretVersion {
                    version: if s.version.is_empty() {
                        uuid::Uuid::new_v4().simple().to_string()
                    } else {
                        s.version.clone()
                    },
                    value: s.value.clone(),
                    content_type: s.content_type.clone(),
                    created: jiff::Timestamp::now().as_second() - (kv.secrets.len() - n) as i64,
                });
            }
            let policies = kv
                .access_policies
                .iter()
                .map(|p| AccessPolicySeed {
                    tenant_id: if p.tenant_id.is_empty() {
                        sub.tenant_id.clone()
                    } else {
                        p.tenant_id.clone()
                    },
                    ..p.clone()
                })
                .collect();
            self.vaults.insert(
                fold(&kv.name),
                Vault {
                    id,
                    location: loc(&kv.location),
                    tenant_id: sub.tenant_id.clone(),
                    rbac: kv.enable_rbac_authorization,
                    secrets,
                    access_policies: policies,
                },
            );
        }
        Ok(())
    }

    /// The state as a seed document (identities as ARM shows them; pending operations are not part of it).
    pub fn to_seed(&self) -> Seed {
        let mut subs = Vec::new();
        for sub in self.subscriptions.values() {
            let mut groups = Vec::new();
            for (rg_key, (rg_name, rg_loc)) in &sub.resource_groups {
                let in_rg = |id: &ResourceId| {
                    fold(&id.subscription) == fold(&sub.id) && fold(&id.resource_group) == *rg_key
                };
                let ident = |i: &Identities| IdentitySeed {
                    system_assigned: i.system.as_ref().map(|s| SystemIdentitySeed {
                        principal_id: s.principal_id.clone(),
                        client_id: s.client_id.clone(),
                    }),
                    user_assigned_identities: i.user.clone(),
                };
                let location = |l: &str| (l != rg_loc).then(|| l.to_owned());
                groups.push(ResourceGroupSeed {
                    name: rg_name.clone(),
                    location: rg_loc.clone(),
                    user_assigned_identities: self
                        .identities
                        .values()
                        .filter(|u| in_rg(&u.id))
                        .map(|u| UserAssignedIdentitySeed {
                            name: u.id.name.clone(),
                            client_id: u.client_id.clone(),
                            principal_id: u.principal_id.clone(),
                            location: location(&u.location),
                            federated_identity_credentials: u
                                .federated_credentials
                                .iter()
                                .map(FederatedCredential::to_seed)
                                .collect(),
                        })
                        .collect(),
                    virtual_machine_scale_sets: self
                        .machines
                        .values()
                        .filter(|c| in_rg(&c.id) && c.id.kind == ResourceType::VirtualMachineScaleSet)
                        .map(|c| ScaleSetSeed {
                            name: c.id.name.clone(),
                            location: location(&c.location),
                            vm_size: c.vm_size.clone(),
                            identity: ident(&c.model),
                            instances: c.instances.clone(),
                        })
                        .collect(),
                    virtual_machines: self
                        .machines
                        .values()
                        .filter(|c| in_rg(&c.id) && c.id.kind == ResourceType::VirtualMachine)
                        .map(|c| VirtualMachineSeed {
                            name: c.id.name.clone(),
                            location: location(&c.location),
                            vm_size: c.vm_size.clone(),
                            identity: ident(&c.model),
                            private_ip_address: c.private_ip_address.clone(),
                        })
                        .collect(),
                    key_vaults: self
                        .vaults
                        .values()
                        .filter(|v| in_rg(&v.id))
                        .map(|v| KeyVaultSeed {
                            name: v.id.name.clone(),
                            location: location(&v.location),
                            enable_rbac_authorization: v.rbac,
                            secrets: v
                                .secrets
                                .values()
                                .flat_map(|s| {
                                    s.versions.iter().map(|ver| SecretSeed {
                                        name: s.name.clone(),
                                        value: ver.value.clone(),
                                        content_type: ver.content_type.clone(),
                                        version: ver.version.clone(),
                                    })
                                })
                                .collect(),
                            access_policies: v.access_policies.clone(),
                        })
                        .collect(),
                });
            }
            subs.push(SubscriptionSeed {
                id: sub.id.clone(),
                tenant_id: sub.tenant_id.clone(),
                display_name: sub.display_name.clone(),
                resource_groups: groups,
            });
        }
        Seed {
            tenants: self.tenants.values().cloned().collect(),
            subscriptions: subs,
            role_assignments: self.role_assignments.clone(),
        }
    }

    /// Completes every long-running operation whose time has come.
    pub fn advance(&mut self, now: Instant) {
        if self
            .operations
            .values()
            .all(|o| o.status != OperationStatus::InProgress)
        {
            return;
        }
        let due: Vec<String> = self
            .operations
            .iter()
            .filter(|(_, o)| o.status == OperationStatus::InProgress && o.due <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(op) = self.operations.get_mut(&key) else {
                continue;
            };
            op.status = OperationStatus::Succeeded;
            op.end = Some(jiff::Timestamp::now());
            let (resource, effect) = (op.resource_key.clone(), op.effect.clone());
            match effect {
                Effect::DeleteInstances(ids) => {
                    if let Some(c) = self.machines.get_mut(&resource) {
                        c.instances.retain(|i| !ids.contains(&i.instance_id));
                    }
                }
                _ if self
                    .machines
                    .get(&resource)
                    .is_none_or(|c| c.pending_operation.as_deref() != Some(key.as_str())) => {}
                Effect::Delete => {
                    self.machines.remove(&resource);
                }
                Effect::Update => {
                    if let Some(c) = self.machines.get_mut(&resource) {
                        c.effective = c.model.clone();
                        c.provisioning = Provisioning::Succeeded;
                        c.pending_operation = None;
                    }
                }
            }
        }
    }

    pub fn subscription(&self, id: &str) -> Option<&Subscription> {
        self.subscriptions.get(&fold(id))
    }

    pub fn tenant_exists(&self, id: &str) -> bool {
        self.tenants.contains_key(&fold(id))
    }

    pub fn application(&self, tenant: &str, client_id: &str) -> Option<&ApplicationSeed> {
        self.tenants
            .get(&fold(tenant))?
            .applications
            .iter()
            .find(|a| a.client_id.eq_ignore_ascii_case(client_id))
    }

    pub fn uami(&self, id: &str) -> Option<&Uami> {
        self.identities.get(&fold(id))
    }

    pub fn uami_mut(&mut self, id: &str) -> Option<&mut Uami> {
        self.identities.get_mut(&fold(id))
    }

    /// The user-assigned identity of `tenant` whose client ID is `client_id` (what Entra's token endpoint
    /// is given for a managed identity that presents a federated credential).
    pub fn uami_by_client_id(&self, tenant: &str, client_id: &str) -> Option<&Uami> {
        self.identities
            .values()
            .find(|u| u.client_id.eq_ignore_ascii_case(client_id) && u.tenant_id.eq_ignore_ascii_case(tenant))
    }

    /// Applies an accepted PATCH: the model changes now, the instances follow when the operation is done
    /// (at once when `duration` is zero). Returns the operation's name.
    pub fn apply_identity_update(
        &mut self,
        key: &str,
        merged: &Merged,
        now: Instant,
        duration: Duration,
    ) -> Option<String> {
        let c = self.machines.get_mut(key)?;
        let system = match (merged.system, &c.model.system) {
            (true, Some(s)) => Some(s.clone()),
            (true, None) => Some(SystemIdentity {
                principal_id: new_guid(),
                client_id: new_guid(),
            }),
            (false, _) => None,
        };
        c.model = Identities {
            system,
            user: merged.user.clone(),
        };
        c.etag += 1;
        let name = new_guid();
        let op = Operation {
            name: name.clone(),
            resource_key: key.to_owned(),
            effect: Effect::Update,
            subscription: c.id.subscription.clone(),
            location: c.location.clone(),
            start: jiff::Timestamp::now(),
            end: None,
            due: now + duration,
            status: OperationStatus::InProgress,
        };
        c.provisioning = Provisioning::Updating;
        c.pending_operation = Some(name.clone());
        self.operations.insert(name.clone(), op);
        self.advance(now);
        Some(name)
    }

    /// Starts deleting a VM or scale set: `Deleting` until the operation is done (at once when `duration`
    /// is zero), then gone. A delete already running is returned instead of a second one. Returns the
    /// operation's name, `None` when there is no such resource.
    pub fn start_delete(&mut self, key: &str, now: Instant, duration: Duration) -> Option<String> {
        let c = self.machines.get_mut(key)?;
        if c.provisioning == Provisioning::Deleting
            && let Some(pending) = &c.pending_operation
        {
            return Some(pending.clone());
        }
        let name = new_guid();
        let op = Operation {
            name: name.clone(),
            resource_key: key.to_owned(),
            effect: Effect::Delete,
            subscription: c.id.subscription.clone(),
            location: c.location.clone(),
            start: jiff::Timestamp::now(),
            end: None,
            due: now + duration,
            status: OperationStatus::InProgress,
        };
        c.provisioning = Provisioning::Deleting;
        c.pending_operation = Some(name.clone());
        c.etag += 1;
        self.operations.insert(name.clone(), op);
        self.advance(now);
        Some(name)
    }

    /// Starts deleting instances of a scale set (scale-in); they go when the operation is done. `Err`
    /// names the instance IDs the scale set does not have (then nothing starts).
    pub fn start_delete_instances(
        &mut self,
        key: &str,
        instance_ids: &[String],
        now: Instant,
        duration: Duration,
    ) -> Result<String, Vec<String>> {
        let Some(c) = self.machines.get(key) else {
            return Err(instance_ids.to_vec());
        };
        let unknown: Vec<String> = instance_ids
            .iter()
            .filter(|id| !c.instances.iter().any(|i| &i.instance_id == *id))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(unknown);
        }
        let name = new_guid();
        let op = Operation {
            name: name.clone(),
            resource_key: key.to_owned(),
            effect: Effect::DeleteInstances(instance_ids.to_vec()),
            subscription: c.id.subscription.clone(),
            location: c.location.clone(),
            start: jiff::Timestamp::now(),
            end: None,
            due: now + duration,
            status: OperationStatus::InProgress,
        };
        self.operations.insert(name.clone(), op);
        self.advance(now);
        Ok(name)
    }

    /// Changes identities behind ARM's back, effective at once (as when a node image upgrade drops them).
    pub fn set_identities_directly(&mut self, key: &str, add: &[String], remove: &[String]) -> bool {
        let Some(c) = self.machines.get_mut(key) else {
            return false;
        };
        for id in add {
            if !c.model.user.iter().any(|u| fold(u) == fold(id)) {
                c.model.user.push(id.clone());
            }
        }
        c.model
            .user
            .retain(|u| !remove.iter().any(|r| fold(r) == fold(u)));
        c.effective = c.model.clone();
        c.etag += 1;
        true
    }

    /// The identity an IMDS request on `instance` gets, from the identities its VM or scale set has *now*.
    pub fn resolve_for_imds(
        &self,
        instance: &ResourceId,
        selector: &Selector,
    ) -> Result<Principal, ResolveError> {
        let c = self
            .machines
            .get(&instance.parent().key())
            .ok_or(ResolveError::NotFound)?;
        let ident = &c.effective;
        let system = ident.system.as_ref().map(|s| Principal {
            tenant_id: c.tenant_id.clone(),
            client_id: s.client_id.clone(),
            object_id: s.principal_id.clone(),
            mi_res_id: Some(c.id.to_string()),
        });
        let user = ident.user.iter().filter_map(|u| self.uami(u)).map(|u| Principal {
            tenant_id: u.tenant_id.clone(),
            client_id: u.client_id.clone(),
            object_id: u.principal_id.clone(),
            mi_res_id: Some(u.id.to_string()),
        });
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        match selector {
            Selector::Default => {
                if let Some(s) = system {
                    return Ok(s);
                }
                let mut all: Vec<Principal> = user.collect();
                match (all.len(), ident.user.len()) {
                    (1, 1) => Ok(all.remove(0)),
                    (_, 0) | (0, 1) => Err(ResolveError::NotFound),
                    _ => Err(ResolveError::Multiple),
                }
            }
            Selector::ClientId(id) => system
                .into_iter()
                .chain(user)
                .find(|p| eq(&p.client_id, id))
                .ok_or(ResolveError::NotFound),
            Selector::ObjectId(id) => system
                .into_iter()
                .chain(user)
                .find(|p| eq(&p.object_id, id))
                .ok_or(ResolveError::NotFound),
            Selector::ResourceId(id) => user
                .into_iter()
                .find(|p| p.mi_res_id.as_deref().is_some_and(|m| fold(m) == fold(id)))
                .ok_or(ResolveError::NotFound),
        }
    }

    /// Whether the principal `oid` holds a role that allows `action` on `resource`.
    pub fn authorized(&self, oid: &str, action: Action, resource: &str) -> bool {
        self.role_assignments.iter().any(|ra| {
            ra.principal_id.eq_ignore_ascii_case(oid)
                && scope_covers(&ra.scope, resource)
                && role_allows(&ra.role_definition_name, action)
        })
    }

    /// Whether the vault lets `oid` of tenant `tid` read secrets.
    pub fn vault_allows_get(&self, vault: &Vault, tid: &str, oid: &str) -> bool {
        if vault.rbac {
            return self.authorized(oid, Action::SecretsRead, &vault.id.to_string());
        }
        vault.access_policies.iter().any(|p| {
            p.object_id.eq_ignore_ascii_case(oid)
                && p.tenant_id.eq_ignore_ascii_case(tid)
                && p.permissions
                    .secrets
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case("get") || s.eq_ignore_ascii_case("all"))
        })
    }

    /// ARM's JSON for a VM or scale set.
    pub fn render_machine(&self, c: &Machine) -> Value {
        let mut body = json!({
            "name": c.id.name,
            "id": c.id.to_string(),
            "type": c.id.kind.arm_type(),
            "location": c.location,
            "etag": format!("\"{}\"", c.etag),
        });
        let kind = IdentityType {
            system: c.model.system.is_some(),
            user: !c.model.user.is_empty(),
        };
        if kind != IdentityType::NONE {
            let mut ident = json!({ "type": kind.as_str() });
            if let Some(s) = &c.model.system {
                ident["principalId"] = json!(s.principal_id);
                ident["tenantId"] = json!(c.tenant_id);
            }
            if !c.model.user.is_empty() {
                let map: serde_json::Map<String, Value> = c
                    .model
                    .user
                    .iter()
                    .map(|u| {
                        let v = match self.uami(u) {
                            Some(x) => json!({"principalId": x.principal_id, "clientId": x.client_id}),
                            // A deleted identity still listed: Compute shows it with null IDs.
                            None => json!({"principalId": null, "clientId": null}),
                        };
                        (u.clone(), v)
                    })
                    .collect();
                ident["userAssignedIdentities"] = Value::Object(map);
            }
            body["identity"] = ident;
        }
        body["properties"] = match c.id.kind {
            ResourceType::VirtualMachineScaleSet => json!({
                "provisioningState": c.provisioning.as_str(),
                "uniqueId": c.unique_id,
                "orchestrationMode": "Uniform",
                "singlePlacementGroup": true,
                "overprovision": false,
                "upgradePolicy": {"mode": "Manual"},
            }),
            _ => json!({
                "provisioningState": c.provisioning.as_str(),
                "vmId": c.unique_id,
                "hardwareProfile": {"vmSize": c.vm_size},
            }),
        };
        if c.id.kind == ResourceType::VirtualMachineScaleSet {
            body["sku"] = json!({"name": c.vm_size, "tier": "Standard", "capacity": c.instances.len()});
        }
        body
    }

    pub fn render_uami(u: &Uami) -> Value {
        json!({
            "id": u.id.to_string(),
            "name": u.id.name,
            "type": ResourceType::UserAssignedIdentity.arm_type(),
            "location": u.location,
            "tags": {},
            "properties": {
                "tenantId": u.tenant_id,
                "principalId": u.principal_id,
                "clientId": u.client_id,
                "isolationScope": "None",
            }
        })
    }

    pub fn render_operation(op: &Operation) -> Value {
        let mut v = json!({
            "startTime": op.start.to_string(),
            "status": match op.status {
                OperationStatus::InProgress => "InProgress",
                OperationStatus::Succeeded => "Succeeded",
            },
            "name": op.name,
        });
        if let Some(end) = op.end {
            v["endTime"] = json!(end.to_string());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity_merge::{merge, parse_patch};

    const SS: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss";

    fn uami(n: &str) -> String {
        format!(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{n}"
        )
    }

    fn seed() -> Seed {
        Seed::from_text(
            &json!({
                "subscriptions": [{"id": "s", "tenantId": "t", "resourceGroups": [{
                    "name": "rg", "location": "westeurope",
                    "userAssignedIdentities": [
                        {"name": "a", "clientId": "ca", "principalId": "pa"},
                        {"name": "b", "clientId": "cb", "principalId": "pb"}],
                    "virtualMachineScaleSets": [{"name": "ss", "identity": {"userAssignedIdentities": [uami("a")]},
                        "instances": [{"instanceId": "0"}]}]
                }]}],
                "roleAssignments": [
                    {"principalId": "ctl", "scope": "/subscriptions/s/resourceGroups/rg", "roleDefinitionName": "Virtual Machine Contributor"},
                    {"principalId": "ctl", "scope": uami("a"), "roleDefinitionName": "Managed Identity Operator"}]
            })
            .to_string(),
            false,
        )
        .unwrap()
    }

    fn instance() -> ResourceId {
        ResourceId::parse(&format!("{SS}/virtualMachines/0")).unwrap()
    }

    #[test]
    fn seed_round_trips_through_export() {
        let st = State::from_seed(&seed()).unwrap();
        let again = State::from_seed(&st.to_seed()).unwrap();
        assert_eq!(st.to_seed(), again.to_seed());
        assert_eq!(
            again.to_seed().subscriptions[0].resource_groups[0].virtual_machine_scale_sets[0].instances[0]
                .name,
            "ss_0"
        );
    }

    #[test]
    fn federated_credentials_round_trip_and_bad_ones_are_refused() {
        let fic = |name: &str, subject: &str| crate::seed::FederatedCredentialSeed {
            name: name.into(),
            issuer: "https://issuer".into(),
            subject: subject.into(),
            audiences: vec!["api://AzureADTokenExchange".into()],
        };
        let mut s = seed();
        s.subscriptions[0].resource_groups[0].user_assigned_identities[0].federated_identity_credentials =
            vec![fic("one", "a"), fic("two", "b")];
        let st = State::from_seed(&s).unwrap();
        assert_eq!(st.uami(&uami("a")).unwrap().federated_credentials.len(), 2);
        assert_eq!(
            st.uami_by_client_id("T", "CA").map(|u| u.principal_id.as_str()),
            Some("pa")
        );
        assert_eq!(st.uami_by_client_id("other-tenant", "ca").map(|u| &u.id), None);
        assert_eq!(State::from_seed(&st.to_seed()).unwrap().to_seed(), st.to_seed());
        assert_eq!(
            st.to_seed().subscriptions[0].resource_groups[0].user_assigned_identities[0]
                .federated_identity_credentials,
            s.subscriptions[0].resource_groups[0].user_assigned_identities[0].federated_identity_credentials
        );
        let mut dup = s.clone();
        dup.subscriptions[0].resource_groups[0].user_assigned_identities[0].federated_identity_credentials =
            vec![fic("one", "a"), fic("two", "a")];
        assert!(matches!(State::from_seed(&dup), Err(SeedError::Invalid(m)) if m.contains("already exists")));
        let mut app = s;
        app.tenants = vec![TenantSeed {
            id: "t".into(),
            applications: vec![ApplicationSeed {
                client_id: "app".into(),
                federated_identity_credentials: vec![fic("x", "a")],
                ..ApplicationSeed::default()
            }],
        }];
        assert!(matches!(State::from_seed(&app), Err(SeedError::Invalid(m)) if m.contains("'x' is invalid")));
    }

    #[test]
    fn seed_with_an_undefined_identity_is_refused() {
        let mut s = seed();
        s.subscriptions[0].resource_groups[0].virtual_machine_scale_sets[0]
            .identity
            .user_assigned_identities
            .push(uami("nope"));
        assert!(matches!(State::from_seed(&s), Err(SeedError::Invalid(_))));
    }

    #[test]
    fn imds_selects_by_client_object_and_resource_id() {
        let st = State::from_seed(&seed()).unwrap();
        let i = instance();
        let by_client = st.resolve_for_imds(&i, &Selector::ClientId("CA".into())).unwrap();
        assert_eq!(by_client.object_id, "pa");
        assert_eq!(
            st.resolve_for_imds(&i, &Selector::ObjectId("pa".into())).unwrap(),
            by_client
        );
        assert_eq!(
            st.resolve_for_imds(&i, &Selector::ResourceId(uami("a").to_lowercase()))
                .unwrap(),
            by_client
        );
        assert_eq!(st.resolve_for_imds(&i, &Selector::Default).unwrap(), by_client);
        assert_eq!(
            st.resolve_for_imds(&i, &Selector::ClientId("cb".into())),
            Err(ResolveError::NotFound)
        );
    }

    #[test]
    fn identity_reaches_imds_only_when_the_operation_completes() {
        let mut st = State::from_seed(&seed()).unwrap();
        let key = fold(SS);
        let patch = parse_patch(&json!({"identity": {"userAssignedIdentities": {uami("b"): {}}}}))
            .unwrap()
            .unwrap();
        let merged = merge(&st.machines[&key].model.current(), &patch).unwrap();
        let now = Instant::now();
        let op = st
            .apply_identity_update(&key, &merged, now, Duration::from_secs(30))
            .unwrap();
        assert_eq!(st.machines[&key].provisioning, Provisioning::Updating);
        assert_eq!(st.machines[&key].model.user.len(), 2);
        let i = instance();
        assert_eq!(
            st.resolve_for_imds(&i, &Selector::ClientId("cb".into())),
            Err(ResolveError::NotFound)
        );
        st.advance(now + Duration::from_secs(29));
        assert_eq!(st.operations[&op].status, OperationStatus::InProgress);
        st.advance(now + Duration::from_secs(30));
        assert_eq!(st.operations[&op].status, OperationStatus::Succeeded);
        assert_eq!(st.machines[&key].provisioning, Provisioning::Succeeded);
        assert!(st.resolve_for_imds(&i, &Selector::ClientId("cb".into())).is_ok());
        // Two identities, no system one: a request that names none is ambiguous.
        assert_eq!(
            st.resolve_for_imds(&i, &Selector::Default),
            Err(ResolveError::Multiple)
        );
    }

    #[test]
    fn a_deleted_identity_still_listed_renders_null_ids_and_gets_no_token() {
        let mut st = State::from_seed(&seed()).unwrap();
        st.identities.remove(&fold(&uami("a")));
        let c = &st.machines[&fold(SS)];
        let body = st.render_machine(c);
        assert_eq!(
            body["identity"]["userAssignedIdentities"][uami("a")]["clientId"],
            Value::Null
        );
        assert_eq!(
            st.resolve_for_imds(&instance(), &Selector::ClientId("ca".into())),
            Err(ResolveError::NotFound)
        );
        assert_eq!(
            st.resolve_for_imds(&instance(), &Selector::Default),
            Err(ResolveError::NotFound)
        );
    }

    #[test]
    fn roles_cover_their_scope_and_below_only() {
        let st = State::from_seed(&seed()).unwrap();
        assert!(st.authorized("ctl", Action::ComputeWrite, SS));
        assert!(st.authorized("CTL", Action::ComputeRead, &SS.to_uppercase()));
        assert!(!st.authorized(
            "ctl",
            Action::ComputeWrite,
            "/subscriptions/s/resourceGroups/rg2/providers/x/y/z"
        ));
        assert!(!st.authorized(
            "ctl",
            Action::ComputeWrite,
            "/subscriptions/s/resourceGroups/rg-other"
        ));
        assert!(st.authorized("ctl", Action::IdentityAssign, &uami("a")));
        assert!(!st.authorized("ctl", Action::IdentityAssign, &uami("b")));
        assert!(!st.authorized("someone", Action::ComputeRead, SS));
    }

    #[test]
    fn enabling_the_system_identity_creates_a_principal_and_keeps_it() {
        let mut st = State::from_seed(&seed()).unwrap();
        let key = fold(SS);
        let patch = parse_patch(&json!({"identity": {"type": "SystemAssigned, UserAssigned"}}))
            .unwrap()
            .unwrap();
        let merged = merge(&st.machines[&key].model.current(), &patch).unwrap();
        st.apply_identity_update(&key, &merged, Instant::now(), Duration::ZERO);
        let sys = st.machines[&key].model.system.clone().unwrap();
        let merged = merge(&st.machines[&key].model.current(), &patch).unwrap();
        st.apply_identity_update(&key, &merged, Instant::now(), Duration::ZERO);
        assert_eq!(st.machines[&key].model.system.as_ref(), Some(&sys));
        assert_eq!(
            st.resolve_for_imds(&instance(), &Selector::Default)
                .unwrap()
                .object_id,
            sys.principal_id
        );
    }

    #[test]
    fn a_deleted_machine_is_deleting_until_its_operation_completes_then_gone() {
        let mut st = State::from_seed(&seed()).unwrap();
        let key = fold(SS);
        let now = Instant::now();
        let op = st.start_delete(&key, now, Duration::from_secs(30)).unwrap();
        assert_eq!(st.machines[&key].provisioning, Provisioning::Deleting);
        assert_eq!(
            st.render_machine(&st.machines[&key])["properties"]["provisioningState"],
            "Deleting"
        );
        assert_eq!(
            st.start_delete(&key, now, Duration::from_secs(30)).as_deref(),
            Some(op.as_str()),
            "a second DELETE joins the running one"
        );
        st.advance(now + Duration::from_secs(30));
        assert!(!st.machines.contains_key(&key));
        assert_eq!(st.operations[&op].status, OperationStatus::Succeeded);
        assert_eq!(
            st.resolve_for_imds(&instance(), &Selector::Default),
            Err(ResolveError::NotFound)
        );
        assert_eq!(st.start_delete(&key, now, Duration::ZERO), None);
    }

    #[test]
    fn scale_in_removes_instances_and_keeps_the_scale_set_and_its_identities() {
        let mut st = State::from_seed(&seed()).unwrap();
        let key = fold(SS);
        let identities = st.machines[&key].model.clone();
        assert_eq!(
            st.start_delete_instances(&key, &["7".into()], Instant::now(), Duration::ZERO),
            Err(vec!["7".to_owned()])
        );
        st.start_delete_instances(&key, &["0".into()], Instant::now(), Duration::ZERO)
            .unwrap();
        assert!(st.machines[&key].instances.is_empty());
        assert_eq!(st.machines[&key].model, identities);
        assert_eq!(st.machines[&key].provisioning, Provisioning::Succeeded);
    }
}

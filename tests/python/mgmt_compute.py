"""azure-mgmt-compute reading and updating a scale set's identities through the emulated ARM, with a token
from the emulated Entra (ClientSecretCredential). Unchanged except for endpoints (authority, base_url) and
the CA (REQUESTS_CA_BUNDLE); instance discovery is off because it would call the public cloud's host.

Environment: AZURE_URL, TENANT_ID, CLIENT_ID, CLIENT_SECRET, SUBSCRIPTION_ID, RESOURCE_GROUP, VMSS_NAME,
ADD_ID (identity to add), REMOVE_ID (identity to remove afterwards), REQUESTS_CA_BUNDLE.
Prints the identity map after the read, the add and the removal."""
import json
import os
import sys

from azure.identity import ClientSecretCredential
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute.models import (
    UserAssignedIdentitiesValue,
    VirtualMachineScaleSetIdentity,
    VirtualMachineScaleSetUpdate,
)


def identity_of(vmss):
    ident = vmss.identity
    return {
        "type": str(ident.type) if ident else None,
        "ids": sorted((ident.user_assigned_identities or {}).keys()) if ident else [],
        "client_ids": sorted(v.client_id for v in (ident.user_assigned_identities or {}).values()) if ident else [],
        "provisioning_state": vmss.provisioning_state if hasattr(vmss, "provisioning_state") else vmss.properties.provisioning_state,
    }


def main():
    env = os.environ
    credential = ClientSecretCredential(
        env["TENANT_ID"], env["CLIENT_ID"], env["CLIENT_SECRET"],
        authority=env["AZURE_URL"], disable_instance_discovery=True,
    )
    client = ComputeManagementClient(
        credential, env["SUBSCRIPTION_ID"], base_url=env["AZURE_URL"],
        credential_scopes=["https://management.azure.com/.default"],
    )
    rg, name = env["RESOURCE_GROUP"], env["VMSS_NAME"]
    out = {"read": identity_of(client.virtual_machine_scale_sets.get(rg, name))}
    add = VirtualMachineScaleSetUpdate(identity=VirtualMachineScaleSetIdentity(
        type="UserAssigned", user_assigned_identities={env["ADD_ID"]: UserAssignedIdentitiesValue()}))
    out["added"] = identity_of(client.virtual_machine_scale_sets.begin_update(rg, name, add).result())
    remove = VirtualMachineScaleSetUpdate(identity=VirtualMachineScaleSetIdentity(
        type="UserAssigned", user_assigned_identities={env["REMOVE_ID"]: None}))
    out["removed"] = identity_of(client.virtual_machine_scale_sets.begin_update(rg, name, remove).result())
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

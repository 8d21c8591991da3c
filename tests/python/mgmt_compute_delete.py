"""azure-mgmt-compute deleting what the emulated ARM holds, as a cluster's machines leave: a VM, scale-set
instances on scale-in (one by one and in a batch), then the whole scale set. Each deletion is a long-running
operation the SDK polls to its end; a machine reads `Deleting` meanwhile and is not found afterwards.
Unchanged except for endpoints (authority, base_url) and the CA (REQUESTS_CA_BUNDLE).

Environment: AZURE_URL, TENANT_ID, CLIENT_ID, CLIENT_SECRET, SUBSCRIPTION_ID, RESOURCE_GROUP, VMSS_NAME,
VM_NAME, REQUESTS_CA_BUNDLE. Prints what it saw as JSON."""
import json
import os
import sys

from azure.core.exceptions import ResourceNotFoundError
from azure.identity import ClientSecretCredential
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute.models import VirtualMachineScaleSetVMInstanceRequiredIDs


def not_found(read):
    try:
        read()
    except ResourceNotFoundError as error:
        return {"status": error.status_code, "code": error.error.code if error.error else None}
    return None


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
    rg, vmss, vm = env["RESOURCE_GROUP"], env["VMSS_NAME"], env["VM_NAME"]
    out = {}

    poller = client.virtual_machines.begin_delete(rg, vm)
    out["vm_while_deleting"] = client.virtual_machines.get(rg, vm).provisioning_state
    poller.result()
    out["vm_poller"] = poller.status()
    out["vm_after"] = not_found(lambda: client.virtual_machines.get(rg, vm))

    client.virtual_machine_scale_set_vms.begin_delete(rg, vmss, "0").result()
    client.virtual_machine_scale_sets.begin_delete_instances(
        rg, vmss, VirtualMachineScaleSetVMInstanceRequiredIDs(instance_ids=["1"])).result()
    after_scale_in = client.virtual_machine_scale_sets.get(rg, vmss)
    out["capacity_after_scale_in"] = after_scale_in.sku.capacity
    out["identities_after_scale_in"] = sorted((after_scale_in.identity.user_assigned_identities or {}).keys())

    client.virtual_machine_scale_sets.begin_delete(rg, vmss).result()
    out["vmss_after"] = not_found(lambda: client.virtual_machine_scale_sets.get(rg, vmss))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

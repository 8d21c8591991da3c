"""azure-mgmt-compute reading a scale set again and again while the emulated ARM throttles it. Unchanged except
for endpoints (authority, base_url) and the CA (REQUESTS_CA_BUNDLE): the SDK's own retry policy meets each 429
and waits out its Retry-After before asking again.

Environment: AZURE_URL, TENANT_ID, CLIENT_ID, CLIENT_SECRET, SUBSCRIPTION_ID, RESOURCE_GROUP, VMSS_NAME,
READS (how many reads), REQUESTS_CA_BUNDLE. Prints how many reads succeeded and how long they took."""
import json
import os
import sys
import time

from azure.identity import ClientSecretCredential
from azure.mgmt.compute import ComputeManagementClient


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
    started = time.monotonic()
    names = [
        client.virtual_machine_scale_sets.get(env["RESOURCE_GROUP"], env["VMSS_NAME"]).name
        for _ in range(int(env["READS"]))
    ]
    json.dump({"reads": len(names), "seconds": time.monotonic() - started}, sys.stdout)


if __name__ == "__main__":
    main()

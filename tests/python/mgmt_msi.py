"""azure-mgmt-msi managing federated identity credentials on a user-assigned identity through the emulated
ARM, with a token from the emulated Entra (ClientSecretCredential). Unchanged except for endpoints
(authority, base_url) and the CA (REQUESTS_CA_BUNDLE); instance discovery is off because it would call the
public cloud's host.

Environment: AZURE_URL, TENANT_ID, CLIENT_ID, CLIENT_SECRET, SUBSCRIPTION_ID, RESOURCE_GROUP, IDENTITY_NAME,
ISSUER, REQUESTS_CA_BUNDLE.
Prints what each step returned: creates, a paged list, a read, a refused duplicate, deletes."""
import json
import os
import sys

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.identity import ClientSecretCredential
from azure.mgmt.msi import ManagedServiceIdentityClient
from azure.mgmt.msi.models import FederatedIdentityCredential

AUDIENCE = "api://AzureADTokenExchange"


def describe(fic):
    return {"id": fic.id, "name": fic.name, "type": fic.type, "issuer": fic.issuer, "subject": fic.subject,
            "audiences": fic.audiences}


def error(e):
    return {"type": type(e).__name__, "status": e.status_code, "code": e.error.code if e.error else None,
            "message": e.error.message if e.error else str(e)}


def main():
    env = os.environ
    credential = ClientSecretCredential(
        env["TENANT_ID"], env["CLIENT_ID"], env["CLIENT_SECRET"],
        authority=env["AZURE_URL"], disable_instance_discovery=True,
    )
    client = ManagedServiceIdentityClient(
        credential, env["SUBSCRIPTION_ID"], base_url=env["AZURE_URL"],
        credential_scopes=["https://management.azure.com/.default"],
    )
    ops = client.federated_identity_credentials
    rg, identity, issuer = env["RESOURCE_GROUP"], env["IDENTITY_NAME"], env["ISSUER"]
    out = {"created": []}
    for n in range(3):
        fic = FederatedIdentityCredential(issuer=issuer, subject=f"system:serviceaccount:apps:sa-{n}",
                                          audiences=[AUDIENCE])
        out["created"].append(describe(ops.create_or_update(rg, identity, f"fic-{n}", fic)))
    pages = ops.list(rg, identity, top=2).by_page()
    out["pages"] = [[f.name for f in page] for page in pages]
    out["read"] = describe(ops.get(rg, identity, "fic-1"))
    try:
        ops.create_or_update(rg, identity, "fic-dup", FederatedIdentityCredential(
            issuer=issuer, subject="system:serviceaccount:apps:sa-0", audiences=[AUDIENCE]))
        out["duplicate"] = "created"
    except HttpResponseError as e:
        out["duplicate"] = error(e)
    for n in range(3):
        ops.delete(rg, identity, f"fic-{n}")
    ops.delete(rg, identity, "fic-0")  # already gone: 204, not an error
    out["after_delete"] = [f.name for f in ops.list(rg, identity)]
    try:
        ops.get(rg, identity, "fic-1")
        out["read_deleted"] = "found"
    except ResourceNotFoundError as e:
        out["read_deleted"] = error(e)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

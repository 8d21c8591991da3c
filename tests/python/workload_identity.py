"""azure-identity's WorkloadIdentityCredential (and ManagedIdentityCredential, which becomes one when the
workload identity variables are set) exchanging a Kubernetes service-account token file at the emulated
Entra. Unchanged: configured only by the variables the azure-workload-identity webhook injects
(AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE, AZURE_AUTHORITY_HOST) and the CA bundle
(REQUESTS_CA_BUNDLE).

Environment: AZURE_TENANT_ID, AZURE_AUTHORITY_HOST, REQUESTS_CA_BUNDLE, and CASES: a JSON list of
{"name", "credential" ("workload" or "managed"), "client_id", "token_file"}; each case sets
AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE before its credential is made.
Prints one JSON object: per case the token's claims, or the error's type and message."""
import base64
import json
import os
import sys

from azure.core.exceptions import ClientAuthenticationError
from azure.identity import ManagedIdentityCredential, WorkloadIdentityCredential

SCOPE = "https://vault.azure.net/.default"


def claims(token):
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))


def run(case):
    os.environ["AZURE_CLIENT_ID"] = case["client_id"]
    os.environ["AZURE_FEDERATED_TOKEN_FILE"] = case["token_file"]
    credential = WorkloadIdentityCredential() if case["credential"] == "workload" else ManagedIdentityCredential()
    try:
        token = credential.get_token(SCOPE)
    except ClientAuthenticationError as e:
        return {"error": type(e).__name__, "message": str(e)}
    c = claims(token.token)
    return {"oid": c["oid"], "appid": c["appid"], "aud": c["aud"], "xms_mirid": c.get("xms_mirid"),
            "expires_in": token.expires_on - int(c["iat"])}


def main():
    json.dump({case["name"]: run(case) for case in json.loads(os.environ["CASES"])}, sys.stdout)


if __name__ == "__main__":
    main()

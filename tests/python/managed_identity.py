"""azure-identity's ManagedIdentityCredential against the emulated IMDS, unchanged except for the endpoint
(AZURE_POD_IDENTITY_AUTHORITY_HOST, the variable azure-identity and MSAL read for pod-identity).

Environment: AZURE_POD_IDENTITY_AUTHORITY_HOST, CLIENT_ID, OBJECT_ID, RESOURCE_ID (of an identity the
listener's scale set has), OTHER_CLIENT_ID (one it does not have), MODE ("user" or "system").
Prints one JSON object with what each credential obtained."""
import json
import os
import sys

from azure.core.exceptions import ClientAuthenticationError
from azure.identity import CredentialUnavailableError, ManagedIdentityCredential

SCOPE = "https://vault.azure.net/.default"


def claims(token):
    import base64
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))


def describe(credential):
    token = credential.get_token(SCOPE)
    c = claims(token.token)
    return {"oid": c["oid"], "appid": c["appid"], "aud": c["aud"], "expires_on": token.expires_on}


def main():
    out = {}
    if os.environ["MODE"] == "system":
        out["system"] = describe(ManagedIdentityCredential())
    else:
        out["client_id"] = describe(ManagedIdentityCredential(client_id=os.environ["CLIENT_ID"]))
        out["object_id"] = describe(ManagedIdentityCredential(identity_config={"object_id": os.environ["OBJECT_ID"]}))
        out["resource_id"] = describe(ManagedIdentityCredential(identity_config={"resource_id": os.environ["RESOURCE_ID"]}))
        try:
            ManagedIdentityCredential(client_id=os.environ["OTHER_CLIENT_ID"]).get_token(SCOPE)
            out["unassigned"] = "token issued"
        except (CredentialUnavailableError, ClientAuthenticationError) as e:
            out["unassigned"] = {"error": type(e).__name__, "message": str(e)}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

"""azure-keyvault-secrets reading a secret from the emulated Key Vault with a token from the emulated IMDS
(ManagedIdentityCredential), through the 401 challenge. Unchanged except for endpoints (vault URL,
AZURE_POD_IDENTITY_AUTHORITY_HOST), the CA (REQUESTS_CA_BUNDLE), and verify_challenge_resource=False
(the vault answers on 127.0.0.1, not on a *.vault.azure.net name).

Environment: VAULT_URL, SECRET_NAME, CLIENT_ID, AZURE_POD_IDENTITY_AUTHORITY_HOST, REQUESTS_CA_BUNDLE.
Prints the secret's value and id."""
import json
import os
import sys

from azure.identity import ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient


def main():
    env = os.environ
    client = SecretClient(
        env["VAULT_URL"], ManagedIdentityCredential(client_id=env["CLIENT_ID"]), verify_challenge_resource=False)
    secret = client.get_secret(env["SECRET_NAME"])
    json.dump({"value": secret.value, "id": secret.id, "name": secret.name, "version": secret.properties.version}, sys.stdout)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Creates, or reuses, a Python venv holding the pinned packages of a requirements file: by default the Azure
# SDKs of tools/python-requirements.txt, for the fidelity tests under tests/python; with an argument, that
# file (tools/azure-cli-requirements.txt: the Azure CLI, whose pins conflict with the SDKs'). The venv lives
# under a key derived from that file and this script, so a change of pins builds a fresh one and a warm run
# only checks the cache. Concurrent callers (test binaries running side by side) wait on a lock instead of
# building twice.
# Prints the venv directory on stdout; its interpreter is <dir>/bin/python.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
req=${1:-"$here/python-requirements.txt"}
python=${PYTHON:-python3}
key=$(cat "$req" "$0" | sha256sum | cut -c1-16)
root=${POD_IDENTITY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pod-identity}
name=$(basename "$req" .txt)
name=${name%-requirements}
if [[ $name == python ]]; then venv="$root/venv-$key"; else venv="$root/venv-$name-$key"; fi
mkdir -p "$root"
exec 9>"$venv.lock"
flock 9
if [[ -x "$venv/bin/python" && -f "$venv/.complete" ]]; then
  echo "$venv"; exit 0
fi
echo "creating python venv $venv with $("$python" --version 2>&1)" >&2
# Built in place under its final name (a venv records its own path); .complete marks a finished build.
rm -rf "$venv"
trap 'rm -rf "$venv"' ERR
"$python" -m venv "$venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req" >&2
touch "$venv/.complete"
echo "$venv"

#!/usr/bin/env bash
# Builds the Helm 3 client from its Go module (pinned in tools/helm/go.mod) and caches it under a key
# derived from that pin. Prints the path of the binary on stdout. With --cached, only looks.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export GOFLAGS=-mod=mod
recipe=1
key=$( (echo "$recipe"; cat "$here/helm/go.mod" "$here/helm/go.sum") | sha256sum | cut -c1-16)
version=$(cd "$here/helm" && go list -m -f '{{.Version}}' helm.sh/helm/v3)
client_go_minor=$(cd "$here/helm" && go list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)
root=${POD_IDENTITY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pod-identity}
bin="$root/helm-$version-$key"
if [[ -x "$bin/helm" ]]; then
  echo "$bin/helm"; exit 0
fi
if [[ ${1:-} == --cached ]]; then
  echo "not built: $bin" >&2; exit 1
fi
tmp="$bin.partial.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
# A plain module build reports a placeholder version and, worse, assumes Kubernetes 1.20 for charts'
# kubeVersion checks; the release Makefile sets these.
ldf="-s -w -X helm.sh/helm/v3/internal/version.version=$version"
for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  ldf+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$client_go_minor"
done
echo "building helm $version" >&2
(cd "$here/helm" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldf" -o "$tmp/helm" helm.sh/helm/v3/cmd/helm)
"$tmp/helm" version --short >&2
mv "$tmp" "$bin"
trap - EXIT
echo "$bin/helm"

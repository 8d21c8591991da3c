#!/usr/bin/env bash
# Regenerates tools/kube/go.mod and go.sum for a Kubernetes version (run once per bump, commit the result).
# k8s.io/kubernetes cannot be built with `go install` because its go.mod points every staging module at a
# directory; each of them is mapped here to the published v0.<minor>.<patch> module instead.
set -euo pipefail
K8S=${1:?usage: regen.sh v1.36.3}
STAGING="v0.${K8S#v1.}"
cd "$(dirname "$0")"
rm -f go.mod go.sum
go mod init pod-identity.invalid/kube-tools
KMOD=$(cd /tmp && go mod download -json "k8s.io/kubernetes@$K8S" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
MODS=$(sed -n -e 's|^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*|\1|p' \
              -e 's|^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) v0\.0\.0\( //.*\)\{0,1\}$|\1|p' "$KMOD" | sort -u)
for m in $MODS; do go mod edit -replace="$m=$m@$STAGING"; done
go mod edit -require="k8s.io/kubernetes@$K8S"
go mod tidy

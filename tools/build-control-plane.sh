#!/usr/bin/env bash
# Builds etcd and the Kubernetes binaries (kube-apiserver, and for the real-node tier the kubelet, kube-proxy,
# kube-scheduler, kube-controller-manager and kubectl) from their Go modules (pins in tools/kube/go.mod and
# tools/etcd/go.mod) and caches them under a key derived from those pins, so a warm run only checks the cache.
# Prints the directory holding the binaries on stdout. With --cached, only looks: exits 1 if not built.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export GOFLAGS=-mod=mod
# Bump when the way of building changes (flags, ldflags), so that caches of the old recipe are not used.
recipe=2
commands="kube-apiserver kubelet kube-proxy kube-scheduler kube-controller-manager kubectl"
key=$( (echo "$recipe $commands"; cat "$here/kube/go.mod" "$here/kube/go.sum" "$here"/kube/cmd/*/main.go \
          "$here/etcd/go.mod" "$here/etcd/go.sum" "$here/etcd/main.go") | sha256sum | cut -c1-16)
k8s=$(cd "$here/kube" && go list -m -f "{{.Version}}" k8s.io/kubernetes)
root=${POD_IDENTITY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pod-identity}
bin="$root/control-plane-$k8s-$key"
built() { for c in etcd $commands; do [[ -x "$bin/$c" ]] || return 1; done; }
if built; then
  echo "$bin"; exit 0
fi
if [[ ${1:-} == --cached ]]; then
  echo "not built: $bin" >&2; exit 1
fi
tmp="$bin.partial.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
minor=$(echo "$k8s" | cut -d. -f2)
ldf="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldf+=" -X $p.gitVersion=$k8s -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
echo "building etcd ($(sed -n 's/^require go.etcd.io\/etcd\/server\/v3 //p' "$here/etcd/go.mod"))" >&2
(cd "$here/etcd" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" .)
echo "building $commands $k8s (a cold build takes many minutes)" >&2
(cd "$here/kube" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldf" -o "$tmp/" $(printf './cmd/%s ' $commands))
for c in $commands; do
  if [[ $c == kubectl ]]; then "$tmp/$c" version --client >&2; else "$tmp/$c" --version >&2; fi
done
mv "$tmp" "$bin"
trap - EXIT
echo "$bin"

#!/bin/sh
# Assembles the root filesystem of one image from the files of a Debian system: a binary, the shared
# libraries it and its helpers load, and the data files they read, nothing else (no shell, no package
# manager). Used by the Dockerfile's final stages and by the tests that pack freshly built binaries, so the
# two ship the same contents.
#   rootfs.sh <image> <out-dir> [binary]
# Images: agent, controller, emulator, cli (binary required), toolbox (busybox and curl, for test pods),
# pause (binary required: a static sandbox process).
set -eu
image=$1 out=$2 binary=${3:-}
mkdir -p "$out"

# Copies a file to the same path under $out, following symlinks.
put() {
  mkdir -p "$out$(dirname "$1")"
  cp -L "$1" "$out$1"
}

# Copies the shared libraries (and the dynamic loader) an ELF file needs. Static files need none.
closure() {
  { ldd "$1" 2>/dev/null || true; } |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
    while read -r lib; do [ -e "$out$lib" ] || put "$lib"; done
}

# Installs a binary at <path> in the image, with its libraries.
binary_at() {
  mkdir -p "$out$(dirname "$2")"
  cp -L "$1" "$out$2"
  chmod 0755 "$out$2"
  closure "$1"
}

ca_bundle() { put /etc/ssl/certs/ca-certificates.crt; }

# The account distroless images run as (65532), for images that do not run as root.
nonroot() {
  mkdir -p "$out/etc" "$out/tmp"
  chmod 1777 "$out/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$out/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$out/etc/group"
}

need_binary() { [ -n "$binary" ] || { echo "rootfs.sh: image $image needs a binary" >&2; exit 2; }; }

case $image in
  agent)
    # The agent runs iptables (either backend: it must use the node's) and conntrack. iptables loads one
    # extension per match or target in every rule it lists, including other components' rules in the
    # chains it shares, so the whole extension directory goes in.
    need_binary
    binary_at "$binary" /usr/local/bin/pod-identity-agent
    for multi in xtables-nft-multi xtables-legacy-multi; do binary_at "/usr/sbin/$multi" "/usr/sbin/$multi"; done
    for family in iptables ip6tables; do
      for suffix in "" -save -restore; do
        ln -sf xtables-nft-multi "$out/usr/sbin/$family$suffix"
        ln -sf xtables-nft-multi "$out/usr/sbin/$family-nft$suffix"
        ln -sf xtables-legacy-multi "$out/usr/sbin/$family-legacy$suffix"
      done
    done
    # Where iptables looks for them: next to libxtables, in the real (not merged-/usr) directory.
    libxtables=$(ldd /usr/sbin/xtables-nft-multi | awk '$1 ~ /^libxtables/ { print $3 }')
    extensions=$(dirname "$(readlink -f "$libxtables")")/xtables
    mkdir -p "$out$extensions"
    for extension in "$extensions"/*.so; do
      cp -P "$extension" "$out$extension"
      [ -L "$extension" ] || closure "$extension"
    done
    binary_at /usr/sbin/conntrack /usr/sbin/conntrack
    ca_bundle
    # iptables-legacy takes its lock here; the chart mounts the node's lock file over it.
    mkdir -p "$out/run"
    ;;
  controller | emulator | cli)
    need_binary
    case $image in
      controller) name=pod-identity-controller ;;
      emulator) name=pod-identity-emulator ;;
      cli) name=kubectl-podidentity ;;
    esac
    binary_at "$binary" "/usr/local/bin/$name"
    ca_bundle
    nonroot
    ;;
  toolbox)
    binary_at /bin/busybox /bin/busybox
    for applet in sh cat sleep ls echo env wc grep head tail kill true false date; do
      ln -sf busybox "$out/bin/$applet"
    done
    binary_at /usr/bin/curl /usr/bin/curl
    ca_bundle
    nonroot
    ;;
  pause)
    need_binary
    binary_at "$binary" /pause
    ;;
  *)
    echo "rootfs.sh: unknown image $image" >&2
    exit 2
    ;;
esac

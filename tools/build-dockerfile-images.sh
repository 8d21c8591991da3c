#!/usr/bin/env bash
# Builds the repository's Dockerfile, unchanged, with buildah (no Docker engine runs here), every target,
# whenever the Dockerfile, Cargo.lock, a workspace manifest or the image root filesystem script changes.
# The result is cached under a key derived from those inputs: one OCI archive per target, the list of its
# files, and sizes.tsv (target, compressed bytes, uncompressed bytes). Prints that directory on stdout.
# With --cached, only looks: exits 1 if not built.
#
# The Dockerfile's base images are made locally, under their exact names, once per machine (kept in the
# cache's buildah storage): debian:bookworm-slim by debootstrap; a gcr.io/distroless/cc-debian12:nonroot
# stand-in from Debian's libc6, libgcc-s1, libssl3 and the CA bundle, with the nonroot user (65532); a
# rust:<version>-bookworm stand-in with gcc, libc6-dev and this machine's Rust toolchain. The builder gets
# this machine's CA bundle, without which cargo cannot reach crates.io from here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
recipe=1
# Bump when a stand-in base image's recipe changes: stand-ins of another recipe are made again.
base_recipe=2
targets="controller agent emulator cli"
rust_version=$(sed -n 's/^ARG RUST_VERSION=//p' "$repo/Dockerfile")
release=$(sed -n 's/^ARG DEBIAN_RELEASE=//p' "$repo/Dockerfile")
# Bump recipe when what this script builds changes (not when only its bookkeeping does).
key=$( (echo "$recipe $base_recipe $targets $rust_version $release"; cat "$repo/Dockerfile" "$repo/Cargo.lock" \
          "$repo/tools/images/rootfs.sh" "$repo/.dockerignore";
        cd "$repo" && find . -name Cargo.toml -not -path './target/*' | sort | xargs cat) |
      sha256sum | cut -c1-16)
root=${POD_IDENTITY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pod-identity}
out="$root/dockerfile-$key"
if [[ -f "$out/sizes.tsv" ]]; then
  echo "$out"; exit 0
fi
if [[ ${1:-} == --cached ]]; then
  echo "not built: $out" >&2; exit 1
fi
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "$tool is required: apt-get install $tool" >&2; exit 1; }
done

storage="$root/buildah"
mkdir -p "$storage"
# buildah keeps RUN --mount=type=cache directories under $TMPDIR; kept with the storage, the next build
# after a change of inputs recompiles only what changed.
export TMPDIR="$storage/tmp"
mkdir -p "$TMPDIR"
exec 9>"$storage/lock"
flock 9
bh() { buildah --root "$storage/root" --runroot "$storage/run" --storage-driver overlay "$@"; }
has_image() {
  [[ $(bh inspect --type image --format '{{index .ImageAnnotations "pod-identity.base-recipe"}}' "$1" 2>/dev/null) == "$base_recipe" ]]
}
ca_bundle=/etc/ssl/certs/ca-certificates.crt

work=$(mktemp -d "$storage/work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# A base image from a root filesystem directory.
commit_rootfs() { # name dir [buildah config args...]
  local name=$1 dir=$2; shift 2
  local container mount
  container=$(bh from scratch)
  mount=$(bh mount "$container")
  cp -a "$dir"/. "$mount"/
  bh umount "$container" >/dev/null
  bh config --annotation "pod-identity.base-recipe=$base_recipe" "$container"
  if (($#)); then bh config "$@" "$container"; fi
  bh commit --quiet "$container" "$name" >/dev/null
  bh rm "$container" >/dev/null
}

debian="$storage/debootstrap-$release"
if ! has_image "debian:$release-slim" || ! has_image "rust:$rust_version-$release"; then
  if [[ ! -f "$debian/.complete" ]]; then
    echo "debootstrap $release (minbase)" >&2
    rm -rf "$debian"
    debootstrap --variant=minbase "$release" "$debian" http://deb.debian.org/debian >&2
    rm -rf "$debian"/var/cache/apt/archives/*.deb
    touch "$debian/.complete"
  fi
fi
if ! has_image "debian:$release-slim"; then
  echo "making debian:$release-slim" >&2
  commit_rootfs "debian:$release-slim" "$debian" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd bash
fi

distroless=$(sed -n 's/^FROM \(gcr.io\/distroless\/[^ ]*\) AS .*/\1/p' "$repo/Dockerfile" | sort -u)
if ! has_image "$distroless"; then
  echo "making a $distroless stand-in" >&2
  fs="$work/distroless"
  mkdir -p "$fs" "$work/debs"
  (cd "$work/debs" && apt-get download libc6 libgcc-s1 libssl3 netbase tzdata >&2)
  for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$fs"; done
  rm -rf "$fs/usr/share/doc" "$fs/usr/share/man" "$fs/usr/share/lintian"
  mkdir -p "$fs/etc/ssl/certs" "$fs/tmp" "$fs/home/nonroot"
  cp "$ca_bundle" "$fs/etc/ssl/certs/ca-certificates.crt"
  chmod 1777 "$fs/tmp"
  chown 65532:65532 "$fs/home/nonroot"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$fs/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$fs/etc/group"
  commit_rootfs "$distroless" "$fs" --user 65532:65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
fi

if ! has_image "rust:$rust_version-$release"; then
  # The real image is buildpack-deps (a C toolchain, make, pkg-config, git, curl, the OpenSSL headers)
  # with rustup's toolchain; crates with C parts (jemalloc, ring) need the toolchain and make.
  echo "making a rust:$rust_version-$release stand-in with this machine's Rust" >&2
  sysroot=$(rustc --print sysroot)
  commit_rootfs localhost/pod-identity-builder-base:tmp "$debian"
  container=$(bh from localhost/pod-identity-builder-base:tmp)
  bh run --network=host "$container" -- sh -c \
    'apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc g++ libc6-dev make pkg-config git curl libssl-dev ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/*' >&2
  mount=$(bh mount "$container")
  mkdir -p "$mount/usr/local/rust" "$mount/usr/local/cargo/bin" "$mount/etc/ssl/certs"
  for part in bin lib libexec etc; do
    [[ -d "$sysroot/$part" ]] && cp -a "$sysroot/$part" "$mount/usr/local/rust/"
  done
  for tool in cargo rustc rustdoc; do ln -sf "/usr/local/rust/bin/$tool" "$mount/usr/local/cargo/bin/$tool"; done
  cp "$ca_bundle" "$mount/etc/ssl/certs/ca-certificates.crt"
  bh umount "$container" >/dev/null
  bh config --annotation "pod-identity.base-recipe=$base_recipe" \
    --env CARGO_HOME=/usr/local/cargo --env RUSTUP_HOME=/usr/local/rustup \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$container"
  bh commit --quiet "$container" "rust:$rust_version-$release" >/dev/null
  bh rm "$container" >/dev/null
  bh rmi localhost/pod-identity-builder-base:tmp >/dev/null
fi

partial="$out.partial.$$"
rm -rf "$partial"
mkdir -p "$partial"
trap 'rm -rf "$work" "$partial"' EXIT
epoch=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)
for target in $targets; do
  echo "buildah bud --target $target" >&2
  bh bud --pull=never --network=host --layers --quiet --target "$target" \
    --build-arg "SOURCE_DATE_EPOCH=$epoch" -t "pod-identity/$target:$key" -f "$repo/Dockerfile" "$repo" >&2
  bh push --quiet "pod-identity/$target:$key" "oci-archive:$partial/$target.tar:pod-identity/$target:$key" >&2
  # The files of the image: every layer's entries.
  mkdir -p "$work/$target"
  tar -C "$work/$target" -xf "$partial/$target.tar"
  : > "$partial/$target.files"
  uncompressed=0
  for blob in "$work/$target"/blobs/sha256/*; do
    if tar -tzf "$blob" >/dev/null 2>&1; then
      tar -tzf "$blob" >> "$partial/$target.files"
      uncompressed=$((uncompressed + $(gzip -dc "$blob" | wc -c)))
    fi
  done
  sort -u -o "$partial/$target.files" "$partial/$target.files"
  compressed=$(stat -c %s "$partial/$target.tar")
  printf '%s\t%s\t%s\n' "$target" "$compressed" "$uncompressed" >> "$partial/sizes.tsv.partial"
  rm -rf "$work/$target"
done
mv "$partial/sizes.tsv.partial" "$partial/sizes.tsv"
rm -rf "$out"
mv "$partial" "$out"
cat "$out/sizes.tsv" >&2
echo "$out"

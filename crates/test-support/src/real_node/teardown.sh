# Removes everything one real node put on the machine. Run by the test process when the node is dropped,
# and by a watchdog when that process dies first, so it depends on nothing but its arguments and the files
# the run wrote. Idempotent: a second run finds nothing to do.
#   $1 run id   $2 base directory   $3 runtime directory   $4 cgroup name   $5 network namespace
#   $6 containerd socket   $7 1 to keep the component logs (copied to /tmp/pod-identity-node-logs-<id>)
id=$1 base=$2 rundir=$3 cg=$4 netns=$5 socket=$6 keep=$7

# Processes: every one the run started is in its cgroup tree (the node's servers, containerd and its shims
# in <cg>/node; containers in the kubelet's pod cgroups under <cg>), whatever namespaces it entered.
procs() { find /sys/fs/cgroup/*/"$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u; }
i=0
while [ $i -lt 100 ]; do
  p=$(procs)
  [ -z "$p" ] && break
  kill -9 $p 2>/dev/null
  sleep 0.1
  i=$((i + 1))
done
# A process that entered the node's namespace without the cgroup (a command a test ran there).
for pid in $(ip netns pids "$netns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done

# Mounts under the run's directories (volumes, rootfs overlays, pod network namespaces), deepest first.
mounts() {
  awk -v b="$base" -v r="$rundir" '{ p = $5; gsub(/\\040/, " ", p);
      if (p == b || index(p, b "/") == 1 || p == r || index(p, r "/") == 1) print p }' /proc/self/mountinfo |
    sort -r
}
for attempt in 1 2 3; do
  m=$(mounts)
  [ -z "$m" ] && break
  echo "$m" | while read -r point; do umount "$point" 2>/dev/null || umount -l "$point" 2>/dev/null; done
done

ip netns del "$netns" 2>/dev/null

# containerd keeps its shims' sockets under /run/containerd/s whatever its state directory says, named by
# sha256(<containerd socket>/<namespace>/<task id>), and libcni caches each sandbox's loopback setup
# under /var/lib/cni/results; the task ids are the bundles in the run's state.
for bundle in "$rundir"/containerd/io.containerd.runtime.v2.task/*/*; do
  [ -d "$bundle" ] || continue
  ns=$(basename "$(dirname "$bundle")")
  task=$(basename "$bundle")
  hash=$(printf '%s' "$socket/$ns/$task" | sha256sum | cut -d' ' -f1)
  rm -f "/run/containerd/s/$hash" "/var/lib/cni/results/cni-loopback-$task-lo"
done

# Links the kubelet made in the machine's shared container log directory, and libcni's result cache.
for link in /var/log/containers/*; do
  [ -L "$link" ] || continue
  case "$(readlink "$link")" in "$base"/*) rm -f "$link" ;; esac
done
rm -f /var/lib/cni/results/pod-identity-"$id"-* 2>/dev/null

# Kernel settings the kubelet changed for the whole machine.
if [ -f "$base/kernel-settings.saved" ]; then
  while read -r key value; do
    [ -n "$key" ] && echo "$value" > "/proc/sys/$key" 2>/dev/null
  done < "$base/kernel-settings.saved"
fi

created=$(sort -r "$base/host-dirs.created" 2>/dev/null)
if [ "$keep" = 1 ] && [ -d "$base/logs" ]; then
  rm -rf "/tmp/pod-identity-node-logs-$id"
  cp -r "$base/logs" "/tmp/pod-identity-node-logs-$id"
fi
rm -rf "$base" "$rundir"
# Shared directories that did not exist before the run and are empty now, deepest first.
for dir in $created; do rmdir "$dir" 2>/dev/null; done

# cgroups, deepest first, in every hierarchy; a cgroup whose last task is still exiting refuses once.
for attempt in 1 2 3 4 5; do
  left=0
  for hierarchy in /sys/fs/cgroup/*; do
    [ -d "$hierarchy/$cg" ] || continue
    find "$hierarchy/$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
    [ -d "$hierarchy/$cg" ] && left=1
  done
  [ $left = 0 ] && break
  sleep 0.2
done
exit 0

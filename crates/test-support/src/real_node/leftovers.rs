//! What a node leaves on the machine: a snapshot of everything a run can touch outside its own network
//! namespace, taken before the node starts and after it is torn down, and the difference between the two.
//! Tests of the teardown assert that the difference is empty.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use super::layout::{KERNEL_SETTINGS, Layout};

/// Shared directories whose entries a node may add (symlinks, sockets, caches).
const WATCHED_DIRS: &[&str] = &[
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni/results",
    "/var/lib/cni/networks",
    "/run/containerd/s",
    "/var/lib/kubelet",
    "/opt/containerd",
    "/opt/cni",
    "/etc/cni/net.d",
];

/// Paths whose mere existence a node may change.
const WATCHED_PATHS: &[&str] = &[
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/run/containerd",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/opt/containerd",
    "/etc/kubernetes",
    "/var/lib/pod-identity-nodes",
    "/run/pod-identity-nodes",
];

/// Everything of the machine a run can touch, as comparable text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// One line per fact: `path exists /x`, `entry /dir/name`, `mount /p`, `cgroup /sys/fs/cgroup/h/c`,
    /// `kernel key value`, `process pid cmdline`.
    pub facts: BTreeSet<String>,
}

impl Snapshot {
    /// Reads the machine, and what belongs to the run `layout` when given (its mounts, cgroups,
    /// namespace, processes). Before a node starts there is no run to look for: take `None`, and compare
    /// with a snapshot taken with the run's layout after it is gone.
    pub fn take(layout: Option<&Layout>) -> Self {
        let host = layout.map(|l| l.host.clone()).unwrap_or_default();
        let mut facts = BTreeSet::new();
        for path in WATCHED_PATHS {
            if Path::new(path).exists() {
                facts.insert(format!("path exists {path}"));
            }
        }
        for dir in WATCHED_DIRS {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                facts.insert(format!("entry {}", entry.path().display()));
            }
        }
        for dir in [host.lib.clone(), host.run.clone()] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                facts.insert(format!("entry {}", entry.path().display()));
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for point in mountinfo.lines().filter_map(|l| l.split(' ').nth(4)) {
            if mount_of_interest(layout, point) {
                facts.insert(format!("mount {point}"));
            }
        }
        for key in KERNEL_SETTINGS {
            let value = std::fs::read_to_string(Path::new("/proc/sys").join(key)).unwrap_or_default();
            facts.insert(format!("kernel {key} {}", value.trim()));
        }
        let Some(layout) = layout else {
            return Self { facts };
        };
        for hierarchy in std::fs::read_dir(&layout.host.cgroup)
            .into_iter()
            .flatten()
            .flatten()
        {
            let cgroup = hierarchy.path().join(layout.cgroup());
            if cgroup.exists() {
                facts.insert(format!("cgroup {}", cgroup.display()));
            }
        }
        if layout.netns_path().exists() {
            facts.insert(format!("netns {}", layout.netns()));
        }
        for process in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(process.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            // The watchdog names the run too, but only in its arguments to the teardown it waits to run.
            if cmdline.contains(&layout.id)
                && !cmdline.contains("node-watchdog")
                && !cmdline.contains("teardown")
            {
                facts.insert(format!(
                    "process {} {}",
                    process.file_name().to_string_lossy(),
                    cmdline.trim()
                ));
            }
        }
        Self { facts }
    }

    /// What `after` has that `self` had not, and what it lost, as `+ fact` and `- fact` lines.
    pub fn difference(&self, after: &Self) -> Vec<String> {
        let added = after.facts.difference(&self.facts).map(|f| format!("+ {f}"));
        let removed = self.facts.difference(&after.facts).map(|f| format!("- {f}"));
        added.chain(removed).collect()
    }
}

fn mount_of_interest(layout: Option<&Layout>, point: &str) -> bool {
    let point = PathBuf::from(point.replace("\\040", " "));
    layout.is_some_and(|layout| super::layout::belongs_to(layout, &point))
        || point.starts_with("/run/netns")
        || point.starts_with("/var/lib/kubelet")
        || point.starts_with("/run/containerd")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_difference_names_what_was_added_and_lost() {
        let before = Snapshot {
            facts: [
                "kernel vm/overcommit_memory 0".to_owned(),
                "path exists /a".to_owned(),
            ]
            .into(),
        };
        let after = Snapshot {
            facts: [
                "kernel vm/overcommit_memory 1".to_owned(),
                "path exists /a".to_owned(),
            ]
            .into(),
        };
        assert_eq!(
            before.difference(&after),
            vec![
                "+ kernel vm/overcommit_memory 1".to_owned(),
                "- kernel vm/overcommit_memory 0".to_owned()
            ]
        );
        assert!(after.difference(&after).is_empty());
    }
}

//! The Dockerfile's images, built unchanged with buildah by `tools/build-dockerfile-images.sh` (cached by
//! the Dockerfile, Cargo.lock and the workspace manifests): the agent image holds what the agent needs and
//! nothing more, which is exactly what `tools/images/rootfs.sh` picks (the real-node tier's images hold
//! the same), and every image runs its binary without anything from the machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use pod_identity_test_support::tools;

/// The directory of the built images: `POD_IDENTITY_DOCKERFILE_IMAGES` (set by `cargo xtask test`), or the
/// cache.
fn images() -> PathBuf {
    if let Some(dir) = std::env::var_os("POD_IDENTITY_DOCKERFILE_IMAGES") {
        return PathBuf::from(dir);
    }
    let script = tools::repository().join("tools/build-dockerfile-images.sh");
    let output = Command::new(&script).arg("--cached").output().unwrap();
    assert!(
        output.status.success(),
        "the Dockerfile's images are not built; run `cargo xtask tools` (or the tests with `cargo xtask test`):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// Regular files and links of a list of tar entries (`./usr/bin/x`, `usr/lib/`), as `/usr/bin/x`.
fn files(entries: &str) -> BTreeSet<String> {
    entries
        .lines()
        .map(|e| e.trim_start_matches("./").trim_end_matches('/'))
        .filter(|e| !e.is_empty())
        .map(|e| format!("/{e}"))
        .collect()
}

/// Unpacks an OCI archive's layers, in order, into `root`.
fn unpack(archive: &Path, root: &Path) {
    let layout = root.with_extension("layout");
    std::fs::create_dir_all(&layout).unwrap();
    std::fs::create_dir_all(root).unwrap();
    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-xf")
        .arg(archive)
        .status()
        .unwrap();
    assert!(status.success());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let status = Command::new("tar")
            .arg("-C")
            .arg(root)
            .arg("-xf")
            .arg(blob(layer["digest"].as_str().unwrap()))
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// Every entry below `root`, as absolute paths of the image.
fn walk(root: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let relative = path.strip_prefix(root).unwrap();
            found.insert(format!("/{}", relative.display()));
            if entry.file_type().unwrap().is_dir() {
                pending.push(path);
            }
        }
    }
    found
}

fn directories_of(paths: &BTreeSet<String>) -> BTreeSet<String> {
    let mut dirs = BTreeSet::new();
    for path in paths {
        let mut current = Path::new(path).parent();
        while let Some(dir) = current {
            if dir != Path::new("/") {
                dirs.insert(dir.display().to_string());
            }
            current = dir.parent();
        }
    }
    dirs
}

#[test]
fn the_agent_image_holds_what_rootfs_sh_picks_and_nothing_more() {
    let built = images();
    let image = files(&std::fs::read_to_string(built.join("agent.files")).unwrap());
    let scratch = tempfile::tempdir().unwrap();
    let status = Command::new("sh")
        .arg(tools::repository().join("tools/images/rootfs.sh"))
        .args(["agent", scratch.path().join("rootfs").to_str().unwrap()])
        // The agent of this workspace loads the same libraries as the image's.
        .arg(tools::workspace_binary("pod-identity-agent").unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let picked = walk(&scratch.path().join("rootfs"));
    // Directories may be listed by one and implied by the other; the files and links must match.
    let image_files: BTreeSet<_> = image.difference(&directories_of(&image)).cloned().collect();
    let picked_files: BTreeSet<_> = picked.difference(&directories_of(&picked)).cloned().collect();
    let extra: Vec<_> = image_files.difference(&picked_files).collect();
    let missing: Vec<_> = picked_files.difference(&image_files).collect();
    assert!(
        extra.is_empty(),
        "the agent image holds more than rootfs.sh picks: {extra:#?}"
    );
    assert!(
        missing.is_empty(),
        "the agent image lacks what rootfs.sh picks: {missing:#?}"
    );
    assert!(image_files.contains("/usr/local/bin/pod-identity-agent"));
    for absent in ["/bin/sh", "/usr/bin/apt-get", "/usr/bin/dpkg", "/bin/bash"] {
        assert!(!image_files.contains(absent), "{absent} is in the agent image");
    }
}

#[test]
fn every_image_runs_its_binary_with_nothing_from_the_machine() {
    let built = images();
    let scratch = tempfile::tempdir().unwrap();
    for (target, argv) in [
        ("agent", vec!["/usr/local/bin/pod-identity-agent", "--version"]),
        ("agent", vec!["/usr/sbin/iptables", "--version"]),
        ("agent", vec!["/usr/sbin/iptables-legacy", "--version"]),
        ("agent", vec!["/usr/sbin/conntrack", "--version"]),
        (
            "controller",
            vec!["/usr/local/bin/pod-identity-controller", "--version"],
        ),
        (
            "emulator",
            vec!["/usr/local/bin/pod-identity-emulator", "--version"],
        ),
        ("cli", vec!["/usr/local/bin/kubectl-podidentity", "--version"]),
    ] {
        let root = scratch.path().join(target);
        if !root.exists() {
            unpack(&built.join(format!("{target}.tar")), &root);
        }
        let output = Command::new("chroot").arg(&root).args(&argv).output().unwrap();
        assert!(
            output.status.success(),
            "{target}: {} failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

//! OCI images of freshly built binaries, without a registry: a root filesystem assembled by
//! `tools/images/rootfs.sh` (the script the Dockerfile's final stages use, so both ship the same files),
//! packed as a one-layer image with `umoci`, and imported into the node's containerd with `ctr`. Packed
//! images are cached by the hash of what went into them, so an unchanged binary is not packed again.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Registry part of every image name; never resolved (pods use `imagePullPolicy: Never`).
pub const REGISTRY: &str = "pod-identity.local";

/// One image to pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    /// Repository name under [`REGISTRY`]: `agent`, `controller`, `toolbox`, `pause`.
    pub name: String,
    /// The `rootfs.sh` image kind.
    pub kind: String,
    /// The binary it carries, when the kind takes one.
    pub binary: Option<PathBuf>,
    /// `umoci config` arguments: entrypoint, user.
    pub config: Vec<String>,
}

impl ImageSpec {
    /// An image whose entrypoint is `entrypoint`, running as `user` when given.
    pub fn new(name: &str, binary: Option<PathBuf>, entrypoint: &str, user: Option<&str>) -> Self {
        let mut config = vec![format!("--config.entrypoint={entrypoint}")];
        if let Some(user) = user {
            config.push(format!("--config.user={user}"));
        }
        Self {
            name: name.into(),
            kind: name.into(),
            binary,
            config,
        }
    }
}

/// A packed image, ready to import.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedImage {
    /// `pod-identity.local/<name>:<tag>`.
    pub reference: String,
    /// Repository (`pod-identity.local/<name>`), the base name `ctr import` takes.
    pub repository: String,
    /// The OCI layout archive.
    pub archive: PathBuf,
    /// Size of the archive in bytes (the compressed image).
    pub size: u64,
}

/// The images of one tag, all packed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageSet {
    /// The tag shared by every image of the set (the chart takes one tag for all).
    pub tag: String,
    /// The images.
    pub images: Vec<PackedImage>,
}

impl ImageSet {
    /// The reference of image `name` in this set.
    pub fn reference(&self, name: &str) -> Option<&str> {
        self.images
            .iter()
            .find(|i| i.repository == format!("{REGISTRY}/{name}"))
            .map(|i| i.reference.as_str())
    }
}

/// Packs every spec under one tag derived from all of their inputs; `cache` keeps the archives.
pub fn pack_all(specs: &[ImageSpec], cache: &Path) -> Result<ImageSet> {
    let script = rootfs_script();
    let script_text = std::fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
    let mut all = ring::digest::Context::new(&ring::digest::SHA256);
    let mut keyed = Vec::new();
    for spec in specs {
        let mut one = ring::digest::Context::new(&ring::digest::SHA256);
        one.update(&script_text);
        one.update(format!("{spec:?}").as_bytes());
        if let Some(binary) = &spec.binary {
            let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
            one.update(&bytes);
        }
        let key = hex(one.finish().as_ref());
        all.update(key.as_bytes());
        keyed.push((spec, key));
    }
    let tag = format!("t{}", &hex(all.finish().as_ref())[..12]);
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut images = Vec::new();
    for (spec, key) in keyed {
        let archive = cache.join(format!("{}-{}.tar", spec.name, &key[..16]));
        if !archive.is_file() {
            pack_one(spec, &archive)?;
        }
        let size = std::fs::metadata(&archive)?.len();
        images.push(PackedImage {
            reference: format!("{REGISTRY}/{}:{tag}", spec.name),
            repository: format!("{REGISTRY}/{}", spec.name),
            archive,
            size,
        });
    }
    Ok(ImageSet { tag, images })
}

/// The script that assembles root filesystems.
pub fn rootfs_script() -> PathBuf {
    crate::tools::repository().join("tools/images/rootfs.sh")
}

/// Builds the root filesystem and packs it; the archive's single manifest is tagged `image` and renamed
/// at import time.
fn pack_one(spec: &ImageSpec, archive: &Path) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("pod-identity-image-")
        .tempdir()
        .context("creating a work directory")?;
    let rootfs = work.path().join("rootfs");
    let layout = work.path().join("layout");
    let mut build = Command::new("sh");
    build.arg(rootfs_script()).arg(&spec.kind).arg(&rootfs);
    if let Some(binary) = &spec.binary {
        build.arg(binary);
    }
    run(&mut build, "assembling the root filesystem")?;
    let image = format!("{}:image", layout.display());
    run(
        Command::new("umoci").args(["init", "--layout"]).arg(&layout),
        "umoci init",
    )?;
    run(
        Command::new("umoci").args(["new", "--image", &image]),
        "umoci new",
    )?;
    run(
        Command::new("umoci")
            .args(["insert", "--image", &image])
            .arg(&rootfs)
            .arg("/"),
        "umoci insert",
    )?;
    run(
        Command::new("umoci")
            .args(["config", "--image", &image])
            .args(&spec.config),
        "umoci config",
    )?;
    let partial = archive.with_extension("partial");
    run(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&partial)
            .arg("."),
        "archiving the image layout",
    )?;
    std::fs::rename(&partial, archive).with_context(|| format!("writing {}", archive.display()))?;
    Ok(())
}

/// Imports `set` into the containerd listening on `socket`, in the namespace the kubelet uses, under
/// each image's reference.
pub fn import(set: &ImageSet, socket: &Path) -> Result<()> {
    for image in &set.images {
        // The archive's manifest is tagged `image`; import it as <repository>:image, then name it.
        run(
            Command::new("ctr")
                .arg("--address")
                .arg(socket)
                .args(["-n", "k8s.io", "images", "import"])
                .arg("--base-name")
                .arg(&image.repository)
                .arg(&image.archive),
            "ctr images import",
        )?;
        let imported = format!("{}:image", image.repository);
        let _ = Command::new("ctr")
            .arg("--address")
            .arg(socket)
            .args(["-n", "k8s.io", "images", "rm", &image.reference])
            .output();
        run(
            Command::new("ctr").arg("--address").arg(socket).args([
                "-n",
                "k8s.io",
                "images",
                "tag",
                &imported,
                &image.reference,
            ]),
            "ctr images tag",
        )?;
        // The kubelet's image manager only counts images that carry the CRI's label.
        run(
            Command::new("ctr").arg("--address").arg(socket).args([
                "-n",
                "k8s.io",
                "images",
                "label",
                &image.reference,
                "io.cri-containerd.image=managed",
            ]),
            "ctr images label",
        )?;
    }
    Ok(())
}

/// Compiles the sandbox ("pause") process: a static program that waits for a signal and reaps orphans.
pub fn build_pause(cache: &Path) -> Result<PathBuf> {
    let source = crate::tools::repository().join("tools/images/pause.c");
    let text = std::fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
    let key = hex(ring::digest::digest(&ring::digest::SHA256, &text).as_ref());
    let binary = cache.join(format!("pause-{}", &key[..16]));
    if binary.is_file() {
        return Ok(binary);
    }
    std::fs::create_dir_all(cache)?;
    let partial = binary.with_extension("partial");
    run(
        Command::new("gcc")
            .args(["-static", "-Os", "-s", "-o"])
            .arg(&partial)
            .arg(&source),
        "compiling the pause process (gcc and libc6-dev)",
    )?;
    std::fs::rename(&partial, &binary)?;
    Ok(binary)
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("{what}: running {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_share_the_sets_tag() {
        let set = ImageSet {
            tag: "t1".into(),
            images: vec![PackedImage {
                reference: format!("{REGISTRY}/agent:t1"),
                repository: format!("{REGISTRY}/agent"),
                archive: PathBuf::from("/x.tar"),
                size: 1,
            }],
        };
        assert_eq!(set.reference("agent"), Some("pod-identity.local/agent:t1"));
        assert_eq!(set.reference("controller"), None);
    }

    #[test]
    fn the_entrypoint_and_user_go_to_the_image_config() {
        let spec = ImageSpec::new("controller", None, "/usr/local/bin/c", Some("65532:65532"));
        assert_eq!(
            spec.config,
            vec![
                "--config.entrypoint=/usr/local/bin/c",
                "--config.user=65532:65532"
            ]
        );
    }
}

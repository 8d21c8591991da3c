//! Development tasks: `cargo xtask <task>`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod demo;

#[derive(Parser)]
#[command(about = "pod-identity development tasks")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Write crds/ from the Rust types (never edit crds/ by hand).
    GenCrds {
        /// Fail instead of writing when crds/ differs from what the types generate.
        #[arg(long)]
        check: bool,
    },
    /// Build (or find in the cache) what the tests run against: etcd and the Kubernetes binaries,
    /// Helm, Python environments with the official Azure SDKs and the Azure CLI, and the Dockerfile's
    /// images. Prints the environment that points the tests at them.
    Tools,
    /// Run the whole system on this machine (as root) and show a bound pod getting a token and an
    /// unbound one refused.
    Demo,
    /// Run every test: builds the tools if needed, then `cargo test --workspace`.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
}

/// Debian packages the tests and the demo run: the network tiers' tools, the real node's parts
/// (containerd, runc, the CNI plugins, nsenter), image packing (umoci; busybox for test pods), openssl for
/// the API servers' RSA service-account keys (Entra accepts only RSA-signed federated tokens), and for
/// the tests alone, buildah and debootstrap to build the Dockerfile.
const DEMO_PACKAGES: &[&str] = &[
    "openssl",
    "iproute2",
    "iptables",
    "conntrack",
    "curl",
    "util-linux",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "umoci",
    "busybox-static",
    "python3-venv",
];
const TEST_PACKAGES: &[&str] = &["buildah", "debootstrap"];

fn main() -> Result<()> {
    let root = workspace_root();
    match Args::parse().task {
        Task::GenCrds { check } => gen_crds(&root, check),
        Task::Tools => {
            ensure_packages(&[DEMO_PACKAGES, TEST_PACKAGES].concat())?;
            for (name, value) in tools(&root, Images::Dockerfile)? {
                println!("export {name}={}", value.display());
            }
            Ok(())
        }
        Task::Test { cargo_args } => test(&root, &cargo_args),
        Task::Demo => {
            // Builds what is missing; the demo then finds the binaries in the cache.
            ensure_packages(DEMO_PACKAGES)?;
            tools(&root, Images::None)?;
            tokio::runtime::Runtime::new()?.block_on(demo::run(&root))
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn gen_crds(root: &Path, check: bool) -> Result<()> {
    let generated = pod_identity_api::crds::render_yaml()?;
    for relative in [
        pod_identity_api::crds::CRDS_PATH,
        pod_identity_api::crds::CHART_CRDS_PATH,
    ] {
        let path = root.join(relative);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == generated {
            println!("{} is up to date", path.display());
            continue;
        }
        if check {
            bail!(
                "{} differs from the Rust types; run `cargo xtask gen-crds`",
                path.display()
            );
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, &generated).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Whether [`tools`] builds the Dockerfile's images (long when cold; the demo packs its own).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Images {
    Dockerfile,
    None,
}

/// Builds (or finds in the cache) every tool the tests need, as environment variables for them.
fn tools(root: &Path, images: Images) -> Result<Vec<(&'static str, PathBuf)>> {
    let mut tools = vec![
        (
            "POD_IDENTITY_CONTROL_PLANE_BIN",
            cached_build(root, "build-control-plane.sh")?,
        ),
        ("POD_IDENTITY_HELM", cached_build(root, "build-helm.sh")?),
        (
            "POD_IDENTITY_PYTHON",
            cached_build(root, "setup-python.sh")?.join("bin").join("python"),
        ),
        (
            "POD_IDENTITY_AZ",
            cached_build_with(root, "setup-python.sh", &["azure-cli-requirements.txt"])?
                .join("bin")
                .join("az"),
        ),
    ];
    if images == Images::Dockerfile {
        tools.push((
            "POD_IDENTITY_DOCKERFILE_IMAGES",
            cached_build(root, "build-dockerfile-images.sh")?,
        ));
    }
    Ok(tools)
}

/// Installs the Debian packages of `wanted` that are missing (as root, with apt-get), or says which to
/// install.
fn ensure_packages(wanted: &[&str]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|package| {
            !Command::new("dpkg")
                .args(["-s", package])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = Command::new("apt-get")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !root || !apt {
        bail!(
            "these Debian packages are needed: apt-get install {}",
            missing.join(" ")
        );
    }
    eprintln!("installing {}", missing.join(" "));
    let update = Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed");
    }
    let install = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !install.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// Runs a build script of `tools/`, which prints the path of what it built (or found cached).
fn cached_build(root: &Path, script: &str) -> Result<PathBuf> {
    cached_build_with(root, script, &[])
}

/// The same with arguments naming files of `tools/`.
fn cached_build_with(root: &Path, script: &str, tool_files: &[&str]) -> Result<PathBuf> {
    let output = Command::new(root.join("tools").join(script))
        .args(tool_files.iter().map(|f| root.join("tools").join(f)))
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running tools/{script}"))?;
    if !output.status.success() {
        bail!("tools/{script} failed");
    }
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

fn test(root: &Path, cargo_args: &[String]) -> Result<()> {
    ensure_packages(&[DEMO_PACKAGES, TEST_PACKAGES].concat())?;
    let tools = tools(root, Images::Dockerfile)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // End-to-end tests run the binaries as processes; `cargo test` builds only the binaries of the
    // package under test, so build them all first.
    let status = Command::new(&cargo)
        .current_dir(root)
        .args(["build", "--workspace", "--bins"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the binaries failed");
    }
    let status = Command::new(&cargo)
        .current_dir(root)
        .args(["test", "--workspace"])
        .args(cargo_args)
        .envs(tools)
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("tests failed");
    }
    Ok(())
}

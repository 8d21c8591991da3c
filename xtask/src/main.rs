//! Development tasks: `cargo xtask <task>`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

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
    /// Build (or find in the cache) the kube-apiserver and etcd the integration tests run against.
    ControlPlane,
    /// Run every test: builds the control plane if needed, then `cargo test --workspace`.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let root = workspace_root();
    match Args::parse().task {
        Task::GenCrds { check } => gen_crds(&root, check),
        Task::ControlPlane => {
            println!("{}", control_plane(&root)?.display());
            Ok(())
        }
        Task::Test { cargo_args } => test(&root, &cargo_args),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn gen_crds(root: &Path, check: bool) -> Result<()> {
    let path = root.join(pod_identity_api::crds::CRDS_PATH);
    let generated = pod_identity_api::crds::render_yaml()?;
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current == generated {
        println!("{} is up to date", path.display());
        return Ok(());
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
    std::fs::write(&path, generated).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn control_plane(root: &Path) -> Result<PathBuf> {
    let output = Command::new(root.join("tools").join("build-control-plane.sh"))
        .output()
        .context("running tools/build-control-plane.sh")?;
    if !output.status.success() {
        bail!(
            "building the control plane failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

fn test(root: &Path, cargo_args: &[String]) -> Result<()> {
    let bin = control_plane(root)?;
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(["test", "--workspace"])
        .args(cargo_args)
        .env("POD_IDENTITY_CONTROL_PLANE_BIN", &bin)
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("tests failed");
    }
    Ok(())
}

//! Finding the binaries built by the scripts in `tools/`: from an environment variable (set by
//! `cargo xtask test`), or in the build cache. Missing means the setup is broken: the error says what
//! to run, and the test fails.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Environment variable naming the Helm binary.
pub const HELM_ENV: &str = "POD_IDENTITY_HELM";

/// The Helm client the chart is tested with.
pub fn helm() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(HELM_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{HELM_ENV} is {}, which is not a file", path.display());
        }
        return Ok(path);
    }
    cached("build-helm.sh", "helm", "cargo xtask tools")
}

/// Runs `tools/<script> --cached`, which prints the path of what it built, or fails if it has not.
pub(crate) fn cached(script: &str, what: &str, how: &str) -> Result<PathBuf> {
    let script = repository().join("tools").join(script);
    let output = Command::new(&script)
        .arg("--cached")
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{what} is not built. Run `{how}` once, or run the tests with `cargo xtask test`.\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

/// A binary of the workspace, built next to the running test (`cargo xtask test` builds them all
/// first; plain `cargo test` builds only those of the package under test).
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable has no target directory")?
        .join(name);
    if !path.is_file() {
        bail!(
            "{} is not built; run the tests with `cargo xtask test`",
            path.display()
        );
    }
    Ok(path)
}

/// Where slow builds are cached, keyed by their inputs: `POD_IDENTITY_CACHE`, else
/// `$XDG_CACHE_HOME/pod-identity`, else `~/.cache/pod-identity` (the same place as the scripts in `tools/`).
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("POD_IDENTITY_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("pod-identity")
}

/// Root of the repository this crate was built from.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

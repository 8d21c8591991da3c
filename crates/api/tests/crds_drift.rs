//! `crds/` is generated from the types; this fails when the two have drifted apart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn checked_in_crds_match_the_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(pod_identity_api::crds::CRDS_PATH);
    let checked_in =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let generated = pod_identity_api::crds::render_yaml().expect("rendering the CRDs");
    assert!(
        checked_in == generated,
        "{} differs from what the Rust types generate; run `cargo xtask gen-crds` and commit the result",
        path.display()
    );
}

//! `crds/` is generated from the types; this fails when the two have drifted apart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn checked_in_crds_match_the_types() {
    let generated = pod_identity_api::crds::render_yaml().expect("rendering the CRDs");
    for relative in [
        pod_identity_api::crds::CRDS_PATH,
        pod_identity_api::crds::CHART_CRDS_PATH,
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(relative);
        let checked_in =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert!(
            checked_in == generated,
            "{} differs from what the Rust types generate; run `cargo xtask gen-crds` and commit the result",
            path.display()
        );
    }
}

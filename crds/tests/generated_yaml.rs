//! The committed CRD YAML must be exactly what the Rust types generate.

use std::path::Path;

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // The raw CRDs and the Helm chart's copy.
    for dir in ["crds", "charts/ballast/crds"] {
        for (file, crd) in ballast_crds::all() {
            let generated = ballast_crds::to_yaml(&crd).expect("CRD serialises to YAML");
            let committed = std::fs::read_to_string(root.join(dir).join(file))
                .unwrap_or_else(|e| panic!("{dir}/{file} is missing ({e}): run `make crds`"));
            assert!(
                committed == generated,
                "{dir}/{file} differs from what the Rust types generate: run `make crds` and commit the result"
            );
        }
    }
}

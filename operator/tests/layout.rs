//! The operator builds without the data plane: neither `ballast-worker` nor
//! DataFusion is among the crates its binary is built from, so a change to
//! the compute engine never rebuilds it and its binary carries none of it.

use std::collections::BTreeSet;
use std::process::Command;

/// The packages `package` is built from on this platform: its normal and build
/// dependencies, transitively (dev-dependencies build tests, not the binary).
fn built_from(package: &str) -> anyhow::Result<BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "--prefix",
            "none",
            "--edges",
            "normal,build",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each line: `name vX.Y.Z[ (path)][ (*)]`.
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

#[test]
fn the_operator_is_built_from_neither_the_worker_crate_nor_datafusion() -> anyhow::Result<()> {
    let operator = built_from("ballast-operator")?;
    assert!(
        operator.contains("ballast-node"),
        "the shared crate is linked: {operator:?}"
    );
    let data_plane: Vec<&String> = operator
        .iter()
        .filter(|n| *n == "ballast-worker" || n.starts_with("datafusion") || n.starts_with("arrow"))
        .collect();
    assert!(data_plane.is_empty(), "the operator is built from {data_plane:?}");
    // The check itself sees the data plane where it is.
    assert!(built_from("ballast-worker")?.contains("datafusion"));
    Ok(())
}

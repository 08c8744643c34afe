//! Writes the CRD YAML of every Ballast kind into the given directories
//! (`make crds` → `crds/` and the Helm chart's `charts/ballast/crds/`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut dirs: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        dirs.push(PathBuf::from("crds"));
    }
    for (dir, (file, crd)) in dirs
        .iter()
        .flat_map(|d| ballast_crds::all().into_iter().map(move |c| (d, c)))
    {
        let path = dir.join(file);
        let written = ballast_crds::to_yaml(&crd)
            .map_err(|e| e.to_string())
            .and_then(|yaml| std::fs::write(&path, yaml).map_err(|e| e.to_string()));
        if let Err(error) = written {
            eprintln!("crdgen: writing {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
        println!("crdgen: wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

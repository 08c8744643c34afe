//! The stack's real Kubernetes node (e2e/stack/node): images built here and
//! imported into its containerd, and what that containerd runs.

use std::path::{Path, PathBuf};

use crate::command::run;
use crate::{Stack, StackError};

/// Where the node is and how its pods reach the stack.
#[derive(Clone, Debug)]
pub struct Node {
    /// The Node's name.
    pub name: String,
    /// The scheduler that places pods on it (pods name it in `schedulerName`).
    pub scheduler: String,
    /// The address its pods reach the stack's servers at, on the same ports.
    pub gateway: String,
    /// Kafka's bootstrap address for its pods.
    pub kafka_bootstrap: String,
    containerd: String,
}

impl Node {
    /// The node `stack.sh up` started.
    pub fn of(stack: &Stack) -> Result<Self, StackError> {
        Ok(Self {
            name: stack.get("BALLAST_NODE_NAME")?,
            scheduler: stack.get("BALLAST_NODE_SCHEDULER")?,
            gateway: stack.get("BALLAST_NODE_GATEWAY")?,
            kafka_bootstrap: stack.get("BALLAST_NODE_KAFKA_BOOTSTRAP")?,
            containerd: stack.get("BALLAST_NODE_CONTAINERD")?,
        })
    }

    /// `host:port` of a stack server (`127.0.0.1:port`) as the node's pods reach it.
    pub fn reach(&self, address: &str) -> String {
        let port = address.rsplit(':').next().unwrap_or(address);
        format!("{}:{port}", self.gateway)
    }

    /// Builds the operator's and the worker's images with `image/build.sh`
    /// from the binaries in `binaries` (tagged `tag`, written under `out`) and
    /// imports them into the node's containerd; the archives written.
    pub fn build_and_import_images(
        &self,
        binaries: &Path,
        tag: &str,
        out: &Path,
    ) -> Result<Vec<PathBuf>, StackError> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../image/build.sh");
        let binaries = binaries.display().to_string();
        let out_dir = out.display().to_string();
        let env = [
            ("BALLAST_IMAGE_BIN_DIR", binaries.as_str()),
            ("BALLAST_IMAGE_OUT", out_dir.as_str()),
            ("BALLAST_IMAGE_TAG", tag),
        ];
        run("bash", &[script], &env, None, "image/build.sh", "")?;
        let archives: Vec<PathBuf> = std::fs::read_dir(out)
            .map_err(|e| StackError::Script {
                command: format!("listing {out_dir}"),
                message: e.to_string(),
            })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(&format!("-{tag}.oci.tar")))
            })
            .collect();
        for archive in &archives {
            let archive = archive.display().to_string();
            self.ctr(&["images", "import", &archive])?;
        }
        Ok(archives)
    }

    /// The ids of the containers the node's containerd holds for pods of `namespace`.
    pub fn containers_of(&self, namespace: &str) -> Result<Vec<String>, StackError> {
        let filter = format!("labels.\"io.kubernetes.pod.namespace\"=={namespace}");
        let listed = self.ctr(&["containers", "ls", "-q", &filter])?;
        Ok(listed.lines().map(str::to_owned).collect())
    }

    fn ctr(&self, args: &[&str]) -> Result<String, StackError> {
        let mut all = vec!["-a", self.containerd.as_str(), "-n", "k8s.io"];
        all.extend_from_slice(args);
        Ok(run(
            "ctr",
            &all,
            &[],
            None,
            "ctr",
            ": run `make stack-up`, which installs containerd",
        )?
        .stdout)
    }
}

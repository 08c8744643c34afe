//! The collector's checkpoint: the binlog position up to which everything is
//! acknowledged downstream, kept in a Lease's annotations so that it survives
//! pod restarts (and moves with the pipeline, not with a pod).

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

const FILE: &str = "ballast.dev/binlog-file";
const POS: &str = "ballast.dev/binlog-position";

/// A binlog position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// Binlog file name.
    pub file: String,
    /// Position in the file.
    pub pos: u64,
}

/// Reads and writes a pipeline's checkpoint.
pub struct Checkpoints {
    api: Api<Lease>,
    name: String,
    pipeline: String,
}

impl Checkpoints {
    /// The checkpoint of `pipeline` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, pipeline: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: format!("{pipeline}-collector-checkpoint"),
            pipeline: pipeline.to_owned(),
        }
    }

    /// The saved position, if any.
    pub async fn load(&self) -> Result<Option<Position>, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(None);
        };
        let annotations = lease.metadata.annotations.unwrap_or_default();
        let pos = annotations.get(POS).and_then(|p| p.parse().ok());
        Ok(annotations
            .get(FILE)
            .cloned()
            .zip(pos)
            .map(|(file, pos)| Position { file, pos }))
    }

    /// Saves `position`.
    pub async fn save(&self, position: &Position) -> Result<(), kube::Error> {
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                // The admission policy lets a pipeline's workers write only its own Leases.
                "labels": {crate::membership::PIPELINE_LABEL: self.pipeline},
                "annotations": {FILE: position.file, POS: position.pos.to_string()},
            },
        });
        self.api
            .patch(
                &self.name,
                &PatchParams::apply("ballast-collector").force(),
                &Patch::Apply(&lease),
            )
            .await?;
        Ok(())
    }
}

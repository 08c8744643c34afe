//! Where the active master keeps its task state: a ConfigMap
//! `<pipeline>-master-state` holding the snapshot as JSON. Every save is a
//! compare-and-swap on the resourceVersion, so a deposed master that still
//! believes it leads fails its next save and stops. The pipeline owns it: it
//! goes with the pipeline, and a pipeline created again under the same name
//! starts planning afresh instead of resuming a deleted one's windows.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use ballast_node::master_report;

use super::tasks::Snapshot;

const KEY: &str = "state.json";

/// Largest state the master writes: a ConfigMap holds at most 1 MiB. The
/// table's bound on open tasks keeps the state far below; this is the
/// backstop that says so loudly instead of failing on the API server.
pub const MAX_STATE_BYTES: usize = 900 * 1024;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The API server failed: retry.
    #[error("master state {name}: {source}")]
    Api {
        /// The ConfigMap.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Someone else wrote the state since this master read it: it is no longer the leader.
    #[error("master state {name} was written by another master")]
    Deposed {
        /// The ConfigMap.
        name: String,
    },
    /// The state is too large for a ConfigMap: it is not written (the
    /// previous one stands), and the master says so.
    #[error("master state {name} would be {bytes} bytes, over the {max} a ConfigMap can hold; not saved")]
    TooLarge {
        /// The ConfigMap.
        name: String,
        /// The state's size.
        bytes: usize,
        /// The bound.
        max: usize,
    },
    /// The stored state is not a snapshot.
    #[error("master state {name} is unreadable: {source}")]
    Corrupt {
        /// The ConfigMap.
        name: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// The name of a pipeline's state ConfigMap.
pub fn name(pipeline: &str) -> String {
    format!("{pipeline}-master-state")
}

/// Reads and writes one pipeline's master state.
pub struct StateStore {
    api: Api<ConfigMap>,
    name: String,
    resource_version: Option<String>,
    owner: Option<OwnerReference>,
}

impl StateStore {
    /// The store of `pipeline` in `namespace`; `owner` (the pipeline) is set
    /// on the ConfigMap so that it is deleted with it.
    pub fn new(client: kube::Client, namespace: &str, pipeline: &str, owner: Option<OwnerReference>) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name(pipeline),
            resource_version: None,
            owner,
        }
    }

    fn api_error(&self) -> impl Fn(kube::Error) -> StateError + '_ {
        |source| StateError::Api {
            name: self.name.clone(),
            source,
        }
    }

    /// The persisted snapshot (empty when none was saved yet).
    pub async fn load(&mut self) -> Result<Snapshot, StateError> {
        let Some(cm) = self.api.get_opt(&self.name).await.map_err(self.api_error())? else {
            self.resource_version = None;
            return Ok(Snapshot::default());
        };
        self.resource_version = cm.metadata.resource_version.clone();
        let corrupt = |source| StateError::Corrupt {
            name: self.name.clone(),
            source,
        };
        let data = cm.data.unwrap_or_default();
        let mut snapshot: Snapshot = match data.get(KEY) {
            Some(json) => serde_json::from_str(json).map_err(corrupt)?,
            None => Snapshot::default(),
        };
        if let Some(json) = data.get(master_report::KEY) {
            snapshot.report = serde_json::from_str(json).map_err(corrupt)?;
        }
        Ok(snapshot)
    }

    /// Saves `snapshot` if nobody else wrote since the last load or save.
    pub async fn save(&mut self, snapshot: &Snapshot) -> Result<(), StateError> {
        let corrupt = |source| StateError::Corrupt {
            name: self.name.clone(),
            source,
        };
        let json = serde_json::to_string(snapshot).map_err(corrupt)?;
        let report = serde_json::to_string(&snapshot.report).map_err(corrupt)?;
        let bytes = json.len() + report.len();
        if bytes > MAX_STATE_BYTES {
            return Err(StateError::TooLarge {
                name: self.name.clone(),
                bytes,
                max: MAX_STATE_BYTES,
            });
        }
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: self.resource_version.clone(),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "ballast-worker".to_owned(),
                    )]
                    .into(),
                ),
                owner_references: self.owner.clone().map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            data: Some([(KEY.to_owned(), json), (master_report::KEY.to_owned(), report)].into()),
            ..ConfigMap::default()
        };
        let params = PostParams::default();
        let result = match &self.resource_version {
            None => self.api.create(&params, &cm).await,
            Some(_) => self.api.replace(&self.name, &params, &cm).await,
        };
        match result {
            Ok(saved) => {
                self.resource_version = saved.metadata.resource_version;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Err(StateError::Deposed {
                name: self.name.clone(),
            }),
            Err(e) => Err(self.api_error()(e)),
        }
    }
}

/// Saves one snapshot, retrying API failures with back-off; once stopping,
/// gives up after a few attempts so that shutdown is never held up.
async fn save(
    store: &mut StateStore,
    snapshot: &Snapshot,
    stop: &CancellationToken,
) -> Result<(), StateError> {
    let mut delay = Duration::from_millis(200);
    for attempt in 1.. {
        match store.save(snapshot).await {
            Ok(()) => return Ok(()),
            Err(error @ StateError::TooLarge { .. }) => {
                // Not a reason to stop leading: the previous state stands, and
                // a standby would resume from it. Loud, every time.
                tracing::error!(%error, "the master state is not saved");
                return Ok(());
            }
            Err(StateError::Api { name, source }) => {
                tracing::warn!(%name, error = %source, attempt, "saving the master state failed; retrying");
                if stop.is_cancelled() && attempt >= 3 {
                    return Ok(());
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(other) => return Err(other),
        }
    }
    Ok(())
}

/// Saves each new snapshot; stops with `Deposed` when another master wrote.
pub async fn persist(
    mut store: StateStore,
    mut snapshots: watch::Receiver<Snapshot>,
    stop: CancellationToken,
) -> Result<(), StateError> {
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        save(&mut store, &snapshot, &stop).await?;
        tokio::select! {
            () = stop.cancelled() => {
                // The final snapshot, if one arrived since.
                if snapshots.has_changed().unwrap_or(false) {
                    let last = snapshots.borrow_and_update().clone();
                    save(&mut store, &last, &stop).await?;
                }
                return Ok(());
            }
            changed = snapshots.changed() => if changed.is_err() { return Ok(()) },
        }
        // Coalesce: at most a few saves a second.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

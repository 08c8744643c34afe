//! Following the modes the operator publishes in the pipeline's status: a
//! Kubernetes watch (not a mounted ConfigMap, which the kubelet refreshes far
//! too slowly for failover). An unreachable API server keeps the last modes.

use std::sync::Arc;

use ballast_crds::analytics_pipeline::ShedDay;
use ballast_crds::{
    AnalyticsPipeline, Dependency, FailingWindow, Mode, PublishedSql, SlaveSet, SourceSchema,
};
use futures::{StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The published mode and epoch of each dependency (Normal at epoch 0 until
/// published), and the slave set a Degraded KV epoch routes over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Modes {
    modes: Vec<Published>,
    shed: Shedding,
    slaves: Option<SlaveSet>,
    source_schema: Option<Arc<SourceSchema>>,
    sql: Option<Arc<PublishedSql>>,
    failing: Arc<[FailingWindow]>,
}

/// One dependency's published mode.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Published {
    dependency: Dependency,
    mode: Mode,
    epoch: i64,
    /// When it entered the mode, Unix milliseconds (if published).
    since_ms: Option<i64>,
}

/// What the backup intake sheds, as published: which merchants' days are incomplete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shedding {
    /// The share of merchants shed now, in basis points.
    pub level: i32,
    /// The last day merchants were shed, and the most shed that day.
    pub last_day: Option<ShedDay>,
}

impl Modes {
    /// When `dependency` entered its mode, in milliseconds since the Unix epoch (if published).
    pub fn since_ms(&self, dependency: Dependency) -> Option<i64> {
        self.published(dependency).and_then(|p| p.since_ms)
    }

    fn published(&self, dependency: Dependency) -> Option<&Published> {
        self.modes.iter().find(|p| p.dependency == dependency)
    }

    /// The windows whose computation keeps failing, as published.
    pub fn failing_windows(&self) -> &[FailingWindow] {
        &self.failing
    }

    /// These modes with `failing` as the published failing windows.
    pub fn with_failing(mut self, failing: Vec<FailingWindow>) -> Self {
        self.failing = failing.into();
        self
    }

    /// What the backup intake sheds now and shed last.
    pub fn shedding(&self) -> &Shedding {
        &self.shed
    }

    /// These modes with `shed` as the published shedding.
    pub fn with_shedding(mut self, shed: Shedding) -> Self {
        self.shed = shed;
        self
    }

    /// The mode and epoch of `dependency`.
    pub fn get(&self, dependency: Dependency) -> (Mode, i64) {
        self.published(dependency)
            .map_or((Mode::Normal, 0), |p| (p.mode, p.epoch))
    }

    /// The slave set published with a Degraded KV epoch, if any.
    pub fn slave_set(&self) -> Option<&SlaveSet> {
        self.slaves.as_ref()
    }

    /// The last SQL the operator accepted, if any.
    pub fn sql(&self) -> Option<Arc<PublishedSql>> {
        self.sql.clone()
    }

    /// The source tables' columns and types the operator published, if read yet.
    pub fn source_schema(&self) -> Option<Arc<SourceSchema>> {
        self.source_schema.clone()
    }

    /// These modes with `dependency` set to `mode` at `epoch`.
    pub fn with(mut self, dependency: Dependency, mode: Mode, epoch: i64) -> Self {
        self.modes.retain(|p| p.dependency != dependency);
        self.modes.push(Published {
            dependency,
            mode,
            epoch,
            since_ms: None,
        });
        self
    }

    /// These modes with `dependency` having entered its mode at `since_ms`.
    pub fn with_since(mut self, dependency: Dependency, since_ms: i64) -> Self {
        if let Some(p) = self.modes.iter_mut().find(|p| p.dependency == dependency) {
            p.since_ms = Some(since_ms);
        }
        self
    }

    /// These modes with `set` as the published slave set.
    pub fn with_slaves(mut self, set: SlaveSet) -> Self {
        self.slaves = Some(set);
        self
    }

    fn of(ap: &AnalyticsPipeline) -> Self {
        let status = ap.status.clone().unwrap_or_default();
        Self {
            modes: Dependency::ALL
                .into_iter()
                .filter_map(|d| {
                    status.dependencies.get(d).map(|s| Published {
                        dependency: d,
                        mode: s.mode,
                        epoch: s.epoch,
                        since_ms: Some(s.since.0.as_millisecond()),
                    })
                })
                .collect(),
            shed: Shedding {
                level: status.shed_level,
                last_day: status.last_shed_day,
            },
            slaves: status.slave_set,
            source_schema: status.source_schema.map(Arc::new),
            sql: status.sql.map(Arc::new),
            failing: status.failing_windows.into(),
        }
    }
}

/// `kv=Degraded@3 mq=Normal@0 slaves=3.2:s-0,s-1 failing=1`: each published
/// mode with its epoch, then the slave set as epoch.generation and members,
/// then how many windows keep failing.
impl std::fmt::Display for Modes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.modes.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{}={:?}@{}", p.dependency.as_str(), p.mode, p.epoch)?;
        }
        if let Some(set) = &self.slaves {
            write!(
                f,
                " slaves={}.{}:{}",
                set.epoch,
                set.generation,
                set.members.join(",")
            )?;
        }
        if !self.failing.is_empty() {
            write!(f, " failing={}", self.failing.len())?;
        }
        Ok(())
    }
}

/// Watches `pipeline` in `namespace` until `shutdown`; the receiver holds its
/// latest modes. Each change is logged: it is when this worker switches paths.
pub fn follow(
    client: kube::Client,
    namespace: &str,
    pipeline: &str,
    shutdown: CancellationToken,
) -> watch::Receiver<Modes> {
    let (tx, rx) = watch::channel(Modes::default());
    let api: Api<AnalyticsPipeline> = Api::namespaced(client, namespace);
    let selector = watcher::Config::default().fields(&format!("metadata.name={pipeline}"));
    tokio::spawn(async move {
        let mut updates = watcher(api, selector).default_backoff().applied_objects().boxed();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                next = updates.try_next() => match next {
                    Ok(Some(ap)) => {
                        tx.send_if_modified(|current| {
                            let modes = Modes::of(&ap);
                            let changed = *current != modes;
                            if changed {
                                tracing::info!(%modes, "following the published modes");
                                *current = modes;
                            }
                            changed
                        });
                    }
                    Ok(None) => return,
                    Err(error) => tracing::warn!(%error, "watching the pipeline's modes failed; keeping the last ones"),
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_display_as_dependency_mode_and_epoch() {
        let modes =
            Modes::default()
                .with(Dependency::Kv, Mode::Degraded, 3)
                .with(Dependency::Mq, Mode::Normal, 0);
        assert_eq!(modes.to_string(), "kv=Degraded@3 mq=Normal@0");
        assert_eq!(Modes::default().to_string(), "");
        let set = SlaveSet {
            epoch: 3,
            generation: 2,
            members: vec!["s-0".into(), "s-1".into()],
        };
        assert_eq!(
            modes.with_slaves(set).to_string(),
            "kv=Degraded@3 mq=Normal@0 slaves=3.2:s-0,s-1"
        );
    }
}

//! Following the MemberStore: one Kubernetes watch on the object, which
//! puts its flow-control rules and admitted callers in force, passes on
//! the MySQL and cache modes the operator publishes, and moves the service to the
//! Elasticsearch and the MySQL master of the data centres the operator
//! promotes (the master first: the mode published with it is the new
//! master's). An unreachable API server keeps what is in force.

use std::sync::Arc;

use ballast_crds::{MemberStore, Mode};
use futures::{StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::caller::Known;
use super::service::Members;

/// How soon a move to a promoted cluster or master that failed is tried
/// again: every write waits for it, so a try is cheap against what a
/// second of refused writes costs.
const RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// The MySQL mode `store` publishes (Normal if none). Pure.
pub fn published_mysql(store: &MemberStore) -> Mode {
    store
        .status
        .as_ref()
        .and_then(|s| s.mysql.as_ref())
        .map_or(Mode::Normal, |d| d.mode)
}

/// Puts what `store` says in force in `members` and `mode`.
pub fn apply(
    store: &MemberStore,
    members: &Members,
    deadline: std::time::Duration,
    mode: &watch::Sender<Mode>,
) {
    if members.flow().reload(super::rules(store, deadline)) {
        tracing::info!("flow-control rules reloaded");
    }
    members.set_known(Known::of(&store.spec.flow_control));
    members.set_cache_modes(store);
    members.set_epoch(store);
    mode.send_if_modified(|current| {
        let published = published_mysql(store);
        let changed = *current != published;
        if changed {
            tracing::warn!(from = ?*current, to = ?published, "published MySQL mode changed");
            *current = published;
        }
        changed
    });
}

/// Moves `members` to the Elasticsearch of the data centre `store` publishes
/// as active, under its epoch, if it is not there: retried every [`RETRY`]
/// until it is, or a newer MemberStore or `shutdown` comes (the caller then
/// decides again).
async fn activate(
    store: &MemberStore,
    config: &super::Config,
    members: &Members,
    shutdown: &CancellationToken,
) {
    let active = store.active_data_center();
    let epoch = store.epoch();
    let current = members.stores().search();
    if current.data_center == active {
        if current.epoch != epoch {
            // Promoted away and back while this process looked elsewhere:
            // the same cluster, under the new epoch.
            tracing::warn!(dc = %active, from = current.epoch, to = epoch, "the epoch changed");
            let mut search = (*current).clone();
            search.epoch = epoch;
            members.stores().search.store(Arc::new(search));
        }
        return;
    }
    let Some(dc) = store.spec.data_centers.iter().find(|dc| dc.name == active) else {
        tracing::error!(%active, "the published active data centre is not one of the MemberStore's");
        return;
    };
    let promoted = || super::search_of(config, dc, epoch);
    if let Some(search) = until_usable("Elasticsearch", active, shutdown, promoted).await {
        tracing::warn!(from = %current.data_center, to = %active, epoch, "the active Elasticsearch changed: writes and reads move");
        members.stores().search.store(Arc::new(search));
    }
}

/// What `connect` makes of the promoted `what` of data centre `dc`, tried
/// again every [`RETRY`] until it succeeds; `None` if `shutdown` came first.
async fn until_usable<T, E, F, Fut>(
    what: &str,
    dc: &str,
    shutdown: &CancellationToken,
    connect: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        match connect().await {
            Ok(usable) => return Some(usable),
            Err(error) => tracing::warn!(%dc, %error, "the promoted {what} is not usable yet; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Moves `members` to the MySQL master `store` publishes, if it is not
/// there: retried every [`RETRY`] until it is, or `shutdown` comes.
async fn relocate(
    store: &MemberStore,
    config: &super::Config,
    members: &Members,
    shutdown: &CancellationToken,
) {
    let master = store.mysql_master();
    let current = members.stores().primary();
    if current.data_center == master {
        return;
    }
    let Some(dc) = store.spec.data_centers.iter().find(|dc| dc.name == master) else {
        tracing::error!(%master, "the published MySQL master is not one of the MemberStore's data centres");
        return;
    };
    let promoted = || super::primary_of(config, store, dc);
    if let Some(primary) = until_usable("MySQL master", master, shutdown, promoted).await {
        tracing::warn!(from = %current.data_center, to = %master, "the MySQL master changed: writes move");
        members.stores().primary.store(Arc::new(primary));
    }
}

/// Watches the MemberStore of `config` until `shutdown`.
pub fn follow(
    api: Api<MemberStore>,
    config: super::Config,
    members: Arc<Members>,
    mode: watch::Sender<Mode>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let selector = watcher::Config::default().fields(&format!("metadata.name={}", config.store));
    let deadline = members.timing.deadline;
    tokio::spawn(async move {
        let mut updates = watcher(api, selector).default_backoff().applied_objects().boxed();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                next = updates.try_next() => match next {
                    Ok(Some(store)) => {
                        relocate(&store, &config, &members, &shutdown).await;
                        apply(&store, &members, deadline, &mode);
                        activate(&store, &config, &members, &shutdown).await;
                    }
                    Ok(None) => return,
                    Err(error) => tracing::warn!(%error, "watching the MemberStore failed; keeping what is in force"),
                }
            }
        }
    })
}

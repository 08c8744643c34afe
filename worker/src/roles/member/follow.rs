//! Following the MemberStore: one Kubernetes watch on the object, which
//! puts its flow-control rules and admitted callers in force and passes on
//! the MySQL mode the operator publishes. An unreachable API server keeps
//! what is in force.

use std::sync::Arc;

use ballast_crds::{MemberStore, Mode};
use futures::{StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::caller::Known;
use super::service::Members;

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

/// Watches MemberStore `name` of `api` until `shutdown`.
pub fn follow(
    api: Api<MemberStore>,
    name: &str,
    members: Arc<Members>,
    mode: watch::Sender<Mode>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let selector = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let deadline = members.timing.deadline;
    tokio::spawn(async move {
        let mut updates = watcher(api, selector).default_backoff().applied_objects().boxed();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                next = updates.try_next() => match next {
                    Ok(Some(store)) => apply(&store, &members, deadline, &mode),
                    Ok(None) => return,
                    Err(error) => tracing::warn!(%error, "watching the MemberStore failed; keeping what is in force"),
                }
            }
        }
    })
}

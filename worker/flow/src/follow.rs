//! Following the custom resource the rules come from: a Kubernetes watch on
//! one object, reloading the flow whenever the rules it yields change. An
//! unreachable API server keeps the rules in force.

use std::fmt::Debug;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use governor::clock::Clock;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::{Flow, Rules};

/// Watches the object `name` of `api` until `shutdown`, and puts the rules
/// `rules_of` reads from it in force in `flow` each time they change (a
/// change elsewhere in the object reloads nothing).
pub fn follow<K, C>(
    api: Api<K>,
    name: &str,
    flow: Arc<Flow<C>>,
    rules_of: fn(&K) -> Rules,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    let selector = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let name = name.to_owned();
    tokio::spawn(async move {
        let mut updates = watcher(api, selector).default_backoff().applied_objects().boxed();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                next = updates.try_next() => match next {
                    Ok(Some(object)) => {
                        if flow.reload(rules_of(&object)) {
                            tracing::info!(resource = %name, "flow-control rules reloaded");
                        }
                    }
                    Ok(None) => return,
                    Err(error) => tracing::warn!(resource = %name, %error, "watching the flow-control rules failed; keeping the rules in force"),
                }
            }
        }
    })
}

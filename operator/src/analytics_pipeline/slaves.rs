//! Slave membership changes that a published slave set must follow: a watch on
//! the slave Leases of every pipeline that triggers a reconcile of a slave's
//! pipeline when the slave joins, leaves, or changes its readiness or address.
//! A renewal alone changes nothing and triggers nothing; a Lease that lapses
//! without a change is caught by the shorter requeue while a set is published.

use std::collections::HashMap;

use ballast_crds::AnalyticsPipeline;
use ballast_node::membership::{ADDRESS_ANNOTATION, PIPELINE_LABEL, READY_ANNOTATION, ROLE_LABEL};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;

use crate::context::Context;

/// What of a slave's Lease decides whether it is in a slave set: ready, and where.
type Standing = (bool, Option<String>);

fn standing(lease: &Lease) -> Standing {
    let annotations = lease.metadata.annotations.clone().unwrap_or_default();
    (
        annotations.get(READY_ANNOTATION).is_some_and(|v| v == "true"),
        annotations.get(ADDRESS_ANNOTATION).cloned(),
    )
}

/// The pipeline a slave Lease belongs to.
fn pipeline_of(lease: &Lease) -> Option<ObjectRef<AnalyticsPipeline>> {
    let name = lease.metadata.labels.as_ref()?.get(PIPELINE_LABEL)?;
    let namespace = lease.metadata.namespace.as_deref()?;
    Some(ObjectRef::new(name).within(namespace))
}

/// Watches slave Leases until `shutdown`, triggering their pipeline's reconcile on each change of standing.
pub async fn watch(ctx: Context, shutdown: CancellationToken) {
    let api: Api<Lease> = ctx.api();
    let config = watcher::Config::default().labels(&format!("{ROLE_LABEL}=slave"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut known: HashMap<(Option<String>, Option<String>), Standing> = HashMap::new();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.next() => event,
        };
        let (lease, changed) = match event {
            Some(Ok(Event::Apply(lease) | Event::InitApply(lease))) => {
                let key = (lease.metadata.namespace.clone(), lease.metadata.name.clone());
                let now = standing(&lease);
                let changed = known.insert(key, now.clone()).as_ref() != Some(&now);
                (lease, changed)
            }
            Some(Ok(Event::Delete(lease))) => {
                known.remove(&(lease.metadata.namespace.clone(), lease.metadata.name.clone()));
                (lease, true)
            }
            Some(Ok(Event::Init | Event::InitDone)) => continue,
            Some(Err(error)) => {
                tracing::warn!(%error, "watching slave leases failed; retrying");
                continue;
            }
            None => return,
        };
        if changed && let Some(pipeline) = pipeline_of(&lease) {
            ctx.trigger(pipeline);
        }
    }
}

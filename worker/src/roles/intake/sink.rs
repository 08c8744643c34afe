//! Where the intake stores events, whichever path they came by (Kafka or the
//! backup intake): the KV store, or the slaves while the KV store is Degraded.

use std::collections::{BTreeMap, HashMap};

use ballast_crds::{Dependency, Mode};
use tokio::sync::watch;

use super::route::{self, Route, Slaves};
use crate::kv::KvStore;
use crate::membership::Refresh;
use crate::modes::Modes;
use crate::routing::Ring;
use crate::wire::slave_client::SlaveClient;
use crate::wire::{ChangeEvent, EventBatch};

/// Where a stored batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// To the KV store: events new to it, and redelivered ones.
    Kv {
        /// Events stored for the first time.
        new: u64,
        /// Events it already held.
        duplicates: u64,
    },
    /// To the slaves: events they accepted. (What a slave holds is lost if it
    /// goes: the master accounts for that from what each slave reports.)
    Slaves {
        /// Events accepted.
        accepted: u64,
    },
}

/// The intake's writer.
pub struct Sink {
    kv: KvStore,
    mode: watch::Receiver<Modes>,
    slaves: watch::Receiver<Slaves>,
    clients: HashMap<String, SlaveClient<tonic::transport::Channel>>,
    /// Asks for a slave view listed after a switch; `None` when the view is
    /// given and exact (benches).
    refresh: Option<Refresh>,
    /// The KV-degraded epoch whose membership view is known fresh.
    settled_epoch: Option<i64>,
}

/// Longest wait for a fresh slave listing before routing over the last view
/// (an API server that does not answer must not stop the data plane).
const FRESH_VIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Sink {
    /// A sink following the published KV `mode` and the slave membership
    /// (`refresh` asks that membership for a fresh view).
    pub fn new(
        kv: KvStore,
        mode: watch::Receiver<Modes>,
        slaves: watch::Receiver<Slaves>,
        refresh: Option<Refresh>,
    ) -> Self {
        Self {
            kv,
            mode,
            slaves,
            clients: HashMap::new(),
            refresh,
            settled_epoch: None,
        }
    }

    /// The KV store, when it is the current route: writers may then store
    /// concurrently on their own clone instead of queueing behind this sink.
    fn kv_route(&mut self) -> Option<KvStore> {
        let (kv_mode, _) = self.mode.borrow().get(Dependency::Kv);
        route::to_kv(kv_mode).then(|| self.kv.clone())
    }

    /// Stores a batch through a shared sink: on the KV route concurrent callers
    /// write in parallel on clones of one multiplexed connection; routing to
    /// slaves stays serialized in the sink. An error means nothing is acknowledged.
    pub async fn store_shared(
        sink: &tokio::sync::Mutex<Self>,
        events: &[ChangeEvent],
    ) -> Result<Stored, String> {
        let kv = sink.lock().await.kv_route();
        match kv {
            Some(mut kv) => write_kv(&mut kv, events).await,
            None => sink.lock().await.store(events).await,
        }
    }

    /// Stores a batch on the current route; an error means nothing is acknowledged.
    pub async fn store(&mut self, events: &[ChangeEvent]) -> Result<Stored, String> {
        let (kv_mode, epoch) = self.mode.borrow().get(Dependency::Kv);
        if kv_mode == Mode::Degraded && self.settled_epoch != Some(epoch) {
            // The operator publishes Degraded only once the scaled-out slaves'
            // Leases are ready, but this intake's view may be a poll older:
            // hashing over it would split merchants between slaves. A listing
            // started after this intake saw the epoch includes them.
            if let Some(refresh) = &mut self.refresh
                && !refresh.fresh(FRESH_VIEW_TIMEOUT).await
            {
                tracing::warn!(
                    epoch,
                    "no fresh slave listing in time; routing over the last membership view"
                );
            }
            self.settled_epoch = Some(epoch);
        }
        let current = route::route(kv_mode, epoch, &self.slaves.borrow());
        match current {
            Route::Kv => write_kv(&mut self.kv, events).await,
            Route::Slaves {
                ring,
                addresses,
                epoch,
            } => {
                let accepted = deliver(events, &ring, &addresses, epoch, &mut self.clients).await?;
                Ok(Stored::Slaves { accepted })
            }
        }
    }
}

/// Writes a batch to the KV store.
async fn write_kv(kv: &mut KvStore, events: &[ChangeEvent]) -> Result<Stored, String> {
    let written = kv.write(events).await.map_err(|e| e.to_string())?;
    Ok(Stored::Kv {
        new: written.new,
        duplicates: written.duplicates,
    })
}

/// Sends each event to the slave owning its merchant; returns how many were accepted.
async fn deliver(
    events: &[ChangeEvent],
    ring: &Ring,
    addresses: &Slaves,
    epoch: i64,
    clients: &mut HashMap<String, SlaveClient<tonic::transport::Channel>>,
) -> Result<u64, String> {
    let mut by_slave: BTreeMap<&str, Vec<ChangeEvent>> = BTreeMap::new();
    for event in events {
        let owner = ring
            .owner(&event.merchant_id)
            .ok_or("no live slave to route to")?;
        by_slave.entry(owner).or_default().push(event.clone());
    }
    // Every slave's share is sent at once: the slaves store in parallel.
    let mut calls = Vec::with_capacity(by_slave.len());
    for (slave, events) in by_slave {
        let address = addresses
            .get(slave)
            .ok_or_else(|| format!("no address for slave {slave}"))?;
        if !clients.contains_key(address) {
            let client = SlaveClient::connect(format!("http://{address}"))
                .await
                .map_err(|e| format!("{slave}: {e}"))?;
            clients.insert(address.clone(), client);
        }
        let mut client = clients.get(address).ok_or("client vanished")?.clone();
        calls.push(async move {
            let reply = client.deliver(EventBatch { events, epoch }).await;
            (slave, address, reply)
        });
    }
    let mut accepted = 0;
    let mut failed = None;
    for (slave, address, reply) in futures::future::join_all(calls).await {
        match reply {
            Ok(reply) => {
                accepted += u64::from(reply.into_inner().accepted);
            }
            Err(status) => {
                // A slave that went away is dropped; the retry re-routes over the
                // new membership (the others' shares are stored again as duplicates).
                clients.remove(address);
                failed = Some(format!("{slave}: {status}"));
            }
        }
    }
    if let Some(error) = failed {
        return Err(error);
    }
    Ok(accepted)
}

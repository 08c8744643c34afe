//! Where the intake stores events, whichever path they came by (Kafka or the
//! backup intake): the KV store, or the slaves while the KV store is Degraded.

use crate::auth::{Authed, Token};
use std::collections::{BTreeMap, HashMap};

use ballast_crds::Dependency;
use tokio::sync::watch;

use super::route::{self, Route, Slaves};
use crate::grpc;
use crate::kv::KvStore;
use crate::modes::Modes;
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
    /// The data-plane token every delivery carries.
    token: Token,
    /// One lazily connected channel per slave address (made without I/O).
    clients: HashMap<String, SlaveClient<Authed>>,
}

/// Where one batch goes, decided under the sink's lock and written outside it.
enum Target {
    /// The KV store, on a clone of its multiplexed connection.
    Kv(KvStore),
    /// The slaves owning the batch's merchants.
    Slaves(Shares),
}

/// The slaves' shares of one batch, each with the client to send it on.
struct Shares {
    epoch: i64,
    generation: i64,
    shares: Vec<Share>,
}

struct Share {
    slave: String,
    address: String,
    client: SlaveClient<Authed>,
    events: Vec<ChangeEvent>,
}

impl Sink {
    /// A sink following the published KV `mode` (with its slave set) and the
    /// slave membership (for the members' addresses).
    pub fn new(
        kv: KvStore,
        mode: watch::Receiver<Modes>,
        slaves: watch::Receiver<Slaves>,
        token: Token,
    ) -> Self {
        Self {
            kv,
            mode,
            slaves,
            token,
            clients: HashMap::new(),
        }
    }

    /// Stores a batch through a shared sink. The route and the clients are
    /// taken under the lock; the writes happen outside it, so that a slow or
    /// hung store delays only the batches bound for it. An error means nothing
    /// is acknowledged.
    pub async fn store_shared(
        sink: &tokio::sync::Mutex<Self>,
        events: &[ChangeEvent],
    ) -> Result<Stored, String> {
        let target = sink.lock().await.target(events)?;
        match write(target, events).await {
            Ok(stored) => Ok(stored),
            Err((failed, error)) => {
                sink.lock().await.forget(&failed);
                Err(error)
            }
        }
    }

    /// Stores a batch on the current route; an error (including a route not
    /// known yet) means nothing is acknowledged.
    pub async fn store(&mut self, events: &[ChangeEvent]) -> Result<Stored, String> {
        let target = self.target(events)?;
        write(target, events).await.map_err(|(failed, error)| {
            self.forget(&failed);
            error
        })
    }

    /// Where `events` go now. No I/O: channels connect on first use.
    fn target(&mut self, events: &[ChangeEvent]) -> Result<Target, String> {
        let current = {
            let modes = self.mode.borrow();
            let (kv_mode, epoch) = modes.get(Dependency::Kv);
            // Over the set the operator published with the epoch, never over
            // this intake's own (possibly older) view of the membership.
            route::route(kv_mode, epoch, modes.slave_set(), &self.slaves.borrow())
                .map_err(|e| e.to_string())?
        };
        let (ring, addresses, epoch, generation) = match current {
            Route::Kv => return Ok(Target::Kv(self.kv.clone())),
            Route::Slaves {
                ring,
                addresses,
                epoch,
                generation,
            } => (ring, addresses, epoch, generation),
        };
        let mut by_slave: BTreeMap<&str, Vec<ChangeEvent>> = BTreeMap::new();
        for event in events {
            let owner = ring
                .owner(&event.merchant_id)
                .ok_or("no live slave to route to")?;
            by_slave.entry(owner).or_default().push(event.clone());
        }
        let mut shares = Vec::with_capacity(by_slave.len());
        for (slave, events) in by_slave {
            let address = addresses
                .get(slave)
                .ok_or_else(|| format!("no address for slave {slave}"))?;
            let client = match self.clients.get(address) {
                Some(client) => client.clone(),
                None => {
                    let channel = crate::auth::channel(address, grpc::STORE_DEADLINE, &self.token)
                        .map_err(|e| format!("{slave}: {e}"))?;
                    let client = SlaveClient::new(channel);
                    self.clients.insert(address.clone(), client.clone());
                    client
                }
            };
            shares.push(Share {
                slave: slave.to_owned(),
                address: address.clone(),
                client,
                events,
            });
        }
        Ok(Target::Slaves(Shares {
            epoch,
            generation,
            shares,
        }))
    }

    /// Drops the clients of slaves that failed: the retry re-routes over the
    /// membership then, and a slave that came back gets a new connection.
    fn forget(&mut self, addresses: &[String]) {
        for address in addresses {
            self.clients.remove(address);
        }
    }
}

/// Writes a batch where `target` says; on failure, the addresses that failed and why.
async fn write(target: Target, events: &[ChangeEvent]) -> Result<Stored, (Vec<String>, String)> {
    match target {
        Target::Kv(mut kv) => write_kv(&mut kv, events).await.map_err(|e| (Vec::new(), e)),
        Target::Slaves(shares) => deliver(shares).await.map(|accepted| Stored::Slaves { accepted }),
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

/// Sends every slave its share at once (the slaves store in parallel), each
/// call bounded by the channel's deadline; returns how many were accepted.
async fn deliver(shares: Shares) -> Result<u64, (Vec<String>, String)> {
    let (epoch, generation) = (shares.epoch, shares.generation);
    let calls = shares.shares.into_iter().map(|share| async move {
        let Share {
            slave,
            address,
            mut client,
            events,
        } = share;
        let reply = client
            .deliver(EventBatch {
                events,
                epoch,
                generation,
            })
            .await;
        (slave, address, reply)
    });
    let mut accepted = 0;
    let mut failed = Vec::new();
    let mut error = None;
    for (slave, address, reply) in futures::future::join_all(calls).await {
        match reply {
            Ok(reply) => accepted += u64::from(reply.into_inner().accepted),
            Err(status) => {
                // The retry re-routes over the membership then (the others'
                // shares are stored again as duplicates).
                failed.push(address);
                error = Some(format!("{slave}: {status}"));
            }
        }
    }
    match error {
        Some(error) => Err((failed, error)),
        None => Ok(accepted),
    }
}

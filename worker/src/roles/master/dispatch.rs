//! The master's side of the slave RPCs: one lazily connected gRPC channel per
//! slave address, the `Compute` calls, and the `Load` poller that feeds the
//! scheduler each slave's queue depth and CPU use.

use crate::auth::{Authed, Token};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::faults::Failure;
use super::losses::Memory;
use super::schedule::SlaveView;
use super::tasks::{Dispatch, Kind};
use crate::wire::slave_client::SlaveClient;
use crate::wire::{
    ComputeTask, DataSource, Granularity, HoldingsRequest, LoadRequest, TaskReport, WindowHolding,
};

/// A slave's address and its client.
type Connection = (String, SlaveClient<Authed>);

/// gRPC clients of the live slaves, by identity.
#[derive(Clone)]
pub struct Slaves {
    token: Token,
    clients: Arc<Mutex<BTreeMap<String, Connection>>>,
}

/// Bound of any call to a slave: a task's compute is the longest (each call
/// sets its own, shorter deadline; this one only backs them up).
const CALL_BOUND: Duration = Duration::from_secs(600);

fn client(address: &str, token: &Token) -> Option<SlaveClient<Authed>> {
    Some(SlaveClient::new(
        crate::auth::channel(address, CALL_BOUND, token).ok()?,
    ))
}

impl Slaves {
    /// No clients yet; each call will carry `token`.
    pub fn new(token: Token) -> Self {
        Self {
            token,
            clients: Arc::default(),
        }
    }

    /// Keeps a client per member of `members` (identity → address).
    pub fn update(&self, members: &BTreeMap<String, String>) {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients.retain(|id, (addr, _)| members.get(id) == Some(addr));
        for (id, address) in members {
            if !clients.contains_key(id)
                && let Some(c) = client(address, &self.token)
            {
                clients.insert(id.clone(), (address.clone(), c));
            }
        }
    }

    /// The client of `slave`, if it is a member.
    pub fn get(&self, slave: &str) -> Option<SlaveClient<Authed>> {
        let clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients.get(slave).map(|(_, c)| c.clone())
    }

    fn all(&self) -> Vec<(String, SlaveClient<Authed>)> {
        let clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients
            .iter()
            .map(|(id, (_, c))| (id.clone(), c.clone()))
            .collect()
    }

    /// What each slave holds in memory (KV-degraded mode); unreachable slaves are left out.
    pub async fn holdings(&self, timeout: Duration) -> BTreeMap<String, Vec<WindowHolding>> {
        let calls = self.all().into_iter().map(|(id, mut c)| async move {
            let reply = tokio::time::timeout(timeout, c.holdings(HoldingsRequest {})).await;
            match reply {
                Ok(Ok(r)) => Some((id, r.into_inner().windows)),
                _ => None,
            }
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Sends one task; a hung slave is bounded by `timeout` (far beyond the hang
/// detection, which moves the task long before).
pub async fn compute(
    mut client: SlaveClient<Authed>,
    task: ComputeTask,
    timeout: Duration,
) -> Result<TaskReport, tonic::Status> {
    let mut request = tonic::Request::new(task);
    request.set_timeout(timeout);
    client.compute(request).await.map(tonic::Response::into_inner)
}

/// What one slave answered to `Load`: its view for the scheduler, and the
/// memory it holds for the loss account.
#[derive(Clone, Debug, Default)]
pub struct Reported {
    /// For the scheduler.
    pub view: SlaveView,
    /// For [`super::losses::Ledger`].
    pub memory: Memory,
}

/// Polls every slave's `Load` each `period` until `shutdown`; the receiver
/// holds what the slaves that answered reported.
pub fn poll_loads(
    slaves: Slaves,
    period: Duration,
    shutdown: CancellationToken,
) -> watch::Receiver<BTreeMap<String, Reported>> {
    let (tx, rx) = watch::channel(BTreeMap::new());
    tokio::spawn(async move {
        // CPU seconds and when they were read, per slave: CPU use is their rate.
        let mut last: BTreeMap<String, (f64, Instant)> = BTreeMap::new();
        loop {
            let calls = slaves.all().into_iter().map(|(id, mut c)| async move {
                let reply = tokio::time::timeout(period, c.load(LoadRequest {})).await;
                match reply {
                    Ok(Ok(r)) => Some((id, r.into_inner(), Instant::now())),
                    _ => None,
                }
            });
            let replies = futures::future::join_all(calls).await;
            let mut views = BTreeMap::new();
            for (id, load, at) in replies.into_iter().flatten() {
                let cpu_cores = match last.get(&id) {
                    Some((cpu, then)) if at > *then => {
                        ((load.cpu_seconds - cpu) / at.duration_since(*then).as_secs_f64()).max(0.0)
                    }
                    _ => 0.0,
                };
                last.insert(id.clone(), (load.cpu_seconds, at));
                views.insert(
                    id,
                    Reported {
                        view: SlaveView {
                            queued: load.queued,
                            running: load.running,
                            slots: load.slots,
                            cpu_cores,
                            ..SlaveView::default()
                        },
                        memory: Memory {
                            incarnation: load.incarnation,
                            events: load.held_events,
                            oldest_window_ms: load.oldest_window_ms,
                        },
                    },
                );
            }
            last.retain(|id, _| views.contains_key(id));
            let _ = tx.send(views);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
        }
    });
    rx
}

/// How a failed call counts: a slave that could not be reached ran nothing.
/// Pure.
pub fn classify(status: &tonic::Status) -> Failure {
    // Statuses the slave itself returns carry no source; transport failures do.
    if std::error::Error::source(status).is_some() {
        Failure::Unreachable
    } else if status.code() == tonic::Code::OutOfRange {
        Failure::Expired
    } else {
        Failure::Failed
    }
}

/// The task a dispatch sends, with the SQL of its window.
pub fn task_of(d: &Dispatch, sql: Option<&super::sql::SqlVersion>) -> ComputeTask {
    let p = &d.planned;
    let (granularity, source) = match (p.key.kind, &p.key.pinned) {
        (Kind::Window, _) => (Granularity::Window, DataSource::Kv),
        // Pinned to the slave whose memory holds it (KV-degraded mode).
        (Kind::Hour, Some(_)) => (Granularity::Hour, DataSource::Memory),
        (Kind::Hour, None) => (Granularity::Hour, DataSource::Kv),
        (Kind::Day, _) => (Granularity::Day, DataSource::Kv),
    };
    ComputeTask {
        task_id: p.key.id(),
        window_start_ms: p.key.start_ms,
        window_end_ms: p.end_ms,
        version: d.version,
        granularity: granularity.into(),
        source: source.into(),
        partition: p.key.partition,
        partitions: p.partitions,
        sql_id: sql.map(|s| s.id.clone()).unwrap_or_default(),
        sql: sql.map(|s| s.text.clone()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transport_failures_count_as_unreachable() {
        let transport = tonic::Status::from_error(Box::new(std::io::Error::other("connection refused")));
        let cases = [
            (transport, Failure::Unreachable),
            (
                tonic::Status::unavailable("KV store: connection refused"),
                Failure::Failed,
            ),
            (
                tonic::Status::invalid_argument("statement 2 failed"),
                Failure::Failed,
            ),
        ];
        for (status, want) in cases {
            assert_eq!(classify(&status), want, "{status:?}");
        }
    }
}

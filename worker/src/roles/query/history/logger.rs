//! The query service's side of the cold query log: each parsed history
//! request is handed to a background writer through a bounded channel (the
//! request never waits on it), which appends them to the cold store in one
//! bulk request per second, and flushes what it holds when the pod stops.

use std::sync::Arc;
use std::time::Duration;

use elasticsearch::params::Refresh;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cold::ColdStore;
use crate::cold::log::Entry;
use crate::roles::query::metrics::Metrics;

/// Entries waiting to be written at most: beyond it (the cold store slow or
/// down), new entries are dropped and counted.
const QUEUE: usize = 10_000;
/// Entries per bulk request at most.
const BATCH: usize = 1_000;

/// Where history requests are recorded.
#[derive(Clone)]
pub struct QueryLog {
    tx: mpsc::Sender<Entry>,
    metrics: Arc<Metrics>,
}

impl QueryLog {
    /// Starts the writer into `store`; it flushes every `every` and once
    /// more when `stopped` (within the store's deadline).
    pub fn start(
        store: ColdStore,
        every: Duration,
        metrics: Arc<Metrics>,
        stopped: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(write(store, rx, every, Arc::clone(&metrics), stopped));
        (Self { tx, metrics }, writer)
    }

    /// Records one request; never waits.
    pub fn record(&self, entry: Entry) {
        if self.tx.try_send(entry).is_err() {
            self.metrics.logged("dropped", 1);
        }
    }
}

async fn write(
    store: ColdStore,
    mut rx: mpsc::Receiver<Entry>,
    every: Duration,
    metrics: Arc<Metrics>,
    stopped: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    let mut held: Vec<Entry> = Vec::new();
    loop {
        let stopping = tokio::select! {
            () = stopped.cancelled() => true,
            entry = rx.recv() => match entry {
                Some(entry) => {
                    held.push(entry);
                    if held.len() < BATCH {
                        continue;
                    }
                    false
                }
                None => true,
            },
            _ = tick.tick() => false,
        };
        if stopping {
            while let Ok(entry) = rx.try_recv() {
                held.push(entry);
            }
        }
        for batch in held.chunks(BATCH) {
            let written = batch.len() as u64;
            match store.log(batch, Refresh::False).await {
                Ok(()) => metrics.logged("written", written),
                Err(error) => {
                    tracing::debug!(%error, "writing the query log failed: entries dropped");
                    metrics.logged("failed", written);
                }
            }
        }
        held.clear();
        if stopping {
            return;
        }
    }
}

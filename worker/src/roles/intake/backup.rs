//! The backup intake (gRPC `ballast.v1.Intake`): where collectors send,
//! synchronously, while Kafka is down. Admission sheds whole merchants over the
//! rate budget; what is admitted is stored before the call returns, so nothing
//! acknowledged is lost.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tonic::{Request, Response, Status};

use super::admission::Admission;
use super::sink::{Sink, Stored};
use crate::wire::intake_server::Intake;
use crate::wire::{EventBatch, IngestReply};

/// Metrics of the backup intake.
#[derive(Clone, Default)]
pub struct Metrics {
    /// Events stored through the backup intake.
    pub accepted: Counter,
    /// Events dropped because their merchant is shed.
    pub shed_events: Counter,
    /// Merchants shed in the current interval.
    pub shed_merchants: Gauge,
    /// Calls refused over the budget.
    pub refused: Counter,
}

/// The gRPC service.
pub struct Backup {
    /// Budget and shedding state.
    pub admission: Arc<Mutex<Admission>>,
    /// Where admitted events go (shared with the Kafka path).
    pub sink: Arc<tokio::sync::Mutex<Sink>>,
    /// Its metrics.
    pub metrics: Metrics,
}

#[tonic::async_trait]
impl Intake for Backup {
    async fn ingest(&self, request: Request<EventBatch>) -> Result<Response<IngestReply>, Status> {
        let events = request.into_inner().events;
        if let Some(bad) = events
            .iter()
            .find(|e| e.event_id.is_empty() || e.merchant_id.is_empty())
        {
            return Err(Status::invalid_argument(format!(
                "every event needs an event_id and a merchant_id (got {:?}/{:?})",
                bad.event_id, bad.merchant_id
            )));
        }
        let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
        let (admitted, level) = {
            let mut admission = self.admission.lock().unwrap_or_else(PoisonError::into_inner);
            let admitted = admission.admit(events, now);
            self.metrics
                .shed_merchants
                .set(i64::try_from(admission.shed_merchants().len()).unwrap_or(i64::MAX));
            (admitted, admission.level())
        };
        let admitted = admitted.map_err(|over| {
            self.metrics.refused.inc();
            let mut status = Status::resource_exhausted(over.to_string());
            status
                .metadata_mut()
                .insert(crate::grpc::RETRY_AFTER_MS, over.retry_after_ms.into());
            status
        })?;
        self.metrics.shed_events.inc_by(u64::from(admitted.shed));
        let stored = Sink::store_shared(&self.sink, &admitted.keep)
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "storing the batch failed, nothing of it is acknowledged: {e}"
                ))
            })?;
        let (accepted, duplicates) = match stored {
            Stored::Kv { new, duplicates } => (new, duplicates),
            Stored::Slaves { accepted, .. } => (accepted, admitted.keep.len() as u64 - accepted),
        };
        self.metrics.accepted.inc_by(accepted);
        Ok(Response::new(IngestReply {
            accepted: u32::try_from(accepted).unwrap_or(u32::MAX),
            shed: admitted.shed,
            duplicates: u32::try_from(duplicates).unwrap_or(u32::MAX),
            shed_level: level,
        }))
    }
}

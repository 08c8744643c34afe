//! Where a slave runs its SQL: a runtime of its own and a memory budget, so
//! that compute neither starves the slave's request threads nor its memory.

use std::sync::Arc;

use ballast_crds::SourceSchema;

use super::engine::{Sql, run};
use super::{ComputeError, MerchantResult};
use crate::wire::ChangeEvent;

/// Where a slave runs its SQL: a Tokio runtime of its own, so that building
/// tables and running DataFusion (CPU-bound throughout) never hold the threads
/// that answer `Load` and `Deliver` and renew Leases; and a memory pool, so
/// that a window too heavy for the pod fails as a task (which the master
/// retries elsewhere) instead of the kernel killing the slave and everything
/// it holds.
pub struct Engine {
    sql: Sql,
    runtime: Option<tokio::runtime::Runtime>,
    memory_limit: Option<usize>,
}

impl Engine {
    /// An engine running `sql` on `threads` threads, whose queries may hold
    /// `memory_limit` bytes between them (unbounded when `None`).
    pub fn new(threads: usize, sql: Sql, memory_limit: Option<usize>) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("compute")
            .enable_all()
            .build()?;
        Ok(Self {
            sql,
            runtime: Some(runtime),
            memory_limit,
        })
    }

    /// The SQL it runs.
    pub fn sql(&self) -> &Sql {
        &self.sql
    }

    /// [`run`] of `sql` (the engine's own when `None`) over `events`, on the engine's runtime.
    pub async fn run(
        &self,
        sql: Option<Sql>,
        events: Vec<ChangeEvent>,
        schema: Option<Arc<SourceSchema>>,
    ) -> Result<Vec<MerchantResult>, ComputeError> {
        let Some(runtime) = &self.runtime else {
            return Err(ComputeError::Engine("the compute runtime is shut down".into()));
        };
        let (sql, limit) = (sql.unwrap_or_else(|| self.sql.clone()), self.memory_limit);
        runtime
            .spawn(async move { run(&sql, &events, schema.as_deref(), limit).await })
            .await
            .map_err(|e| ComputeError::Engine(format!("the compute task did not finish: {e}")))?
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Dropped from async code at shutdown: a blocking shutdown would panic there.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The memory a slave's queries may hold: what is configured, else half of
/// the pod's memory limit (the other half holds the events in memory and the
/// process), else unbounded. Pure.
pub fn memory_budget(configured: Option<u64>, pod_limit: Option<u64>) -> Option<usize> {
    configured
        .or(pod_limit.map(|l| l / 2))
        .map(|b| usize::try_from(b).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compute_budget_is_configured_or_half_the_pod_limit() {
        // (configured, pod limit, budget)
        let cases = [
            (None, None, None),
            (None, Some(2_048), Some(1_024)),
            (Some(100), Some(2_048), Some(100)),
            (Some(100), None, Some(100)),
        ];
        for (configured, pod, want) in cases {
            assert_eq!(memory_budget(configured, pod), want, "{configured:?} {pod:?}");
        }
    }
}

//! Reads what the dashboard shows from where it really is: the pipeline's
//! status (modes, slaves, shedding), the master Lease, and the results in
//! the hot MySQL.

use ballast_crds::{AnalyticsPipeline, Dependency};
use ballast_e2e::orders::Metrics;
use ballast_worker::results::hot::HotStore;
use ballast_worker::results::{Granularity, Slot};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use mysql_async::prelude::Queryable;

use crate::dashboard::{DependencyRow, MerchantRow};

/// What one look at the platform found.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// Published modes.
    pub dependencies: Vec<DependencyRow>,
    /// `ready/desired` slaves.
    pub slaves: String,
    /// Merchants shed now.
    pub shed_merchants: i64,
    /// Holder of the master Lease.
    pub master: String,
    /// Result rows in the hot MySQL.
    pub results: u64,
    /// What the merchant rows are.
    pub latest: String,
    /// The latest period's results, largest GMV first.
    pub merchants: Vec<MerchantRow>,
}

/// Looks at one pipeline.
pub struct Observer {
    pub client: kube::Client,
    pub namespace: String,
    pub pipeline: String,
    pub pool: mysql_async::Pool,
    pub hot: HotStore,
}

impl Observer {
    /// One look; parts that cannot be read now are left empty.
    pub async fn observe(&self, merchants: usize) -> Observation {
        let mut o = Observation::default();
        let aps: Api<AnalyticsPipeline> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Ok(ap) = aps.get(&self.pipeline).await {
            let status = ap.status.unwrap_or_default();
            o.dependencies = Dependency::ALL
                .into_iter()
                .map(|d| {
                    let s = status.dependencies.get(d);
                    DependencyRow {
                        name: d.as_str(),
                        mode: s.map_or_else(|| "Normal".to_owned(), |s| format!("{:?}", s.mode)),
                        epoch: s.map_or(0, |s| s.epoch),
                        reason: s.and_then(|s| s.reason.clone()).unwrap_or_default(),
                    }
                })
                .collect();
            o.slaves = status.slaves.unwrap_or_default();
            o.shed_merchants = status.shed_merchants;
        }
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Ok(Some(lease)) = leases.get_opt(&format!("{}-master", self.pipeline)).await {
            o.master = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
        }
        let kv_degraded = o
            .dependencies
            .iter()
            .any(|d| d.name == Dependency::Kv.as_str() && d.mode == "Degraded");
        if let Ok((results, latest)) = self.results(kv_degraded).await {
            o.results = results;
            if let Some((granularity, start)) = latest {
                o.latest = label(granularity, start);
                o.merchants = self
                    .merchants(granularity, start, merchants)
                    .await
                    .unwrap_or_default();
            }
        }
        o
    }

    /// Result rows of the pipeline, and its latest period: hourly while the
    /// KV store is down, by window otherwise (hours and days to date are
    /// written beside the windows then).
    async fn results(
        &self,
        kv_degraded: bool,
    ) -> Result<(u64, Option<(Granularity, i64)>), mysql_async::Error> {
        let mut conn = self.pool.get_conn().await?;
        let mut total = 0;
        let wanted = if kv_degraded { "hour" } else { "window" };
        let mut latest: Option<i64> = None;
        for d in 0..2 {
            for t in 0..4 {
                let table = self.hot.table_name(d, t);
                let rows: Vec<(String, u64, i64)> = conn
                    .exec(
                        format!(
                            "SELECT granularity, COUNT(*), MAX(window_start_ms) \
                             FROM {table} WHERE pipeline = ? GROUP BY granularity"
                        ),
                        (&self.pipeline,),
                    )
                    .await
                    .unwrap_or_default();
                for (granularity, count, max) in rows {
                    total += count;
                    if granularity == wanted {
                        latest = Some(latest.map_or(max, |m| m.max(max)));
                    }
                }
            }
        }
        let granularity = if kv_degraded {
            Granularity::Hour
        } else {
            Granularity::Window
        };
        let latest = latest.map(|start| (granularity, start));
        Ok((total, latest))
    }

    async fn merchants(
        &self,
        granularity: Granularity,
        start: i64,
        n: usize,
    ) -> anyhow::Result<Vec<MerchantRow>> {
        let slot = Slot {
            pipeline: self.pipeline.clone(),
            granularity,
            window_start_ms: start,
        };
        let mut rows: Vec<MerchantRow> = self
            .hot
            .read(&slot)
            .await?
            .into_iter()
            .filter_map(|(merchant, stored)| {
                let m = Metrics::from_json(&stored.metrics)?;
                Some(MerchantRow {
                    merchant,
                    orders: m.orders,
                    gmv: m.gmv,
                    avg_order_value: m.avg_order_value,
                    paying_users: m.paying_users,
                    refunds: m.refunds,
                    top_items: m.top_items,
                    version: stored.version,
                })
            })
            .collect();
        rows.sort_by(|a, b| b.gmv.cmp(&a.gmv).then(a.merchant.cmp(&b.merchant)));
        rows.truncate(n);
        Ok(rows)
    }
}

/// `window 12:00:05 UTC` or `hour 12:00 UTC (hour-to-date, from slave memory)`.
fn label(granularity: Granularity, start_ms: i64) -> String {
    let secs = start_ms.div_euclid(1000).rem_euclid(86_400);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match granularity {
        Granularity::Window => format!("window {h:02}:{m:02}:{s:02} UTC"),
        Granularity::Hour => format!("hour {h:02}:{m:02} UTC (hour-to-date, from slave memory)"),
        Granularity::Day => "today so far".to_owned(),
    }
}

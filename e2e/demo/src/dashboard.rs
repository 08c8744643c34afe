//! What the demo shows each second: one `Frame` of the platform's state,
//! rendered as plain text for the terminal. Pure.

use std::fmt::Write as _;
use std::time::Duration;

/// One dependency's published mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DependencyRow {
    /// `mq`, `kv`, ...
    pub name: &'static str,
    /// `Normal`, `Degraded`, `Recovering`.
    pub mode: String,
    /// The mode's epoch.
    pub epoch: i64,
    /// Why, as the operator put it.
    pub reason: String,
}

/// One merchant's latest result.
#[derive(Clone, Debug, PartialEq)]
pub struct MerchantRow {
    /// Merchant id.
    pub merchant: String,
    /// Orders in the period.
    pub orders: i64,
    /// Paid amount, in cents.
    pub gmv: i64,
    /// Average paid order, in cents.
    pub avg_order_value: Option<f64>,
    /// Distinct paying users.
    pub paying_users: i64,
    /// Refunded orders.
    pub refunds: i64,
    /// Best sellers.
    pub top_items: String,
    /// The version that wrote it.
    pub version: u64,
}

pub use crate::query::QueryStats;

/// Everything one refresh shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Frame {
    /// Time since the demo started.
    pub elapsed: Duration,
    /// What the demo is doing now, for a newcomer.
    pub phase: String,
    /// Orders inserted into the source database.
    pub orders_in: u64,
    /// Orders per second lately.
    pub orders_rate: f64,
    /// Result rows in the hot MySQL.
    pub results_out: u64,
    /// Result rows written per second lately.
    pub results_rate: f64,
    /// Modes the operator publishes.
    pub dependencies: Vec<DependencyRow>,
    /// `ready/desired` slaves.
    pub slaves: String,
    /// Merchants shed by the backup intake now.
    pub shed_merchants: i64,
    /// The master holding the lease.
    pub master: String,
    /// What the merchant rows are: `window 12:00:05` or `hour 12:00`.
    pub latest: String,
    /// The latest results, largest GMV first.
    pub merchants: Vec<MerchantRow>,
    /// The merchants' queries over the last few seconds.
    pub query: QueryStats,
    /// The followed merchant's page.
    pub page: String,
}

fn money(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, (cents % 100).abs())
}

/// The frame as terminal text (no colour, fits 100 columns).
pub fn render(f: &Frame) -> String {
    let mut out = String::new();
    let secs = f.elapsed.as_secs();
    let _ = writeln!(
        out,
        "Ballast demo  {:02}:{:02}   {}",
        secs / 60,
        secs % 60,
        f.phase
    );
    let _ = writeln!(out, "{}", "=".repeat(100));
    let _ = writeln!(
        out,
        "orders in {:>9} ({:>6.0}/s)    results out {:>8} ({:>6.0}/s)    slaves {:<6} shed merchants {}",
        f.orders_in, f.orders_rate, f.results_out, f.results_rate, f.slaves, f.shed_merchants
    );
    let _ = writeln!(out, "active master {}", f.master);
    let q = &f.query;
    let _ = writeln!(
        out,
        "queries {:>5.1}/s  p50 {:>6.1} ms  p99 {:>6.1} ms  answers [{}]  from [{}]  partial [{}]",
        q.per_second, q.p50_ms, q.p99_ms, q.statuses, q.sources, q.reasons
    );
    let _ = writeln!(out, "merchant page {}", f.page);
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<8} {:<11} {:>5}  REASON", "DEPEND.", "MODE", "EPOCH");
    for d in &f.dependencies {
        let marker = if d.mode == "Normal" { " " } else { "!" };
        let _ = writeln!(
            out,
            "{marker}{:<7} {:<11} {:>5}  {}",
            d.name, d.mode, d.epoch, d.reason
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "latest results: {}", f.latest);
    let _ = writeln!(
        out,
        "{:<14} {:>6} {:>11} {:>9} {:>6} {:>7}  {:<28} VERSION",
        "MERCHANT", "ORDERS", "GMV", "AOV", "USERS", "REFUNDS", "TOP ITEMS"
    );
    for m in &f.merchants {
        let aov = m
            .avg_order_value
            .map_or_else(|| "-".to_owned(), |a| money(a.round() as i64));
        let _ = writeln!(
            out,
            "{:<14} {:>6} {:>11} {:>9} {:>6} {:>7}  {:<28} {:#x}",
            m.merchant,
            m.orders,
            money(m.gmv),
            aov,
            m.paying_users,
            m.refunds,
            m.top_items,
            m.version
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_shows_modes_counts_and_merchants() {
        let frame = Frame {
            elapsed: Duration::from_secs(75),
            phase: "KV store down".into(),
            orders_in: 1234,
            orders_rate: 400.0,
            results_out: 99,
            results_rate: 12.5,
            dependencies: vec![DependencyRow {
                name: "kv",
                mode: "Degraded".into(),
                epoch: 1,
                reason: "ProbeFailed".into(),
            }],
            slaves: "4/4".into(),
            shed_merchants: 0,
            master: "demo-master-0".into(),
            latest: "hour 12:00".into(),
            merchants: vec![MerchantRow {
                merchant: "demo-m7".into(),
                orders: 3,
                gmv: 12_345,
                avg_order_value: Some(6_172.5),
                paying_users: 2,
                refunds: 1,
                top_items: "item-0,item-3".into(),
                version: 0x1_0000_0002,
            }],
            query: QueryStats {
                per_second: 20.0,
                p50_ms: 1.5,
                p99_ms: 7.25,
                statuses: "200 x100".into(),
                sources: "cache x100".into(),
                reasons: "cacheOnly x50".into(),
            },
            page: "http://127.0.0.1:9/?merchant=demo-m7".into(),
        };
        let text = render(&frame);
        assert!(text.contains("01:15"), "{text}");
        assert!(text.contains("!kv      Degraded"), "{text}");
        assert!(text.contains("123.45"), "{text}");
        assert!(text.contains("61.73"), "{text}");
        assert!(text.contains("0x100000002"), "{text}");
        assert!(text.contains("p99    7.2 ms"), "{text}");
        assert!(text.contains("partial [cacheOnly x50]"), "{text}");
        assert!(text.contains("?merchant=demo-m7"), "{text}");
    }
}

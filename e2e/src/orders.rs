//! Synthetic orders for scenarios, benches and the demo, and the golden
//! expectation: the sample SQL's metrics computed independently by MariaDB
//! over the raw source rows.

use std::collections::BTreeMap;

use mysql_async::prelude::Queryable;
use serde_json::{Map, Value};

/// One order row of the source table `orders`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    /// Merchant id.
    pub merchant: String,
    /// Amount in cents.
    pub amount: i64,
    /// Buyer.
    pub user: String,
    /// What was bought.
    pub item: String,
    /// `paid` or `refunded`.
    pub status: &'static str,
}

/// A deterministic stream of orders over `merchants` merchants named `<prefix>-m<i>`.
#[derive(Clone, Debug)]
pub struct Orders {
    prefix: String,
    merchants: u64,
    state: u64,
}

impl Orders {
    /// A stream seeded with `seed`.
    pub fn new(prefix: &str, merchants: u64, seed: u64) -> Self {
        Self {
            prefix: prefix.to_owned(),
            merchants: merchants.max(1),
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*: fast, deterministic, good enough for synthetic data.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The next `n` orders.
    pub fn batch(&mut self, n: usize) -> Vec<Order> {
        (0..n)
            .map(|_| {
                let merchant = self.next() % self.merchants;
                // Skewed: low item numbers sell most, so top items are meaningful.
                let r = self.next() % 1000;
                let item = r * r / 50_000;
                Order {
                    merchant: format!("{}-m{merchant}", self.prefix),
                    amount: 100 + (self.next() % 20_000) as i64,
                    user: format!("u{}", self.next() % (self.merchants * 5)),
                    item: format!("item-{item}"),
                    status: if self.next().is_multiple_of(10) {
                        "refunded"
                    } else {
                        "paid"
                    },
                }
            })
            .collect()
    }
}

/// Inserts `orders` in one statement: one binlog event time for all of them.
pub async fn insert(conn: &mut mysql_async::Conn, orders: &[Order]) -> Result<(), mysql_async::Error> {
    if orders.is_empty() {
        return Ok(());
    }
    // The values are generated here (alphanumeric), never user input.
    let rows: Vec<String> = orders
        .iter()
        .map(|o| {
            format!(
                "('{}',{},'{}','{}','{}')",
                o.merchant, o.amount, o.user, o.item, o.status
            )
        })
        .collect();
    conn.query_drop(format!(
        "INSERT INTO orders (merchant_id, amount, user_id, item, status) VALUES {}",
        rows.join(",")
    ))
    .await
}

/// Creates `table`, shaped as `orders`, outside the pipeline's source (no
/// collector reads it), and inserts `orders` with past event times: order
/// `i` on the day `day(i)` (`YYYY-MM-DD`, UTC) at a time of day spread by
/// `i`. The connection's time zone is set to UTC, so that MariaDB computes
/// the days as written.
pub async fn insert_past(
    conn: &mut mysql_async::Conn,
    table: &str,
    orders: &[(Order, String)],
) -> Result<(), mysql_async::Error> {
    conn.query_drop("SET time_zone = '+00:00'").await?;
    conn.query_drop(format!(
        "CREATE TABLE {table} (merchant_id VARCHAR(64) NOT NULL, amount BIGINT NOT NULL, \
         user_id VARCHAR(32) NOT NULL, item VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, \
         created_at TIMESTAMP(3) NOT NULL)"
    ))
    .await?;
    // The values are generated here (alphanumeric), never user input.
    let rows: Vec<String> = orders
        .iter()
        .enumerate()
        .map(|(i, (o, day))| {
            let second = (i * 7919) % 86_400;
            format!(
                "('{}',{},'{}','{}','{}','{day} {:02}:{:02}:{:02}')",
                o.merchant,
                o.amount,
                o.user,
                o.item,
                o.status,
                second / 3600,
                second / 60 % 60,
                second % 60
            )
        })
        .collect();
    for chunk in rows.chunks(1000) {
        conn.query_drop(format!(
            "INSERT INTO {table} (merchant_id, amount, user_id, item, status, created_at) VALUES {}",
            chunk.join(",")
        ))
        .await?;
    }
    Ok(())
}

/// The sample SQL's output for one merchant and window.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    /// Sum of paid amounts.
    pub gmv: i64,
    /// All orders.
    pub orders: i64,
    /// Paid orders.
    pub paid_orders: i64,
    /// Distinct paying users.
    pub paying_users: i64,
    /// gmv / paid_orders; none without paid orders.
    pub avg_order_value: Option<f64>,
    /// Refunded orders.
    pub refunds: i64,
    /// Sum of refunded amounts.
    pub refund_amount: i64,
    /// Up to three items with the most paid orders, comma-joined.
    pub top_items: String,
}

impl Metrics {
    /// Reads a result row's metrics as the slaves store them.
    pub fn from_json(m: &Map<String, Value>) -> Option<Self> {
        let int = |k: &str| m.get(k).and_then(Value::as_i64);
        Some(Self {
            gmv: int("gmv")?,
            orders: int("orders")?,
            paid_orders: int("paid_orders")?,
            paying_users: int("paying_users")?,
            avg_order_value: m.get("avg_order_value").and_then(Value::as_f64),
            refunds: int("refunds")?,
            refund_amount: int("refund_amount")?,
            top_items: m.get("top_items")?.as_str()?.to_owned(),
        })
    }

    /// The metrics as the slaves store them (a JSON object of the sample SQL's columns).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("gmv".into(), self.gmv.into());
        m.insert("orders".into(), self.orders.into());
        m.insert("paid_orders".into(), self.paid_orders.into());
        m.insert("paying_users".into(), self.paying_users.into());
        m.insert("avg_order_value".into(), self.avg_order_value.into());
        m.insert("refunds".into(), self.refunds.into());
        m.insert("refund_amount".into(), self.refund_amount.into());
        m.insert("top_items".into(), self.top_items.clone().into());
        m
    }

    /// Equal, with the average compared to a relative 1e-9 (engines round differently).
    pub fn matches(&self, other: &Self) -> bool {
        let avg = match (self.avg_order_value, other.avg_order_value) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(1.0),
            (None, None) => true,
            _ => false,
        };
        avg && Self {
            avg_order_value: None,
            ..self.clone()
        } == Self {
            avg_order_value: None,
            ..other.clone()
        }
    }
}

/// One row of the expectation's totals: window, merchant, then the counts in `Metrics` order.
type Totals = (i64, String, i64, i64, i64, i64, i64, i64);

/// The expected metrics per (window start, merchant) of the merchants named
/// `<prefix>-…`, computed by MariaDB over the raw `orders` rows that also
/// satisfy `condition` (SQL, e.g. `id > 100`; `TRUE` for all).
pub async fn expected(
    conn: &mut mysql_async::Conn,
    prefix: &str,
    window_ms: i64,
    condition: &str,
) -> Result<BTreeMap<(i64, String), Metrics>, mysql_async::Error> {
    expected_in(conn, "orders", prefix, window_ms, condition).await
}

/// [`expected`] over the rows of `table` (a table shaped as `orders`).
pub async fn expected_in(
    conn: &mut mysql_async::Conn,
    table: &str,
    prefix: &str,
    window_ms: i64,
    condition: &str,
) -> Result<BTreeMap<(i64, String), Metrics>, mysql_async::Error> {
    let window = format!("FLOOR(UNIX_TIMESTAMP(created_at) * 1000 / {window_ms}) * {window_ms}");
    let filter = format!("merchant_id LIKE '{prefix}-%' AND ({condition})");
    let totals: Vec<Totals> = conn
        .query(format!(
            "SELECT CAST({window} AS SIGNED) w, merchant_id, \
             CAST(SUM(IF(status = 'paid', amount, 0)) AS SIGNED), COUNT(*), \
             CAST(SUM(status = 'paid') AS SIGNED), COUNT(DISTINCT IF(status = 'paid', user_id, NULL)), \
             CAST(SUM(status = 'refunded') AS SIGNED), CAST(SUM(IF(status = 'refunded', amount, 0)) AS SIGNED) \
             FROM {table} WHERE {filter} GROUP BY w, merchant_id"
        ))
        .await?;
    let tops: Vec<(i64, String, String)> = conn
        .query(format!(
            "SELECT w, merchant_id, GROUP_CONCAT(item ORDER BY n DESC, item ASC SEPARATOR ',') FROM ( \
               SELECT w, merchant_id, item, n, \
                      ROW_NUMBER() OVER (PARTITION BY w, merchant_id ORDER BY n DESC, item ASC) rn FROM ( \
                 SELECT CAST({window} AS SIGNED) w, merchant_id, item, COUNT(*) n FROM {table} \
                 WHERE {filter} AND status = 'paid' GROUP BY w, merchant_id, item) counted) ranked \
             WHERE rn <= 3 GROUP BY w, merchant_id"
        ))
        .await?;
    let tops: BTreeMap<(i64, String), String> = tops.into_iter().map(|(w, m, t)| ((w, m), t)).collect();
    Ok(totals
        .into_iter()
        .map(
            |(w, merchant, gmv, orders, paid_orders, paying_users, refunds, refund_amount)| {
                let top_items = tops.get(&(w, merchant.clone())).cloned().unwrap_or_default();
                let metrics = Metrics {
                    gmv,
                    orders,
                    paid_orders,
                    paying_users,
                    avg_order_value: (paid_orders > 0).then(|| gmv as f64 / paid_orders as f64),
                    refunds,
                    refund_amount,
                    top_items,
                };
                ((w, merchant), metrics)
            },
        )
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_deterministic_and_stays_within_its_merchants() {
        let a = Orders::new("t", 3, 7).batch(50);
        assert_eq!(a, Orders::new("t", 3, 7).batch(50));
        assert!(
            a.iter()
                .all(|o| ["t-m0", "t-m1", "t-m2"].contains(&o.merchant.as_str()))
        );
        assert!(a.iter().any(|o| o.status == "refunded") && a.iter().any(|o| o.status == "paid"));
    }

    #[test]
    fn metrics_match_with_a_tolerance_on_the_average_only() {
        let m = Metrics {
            gmv: 300,
            orders: 3,
            paid_orders: 2,
            paying_users: 2,
            avg_order_value: Some(150.0),
            refunds: 1,
            refund_amount: 50,
            top_items: "a,b".into(),
        };
        let close = Metrics {
            avg_order_value: Some(150.000_000_000_01),
            ..m.clone()
        };
        assert!(m.matches(&close));
        assert!(!m.matches(&Metrics {
            gmv: 301,
            ..m.clone()
        }));
        assert!(!m.matches(&Metrics {
            avg_order_value: None,
            ..m.clone()
        }));
    }
}

//! The cold query log: every history request the query service parses,
//! kept in daily indices `<indexPrefix>.querylog-YYYY.MM.DD` beside the
//! rollups (the cluster that just answered the request; the nightly job
//! reads it there with one aggregation). Requests are recorded normalised:
//! `from` and `to` as days before the day asked (`@1` is yesterday), so
//! "the last 7 days" asked each morning is one query, not seven.

use elasticsearch::params::Refresh;
use elasticsearch::{BulkOperation, SearchParts};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{ColdStore, Day, EsError, checked};

/// One cold request, as logged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// The merchant asked about.
    pub merchant: String,
    /// The day it was asked (UTC), `YYYY-MM-DD`.
    pub day: String,
    /// The request, normalised (see [`normalize`]).
    pub key: String,
    /// How long the cold store took to answer it, in ms (0 if it did not).
    pub took_ms: u64,
}

/// The normalised form of a history request asked on `today`: its pairs in
/// order, with `from` and `to` written as days before `today` (`@7`), each
/// pair `name=value` percent-encoded and joined by `&`. Pure.
pub fn normalize(pairs: &[(String, String)], today: Day) -> Option<String> {
    let mut out = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        let value = match name.as_str() {
            "from" | "to" => format!("@{}", today.0 - Day::parse(value)?.0),
            _ => value.clone(),
        };
        out.push(format!("{}={}", encode(name), encode(&value)));
    }
    Some(out.join("&"))
}

/// The request a normalised `key` asks on `today`; none if `key` is not one
/// [`normalize`] writes. Pure.
pub fn resolve(key: &str, today: Day) -> Option<Vec<(String, String)>> {
    if key.is_empty() {
        return None;
    }
    key.split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=')?;
            let (name, value) = (decode(name)?, decode(value)?);
            let value = match name.as_str() {
                "from" | "to" => {
                    let back: i32 = value.strip_prefix('@')?.parse().ok()?;
                    Day(today.0 - back).to_string()
                }
                _ => value,
            };
            Some((name, value))
        })
        .collect()
}

/// Percent-encodes everything but unreserved characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'@' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The daily log index of `day`. Pure.
pub fn index(prefix: &str, day: Day) -> String {
    let (y, m, d) = day.ymd();
    format!("{prefix}.querylog-{y:04}.{m:02}.{d:02}")
}

/// The log indices' template. Pure.
pub fn template(prefix: &str) -> Value {
    json!({
        "index_patterns": [format!("{prefix}.querylog-*")],
        "template": {
            "settings": { "number_of_shards": 1, "auto_expand_replicas": "0-1", "refresh_interval": "5s" },
            "mappings": {
                "dynamic": "strict",
                "properties": {
                    "merchant": { "type": "keyword" },
                    "day": { "type": "date", "format": "yyyy-MM-dd" },
                    "key": { "type": "keyword", "ignore_above": 4096 },
                    "tookMs": { "type": "long" }
                }
            }
        }
    })
}

/// How often one merchant asked one normalised query, and how long the
/// cold store took on average.
#[derive(Clone, Debug, PartialEq)]
pub struct Frequency {
    /// The merchant.
    pub merchant: String,
    /// The normalised query.
    pub key: String,
    /// Times asked.
    pub count: u64,
    /// Mean time the cold store took, in ms.
    pub took_ms: f64,
}

impl ColdStore {
    fn log_prefix(&self) -> String {
        format!("{}.querylog", self.prefix)
    }

    /// Installs (or updates) the log indices' template; idempotent.
    pub async fn install_log_template(&self) -> Result<(), EsError> {
        self.put_template(&self.log_prefix(), template(&self.prefix))
            .await
    }

    /// Appends `entries` to the log (each in the index of the day it was asked).
    pub async fn log(&self, entries: &[Entry], refresh: Refresh) -> Result<(), EsError> {
        if entries.is_empty() {
            return Ok(());
        }
        let operations: Vec<BulkOperation<Value>> = entries
            .iter()
            .map(|e| {
                let day = Day::parse(&e.day).unwrap_or(Day(0));
                BulkOperation::index(serde_json::to_value(e).unwrap_or_default())
                    .index(index(&self.prefix, day))
                    .into()
            })
            .collect();
        self.bulk(operations, refresh).await
    }

    /// How often each merchant asked each query from `from` to `to`
    /// (inclusive), read with a paged composite aggregation.
    pub async fn frequencies(&self, from: Day, to: Day) -> Result<Vec<Frequency>, EsError> {
        let pattern = format!("{}-*", self.log_prefix());
        let mut out = Vec::new();
        let mut after: Option<Value> = None;
        loop {
            let mut composite = json!({
                "size": 1000,
                "sources": [
                    { "merchant": { "terms": { "field": "merchant" } } },
                    { "key": { "terms": { "field": "key" } } }
                ]
            });
            if let Some(after) = &after {
                composite["after"] = after.clone();
            }
            let body = json!({
                "size": 0,
                "query": { "bool": { "filter": [
                    { "range": { "day": { "gte": from.to_string(), "lte": to.to_string() } } }
                ] } },
                "aggs": { "asked": { "composite": composite, "aggs": { "took": { "avg": { "field": "tookMs" } } } } }
            });
            let response = self
                .es
                .search(SearchParts::Index(&[&pattern]))
                .allow_no_indices(true)
                .ignore_unavailable(true)
                .request_timeout(self.deadline)
                .body(body)
                .send()
                .await?;
            let answer = checked(response).await?;
            let asked = &answer["aggregations"]["asked"];
            let buckets = asked["buckets"].as_array().cloned().unwrap_or_default();
            for b in &buckets {
                out.push(Frequency {
                    merchant: b["key"]["merchant"].as_str().unwrap_or_default().to_owned(),
                    key: b["key"]["key"].as_str().unwrap_or_default().to_owned(),
                    count: b["doc_count"].as_u64().unwrap_or(0),
                    took_ms: b["took"]["value"].as_f64().unwrap_or(0.0),
                });
            }
            match asked.get("after_key") {
                Some(next) if !buckets.is_empty() => after = Some(next.clone()),
                _ => return Ok(out),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_same_relative_range_asked_on_different_days_is_one_key() {
        let monday = Day::parse("2026-11-30").unwrap_or(Day(0));
        let tuesday = monday.next();
        let asked = |today: Day, from: &str, to: &str| {
            normalize(
                &pairs(&[
                    ("from", from),
                    ("to", to),
                    ("where", "gmv>=100&x"),
                    ("groupBy", "week"),
                ]),
                today,
            )
        };
        let a = asked(monday, "2026-11-23", "2026-11-29");
        let b = asked(tuesday, "2026-11-24", "2026-11-30");
        assert_eq!(a, b);
        assert_eq!(
            a.as_deref(),
            Some("from=@7&to=@1&where=gmv%3E%3D100%26x&groupBy=week")
        );
        assert_ne!(
            a,
            asked(tuesday, "2026-11-23", "2026-11-29"),
            "a fixed range moves"
        );
        // And back, on any day.
        let key = a.unwrap_or_default();
        assert_eq!(
            resolve(&key, tuesday),
            Some(pairs(&[
                ("from", "2026-11-24"),
                ("to", "2026-11-30"),
                ("where", "gmv>=100&x"),
                ("groupBy", "week")
            ]))
        );
        assert_eq!(normalize(&pairs(&[("from", "yesterday")]), monday), None);
    }

    #[test]
    fn a_malformed_key_resolves_to_nothing() {
        let today = Day::parse("2026-11-30").unwrap_or(Day(0));
        for key in [
            "",
            "from",
            "from=7",
            "from=@x",
            "a=%zz",
            "a=%F0%28",
            "from=@7&&to=@1",
        ] {
            assert_eq!(resolve(key, today), None, "{key:?}");
        }
        assert_eq!(index("shop", today), "shop.querylog-2026.11.30");
    }
}

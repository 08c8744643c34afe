//! The cold store: one Elasticsearch document per merchant and closed day
//! (its rollup), in monthly indices `<indexPrefix>-YYYY.MM` made from an
//! index template, routed by merchant so that a merchant's history is read
//! from one shard. Only keyword, numeric, date and boolean fields: no text
//! analysis and no scoring (every query runs in filter context). The nightly
//! job writes the rollups; the query service reads them.

pub mod day;
pub mod log;

use std::collections::BTreeMap;
use std::time::Duration;

use elasticsearch::indices::IndicesGetFieldMappingParts;
use elasticsearch::params::Refresh;
use elasticsearch::{BulkOperation, BulkParts, Elasticsearch, IndexParts, SearchParts};
use serde_json::{Map, Value, json};

pub use crate::es::EsError;
use crate::es::checked;

pub use day::Day;

/// The type of a rollup column, as the cold store maps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnType {
    /// A number (every numeric column is mapped as a double; the documents
    /// keep the values as computed).
    Number,
    /// A keyword: compared as a whole string.
    Keyword,
}

/// The rollups' columns and their types.
pub type Columns = BTreeMap<String, ColumnType>;

/// One merchant's rollup of one closed day.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollup {
    /// The merchant.
    pub merchant: String,
    /// The day.
    pub day: Day,
    /// The backup intake shed this merchant's events that day.
    pub shed: bool,
    /// The KV store was degraded that day: the day's own totals could not
    /// be computed, and the rollup was made from its hours.
    pub hourly_only: bool,
    /// The result columns (names starting with `_` are bookkeeping and are not stored).
    pub metrics: Map<String, Value>,
}

/// The cold store of one pipeline.
#[derive(Clone, Debug)]
pub struct ColdStore {
    es: Elasticsearch,
    prefix: String,
    deadline: Duration,
}

/// Field holding the result columns.
const METRICS: &str = "m";

impl ColdStore {
    /// The store under `index_prefix` (the pipeline's `coldStore.indexPrefix`);
    /// each request times out after `deadline`.
    pub fn new(es: Elasticsearch, index_prefix: &str, deadline: Duration) -> Self {
        Self {
            es,
            prefix: index_prefix.to_owned(),
            deadline,
        }
    }

    /// How long each request may take.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The monthly index holding `day`.
    pub fn index_of(&self, day: Day) -> String {
        format!("{}-{}", self.prefix, day.month_suffix())
    }

    /// The monthly indices a range of days spans.
    pub fn indices(&self, from: Day, to: Day) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut month = from.month();
        while month <= to {
            out.push(self.index_of(month));
            let (y, m, _) = month.ymd();
            let next = if m == 12 {
                Day::from_ymd(y + 1, 1, 1)
            } else {
                Day::from_ymd(y, m + 1, 1)
            };
            match next {
                Some(next) => month = next,
                None => break,
            }
        }
        out
    }

    /// The document id of a merchant's day: rewriting a day replaces it.
    pub fn id(merchant: &str, day: Day) -> String {
        // The day first: its length is fixed, so no two merchants' ids meet.
        format!("{day}:{merchant}")
    }

    /// The index template of the rollup indices. Pure.
    pub fn template(&self) -> Value {
        json!({
            "index_patterns": [format!("{}-*", self.prefix)],
            "template": {
                "settings": {
                    "number_of_shards": 2,
                    // One replica wherever a second node can hold it.
                    "auto_expand_replicas": "0-1",
                    "refresh_interval": "1s"
                },
                "mappings": {
                    "dynamic": "strict",
                    "date_detection": false,
                    "numeric_detection": false,
                    "_routing": { "required": true },
                    "properties": {
                        "merchant": { "type": "keyword" },
                        "day": { "type": "date", "format": "yyyy-MM-dd" },
                        "shed": { "type": "boolean" },
                        "hourlyOnly": { "type": "boolean" },
                        METRICS: { "type": "object", "dynamic": true }
                    },
                    "dynamic_templates": [
                        { "numbers": { "path_match": "m.*", "match_mapping_type": "long",
                                       "mapping": { "type": "double" } } },
                        { "fractions": { "path_match": "m.*", "match_mapping_type": "double",
                                         "mapping": { "type": "double" } } },
                        { "keywords": { "path_match": "m.*", "match_mapping_type": "string",
                                        "mapping": { "type": "keyword", "ignore_above": 1024 } } },
                        { "flags": { "path_match": "m.*", "match_mapping_type": "boolean",
                                     "mapping": { "type": "boolean" } } }
                    ]
                }
            }
        })
    }

    /// Installs (or updates) the index template; idempotent.
    pub async fn install_template(&self) -> Result<(), EsError> {
        self.put_template(&self.prefix, self.template()).await
    }

    /// Puts the index template `name`; idempotent.
    async fn put_template(&self, name: &str, body: Value) -> Result<(), EsError> {
        crate::es::put_template(&self.es, name, body, self.deadline).await
    }

    /// The document of a rollup. Pure.
    pub fn document(rollup: &Rollup) -> Value {
        let metrics: Map<String, Value> = rollup
            .metrics
            .iter()
            .filter(|(k, v)| !k.starts_with('_') && !v.is_null() && !v.is_array() && !v.is_object())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        json!({
            "merchant": rollup.merchant,
            "day": rollup.day.to_string(),
            "shed": rollup.shed,
            "hourlyOnly": rollup.hourly_only,
            METRICS: metrics,
        })
    }

    /// Writes a rollup (replacing the day's earlier one), visible to searches
    /// once `refresh` says.
    pub async fn write(&self, rollup: &Rollup, refresh: Refresh) -> Result<(), EsError> {
        let index = self.index_of(rollup.day);
        let id = Self::id(&rollup.merchant, rollup.day);
        let response = self
            .es
            .index(IndexParts::IndexId(&index, &id))
            .routing(&rollup.merchant)
            .refresh(refresh)
            .request_timeout(self.deadline)
            .body(Self::document(rollup))
            .send()
            .await?;
        checked(response).await.map(drop)
    }

    /// Writes many rollups in one bulk request (each replacing its day's
    /// earlier one); an error names the first document refused.
    pub async fn write_all(&self, rollups: &[Rollup], refresh: Refresh) -> Result<(), EsError> {
        if rollups.is_empty() {
            return Ok(());
        }
        let operations: Vec<BulkOperation<Value>> = rollups
            .iter()
            .map(|r| {
                BulkOperation::index(Self::document(r))
                    .index(self.index_of(r.day))
                    .id(Self::id(&r.merchant, r.day))
                    .routing(&r.merchant)
                    .into()
            })
            .collect();
        self.bulk(operations, refresh).await
    }

    /// One bulk request; an error names the first operation refused.
    async fn bulk(&self, operations: Vec<BulkOperation<Value>>, refresh: Refresh) -> Result<(), EsError> {
        let response = self
            .es
            .bulk(BulkParts::None)
            .refresh(refresh)
            .request_timeout(self.deadline)
            .body(operations)
            .send()
            .await?;
        let answer = checked(response).await?;
        if answer["errors"].as_bool() == Some(true) {
            let refused = answer["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|item| item["index"]["error"]["reason"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "a document was refused".into());
            return Err(EsError::Refused {
                status: 400,
                reason: refused,
            });
        }
        Ok(())
    }

    /// The result columns the rollups hold, and their types.
    pub async fn columns(&self) -> Result<Columns, EsError> {
        let pattern = format!("{}-*", self.prefix);
        let response = self
            .es
            .indices()
            .get_field_mapping(IndicesGetFieldMappingParts::IndexFields(&[&pattern], &["m.*"]))
            .allow_no_indices(true)
            .ignore_unavailable(true)
            .request_timeout(self.deadline)
            .send()
            .await?;
        Ok(columns_of(&checked(response).await?))
    }

    /// A merchant's rollups from `from` to `to` (inclusive) that meet every
    /// clause of `filters` (Elasticsearch filter clauses on `m.<column>`;
    /// `exclusions` must not match), oldest first.
    pub async fn search(
        &self,
        merchant: &str,
        (from, to): (Day, Day),
        filters: Vec<Value>,
        exclusions: Vec<Value>,
    ) -> Result<Vec<Rollup>, EsError> {
        let indices = self.indices(from, to);
        let indices: Vec<&str> = indices.iter().map(String::as_str).collect();
        let body = search_body(merchant, (from, to), filters, exclusions);
        let response = self
            .es
            .search(SearchParts::Index(&indices))
            .routing(&[merchant])
            .allow_no_indices(true)
            .ignore_unavailable(true)
            .request_timeout(self.deadline)
            .body(body)
            .send()
            .await?;
        rollups_of(&checked(response).await?)
    }
}

/// The search of a merchant's range: filter context only, no scoring, no
/// total count, at most one document per day. Pure.
pub fn search_body(
    merchant: &str,
    (from, to): (Day, Day),
    filters: Vec<Value>,
    exclusions: Vec<Value>,
) -> Value {
    let mut clauses = vec![
        json!({ "term": { "merchant": merchant } }),
        json!({ "range": { "day": { "gte": from.to_string(), "lte": to.to_string() } } }),
    ];
    clauses.extend(filters);
    json!({
        "size": to.0 - from.0 + 1,
        "track_total_hits": false,
        "_source": ["merchant", "day", "shed", "hourlyOnly", METRICS],
        "sort": [{ "day": "asc" }],
        "query": { "bool": { "filter": clauses, "must_not": exclusions } }
    })
}

/// The columns of a field-mapping answer (every index's `m.*` fields). Pure.
pub fn columns_of(answer: &Value) -> Columns {
    let mut columns = Columns::new();
    for index in answer.as_object().into_iter().flat_map(Map::values) {
        for (field, mapping) in index["mappings"].as_object().into_iter().flatten() {
            let Some(column) = field.strip_prefix("m.") else {
                continue;
            };
            let kind = mapping["mapping"][column]["type"].as_str();
            let kind = match kind {
                Some("keyword") => ColumnType::Keyword,
                Some("double" | "long" | "integer" | "float" | "scaled_float" | "short") => {
                    ColumnType::Number
                }
                _ => continue,
            };
            columns.insert(column.to_owned(), kind);
        }
    }
    columns
}

/// The rollups of a search answer. Pure.
pub fn rollups_of(answer: &Value) -> Result<Vec<Rollup>, EsError> {
    let hits = answer["hits"]["hits"]
        .as_array()
        .ok_or_else(|| EsError::Decode("no hits in a search answer".into()))?;
    hits.iter()
        .map(|hit| {
            let source = &hit["_source"];
            let day = source["day"]
                .as_str()
                .and_then(Day::parse)
                .ok_or_else(|| EsError::Decode(format!("a rollup without a day: {}", hit["_id"])))?;
            Ok(Rollup {
                merchant: source["merchant"].as_str().unwrap_or_default().to_owned(),
                day,
                shed: source["shed"].as_bool().unwrap_or(false),
                hourly_only: source["hourlyOnly"].as_bool().unwrap_or(false),
                metrics: source[METRICS].as_object().cloned().unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> Day {
        Day::parse(text).unwrap_or(Day(0))
    }

    #[test]
    fn a_range_reads_only_the_months_it_spans() {
        let es = Elasticsearch::default();
        let store = ColdStore::new(es, "shop-rollups", Duration::from_secs(1));
        assert_eq!(
            store.indices(day("2026-11-20"), day("2027-02-01")),
            vec![
                "shop-rollups-2026.11",
                "shop-rollups-2026.12",
                "shop-rollups-2027.01",
                "shop-rollups-2027.02"
            ]
        );
        assert_eq!(
            store.indices(day("2026-11-01"), day("2026-11-30")),
            vec!["shop-rollups-2026.11"]
        );
        assert_eq!(ColdStore::id("m:1", day("2026-11-02")), "2026-11-02:m:1");
    }

    #[test]
    fn a_document_holds_the_columns_but_not_the_bookkeeping() {
        let rollup = Rollup {
            merchant: "m1".into(),
            day: day("2026-11-02"),
            shed: true,
            hourly_only: false,
            metrics: json!({"gmv": 5, "top": "a,b", "_sql": "v1", "_throughMs": 9, "nothing": null})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        };
        assert_eq!(
            ColdStore::document(&rollup),
            json!({"merchant": "m1", "day": "2026-11-02", "shed": true, "hourlyOnly": false,
                   "m": {"gmv": 5, "top": "a,b"}})
        );
        let answer =
            json!({"hits": {"hits": [{"_id": "2026-11-02:m1", "_source": ColdStore::document(&rollup)}]}});
        let back = rollups_of(&answer).unwrap_or_default();
        assert_eq!(back.len(), 1);
        assert!(back[0].shed && back[0].metrics["gmv"] == 5 && !back[0].metrics.contains_key("_sql"));
        assert!(rollups_of(&json!({"error": "x"})).is_err());
    }

    #[test]
    fn field_mappings_read_into_typed_columns() {
        let answer = json!({
            "r-2026.10": {"mappings": {
                "m.gmv": {"full_name": "m.gmv", "mapping": {"gmv": {"type": "double"}}},
                "m.top": {"full_name": "m.top", "mapping": {"top": {"type": "keyword"}}}
            }},
            "r-2026.11": {"mappings": {
                "m.users": {"full_name": "m.users", "mapping": {"users": {"type": "double"}}},
                "m.flag": {"full_name": "m.flag", "mapping": {"flag": {"type": "boolean"}}}
            }},
            "r-2026.12": {"mappings": {}}
        });
        let want: Columns = [
            ("gmv".to_owned(), ColumnType::Number),
            ("top".to_owned(), ColumnType::Keyword),
            ("users".to_owned(), ColumnType::Number),
        ]
        .into();
        assert_eq!(columns_of(&answer), want);
        assert!(columns_of(&json!({})).is_empty());
    }
}

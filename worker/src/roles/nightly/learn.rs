//! What the nightly job learns from the cold query log: each merchant's
//! frequent cold queries, the most asked first and, among as many asks, the
//! costliest (the longest the cold store took) first. Pure.

use std::collections::BTreeMap;

/// How often a merchant asked one normalised query over the lookback.
#[derive(Clone, Debug, PartialEq)]
pub struct Asked {
    /// The merchant.
    pub merchant: String,
    /// The normalised query.
    pub key: String,
    /// Times asked.
    pub count: u64,
    /// Mean time the cold store took, in ms.
    pub took_ms: f64,
}

/// Each merchant's `per_merchant` most frequent queries, by count, then
/// cost, then key (so that a rerun picks the same).
pub fn pick(asked: Vec<Asked>, per_merchant: usize) -> BTreeMap<String, Vec<String>> {
    let mut by_merchant: BTreeMap<String, Vec<Asked>> = BTreeMap::new();
    for a in asked {
        by_merchant.entry(a.merchant.clone()).or_default().push(a);
    }
    by_merchant
        .into_iter()
        .filter_map(|(merchant, mut queries)| {
            queries.sort_by(|a, b| {
                b.count
                    .cmp(&a.count)
                    .then(b.took_ms.total_cmp(&a.took_ms))
                    .then(a.key.cmp(&b.key))
            });
            let keys: Vec<String> = queries.into_iter().take(per_merchant).map(|q| q.key).collect();
            (!keys.is_empty()).then_some((merchant, keys))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(merchant: &str, key: &str, count: u64, took_ms: f64) -> Asked {
        Asked {
            merchant: merchant.into(),
            key: key.into(),
            count,
            took_ms,
        }
    }

    #[test]
    fn each_merchant_keeps_its_most_asked_then_costliest_queries() {
        let picked = pick(
            vec![
                asked("m1", "last7", 7, 3.0),
                asked("m1", "once-a", 1, 90.0),
                asked("m1", "twice", 2, 1.0),
                asked("m1", "twice-slow", 2, 5.0),
                asked("m2", "once-b", 1, 1.0),
                asked("m2", "once-a", 1, 1.0),
            ],
            3,
        );
        let want: BTreeMap<String, Vec<String>> = [
            (
                "m1".to_owned(),
                vec!["last7".to_owned(), "twice-slow".into(), "twice".into()],
            ),
            ("m2".to_owned(), vec!["once-a".to_owned(), "once-b".into()]),
        ]
        .into();
        assert_eq!(picked, want);
        assert!(
            pick(vec![asked("m1", "k", 1, 1.0)], 0).is_empty(),
            "none wanted: none kept"
        );
    }
}

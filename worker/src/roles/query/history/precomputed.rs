//! The frequent cold queries the nightly job precomputed for today, held in
//! this pod's memory (loaded from the hot MySQL at start and every minute):
//! while the cold store is down they are answered from here even if the hot
//! MySQL and the cache are down too.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cold::Day;
use crate::results::hot::HotStore;

/// Today's precomputed answers, by merchant and normalised query.
#[derive(Default)]
pub struct Precomputed {
    loaded: RwLock<Arc<Loaded>>,
}

#[derive(Default)]
struct Loaded {
    day: Option<Day>,
    by_merchant: HashMap<String, HashMap<String, Arc<str>>>,
}

impl Precomputed {
    /// The answer to `key` for `merchant`, if precomputed for `today`.
    pub fn answer(&self, merchant: &str, key: &str, today: Day) -> Option<Arc<str>> {
        let loaded = self.current();
        if loaded.day != Some(today) {
            return None;
        }
        loaded.by_merchant.get(merchant)?.get(key).cloned()
    }

    /// The queries precomputed for `merchant` for `today`, sorted.
    pub fn covered(&self, merchant: &str, today: Day) -> Vec<String> {
        let loaded = self.current();
        let mut keys: Vec<String> = match (loaded.day == Some(today), loaded.by_merchant.get(merchant)) {
            (true, Some(queries)) => queries.keys().cloned().collect(),
            _ => Vec::new(),
        };
        keys.sort();
        keys
    }

    /// Replaces the answers with `day`'s `rows` (merchant, key, answer).
    pub fn replace(&self, day: Day, rows: Vec<(String, String, String)>) {
        let mut by_merchant: HashMap<String, HashMap<String, Arc<str>>> = HashMap::new();
        for (merchant, key, answer) in rows {
            by_merchant
                .entry(merchant)
                .or_default()
                .insert(key, answer.into());
        }
        let loaded = Arc::new(Loaded {
            day: Some(day),
            by_merchant,
        });
        *self
            .loaded
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = loaded;
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(
            &self
                .loaded
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// Loads today's answers into `precomputed` now and every `every` until
/// `stopped`; a failed load keeps what was loaded.
pub async fn refresh(
    precomputed: Arc<Precomputed>,
    hot: HotStore,
    pipeline: String,
    (every, deadline): (Duration, Duration),
    stopped: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = stopped.cancelled() => return,
            _ = tick.tick() => {}
        }
        let today = Day::of_ms(k8s_openapi::jiff::Timestamp::now().as_millisecond());
        match tokio::time::timeout(deadline, hot.precomputed(&pipeline, today.start_ms())).await {
            Ok(Ok(rows)) => precomputed.replace(
                today,
                rows.into_iter().map(|p| (p.merchant, p.key, p.answer)).collect(),
            ),
            Ok(Err(error)) => tracing::debug!(%error, "loading the precomputed answers failed"),
            Err(_) => tracing::debug!("loading the precomputed answers timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_todays_answers_are_served_and_listed() {
        let p = Precomputed::default();
        let today = Day::parse("2026-11-30").unwrap_or(Day(0));
        assert_eq!(p.answer("m1", "k", today), None, "nothing loaded");
        p.replace(
            today,
            vec![
                ("m1".into(), "kb".into(), "{\"b\":1}".into()),
                ("m1".into(), "ka".into(), "{\"a\":1}".into()),
                ("m2".into(), "kc".into(), "{}".into()),
            ],
        );
        assert_eq!(p.answer("m1", "ka", today).as_deref(), Some("{\"a\":1}"));
        assert_eq!(p.answer("m1", "kc", today), None, "another merchant's query");
        assert_eq!(p.covered("m1", today), vec!["ka".to_owned(), "kb".into()]);
        assert!(p.covered("m3", today).is_empty());
        assert_eq!(
            p.answer("m1", "ka", today.next()),
            None,
            "yesterday's set is stale"
        );
        assert!(p.covered("m1", today.next()).is_empty());
    }
}

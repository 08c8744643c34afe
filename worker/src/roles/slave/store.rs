//! The slave's in-memory event store, used while the KV store is down: events
//! by window and merchant, deduplicated by event id, kept for the retention,
//! under a hard memory bound. Pure: time comes in as an argument.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::wire::ChangeEvent;

/// Why a batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Storing the batch would pass the memory bound; nothing of it was stored.
    #[error("batch of {batch_bytes} bytes does not fit: {held_bytes} of {max_bytes} bytes held")]
    Full {
        /// Estimated size of the refused batch.
        batch_bytes: u64,
        /// Bytes held now.
        held_bytes: u64,
        /// The bound.
        max_bytes: u64,
    },
}

/// A span reaching back before what the retention kept: computed over what is
/// left, it would be partial, and would replace a result computed while whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "events before {expired_until_ms} have expired from memory (the policy's retention), \
     so the span from {start_ms} is no longer whole; the result computed while it was stands"
)]
pub struct SpanExpired {
    /// Start of the span asked for.
    pub start_ms: i64,
    /// Windows starting before this were dropped for age.
    pub expired_until_ms: i64,
}

/// What one stored batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Events stored.
    pub accepted: u32,
    /// Events already held (same id), dropped.
    pub duplicates: u32,
    /// Events older than the retention, dropped.
    pub expired: u32,
}

/// One window's events.
#[derive(Debug, Default)]
struct Window {
    by_merchant: HashMap<String, Vec<ChangeEvent>>,
    ids: HashSet<String>,
    events: u64,
    bytes: u64,
}

/// Summary of one held window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Window start, ms since the epoch.
    pub window_start_ms: i64,
    /// Events held.
    pub events: u64,
    /// Distinct merchants.
    pub merchants: u32,
}

/// Events held in memory, by window.
#[derive(Debug)]
pub struct Store {
    window_ms: i64,
    retention_ms: i64,
    max_bytes: u64,
    windows: BTreeMap<i64, Window>,
    bytes: u64,
    /// Windows starting before this were dropped for age.
    expired_until_ms: i64,
}

/// Estimated memory of one event: its strings and columns plus a fixed overhead.
fn size_of(event: &ChangeEvent) -> u64 {
    let text = event.event_id.len() * 2 + event.merchant_id.len() + event.table.len() + event.columns.len();
    u64::try_from(text).unwrap_or(u64::MAX).saturating_add(96)
}

impl Store {
    /// A store cutting windows of `window_ms`, keeping `retention_ms`, holding at most `max_bytes`.
    pub fn new(window_ms: i64, retention_ms: i64, max_bytes: u64) -> Self {
        Self {
            window_ms: window_ms.max(1),
            retention_ms,
            max_bytes,
            windows: BTreeMap::new(),
            bytes: 0,
            expired_until_ms: i64::MIN,
        }
    }

    fn window_of(&self, time_ms: i64) -> i64 {
        time_ms.div_euclid(self.window_ms) * self.window_ms
    }

    /// Oldest window start still kept at `now_ms`.
    fn horizon(&self, now_ms: i64) -> i64 {
        self.window_of(now_ms.saturating_sub(self.retention_ms))
    }

    /// Stores a batch, all or nothing: refused whole when it would pass the bound.
    pub fn insert(&mut self, batch: Vec<ChangeEvent>, now_ms: i64) -> Result<Stored, StoreError> {
        let horizon = self.horizon(now_ms);
        let fresh: u64 = batch
            .iter()
            .filter(|e| self.window_of(e.event_time_ms) >= horizon)
            .map(size_of)
            .sum();
        if self.bytes.saturating_add(fresh) > self.max_bytes {
            return Err(StoreError::Full {
                batch_bytes: fresh,
                held_bytes: self.bytes,
                max_bytes: self.max_bytes,
            });
        }
        let mut stored = Stored::default();
        for event in batch {
            let start = self.window_of(event.event_time_ms);
            if start < horizon {
                stored.expired += 1;
                continue;
            }
            let window = self.windows.entry(start).or_default();
            if !window.ids.insert(event.event_id.clone()) {
                stored.duplicates += 1;
                continue;
            }
            let size = size_of(&event);
            window.bytes += size;
            window.events += 1;
            self.bytes += size;
            window
                .by_merchant
                .entry(event.merchant_id.clone())
                .or_default()
                .push(event);
            stored.accepted += 1;
        }
        Ok(stored)
    }

    /// Drops windows older than the retention; returns how many events went.
    pub fn expire(&mut self, now_ms: i64) -> u64 {
        let horizon = self.horizon(now_ms);
        let keep = self.windows.split_off(&horizon);
        let dropped = std::mem::replace(&mut self.windows, keep);
        if !dropped.is_empty() {
            self.expired_until_ms = self.expired_until_ms.max(horizon);
        }
        let (events, bytes) = dropped
            .values()
            .fold((0, 0), |(e, b), w| (e + w.events, b + w.bytes));
        self.bytes -= bytes;
        events
    }

    /// Every held window, oldest first.
    pub fn holdings(&self) -> Vec<Held> {
        self.windows
            .iter()
            .map(|(start, w)| Held {
                window_start_ms: *start,
                events: w.events,
                merchants: u32::try_from(w.by_merchant.len()).unwrap_or(u32::MAX),
            })
            .collect()
    }

    /// Events of one window, all merchants.
    pub fn window(&self, window_start_ms: i64) -> impl Iterator<Item = &ChangeEvent> {
        self.windows
            .get(&window_start_ms)
            .into_iter()
            .flat_map(|w| w.by_merchant.values().flatten())
    }

    /// Events of the windows starting in `[start_ms, end_ms)`, all merchants,
    /// cloned; refused when windows of the span were already dropped for age.
    pub fn span(&self, start_ms: i64, end_ms: i64) -> Result<Vec<ChangeEvent>, SpanExpired> {
        if start_ms < self.expired_until_ms {
            return Err(SpanExpired {
                start_ms,
                expired_until_ms: self.expired_until_ms,
            });
        }
        Ok(self
            .windows
            .range(start_ms..end_ms.max(start_ms))
            .flat_map(|(_, w)| w.by_merchant.values().flatten())
            .cloned()
            .collect())
    }

    /// Events of one window for one merchant.
    pub fn merchant(&self, window_start_ms: i64, merchant: &str) -> &[ChangeEvent] {
        self.windows
            .get(&window_start_ms)
            .and_then(|w| w.by_merchant.get(merchant))
            .map_or(&[], Vec::as_slice)
    }

    /// Every merchant with events held, in any window.
    pub fn merchants(&self) -> BTreeSet<&str> {
        self.windows
            .values()
            .flat_map(|w| w.by_merchant.keys().map(String::as_str))
            .collect()
    }

    /// Copies of every held event of `merchants`, oldest window first.
    pub fn events_of(&self, merchants: &BTreeSet<String>) -> Vec<ChangeEvent> {
        self.windows
            .values()
            .flat_map(|w| merchants.iter().filter_map(|m| w.by_merchant.get(m)).flatten())
            .cloned()
            .collect()
    }

    /// Removes `events` (matched by window, merchant and id), freeing their
    /// bytes; returns how many of them were held.
    pub fn remove(&mut self, events: &[ChangeEvent]) -> u64 {
        let mut places: BTreeMap<(i64, &str), HashSet<&str>> = BTreeMap::new();
        for event in events {
            places
                .entry((self.window_of(event.event_time_ms), event.merchant_id.as_str()))
                .or_default()
                .insert(event.event_id.as_str());
        }
        let mut removed = 0;
        for ((start, merchant), gone) in places {
            let Some(window) = self.windows.get_mut(&start) else {
                continue;
            };
            let Window {
                by_merchant,
                ids,
                events,
                bytes,
            } = window;
            let Some(held) = by_merchant.get_mut(merchant) else {
                continue;
            };
            held.retain(|event| {
                let keep = !gone.contains(event.event_id.as_str());
                if !keep {
                    ids.remove(&event.event_id);
                    let size = size_of(event);
                    *bytes -= size;
                    self.bytes -= size;
                    *events -= 1;
                    removed += 1;
                }
                keep
            });
            if held.is_empty() {
                by_merchant.remove(merchant);
            }
            if *events == 0 {
                self.windows.remove(&start);
            }
        }
        removed
    }

    /// Events held.
    pub fn events(&self) -> u64 {
        self.windows.values().map(|w| w.events).sum()
    }

    /// Start of the oldest window held.
    pub fn oldest_window_ms(&self) -> Option<i64> {
        self.windows.keys().next().copied()
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The memory bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn event(id: &str, merchant: &str, time_ms: i64) -> ChangeEvent {
        ChangeEvent::insert(id, merchant, "orders", time_ms, br#"{"amount":100}"#.to_vec())
    }

    /// m1 in both windows, m2 in the first.
    fn two_windows() -> Vec<ChangeEvent> {
        vec![
            event("a", "m1", 10),
            event("b", "m2", 20),
            event("c", "m1", MIN + 5),
        ]
    }

    #[test]
    fn events_are_held_by_window_and_merchant() {
        let mut store = Store::new(MIN, 60 * MIN, 1 << 20);
        let stored = store.insert(two_windows(), MIN + 10).expect("fits");
        assert_eq!(stored.accepted, 3);
        assert_eq!(store.merchant(0, "m1").len(), 1);
        assert_eq!(store.window(0).count(), 2);
        assert_eq!(store.merchant(MIN, "m1")[0].event_id, "c");
        assert_eq!(store.span(0, 2 * MIN).map(|s| s.len()), Ok(3), "both windows");
        assert_eq!(
            store.span(MIN, 2 * MIN).map(|s| s.len()),
            Ok(1),
            "end is exclusive of earlier windows"
        );
        assert_eq!((store.events(), store.oldest_window_ms()), (3, Some(0)));
        let held = store.holdings();
        assert_eq!(
            held,
            [
                Held {
                    window_start_ms: 0,
                    events: 2,
                    merchants: 2
                },
                Held {
                    window_start_ms: MIN,
                    events: 1,
                    merchants: 1
                }
            ]
        );
    }

    #[test]
    fn duplicate_ids_are_dropped_and_counted() {
        let mut store = Store::new(MIN, 60 * MIN, 1 << 20);
        store.insert(vec![event("a", "m1", 10)], 20).expect("fits");
        let again = store
            .insert(vec![event("a", "m1", 10), event("b", "m1", 11)], 20)
            .expect("fits");
        assert_eq!((again.accepted, again.duplicates), (1, 1));
        assert_eq!(store.window(0).count(), 2);
    }

    #[test]
    fn retention_drops_old_windows_and_their_bytes() {
        let mut store = Store::new(MIN, 2 * MIN, 1 << 20);
        // Inserted while both windows are within the retention...
        store
            .insert(vec![event("a", "m", 0), event("b", "m", 2 * MIN)], 2 * MIN)
            .expect("fits");
        assert_eq!(store.holdings().len(), 2);
        let before = store.bytes();
        // ...a minute later the first has aged out.
        assert_eq!(store.span(0, 3 * MIN).map(|s| s.len()), Ok(2));
        assert_eq!(store.expire(3 * MIN), 1);
        assert_eq!(store.holdings().len(), 1);
        assert!(store.bytes() < before);
        // A span reaching back into it is no longer whole: refused, not computed partially.
        assert_eq!(
            store.span(0, 3 * MIN),
            Err(SpanExpired {
                start_ms: 0,
                expired_until_ms: MIN
            })
        );
        assert_eq!(
            store.span(MIN, 3 * MIN).map(|s| s.len()),
            Ok(1),
            "what is whole still is"
        );
        // Events older than the retention are refused on arrival, but acknowledged as expired.
        let late = store.insert(vec![event("c", "m", 0)], 3 * MIN).expect("fits");
        assert_eq!((late.accepted, late.expired), (0, 1));
    }

    #[test]
    fn a_merchant_handed_away_leaves_nothing_behind() {
        let mut store = Store::new(MIN, 60 * MIN, 1 << 20);
        store.insert(two_windows(), MIN + 10).expect("fits");
        let full = store.bytes();
        assert_eq!(store.merchants(), BTreeSet::from(["m1", "m2"]));
        let m1 = store.events_of(&BTreeSet::from(["m1".to_owned()]));
        let ids: Vec<&str> = m1.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"], "every window, oldest first");
        // An event stored since the copy was taken stays: only what was handed over goes.
        store.insert(vec![event("d", "m1", 30)], MIN + 10).expect("fits");
        assert_eq!(store.remove(&m1), 2);
        assert_eq!(store.merchants(), BTreeSet::from(["m1", "m2"]));
        assert_eq!(store.merchant(0, "m1").len(), 1);
        assert_eq!(store.holdings().len(), 1, "the emptied window is gone");
        assert_eq!(
            store.bytes(),
            full - size_of(&m1[0]) - size_of(&m1[1]) + size_of(&event("d", "m1", 30))
        );
        assert_eq!(store.remove(&m1), 0, "removing twice removes nothing");
        // A handed-over event may come back (ownership moved again): it is not a duplicate.
        let back = store.insert(vec![event("a", "m1", 10)], MIN + 10).expect("fits");
        assert_eq!(back.accepted, 1);
    }

    #[test]
    fn a_batch_past_the_memory_bound_is_refused_whole() {
        let one = size_of(&event("a", "m", 0));
        let mut store = Store::new(MIN, 60 * MIN, one * 2);
        store.insert(vec![event("a", "m", 0)], 0).expect("fits");
        let err = store
            .insert(vec![event("b", "m", 0), event("c", "m", 0)], 0)
            .expect_err("over the bound");
        assert!(matches!(err, StoreError::Full { .. }));
        assert_eq!(store.window(0).count(), 1, "nothing of a refused batch is stored");
        assert!(store.insert(vec![event("b", "m", 0)], 0).is_ok());
    }
}

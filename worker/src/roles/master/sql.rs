//! Which SQL computes which window: the master adopts each SQL the operator
//! publishes from the next window it plans, for every slave, and stamps every
//! task with the SQL of its window (an hour task with the SQL of its hour's
//! start), so a change applies from one window on, the same everywhere,
//! KV-degraded mode included. Kept in the master's state. Pure.

use serde::{Deserialize, Serialize};

/// A SQL and the first window it computes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqlVersion {
    /// Its identity (`ballast_crds::sql::id`).
    pub id: String,
    /// Its text.
    pub text: String,
    /// Start of the first window it computes.
    pub from_ms: i64,
}

/// The SQL of the window (or hour) starting at `start_ms`: the latest version
/// in force then; the oldest one for a window before them all.
pub fn for_window(versions: &[SqlVersion], start_ms: i64) -> Option<&SqlVersion> {
    versions
        .iter()
        .rev()
        .find(|v| v.from_ms <= start_ms)
        .or_else(|| versions.first())
}

/// Adopts SQL `id` from window `from_ms` on, unless it is the latest already;
/// whether it was adopted. A version that would start at or before the
/// latest one's start replaces it (nothing was planned with it yet).
pub fn adopt(versions: &mut Vec<SqlVersion>, id: &str, text: &str, from_ms: i64) -> bool {
    if versions.last().is_some_and(|v| v.id == id) {
        return false;
    }
    while versions.last().is_some_and(|v| v.from_ms >= from_ms) && versions.len() > 1 {
        versions.pop();
    }
    let version = SqlVersion {
        id: id.to_owned(),
        text: text.to_owned(),
        from_ms,
    };
    match versions.last_mut() {
        Some(last) if last.from_ms >= from_ms => *last = version,
        _ => versions.push(version),
    }
    true
}

/// Forgets the versions no window from `oldest_ms` on uses.
pub fn prune(versions: &mut Vec<SqlVersion>, oldest_ms: i64) {
    let in_force = versions.iter().rposition(|v| v.from_ms <= oldest_ms).unwrap_or(0);
    versions.drain(..in_force);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(id: &str, from_ms: i64) -> SqlVersion {
        SqlVersion {
            id: id.into(),
            text: format!("SELECT '{id}'"),
            from_ms,
        }
    }

    #[test]
    fn each_window_gets_the_sql_in_force_at_its_start() {
        let versions = [version("a", 0), version("b", 120), version("c", 300)];
        // (window or hour start, SQL)
        for (start, want) in [
            (-60, "a"),
            (0, "a"),
            (60, "a"),
            (120, "b"),
            (299, "b"),
            (300, "c"),
            (9_000, "c"),
        ] {
            assert_eq!(
                for_window(&versions, start).map(|v| v.id.as_str()),
                Some(want),
                "{start}"
            );
        }
        assert_eq!(for_window(&[], 0), None);
    }

    #[test]
    fn a_new_sql_applies_from_the_next_window_and_the_same_one_twice_changes_nothing() {
        let mut versions = vec![version("a", 0)];
        assert!(adopt(&mut versions, "b", "SELECT 'b'", 120));
        assert!(!adopt(&mut versions, "b", "SELECT 'b'", 180));
        // Replaced before any window used it: only the latest stays at that start.
        assert!(adopt(&mut versions, "c", "SELECT 'c'", 120));
        let ids: Vec<(&str, i64)> = versions.iter().map(|v| (v.id.as_str(), v.from_ms)).collect();
        assert_eq!(ids, [("a", 0), ("c", 120)]);
        let mut first = Vec::new();
        assert!(adopt(&mut first, "a", "SELECT 'a'", 60));
        assert_eq!(first, [version("a", 60)]);
    }

    #[test]
    fn versions_no_remaining_window_uses_are_forgotten() {
        let mut versions = vec![version("a", 0), version("b", 120), version("c", 300)];
        prune(&mut versions, 60);
        assert_eq!(versions.len(), 3);
        prune(&mut versions, 200);
        let ids: Vec<&str> = versions.iter().map(|v| v.id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        prune(&mut versions, 10_000);
        assert_eq!(versions, [version("c", 300)]);
    }
}

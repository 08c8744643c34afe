//! Where the intake sends events: the KV store, or — while the operator
//! publishes the KV store as Degraded — the slaves of the slave set published
//! with that epoch, by merchant. Pure.

use ballast_crds::{Mode, SlaveSet};

use crate::routing::Ring;

/// The live, ready slaves: identity → address.
pub type Slaves = crate::membership::Members;

/// Where events go now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The KV store (Normal and Recovering: the intake writes to the KV store again).
    Kv,
    /// The slaves of the published set, hash-distributed by merchant.
    Slaves {
        /// The ring over the set's members.
        ring: Ring,
        /// Their addresses.
        addresses: Slaves,
        /// Epoch of the published KV mode.
        epoch: i64,
        /// Generation of the set, stamped on every delivery.
        generation: i64,
    },
}

/// Why events cannot be routed to the slaves yet: the batch waits (it is not
/// acknowledged) rather than go over a guessed set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unroutable {
    /// The Degraded epoch was seen before its slave set.
    #[error("kv epoch {0} is Degraded but no slave set is published for it yet")]
    NoSet(i64),
    /// The published set is empty.
    #[error("the slave set of kv epoch {0} is empty")]
    Empty(i64),
    /// Members of the set whose Lease (and so address) this intake has not seen yet.
    #[error("slaves {0:?} of the published set are not in this intake's membership view yet")]
    Unknown(Vec<String>),
}

/// Whether a published KV mode routes to the KV store (Normal and
/// Recovering) rather than to the slaves (Degraded).
pub fn to_kv(kv_mode: Mode) -> bool {
    match kv_mode {
        Mode::Degraded => false,
        Mode::Normal | Mode::Recovering => true,
    }
}

/// The route for a published KV mode and epoch, the slave set published with
/// it, and this intake's view of the slaves' addresses.
pub fn route(kv_mode: Mode, epoch: i64, set: Option<&SlaveSet>, view: &Slaves) -> Result<Route, Unroutable> {
    if to_kv(kv_mode) {
        return Ok(Route::Kv);
    }
    let set = set.filter(|s| s.epoch == epoch).ok_or(Unroutable::NoSet(epoch))?;
    if set.members.is_empty() {
        return Err(Unroutable::Empty(epoch));
    }
    let unknown: Vec<String> = set
        .members
        .iter()
        .filter(|m| !view.contains_key(*m))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(Unroutable::Unknown(unknown));
    }
    let addresses: Slaves = set
        .members
        .iter()
        .filter_map(|m| Some((m.clone(), view.get(m)?.clone())))
        .collect();
    Ok(Route::Slaves {
        ring: Ring::new(set.members.iter().cloned()),
        addresses,
        epoch,
        generation: set.generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(names: &[&str]) -> Slaves {
        names
            .iter()
            .map(|n| ((*n).to_owned(), format!("{n}:7071")))
            .collect()
    }

    fn set(epoch: i64, generation: i64, members: &[&str]) -> SlaveSet {
        SlaveSet {
            epoch,
            generation,
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    /// (mode, epoch, set, view, want: Ok(members, generation) or the error)
    type Case<'a> = (
        Mode,
        i64,
        Option<&'a SlaveSet>,
        Slaves,
        Result<(Vec<&'a str>, i64), Unroutable>,
    );

    #[test]
    fn only_a_published_degraded_kv_routes_to_slaves_and_only_over_its_set() {
        let two = set(1, 2, &["s-0", "s-1"]);
        let all = view(&["s-0", "s-1", "s-2"]);
        let cases: [Case<'_>; 7] = [
            (Mode::Normal, 0, None, all.clone(), Ok((vec![], 0))),
            (Mode::Recovering, 2, Some(&two), all.clone(), Ok((vec![], 0))),
            // A slave the view has but the set lacks gets nothing.
            (
                Mode::Degraded,
                1,
                Some(&two),
                all.clone(),
                Ok((vec!["s-0", "s-1"], 2)),
            ),
            (Mode::Degraded, 1, None, all.clone(), Err(Unroutable::NoSet(1))),
            (
                Mode::Degraded,
                2,
                Some(&two),
                all.clone(),
                Err(Unroutable::NoSet(2)),
            ),
            (
                Mode::Degraded,
                1,
                Some(&set(1, 1, &[])),
                all.clone(),
                Err(Unroutable::Empty(1)),
            ),
            // A member this intake has not seen yet: wait, never route over fewer.
            (
                Mode::Degraded,
                1,
                Some(&two),
                view(&["s-0"]),
                Err(Unroutable::Unknown(vec!["s-1".to_owned()])),
            ),
        ];
        for (mode, epoch, set, view, want) in cases {
            let got = route(mode, epoch, set, &view).map(|r| match r {
                Route::Kv => (vec![], 0),
                Route::Slaves {
                    addresses,
                    generation,
                    ..
                } => (addresses.into_keys().collect::<Vec<String>>(), generation),
            });
            let want =
                want.map(|(members, g)| (members.into_iter().map(str::to_owned).collect::<Vec<_>>(), g));
            assert_eq!(got, want, "{mode:?}@{epoch} over {set:?}");
        }
    }
}

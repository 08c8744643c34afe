//! Where the intake sends events: the KV store, or — while the operator
//! publishes the KV store as Degraded — the live slaves, by merchant. Pure.

use ballast_crds::Mode;

use crate::routing::Ring;

/// The live, ready slaves: identity → address.
pub type Slaves = crate::membership::Members;

/// Where events go now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The KV store (Normal and Recovering: the intake writes to the KV store again).
    Kv,
    /// The slaves, hash-distributed by merchant, under the KV mode's epoch.
    Slaves {
        /// The ring over the live slaves.
        ring: Ring,
        /// Their addresses.
        addresses: Slaves,
        /// Epoch of the published KV mode.
        epoch: i64,
    },
}

/// Whether a published KV mode routes to the KV store (Normal and
/// Recovering) rather than to the slaves (Degraded).
pub fn to_kv(kv_mode: Mode) -> bool {
    match kv_mode {
        Mode::Degraded => false,
        Mode::Normal | Mode::Recovering => true,
    }
}

/// The route for a published KV mode and the current membership.
pub fn route(kv_mode: Mode, epoch: i64, slaves: &Slaves) -> Route {
    if to_kv(kv_mode) {
        return Route::Kv;
    }
    Route::Slaves {
        ring: Ring::new(slaves.keys().cloned()),
        addresses: slaves.clone(),
        epoch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_published_degraded_kv_routes_to_slaves() {
        let slaves: Slaves = [("s-0".to_owned(), "127.0.0.1:1".to_owned())].into();
        assert_eq!(route(Mode::Normal, 0, &slaves), Route::Kv);
        assert_eq!(route(Mode::Recovering, 2, &slaves), Route::Kv);
        let Route::Slaves { ring, epoch, .. } = route(Mode::Degraded, 1, &slaves) else {
            panic!("expected slaves")
        };
        assert_eq!((ring.owner("m"), epoch), (Some("s-0"), 1));
    }
}

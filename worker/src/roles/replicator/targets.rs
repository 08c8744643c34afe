//! Which clusters the replicator keeps: every data centre's Elasticsearch
//! but the active one's (which the member services write), and the
//! marketing cluster. Pure.

use ballast_crds::MemberStore;

/// The name the marketing cluster goes by among the targets.
pub const MARKETING: &str = "marketing";

/// One cluster the replicator keeps.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    /// The data centre's name, or [`MARKETING`].
    pub name: String,
    /// The cluster's URL.
    pub url: String,
}

/// The data centre whose Elasticsearch the member services write: the one
/// the operator published, else the primary.
pub fn active(store: &MemberStore) -> &str {
    store
        .status
        .as_ref()
        .and_then(|s| s.active_data_center.as_deref())
        .unwrap_or(&store.spec.primary)
}

/// The clusters `store` has the replicator keep, in a stable order.
pub fn of(store: &MemberStore) -> Vec<Target> {
    let active = active(store);
    let mut targets: Vec<Target> = store
        .spec
        .data_centers
        .iter()
        .filter(|dc| dc.name != active)
        .map(|dc| Target {
            name: dc.name.clone(),
            url: dc.elasticsearch.url.clone(),
        })
        .collect();
    targets.extend(store.spec.marketing_elasticsearch.as_ref().map(|m| Target {
        name: MARKETING.to_owned(),
        url: m.url.clone(),
    }));
    targets.sort();
    targets
}

/// The consumer group that keeps `target` of MemberStore `name` in
/// `namespace`: its committed offset is what the cluster holds.
pub fn group(namespace: &str, name: &str, target: &str) -> String {
    format!("ballast-members-{namespace}.{name}-replica-{target}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MemberStore {
        serde_yaml::from_str(include_str!("../../../../manifests/samples/memberstore.yaml"))
            .unwrap_or_else(|e| panic!("sample MemberStore: {e}"))
    }

    fn names(store: &MemberStore) -> Vec<String> {
        of(store).into_iter().map(|t| t.name).collect()
    }

    #[test]
    fn the_replicator_keeps_every_cluster_but_the_active_one() {
        let mut store = sample();
        let primary = store.spec.primary.clone();
        let others: Vec<String> = store
            .spec
            .data_centers
            .iter()
            .map(|dc| dc.name.clone())
            .filter(|n| *n != primary)
            .collect();
        let marketing = store.spec.marketing_elasticsearch.is_some();
        // (what the store says, the targets)
        let mut want = others.clone();
        if marketing {
            want.push(MARKETING.to_owned());
        }
        want.sort();
        assert_eq!(names(&store), want, "nothing published: the primary is active");

        let promoted = others[0].clone();
        store.status = Some(ballast_crds::MemberStoreStatus {
            active_data_center: Some(promoted.clone()),
            ..ballast_crds::MemberStoreStatus::default()
        });
        let kept = names(&store);
        assert!(
            kept.contains(&primary),
            "the old primary is kept once another is active: {kept:?}"
        );
        assert!(
            !kept.contains(&promoted),
            "the promoted one is written, not kept: {kept:?}"
        );

        store.spec.marketing_elasticsearch = None;
        assert!(!names(&store).contains(&MARKETING.to_owned()));
    }

    #[test]
    fn each_cluster_has_a_group_of_its_own() {
        assert_ne!(group("ns", "members", "dc-b"), group("ns", "members", MARKETING));
        assert_ne!(group("ns", "members", "dc-b"), group("ns", "other", "dc-b"));
    }
}

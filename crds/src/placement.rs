//! Where a resource's pods run: the scheduling fields the operator gives every pod it creates.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PodSpec, Toleration};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The scheduling of every pod of a resource: which nodes, which taints, which
/// scheduler, which priority. Unset, the pods go wherever the cluster's
/// default scheduler puts them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Node labels every pod requires (the pods' `nodeSelector`), e.g. a
    /// node pool reserved for the pipeline.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate, e.g. those of that node pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// The scheduler that places the pods (the pods' `schedulerName`), when
    /// not the cluster's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub scheduler_name: Option<String>,
    /// The pods' PriorityClass, so that a busy cluster preempts others first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

impl Placement {
    /// Sets these fields on `pod`, leaving the rest of it as it is.
    pub fn apply_to(&self, pod: &mut PodSpec) {
        if !self.node_selector.is_empty() {
            pod.node_selector = Some(self.node_selector.clone());
        }
        if !self.tolerations.is_empty() {
            pod.tolerations = Some(self.tolerations.clone());
        }
        pod.scheduler_name.clone_from(&self.scheduler_name);
        pod.priority_class_name.clone_from(&self.priority_class_name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_placement_leaves_the_pod_to_the_default_scheduler() {
        let mut pod = PodSpec::default();
        Placement::default().apply_to(&mut pod);
        assert_eq!(pod, PodSpec::default());
    }

    #[test]
    fn a_placement_sets_the_pods_scheduling_fields() {
        let placement = Placement {
            node_selector: [("pool".to_owned(), "analytics".to_owned())].into(),
            tolerations: vec![Toleration {
                key: Some("pool".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            }],
            scheduler_name: Some("ballast-real-node".into()),
            priority_class_name: Some("analytics".into()),
        };
        let mut pod = PodSpec {
            service_account_name: Some("shop-worker".into()),
            ..PodSpec::default()
        };
        placement.apply_to(&mut pod);
        assert_eq!(pod.node_selector, Some(placement.node_selector.clone()));
        assert_eq!(pod.tolerations, Some(placement.tolerations.clone()));
        assert_eq!(pod.scheduler_name.as_deref(), Some("ballast-real-node"));
        assert_eq!(pod.priority_class_name.as_deref(), Some("analytics"));
        assert_eq!(pod.service_account_name.as_deref(), Some("shop-worker"));
    }
}

//! What every worker pod runs with beyond its role: the `restricted` Pod
//! Security Standard (non-root, read-only root filesystem, no privilege
//! escalation, no capabilities, the runtime's seccomp profile), resources
//! by default, and the disruption budgets that keep a node drain from taking
//! a role's pods down together. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, EmptyDirVolumeSource, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The user and group workers run as: not root, and not a user the image
/// names (distroless images use the same number for `nonroot`).
pub const WORKER_UID: i64 = 65_532;

/// Memory the slave needs beyond the events it holds and its SQL's pool
/// (runtime, gRPC buffers, Arrow batches being built), in MiB.
const SLAVE_OVERHEAD_MIB: i64 = 128;

/// Makes `pod` meet the `restricted` Pod Security Standard; `/tmp` is the
/// one writable place, a small memory-backed volume.
pub fn restrict(pod: &mut PodSpec) {
    pod.security_context = Some(PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(WORKER_UID),
        run_as_group: Some(WORKER_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    });
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity("64Mi".into())),
        }),
        ..Volume::default()
    });
    for container in &mut pod.containers {
        container.security_context = Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        });
        container
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            });
    }
}

/// The resources of `role`'s worker container when its spec names none.
/// Memory is limited (a leak takes one pod, not the node); CPU is only
/// requested, since a throttled worker misses the deadlines failover relies on.
/// The slave's memory holds up to `slave_memory_mib` of events (the policy's
/// `kv.maxMemoryMiB`) and its SQL may use half the limit, so the limit is
/// twice those and the overhead; requested whole, so that a node under
/// memory pressure does not evict the one copy of the events it holds.
pub fn default_resources(role: &str, slave_memory_mib: i64) -> ResourceRequirements {
    let mib = |n: i64| Quantity(format!("{n}Mi"));
    let (cpu, request_mib, limit_mib) = match role {
        "slave" => {
            let limit = 2 * (slave_memory_mib.max(16) + SLAVE_OVERHEAD_MIB);
            ("500m", limit, limit)
        }
        "intake" | "query" | "nightly" => ("200m", 256, 512),
        _ => ("100m", 128, 256),
    };
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.into())),
            ("memory".to_owned(), mib(request_mib)),
        ])),
        limits: Some(BTreeMap::from([("memory".to_owned(), mib(limit_mib))])),
        ..ResourceRequirements::default()
    }
}

/// The roles whose pods a voluntary disruption (a node drain) takes one at
/// a time: the master pair (the standby takes over from the active one)
/// and the intakes (each consumes a share of the topic's partitions).
pub const BUDGETED_ROLES: [&str; 2] = ["master", "intake"];

/// At most one of the pods `selector` picks unavailable through voluntary disruptions.
pub fn disruption_budget(metadata: ObjectMeta, selector: BTreeMap<String, String>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantity(r: &ResourceRequirements, which: &str, resource: &str) -> Option<String> {
        let map = if which == "limits" { &r.limits } else { &r.requests };
        map.as_ref()?.get(resource).map(|q| q.0.clone())
    }

    #[test]
    fn each_role_gets_requests_and_a_memory_limit_and_the_slave_fits_what_it_holds() {
        // (role, policy's maxMemoryMiB, cpu request, memory request, memory limit)
        let cases = [
            ("collector", 512, "100m", "128Mi", "256Mi"),
            ("master", 512, "100m", "128Mi", "256Mi"),
            ("intake", 512, "200m", "256Mi", "512Mi"),
            ("query", 512, "200m", "256Mi", "512Mi"),
            // Events held + the SQL's pool (half the limit) + overhead.
            ("slave", 512, "500m", "1280Mi", "1280Mi"),
            ("slave", 2048, "500m", "4352Mi", "4352Mi"),
        ];
        for (role, held, cpu, request, limit) in cases {
            let r = default_resources(role, held);
            assert_eq!(quantity(&r, "requests", "cpu").as_deref(), Some(cpu), "{role}");
            assert_eq!(
                quantity(&r, "requests", "memory").as_deref(),
                Some(request),
                "{role}"
            );
            assert_eq!(quantity(&r, "limits", "memory").as_deref(), Some(limit), "{role}");
            assert_eq!(quantity(&r, "limits", "cpu"), None, "{role}: no CPU limit");
        }
    }

    #[test]
    fn a_restricted_pod_runs_as_non_root_without_privileges_and_writes_only_tmp() {
        let mut pod = PodSpec {
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "worker".into(),
                ..Default::default()
            }],
            ..PodSpec::default()
        };
        restrict(&mut pod);
        let security = pod.security_context.clone().unwrap_or_default();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.run_as_user, Some(WORKER_UID));
        assert_eq!(
            security.seccomp_profile.map(|s| s.type_).as_deref(),
            Some("RuntimeDefault")
        );
        let container = pod.containers[0].security_context.clone().unwrap_or_default();
        assert_eq!(container.allow_privilege_escalation, Some(false));
        assert_eq!(container.read_only_root_filesystem, Some(true));
        assert_eq!(
            container.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_owned()])
        );
        let mounts = pod.containers[0].volume_mounts.clone().unwrap_or_default();
        assert_eq!(
            mounts.iter().map(|m| m.mount_path.as_str()).collect::<Vec<_>>(),
            ["/tmp"]
        );
    }
}

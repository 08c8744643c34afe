//! The desired objects pinned: the golden snapshot, owner references, roles, RBAC.

use super::*;

pub(crate) fn fixture() -> AnalyticsPipeline {
    let text = include_str!("../../../manifests/samples/analyticspipeline.yaml");
    let mut ap: AnalyticsPipeline = serde_yaml::from_str(text).expect("sample parses");
    ap.metadata.namespace = Some("shop".into());
    ap.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    ap
}

/// The worker image the sample names, as the operator would pass it.
const IMAGE: &str = "ghcr.io/ballast-dev/ballast-worker:0.1.0";

/// What the operator derives besides the pipeline, with `slave_replicas` slaves.
fn inputs(slave_replicas: i32) -> Inputs {
    Inputs {
        image: IMAGE.into(),
        writes_role: WritesRole::ClusterRole,
        slave_replicas,
        config_hash: String::new(),
        slave_memory_mib: 512,
    }
}

fn owner() -> OwnerReference {
    OwnerReference {
        api_version: "ballast.dev/v1alpha1".into(),
        kind: "AnalyticsPipeline".into(),
        name: "merchant-analytics".into(),
        uid: "00000000-0000-0000-0000-000000000001".into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

#[test]
fn objects_match_the_golden_snapshot() {
    let inputs = Inputs {
        config_hash: "abc123".into(),
        ..inputs(4)
    };
    let yaml = to_yaml(&objects(&fixture(), &owner(), &inputs));
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/analytics_pipeline/golden/objects.yaml"
    );
    if std::env::var_os("BALLAST_BLESS").is_some() {
        // Blessing passes by construction: never where the result counts.
        assert!(
            std::env::var_os("CI").is_none(),
            "BALLAST_BLESS is refused under CI"
        );
        std::fs::write(path, &yaml).expect("write golden");
    }
    let golden = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        yaml == golden,
        "desired objects differ from {path}; if the change is intended, rerun with BALLAST_BLESS=1 and review the diff"
    );
}

fn template(o: &Owned) -> Option<&PodTemplateSpec> {
    match o {
        Owned::Deployment(d) => d.spec.as_ref().map(|s| &s.template),
        Owned::StatefulSet(s) => s.spec.as_ref().map(|s| &s.template),
        _ => None,
    }
}

fn container(o: &Owned) -> Option<&Container> {
    template(o)?.spec.as_ref()?.containers.first()
}

#[test]
fn every_workload_runs_a_role_the_worker_binary_has() -> Result<(), ballast_e2e::StackError> {
    // The binary itself says which subcommands it has (`cargo test --workspace` builds it).
    let worker = ballast_e2e::worker_binary()?;
    let is_role = |role: &str| {
        std::process::Command::new(&worker)
            .args([role, "--help"])
            .output()
            .is_ok_and(|out| out.status.success())
    };
    let inputs = Inputs {
        config_hash: "abc123".into(),
        ..inputs(2)
    };
    let objects = objects(&fixture(), &owner(), &inputs);
    assert_eq!(
        workloads(&objects).len(),
        5,
        "collector, intake, master and query Deployments and the slave StatefulSet"
    );
    for object in objects.iter().filter(|o| template(o).is_some()) {
        let args = container(object).and_then(|c| c.args.clone()).unwrap_or_default();
        let role = args.first().map(String::as_str).unwrap_or_default();
        assert!(
            !role.is_empty() && is_role(role),
            "{} {} runs `ballast-worker {role}`, which does not exist",
            object.kind(),
            object.name()
        );
    }
    Ok(())
}

#[test]
fn every_object_is_owned_by_the_pipeline_as_controller() {
    let inputs = inputs(2);
    for o in objects(&fixture(), &owner(), &inputs) {
        let refs = o.metadata().owner_references.clone().unwrap_or_default();
        assert_eq!(refs.len(), 1, "{}", o.name());
        assert_eq!(
            refs[0].uid,
            "00000000-0000-0000-0000-000000000001",
            "{}",
            o.name()
        );
        assert_eq!(refs[0].controller, Some(true), "{}", o.name());
    }
}

#[test]
fn slave_replicas_follow_inputs_and_secrets_become_env_refs() {
    let inputs = inputs(12);
    let objs = objects(&fixture(), &owner(), &inputs);
    let Some(sts @ Owned::StatefulSet(set)) = objs.iter().find(|o| o.kind() == "StatefulSet") else {
        panic!("no statefulset");
    };
    assert_eq!(set.spec.as_ref().and_then(|s| s.replicas), Some(12));
    let env = container(sts).and_then(|c| c.env.clone()).unwrap_or_default();
    let hot = env.iter().find(|e| e.name == "BALLAST_HOT_MYSQL_PASSWORD");
    let secret = hot
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.secret_key_ref.as_ref())
        .map(|r| r.name.as_str());
    assert_eq!(secret, Some("results-db"));
}

#[test]
fn only_the_query_pods_get_the_cold_stores_credentials_from_its_secret() {
    let inputs = inputs(2);
    let mut ap = fixture();
    ap.spec.cold_store.elasticsearch.credentials_secret_ref = Some(ballast_crds::refs::LocalObjectRef {
        name: "cold-es".into(),
    });
    let objs = objects(&ap, &owner(), &inputs);
    for o in objs.iter().filter(|o| template(o).is_some()) {
        let env = container(o).and_then(|c| c.env.clone()).unwrap_or_default();
        let cold: Vec<(String, String, String)> = env
            .iter()
            .filter(|e| e.name.starts_with("BALLAST_COLD_"))
            .filter_map(|e| {
                let r = e.value_from.as_ref()?.secret_key_ref.as_ref()?;
                Some((e.name.clone(), r.name.clone(), r.key.clone()))
            })
            .collect();
        let want: Vec<(String, String, String)> = if o.name().ends_with("-query") {
            vec![
                (
                    "BALLAST_COLD_USERNAME".into(),
                    "cold-es".into(),
                    "username".into(),
                ),
                (
                    "BALLAST_COLD_PASSWORD".into(),
                    "cold-es".into(),
                    "password".into(),
                ),
            ]
        } else {
            Vec::new()
        };
        assert_eq!(cold, want, "{}", o.name());
    }
}

#[test]
fn each_role_gets_only_the_passwords_of_the_servers_it_talks_to() {
    let inputs = inputs(2);
    let objs = objects(&fixture(), &owner(), &inputs);
    // The sample references the source, cache and hot MySQL passwords (the KV
    // store has none); the roles that call each other carry the data-plane token.
    let token = "BALLAST_DATA_PLANE_TOKEN";
    let cases: [(&str, &[&str]); 5] = [
        (
            "merchant-analytics-collector",
            &["BALLAST_SOURCE_MYSQL_PASSWORD", token],
        ),
        ("merchant-analytics-intake", &[token]),
        ("merchant-analytics-master", &[token]),
        (
            "merchant-analytics-query",
            &["BALLAST_HOT_MYSQL_PASSWORD", "BALLAST_CACHE_PASSWORD"],
        ),
        (
            "merchant-analytics-slave",
            &["BALLAST_HOT_MYSQL_PASSWORD", "BALLAST_CACHE_PASSWORD", token],
        ),
    ];
    for (name, want) in cases {
        let workload = objs.iter().find(|o| template(o).is_some() && o.name() == name);
        let env = workload
            .and_then(container)
            .and_then(|c| c.env.clone())
            .unwrap_or_default();
        let secrets: Vec<&str> = env
            .iter()
            .filter(|e| e.value_from.as_ref().is_some_and(|v| v.secret_key_ref.is_some()))
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(secrets, want, "{name}");
    }
}

#[test]
fn role_grants_only_this_pipeline_and_its_policy() {
    let inputs = inputs(2);
    let objs = objects(&fixture(), &owner(), &inputs);
    let Some(Owned::Role(role)) = objs.iter().find(|o| o.kind() == "Role") else {
        panic!("no role");
    };
    let rules = role.rules.clone().unwrap_or_default();
    let only = Some(vec!["merchant-analytics".to_owned()]);
    assert_eq!(rules[0].resource_names, only);
    assert_eq!(rules[1].resource_names, only);
    assert!(rules.iter().all(|r| !r.verbs.iter().any(|v| v == "*")));
}

#[test]
fn every_pod_of_the_pipeline_gets_its_placement() {
    let inputs = inputs(2);
    let mut ap = fixture();
    let placement = ballast_crds::Placement {
        node_selector: [("pool".to_owned(), "analytics".to_owned())].into(),
        scheduler_name: Some("ballast-real-node".into()),
        ..ballast_crds::Placement::default()
    };
    ap.spec.placement = Some(placement.clone());
    let objs = objects(&ap, &owner(), &inputs);
    let specs: Vec<(String, &k8s_openapi::api::core::v1::PodSpec)> = objs
        .iter()
        .filter_map(|o| {
            let template = match o {
                Owned::CronJob(c) => c
                    .spec
                    .as_ref()
                    .and_then(|s| s.job_template.spec.as_ref())
                    .map(|s| &s.template),
                other => template(other),
            }?;
            Some((o.name().to_owned(), template.spec.as_ref()?))
        })
        .collect();
    // Collector, intake, master, query, slaves and the nightly job.
    assert_eq!(
        specs.len(),
        6,
        "pod templates: {:?}",
        specs.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    for (name, spec) in specs {
        assert_eq!(
            spec.node_selector.as_ref(),
            Some(&placement.node_selector),
            "{name}"
        );
        assert_eq!(spec.scheduler_name, placement.scheduler_name, "{name}");
    }
}

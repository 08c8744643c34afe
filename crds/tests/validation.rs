//! The CRDs against the local stack's real API server: the samples are accepted,
//! and each invalid resource of the table is rejected with its own message.

use ballast_e2e::Stack;
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams, ValidationDirective};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

const MANAGER: &str = "ballast-crd-validation-test";

/// One invalid resource: a sample, an edit that breaks it, and the words the API server must say.
struct Case {
    name: &'static str,
    sample: Sample,
    edit: fn(&mut Value),
    /// Whether the edit is an update of the existing sample (transition rules) rather than a create.
    update: bool,
    expected: &'static str,
}

#[derive(Clone, Copy, Debug)]
enum Sample {
    Policy,
    Pipeline,
    Members,
}

impl Sample {
    fn file(self) -> &'static str {
        match self {
            Self::Policy => "degradationpolicy.yaml",
            Self::Pipeline => "analyticspipeline.yaml",
            Self::Members => "memberstore.yaml",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Policy => "DegradationPolicy",
            Self::Pipeline => "AnalyticsPipeline",
            Self::Members => "MemberStore",
        }
    }

    fn load(self) -> Value {
        let path = format!(
            "{}/../manifests/samples/{}",
            env!("CARGO_MANIFEST_DIR"),
            self.file()
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }
}

fn spec(v: &mut Value) -> &mut Value {
    &mut v["spec"]
}

#[rustfmt::skip] // a table reads best one case per block
fn cases() -> Vec<Case> {
    use Sample::*;
    vec![
        Case { name: "failure threshold of 1", sample: Policy, update: false,
            edit: |v| spec(v)["mq"]["probe"]["failureThreshold"] = json!(1),
            expected: "failureThreshold must be between 2 and 100" },
        Case { name: "success threshold of 0", sample: Policy, update: false,
            edit: |v| spec(v)["kv"]["probe"]["successThreshold"] = json!(0),
            expected: "successThreshold must be between 1 and 100" },
        Case { name: "scale factor above 10", sample: Policy, update: false,
            edit: |v| spec(v)["kv"]["slaveScaleFactor"] = json!(11),
            expected: "slaveScaleFactor must be between 1 and 10" },
        Case { name: "scale factor of 0", sample: Policy, update: false,
            edit: |v| spec(v)["kv"]["slaveScaleFactor"] = json!(0),
            expected: "slaveScaleFactor must be between 1 and 10" },
        Case { name: "shed share above 100%", sample: Policy, update: false,
            edit: |v| spec(v)["mq"]["maxShedPercent"] = json!(101),
            expected: "maxShedPercent must be between 0 and 100" },
        Case { name: "probe timeout longer than its period", sample: Policy, update: false,
            edit: |v| spec(v)["cache"]["probe"] = json!({"periodSeconds": 2, "timeoutSeconds": 5}),
            expected: "probe timeoutSeconds must not exceed periodSeconds" },
        Case { name: "degraded granularity that does not divide a day", sample: Policy, update: false,
            edit: |v| spec(v)["kv"]["granularitySeconds"] = json!(7000),
            expected: "granularitySeconds must be at least 60 and divide a day" },
        Case { name: "backup intake rate of 0", sample: Policy, update: false,
            edit: |v| spec(v)["mq"]["backupIntakeRatePerSecond"] = json!(0),
            expected: "backupIntakeRatePerSecond must be at least 1" },
        Case { name: "retention shorter than the degraded period", sample: Policy, update: false,
            edit: |v| spec(v)["kv"]["retentionSeconds"] = json!(600),
            expected: "kv.retentionSeconds must be at least kv.granularitySeconds" },
        Case { name: "retention below ten seconds", sample: Policy, update: false,
            edit: |v| spec(v)["kv"]["retentionSeconds"] = json!(5),
            expected: "spec.kv.retentionSeconds: Invalid value: 5: spec.kv.retentionSeconds in body should be greater than or equal to 10" },
        Case { name: "empty SQL", sample: Pipeline, update: false,
            edit: |v| spec(v)["compute"] = json!({"windowSeconds": 300, "sql": "   "}),
            expected: "compute.sql must not be empty" },
        Case { name: "SQL both inline and from a ConfigMap", sample: Pipeline, update: false,
            edit: |v| spec(v)["compute"]["sql"] = json!("SELECT 1"),
            expected: "compute needs exactly one of sql and sqlConfigMapRef" },
        Case { name: "no SQL at all", sample: Pipeline, update: false,
            edit: |v| spec(v)["compute"] = json!({"windowSeconds": 300}),
            expected: "compute needs exactly one of sql and sqlConfigMapRef" },
        Case { name: "window that does not divide an hour", sample: Pipeline, update: false,
            edit: |v| spec(v)["compute"]["windowSeconds"] = json!(420),
            expected: "windowSeconds must divide an hour" },
        Case { name: "no policy reference", sample: Pipeline, update: false,
            edit: |v| if let Some(s) = spec(v).as_object_mut() { s.remove("policyRef"); },
            expected: "spec.policyRef: Required value" },
        Case { name: "no source tables", sample: Pipeline, update: false,
            edit: |v| spec(v)["source"]["tables"] = json!([]),
            expected: "spec.source.tables in body should have at least 1 items" },
        Case { name: "five masters", sample: Pipeline, update: false,
            edit: |v| spec(v)["roles"]["master"]["replicas"] = json!(5),
            expected: "roles.master.replicas must be 1 to 3" },
        Case { name: "KV address without a port", sample: Pipeline, update: false,
            edit: |v| spec(v)["kv"]["address"] = json!("kv-redis"),
            expected: "spec.kv.address in body should match" },
        Case { name: "cold store URL without a scheme", sample: Pipeline, update: false,
            edit: |v| spec(v)["coldStore"]["elasticsearch"]["url"] = json!("es-cold:9200"),
            expected: "spec.coldStore.elasticsearch.url in body should match" },
        Case { name: "a password written into the spec", sample: Pipeline, update: false,
            edit: |v| spec(v)["source"]["mysql"]["password"] = json!("hunter2"),
            expected: ".spec.source.mysql.password: field not declared in schema" },
        Case { name: "window size changed after creation", sample: Pipeline, update: true,
            edit: |v| spec(v)["compute"]["windowSeconds"] = json!(600),
            expected: "windowSeconds is immutable" },
        Case { name: "Kafka topic changed after creation", sample: Pipeline, update: true,
            edit: |v| spec(v)["kafka"]["topic"] = json!("another-topic"),
            expected: "kafka.topic is immutable" },
        Case { name: "primary not among the data centres", sample: Members, update: false,
            edit: |v| spec(v)["primary"] = json!("dc-c"),
            expected: "spec.primary must name one of spec.dataCenters" },
        Case { name: "two data centres in one namespace", sample: Members, update: false,
            edit: |v| spec(v)["dataCenters"][1]["namespace"] = json!("members-dc-a"),
            expected: "every data centre needs its own namespace" },
        Case { name: "a single data centre", sample: Members, update: false,
            edit: |v| if let Some(dcs) = spec(v)["dataCenters"].as_array_mut() { dcs.truncate(1) },
            expected: "spec.dataCenters in body should have at least 2 items" },
        Case { name: "two data centres with one name", sample: Members, update: false,
            edit: |v| spec(v)["dataCenters"][1]["name"] = json!("dc-a"),
            expected: ".spec.dataCenters: duplicate entries for key [name=\"dc-a\"]" },
        Case { name: "zero logical shards", sample: Members, update: false,
            edit: |v| spec(v)["logicalShards"] = json!(0),
            expected: "logicalShards must be between 1 and 65536" },
        Case { name: "logical shards changed after creation", sample: Members, update: true,
            edit: |v| spec(v)["logicalShards"] = json!(2048),
            expected: "logicalShards is immutable" },
        Case { name: "circuit breaker without a threshold", sample: Members, update: false,
            edit: |v| spec(v)["circuitBreakers"] = json!([{"dependency": "Redis"}]),
            expected: "a circuit breaker needs at least one of" },
        Case { name: "error ratio above 100%", sample: Members, update: false,
            edit: |v| spec(v)["circuitBreakers"][0]["maxErrorPercent"] = json!(150),
            expected: "maxErrorPercent must be between 1 and 100" },
        Case { name: "slow-call ratio without a slow-call threshold", sample: Members, update: false,
            edit: |v| spec(v)["circuitBreakers"][0]["maxSlowCallPercent"] = json!(50),
            expected: "maxSlowCallPercent needs slowCallMillis" },
        Case { name: "unknown shadow limit", sample: Members, update: false,
            edit: |v| spec(v)["flowControl"]["shadow"] = json!(["Everything"]),
            expected: "spec.flowControl.shadow[0]: Unsupported value: \"Everything\"" },
        Case { name: "zero concurrent requests", sample: Members, update: false,
            edit: |v| spec(v)["flowControl"]["maxConcurrentRequests"] = json!(0),
            expected: "spec.flowControl.maxConcurrentRequests: Invalid value" },
        Case { name: "unknown failback", sample: Members, update: false,
            edit: |v| spec(v)["failback"] = json!("Sometimes"),
            expected: "spec.failback: Unsupported value: \"Sometimes\"" },
    ]
}

fn api(client: &Client, ns: &str, sample: Sample) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("ballast.dev", "v1alpha1", sample.kind());
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

/// Server-side apply with strict field validation, as `kubectl apply --server-side` does.
async fn apply(
    api: &Api<DynamicObject>,
    object: &Value,
    dry_run: bool,
) -> Result<DynamicObject, kube::Error> {
    let mut params = PatchParams::apply(MANAGER).force();
    params.dry_run = dry_run;
    params.field_validation = Some(ValidationDirective::Strict);
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    api.patch(&name, &params, &Patch::Apply(object)).await
}

#[tokio::test]
async fn samples_are_accepted_and_invalid_specs_rejected_with_their_message() -> anyhow::Result<()> {
    let client = Stack::discover().kube_client().await?;
    ballast_e2e::install_crds(&client).await?;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = format!("crd-validation-{}", ballast_e2e::run_id());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;

    for sample in [Sample::Policy, Sample::Pipeline, Sample::Members] {
        apply(&api(&client, &ns, sample), &sample.load(), false)
            .await
            .map_err(|e| anyhow::anyhow!("sample {} was rejected: {e}", sample.file()))?;
    }

    let mut failures = Vec::new();
    for case in cases() {
        let mut object = case.sample.load();
        if !case.update {
            // A fresh name: the edit is judged as a create, not as an update.
            object["metadata"]["name"] = json!("invalid");
        }
        (case.edit)(&mut object);
        match apply(&api(&client, &ns, case.sample), &object, true).await {
            Ok(_) => failures.push(format!("{}: accepted", case.name)),
            Err(kube::Error::Api(status)) if status.message.contains(case.expected) => {}
            Err(other) => failures.push(format!(
                "{}: expected «{}», got: {other}",
                case.name, case.expected
            )),
        }
    }
    namespaces.delete(&ns, &Default::default()).await?;
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases().len(),
        failures.join("\n")
    );
    assert!(cases().len() >= 20);
    Ok(())
}

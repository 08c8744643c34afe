//! The Argo CD health scripts of `manifests/argocd/argocd-cm-health.yaml`, run as
//! Argo CD runs them, over pipelines and policies in each state the operator writes.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, anyhow, bail};
use ballast_crds::conditions::{self, Desired};
use ballast_crds::{
    AnalyticsPipeline, AnalyticsPipelineStatus, DegradationPolicy, DegradationPolicyStatus, Dependency,
    DependencyModes, DependencyStatus, Mode,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use mlua::{Lua, LuaOptions, LuaSerdeExt, StdLib, Value as LuaValue};
use serde::Deserialize;
use serde_json::Value;

const CONFIG_MAP: &str = include_str!("../../manifests/argocd/argocd-cm-health.yaml");
const PIPELINE_SAMPLE: &str = include_str!("../../manifests/samples/analyticspipeline.yaml");
const POLICY_SAMPLE: &str = include_str!("../../manifests/samples/degradationpolicy.yaml");

/// `metadata.generation` of every object; a status that observed another one is stale.
const GENERATION: i64 = 4;

/// The statuses Argo CD accepts from a health script.
const HEALTH_STATUSES: [&str; 6] = [
    "Healthy",
    "Progressing",
    "Degraded",
    "Suspended",
    "Missing",
    "Unknown",
];

/// What Argo CD keeps of the table a health script returns.
#[derive(Debug, Deserialize)]
struct Health {
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: String,
}

/// The Lua health scripts of the ConfigMap, by data key.
fn scripts() -> anyhow::Result<BTreeMap<String, String>> {
    let cm: ConfigMap =
        serde_yaml::from_str(CONFIG_MAP).context("argocd-cm-health.yaml is not a ConfigMap")?;
    let data = cm.data.context("argocd-cm-health.yaml has no data")?;
    Ok(data
        .into_iter()
        .filter(|(key, _)| key.starts_with("resource.customizations.health."))
        .collect())
}

/// Runs `script` over `obj` the way Argo CD's `ExecuteHealthLua` does.
fn run(script: &str, obj: &Value) -> anyhow::Result<Health> {
    // A fresh state per object, with only the libraries Argo CD opens when
    // `useOpenLibs` is off (base, table, package; its `os` is a reduced one no
    // script here needs): a script calling `string` or `math` fails here as it
    // would there.
    let lua = Lua::new_with(StdLib::TABLE | StdLib::PACKAGE, LuaOptions::default()).map_err(lua_error)?;
    // Argo CD hands the object over as plain tables: JSON null and absent
    // fields are both nil, and arrays carry no metatable.
    let options = mlua::serde::SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false)
        .set_array_metatable(false);
    let value = lua.to_value_with(obj, options).map_err(lua_error)?;
    lua.globals().set("obj", value).map_err(lua_error)?;
    // Like gopher-lua's DoString: the script is a chunk, its last returned value is the result.
    let returned: mlua::MultiValue = lua
        .load(script)
        .set_name("health.lua")
        .call(())
        .map_err(lua_error)?;
    let table = match returned.back() {
        Some(table @ LuaValue::Table(_)) => table.clone(),
        other => bail!(
            "expect table output from Lua script, not {}",
            other.map_or("nil", LuaValue::type_name)
        ),
    };
    let mut health: Health = lua.from_value(table).map_err(lua_error)?;
    // Argo CD replaces a status it does not know with Unknown.
    if !HEALTH_STATUSES.contains(&health.status.as_str()) {
        health = Health {
            status: "Unknown".into(),
            message: "Lua returned an invalid health status".into(),
        };
    }
    Ok(health)
}

/// mlua's error is not `Send`, which `anyhow` needs; its text is all a test failure shows.
fn lua_error(e: mlua::Error) -> anyhow::Error {
    anyhow!("{e}")
}

/// The data key Argo CD reads `obj`'s health script from: `<group>_<kind>` of
/// its `apiVersion` and `kind`, which the Rust types wrote.
fn key_of(obj: &Value) -> anyhow::Result<String> {
    let api_version = obj["apiVersion"].as_str().context("object without apiVersion")?;
    let kind = obj["kind"].as_str().context("object without kind")?;
    let group = api_version.split_once('/').map_or("", |(group, _)| group);
    Ok(format!("resource.customizations.health.{group}_{kind}"))
}

fn now() -> Time {
    Time(Timestamp::from_second(1_790_000_000).expect("valid timestamp"))
}

/// The sample pipeline, as the API server would hand it out, with `status`.
fn pipeline(status: Option<AnalyticsPipelineStatus>) -> Value {
    let mut ap: AnalyticsPipeline = serde_yaml::from_str(PIPELINE_SAMPLE).expect("sample pipeline");
    ap.metadata.namespace = Some("shop".into());
    ap.metadata.generation = Some(GENERATION);
    ap.status = status;
    serde_json::to_value(&ap).expect("pipeline as JSON")
}

/// The sample policy, as the API server would hand it out, with `status`.
fn policy(status: Option<DegradationPolicyStatus>) -> Value {
    let mut dp: DegradationPolicy = serde_yaml::from_str(POLICY_SAMPLE).expect("sample policy");
    dp.metadata.namespace = Some("shop".into());
    dp.metadata.generation = Some(GENERATION);
    dp.status = status;
    serde_json::to_value(&dp).expect("policy as JSON")
}

/// What one reconcile decided, in the terms of the operator's status computation
/// (operator/src/analytics_pipeline/status.rs and publish.rs).
#[derive(Default)]
struct Decided {
    /// Published mode of each dependency not in Normal.
    away: Vec<(Dependency, Mode)>,
    /// Dependencies found down whose degraded mode is not published yet.
    pending: Vec<Dependency>,
    /// The switch under way, if any (`Progressing` holds with this message).
    switching: Option<&'static str>,
}

/// The status the operator writes after a reconcile: Ready, Progressing,
/// Degraded, then one `<Dependency>Available` per dependency.
fn reconciled(decided: Decided) -> AnalyticsPipelineStatus {
    let mut modes = DependencyModes::default();
    let mut available = Vec::new();
    for dependency in Dependency::ALL {
        let mode = decided
            .away
            .iter()
            .find(|(d, _)| *d == dependency)
            .map_or(Mode::Normal, |(_, mode)| *mode);
        modes.set(
            dependency,
            DependencyStatus {
                mode,
                since: now(),
                epoch: if mode == Mode::Normal { 0 } else { 1 },
                forced: false,
                reason: Some("ProbeFailureThresholdReached".into()),
                message: None,
            },
        );
        let type_ = conditions::dependency_condition(dependency);
        let name = dependency.as_str();
        available.push(match mode {
            Mode::Normal if decided.pending.contains(&dependency) => Desired::fails(
                type_,
                "SwitchPending",
                format!("{name} is down; preparing its degraded mode"),
            ),
            Mode::Normal => Desired::holds(type_, "Healthy", format!("{name} answers probes")),
            Mode::Degraded => Desired::fails(
                type_,
                "ProbeFailureThresholdReached",
                format!("{name} is down; its degraded mode is published"),
            ),
            Mode::Recovering => Desired::fails(
                type_,
                "Recovering",
                format!("{name} answers again; moving consumers back"),
            ),
        });
    }
    let away: Vec<String> = decided
        .away
        .iter()
        .map(|(d, mode)| format!("{} is {mode:?} (epoch 1)", d.as_str()))
        .collect();
    let mut desired = vec![
        Desired::holds(
            conditions::READY,
            "Reconciled",
            "workloads are applied and every mode is published",
        ),
        match decided.switching {
            Some(message) => Desired::holds(conditions::PROGRESSING, "SwitchingMode", message),
            None => Desired::fails(conditions::PROGRESSING, "Stable", "no switch under way"),
        },
        if away.is_empty() {
            Desired::fails(
                conditions::DEGRADED,
                "AllNormal",
                "every dependency is in Normal mode",
            )
        } else {
            Desired::holds(conditions::DEGRADED, "DependencyDegraded", away.join("; "))
        },
    ];
    desired.extend(available);
    AnalyticsPipelineStatus {
        observed_generation: Some(GENERATION),
        conditions: conditions::compute(&[], &desired, Some(GENERATION), &now()),
        summary: Some(modes.summary()),
        dependencies: modes,
        slaves: Some("4/4".into()),
        ..AnalyticsPipelineStatus::default()
    }
}

/// The status the operator writes while a reference is missing.
fn waiting_for_policy() -> AnalyticsPipelineStatus {
    let desired = [
        Desired::fails(
            conditions::READY,
            "PolicyNotFound",
            "DegradationPolicy \"merchant-analytics\" does not exist in this namespace",
        ),
        Desired::fails(
            conditions::PROGRESSING,
            "WaitingForReferences",
            "retried with backoff until the references resolve",
        ),
    ];
    AnalyticsPipelineStatus {
        observed_generation: Some(GENERATION),
        conditions: conditions::compute(&[], &desired, Some(GENERATION), &now()),
        ..AnalyticsPipelineStatus::default()
    }
}

/// The status the operator writes for a policy `pipelines` pipelines use.
fn accepted(pipelines: i32) -> DegradationPolicyStatus {
    let ready = Desired::holds(
        conditions::READY,
        "Accepted",
        format!("used by {pipelines} pipeline(s)"),
    );
    DegradationPolicyStatus {
        observed_generation: Some(GENERATION),
        conditions: conditions::compute(&[], &[ready], Some(GENERATION), &now()),
        pipelines,
    }
}

/// (case, object, health status Argo CD must show)
fn cases() -> Vec<(&'static str, Value, &'static str)> {
    let kv_scaling = "KV store down: scaling slaves to 12, 4 ready";
    vec![
        (
            "pipeline the operator has not seen yet",
            pipeline(None),
            "Progressing",
        ),
        (
            "pipeline whose status is null",
            {
                let mut obj = pipeline(None);
                obj["status"] = Value::Null;
                obj
            },
            "Progressing",
        ),
        (
            "pipeline status without conditions",
            pipeline(Some(AnalyticsPipelineStatus::default())),
            "Progressing",
        ),
        (
            "pipeline whose status describes an older generation",
            pipeline(Some(AnalyticsPipelineStatus {
                observed_generation: Some(GENERATION - 1),
                ..reconciled(Decided::default())
            })),
            "Progressing",
        ),
        (
            "stale status that said degraded",
            pipeline(Some(AnalyticsPipelineStatus {
                observed_generation: Some(GENERATION - 1),
                ..reconciled(Decided {
                    away: vec![(Dependency::Kv, Mode::Degraded)],
                    ..Decided::default()
                })
            })),
            "Progressing",
        ),
        (
            "every dependency Normal and Ready",
            pipeline(Some(reconciled(Decided::default()))),
            "Healthy",
        ),
        (
            "KV store in its degraded mode",
            pipeline(Some(reconciled(Decided {
                away: vec![(Dependency::Kv, Mode::Degraded)],
                ..Decided::default()
            }))),
            "Degraded",
        ),
        (
            "KV store recovering, still away from Normal",
            pipeline(Some(reconciled(Decided {
                away: vec![(Dependency::Kv, Mode::Recovering)],
                ..Decided::default()
            }))),
            "Degraded",
        ),
        (
            "policy missing: Ready is False",
            pipeline(Some(waiting_for_policy())),
            "Degraded",
        ),
        (
            "KV store down, slaves scaling before the switch",
            pipeline(Some(reconciled(Decided {
                pending: vec![Dependency::Kv],
                switching: Some(kv_scaling),
                ..Decided::default()
            }))),
            "Progressing",
        ),
        (
            "Kafka degraded while the KV switch is under way",
            pipeline(Some(reconciled(Decided {
                away: vec![(Dependency::Mq, Mode::Degraded)],
                pending: vec![Dependency::Kv],
                switching: Some(kv_scaling),
            }))),
            "Degraded",
        ),
        (
            "policy the operator has not seen yet",
            policy(None),
            "Progressing",
        ),
        (
            "policy status without conditions",
            policy(Some(DegradationPolicyStatus::default())),
            "Progressing",
        ),
        (
            "policy accepted: Ready is True",
            policy(Some(accepted(1))),
            "Healthy",
        ),
    ]
}

#[test]
fn health_scripts_give_each_state_its_argo_cd_status_and_a_message() -> anyhow::Result<()> {
    let scripts = scripts()?;
    // Every case runs, then every mismatch is reported at once.
    let mut failures = Vec::new();
    for (case, obj, want) in cases() {
        let key = key_of(&obj)?;
        let script = scripts
            .get(&key)
            .with_context(|| format!("{case}: no {key} in argocd-cm-health.yaml"))?;
        match run(script, &obj) {
            Ok(health) if health.status != want => failures.push(format!(
                "{case}: got {} ({:?}), want {want}",
                health.status, health.message
            )),
            Ok(health) if health.message.trim().is_empty() => {
                failures.push(format!("{case}: {} without a message", health.status))
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("{case}: the script failed: {e:#}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn every_health_script_shipped_is_run_by_some_case() -> anyhow::Result<()> {
    let shipped: BTreeSet<String> = scripts()?.into_keys().collect();
    let run: BTreeSet<String> = cases()
        .iter()
        .map(|(_, obj, _)| key_of(obj))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(shipped, run, "health scripts shipped vs run by the cases");
    Ok(())
}

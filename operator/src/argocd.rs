//! Argo CD health of what this operator writes: the Lua scripts of
//! `manifests/argocd/argocd-cm-health.yaml`, run as Argo CD runs them (Lua 5.1,
//! as its gopher-lua), over statuses computed by the operator's own status
//! functions for pipelines and policies in each state.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, anyhow, bail};
use ballast_crds::{AnalyticsPipeline, DegradationPolicy, Dependency, DependencyModes, Mode};
use ballast_node::membership::Shedding;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use mlua::{Lua, LuaOptions, LuaSerdeExt, StdLib, Value as LuaValue};
use serde::Deserialize;
use serde_json::Value;

use crate::analytics_pipeline::publish;
use crate::analytics_pipeline::rollout::Rollout;
use crate::analytics_pipeline::status::{self, Outcome};
use crate::analytics_pipeline::validate::Invalid;
use crate::mode::Machine;

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

fn now() -> Timestamp {
    Timestamp::from_second(1_790_000_000).expect("valid timestamp")
}

fn sample_pipeline() -> AnalyticsPipeline {
    let mut ap: AnalyticsPipeline = serde_yaml::from_str(PIPELINE_SAMPLE).expect("sample pipeline");
    ap.metadata.namespace = Some("shop".into());
    ap.metadata.generation = Some(GENERATION);
    ap
}

fn sample_policy() -> DegradationPolicy {
    let mut dp: DegradationPolicy = serde_yaml::from_str(POLICY_SAMPLE).expect("sample policy");
    dp.metadata.namespace = Some("shop".into());
    dp.metadata.generation = Some(GENERATION);
    dp
}

fn as_json<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).expect("object as JSON")
}

/// What the probes found and how far the workloads are.
struct Found {
    /// Detected mode of each dependency not in Normal.
    away: Vec<(Dependency, Mode)>,
    /// Slaves ready (the KV switch waits for the scaled-out count).
    ready_slaves: i32,
    rollout: Rollout,
    /// What the master reports.
    master: ballast_node::master_report::MasterReport,
    /// The pipeline's SQL text.
    sql: &'static str,
}

impl Default for Found {
    fn default() -> Self {
        Self {
            away: Vec::new(),
            ready_slaves: 1_000,
            rollout: Rollout::Available,
            master: ballast_node::master_report::MasterReport::default(),
            sql: "SELECT merchant_id, COUNT(*) AS orders FROM orders GROUP BY merchant_id",
        }
    }
}

/// The pipeline as the API server hands it out after the operator reconciled
/// what was `found`, with the status `publish::decide` and `status::compute` give.
fn reconciled(found: Found) -> AnalyticsPipeline {
    let mut ap = sample_pipeline();
    let policy = sample_policy().spec;
    let detected: BTreeMap<Dependency, Machine> = Dependency::ALL
        .into_iter()
        .map(|d| {
            let mode = found
                .away
                .iter()
                .find(|(a, _)| *a == d)
                .map_or(Mode::Normal, |(_, m)| *m);
            let machine = Machine {
                mode,
                epoch: i64::from(mode != Mode::Normal),
                // Detected a moment ago: a KV switch still waits for its slaves.
                since: now() - SignedDuration::from_secs(1),
                ..Machine::new(now())
            };
            (d, machine)
        })
        .collect();
    let publication = publish::decide(
        ap.spec.roles.slave.replicas,
        &policy,
        &detected,
        &BTreeMap::new(),
        &DependencyModes::default(),
        found.ready_slaves,
        now(),
    );
    let outcome = Outcome::Reconciled {
        publication: Box::new(publication),
        ready_slaves: found.ready_slaves,
        shedding: Shedding::default(),
        rollout: found.rollout,
        master: Box::new(found.master),
        source_schema: None,
        sql: Box::new(crate::analytics_pipeline::sql::decide(
            Some(found.sql),
            GENERATION,
            None,
            &Default::default(),
        )),
    };
    ap.status = Some(status::compute(&ap, &outcome, now()));
    ap
}

fn stale(mut ap: AnalyticsPipeline) -> AnalyticsPipeline {
    if let Some(status) = ap.status.as_mut() {
        status.observed_generation = Some(GENERATION - 1);
    }
    ap
}

/// (case, object, health status Argo CD must show)
fn cases() -> Vec<(&'static str, Value, &'static str)> {
    let degraded = |d: Dependency| Found {
        away: vec![(d, Mode::Degraded)],
        ..Found::default()
    };
    let pending = || vec!["Deployment merchant-analytics-intake: 0/1 replicas available".to_owned()];
    let waiting = {
        let mut ap = sample_pipeline();
        let invalid = Invalid {
            reason: "PolicyNotFound",
            message: "DegradationPolicy \"merchant-analytics\" does not exist in this namespace".into(),
        };
        ap.status = Some(status::compute(&ap, &Outcome::Invalid(invalid), now()));
        ap
    };
    let accepted = {
        let mut dp = sample_policy();
        dp.status = Some(crate::degradation_policy::compute(&dp, 1, now()));
        dp
    };
    vec![
        (
            "pipeline the operator has not seen yet",
            as_json(&sample_pipeline()),
            "Progressing",
        ),
        (
            "pipeline whose status is null",
            {
                let mut obj = as_json(&sample_pipeline());
                obj["status"] = Value::Null;
                obj
            },
            "Progressing",
        ),
        (
            "pipeline status without conditions",
            {
                let mut ap = sample_pipeline();
                ap.status = Some(Default::default());
                as_json(&ap)
            },
            "Progressing",
        ),
        (
            "pipeline whose status describes an older generation",
            as_json(&stale(reconciled(Found::default()))),
            "Progressing",
        ),
        (
            "stale status that said degraded",
            as_json(&stale(reconciled(degraded(Dependency::Kv)))),
            "Progressing",
        ),
        (
            "every dependency Normal, every workload available",
            as_json(&reconciled(Found::default())),
            "Healthy",
        ),
        (
            "workloads still rolling out",
            as_json(&reconciled(Found {
                rollout: Rollout::Progressing(pending()),
                ..Found::default()
            })),
            "Progressing",
        ),
        (
            "a Deployment past its progress deadline",
            as_json(&reconciled(Found {
                rollout: Rollout::Failed(pending()),
                ..Found::default()
            })),
            "Degraded",
        ),
        (
            "KV store in its degraded mode",
            as_json(&reconciled(degraded(Dependency::Kv))),
            "Degraded",
        ),
        (
            "KV store recovering, still away from Normal",
            as_json(&reconciled(Found {
                away: vec![(Dependency::Kv, Mode::Recovering)],
                ..Found::default()
            })),
            "Degraded",
        ),
        ("policy missing: Ready is False", as_json(&waiting), "Degraded"),
        (
            "a SQL the operator refused while every mode is Normal",
            as_json(&reconciled(Found {
                sql: "COPY orders TO '/tmp/orders.csv'",
                ..Found::default()
            })),
            "Degraded",
        ),
        (
            "a window keeps failing while every mode is Normal",
            as_json(&reconciled(Found {
                master: {
                    let mut report = ballast_node::master_report::MasterReport::default();
                    report.set_failing(vec![ballast_node::master_report::FailingWindow {
                        kind: "window".into(),
                        start_ms: 0,
                        end_ms: 60_000,
                        attempts: 4,
                        since_ms: 60_000,
                        error: "decoding failed".into(),
                    }]);
                    report
                },
                ..Found::default()
            })),
            "Degraded",
        ),
        (
            "KV store down, slaves scaling before the switch",
            as_json(&reconciled(Found {
                ready_slaves: 0,
                ..degraded(Dependency::Kv)
            })),
            "Progressing",
        ),
        (
            "Kafka degraded while the KV switch is under way",
            as_json(&reconciled(Found {
                away: vec![(Dependency::Mq, Mode::Degraded), (Dependency::Kv, Mode::Degraded)],
                ready_slaves: 0,
                ..Found::default()
            })),
            "Degraded",
        ),
        (
            "policy the operator has not seen yet",
            as_json(&sample_policy()),
            "Progressing",
        ),
        (
            "policy status without conditions",
            {
                let mut dp = sample_policy();
                dp.status = Some(Default::default());
                as_json(&dp)
            },
            "Progressing",
        ),
        ("policy accepted: Ready is True", as_json(&accepted), "Healthy"),
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

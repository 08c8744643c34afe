//! The shipped monitoring: the alert rules pass `promtool check rules` and their unit
//! tests pass `promtool test rules`; every alert has a case that fires and one that does
//! not; the rules and the Grafana dashboard query only metrics the binaries expose; the
//! dashboard's queries parse; and the chart's PrometheusRule holds exactly the rules file.
//!
//! promtool comes from Debian's `prometheus` package, which `make stack-up` installs
//! (`BALLAST_PROMTOOL` overrides the one on `PATH`); helm is the stack's build. A missing
//! tool fails these tests, it never skips them.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context as _;
use ballast_e2e::Stack;
use serde::Deserialize as _;

/// The canonical rules file, tested by [`RULES_TEST`].
const RULES: &str = "manifests/monitoring/ballast.rules.yaml";
/// The promtool unit tests of [`RULES`].
const RULES_TEST: &str = "manifests/monitoring/ballast.rules.test.yaml";
/// The chart's byte-for-byte copy of [`RULES`] (Helm reads only inside the chart).
const CHART_RULES: &str = "charts/ballast/files/ballast.rules.yaml";
const DASHBOARD: &str = "manifests/monitoring/grafana-dashboard.json";
const CHART: &str = "charts/ballast";

/// Every metric the binaries expose on `/metrics`, as Prometheus names them (counters
/// with `_total`; histograms by their base name, see [`HISTOGRAMS`]). The operator
/// registers under `ballast_operator_` (`operator/src/context.rs`), each worker role
/// under `ballast_<role>_` (`worker/src/roles/*/`), flow control under `ballast_flow_`
/// (`worker/flow/src/metrics.rs`). A metric added or renamed there belongs here too.
const KNOWN_METRICS: &[&str] = &[
    // operator
    "ballast_operator_reconciles_total",
    "ballast_operator_reconcile_errors_total",
    "ballast_operator_mode_transitions_total",
    "ballast_operator_probe_failures_total",
    "ballast_operator_api_check_failures_total",
    "ballast_operator_dependency_mode",
    "ballast_operator_dependency_epoch",
    "ballast_operator_pipeline_ready",
    "ballast_operator_pipeline_windows_failing",
    // master
    "ballast_master_active",
    "ballast_master_term",
    "ballast_master_tasks_total",
    "ballast_master_tasks_in_flight",
    "ballast_master_tasks_delayed",
    "ballast_master_window_lag_seconds",
    "ballast_master_stale_results_refused_total",
    "ballast_master_slave_events_lost_total",
    "ballast_master_windows_failing",
    // collector
    "ballast_collector_events_to_kafka_total",
    "ballast_collector_events_to_backup_intake_total",
    "ballast_collector_events_shed_total",
    "ballast_collector_dead_letters_total",
    "ballast_collector_dead_letters_pending",
    "ballast_collector_transaction_parts_total",
    "ballast_collector_path_switches_total",
    // intake and backup intake
    "ballast_intake_events_to_kv_total",
    "ballast_intake_events_to_slaves_total",
    "ballast_intake_events_duplicate_total",
    "ballast_intake_dead_letters_total",
    "ballast_intake_write_failures_total",
    "ballast_backup_intake_events_accepted_total",
    "ballast_backup_intake_events_shed_total",
    "ballast_backup_intake_shed_merchants",
    "ballast_backup_intake_calls_refused_total",
    // slave
    "ballast_slave_events_accepted_total",
    "ballast_slave_events_duplicate_total",
    "ballast_slave_events_expired_total",
    "ballast_slave_batches_refused_total",
    "ballast_slave_held_bytes",
    "ballast_slave_events_handed_off_total",
    "ballast_slave_handoff_failures_total",
    "ballast_slave_tasks_total",
    "ballast_slave_results_refused_total",
    "ballast_slave_compute_events_total",
    // flow control
    "ballast_flow_decisions_total",
    "ballast_flow_breaker_state",
    "ballast_flow_breaker_transitions_total",
    "ballast_flow_tracked_keys",
];

/// Histograms the binaries expose: each is `<name>_bucket`, `<name>_sum`, `<name>_count`.
const HISTOGRAMS: &[&str] = &[
    "ballast_operator_probe_duration_seconds",
    "ballast_operator_reconcile_duration_seconds",
];

fn path(relative: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(relative)
}

fn read(relative: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path(relative)).with_context(|| format!("reading {relative}"))
}

/// The exposed series names: [`KNOWN_METRICS`] plus each histogram's three series.
fn exposed() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = KNOWN_METRICS.iter().map(|n| (*n).to_owned()).collect();
    for h in HISTOGRAMS {
        for suffix in ["_bucket", "_sum", "_count"] {
            names.insert(format!("{h}{suffix}"));
        }
    }
    names
}

/// Runs promtool with `args`: its output, or an error with it.
fn promtool(args: &[&str]) -> anyhow::Result<String> {
    Ok(ballast_e2e::promtool(args, None)?)
}

/// Runs the stack's helm with `args`: its stdout, or an error with its output.
fn helm(args: &[&str]) -> anyhow::Result<String> {
    Ok(Stack::discover().helm(args)?)
}

/// Every YAML document in `text` (empty ones left out).
fn documents(text: &str) -> anyhow::Result<Vec<serde_yaml::Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn rules_file() -> anyhow::Result<serde_yaml::Value> {
    Ok(serde_yaml::from_str(&read(RULES)?)?)
}

/// Every rule of the rules file (alerting and recording).
fn rules() -> anyhow::Result<Vec<serde_yaml::Value>> {
    let file = rules_file()?;
    let groups = file["groups"]
        .as_sequence()
        .context("the rules file has no groups")?;
    Ok(groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .collect())
}

fn text_of(value: &serde_yaml::Value, key: &str) -> Option<String> {
    value[key].as_str().map(str::to_owned)
}

// --- metric names in PromQL ------------------------------------------------

/// Aggregation operators and keywords: identifiers in PromQL that are not metrics.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// `text` without string literals, label matchers (`{...}`) and ranges (`[...]`).
fn strip(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                let mut escaped = false;
                for s in chars.by_ref() {
                    if s == c && !escaped {
                        break;
                    }
                    escaped = s == '\\' && !escaped;
                }
                out.push(' ');
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                let mut quote = None;
                for s in chars.by_ref() {
                    match quote {
                        Some(q) if s == q => quote = None,
                        Some(_) => {}
                        None if s == '"' || s == '\'' => quote = Some(s),
                        None if s == close => break,
                        None => {}
                    }
                }
                out.push(' ');
            }
            '#' => {
                // A comment runs to the end of its line.
                for s in chars.by_ref() {
                    if s == '\n' {
                        break;
                    }
                }
                out.push('\n');
            }
            c => out.push(c),
        }
    }
    out
}

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// aggregations, keywords, label lists (`by (...)`), numbers or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let text = strip(expr);
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if !(word(b) || b == b'$') {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        while i < bytes.len() && word(bytes[i]) {
            i += 1;
        }
        let token = &text[start..i];
        let mut next = i;
        while next < bytes.len() && bytes[next].is_ascii_whitespace() {
            next += 1;
        }
        let call = next < bytes.len() && bytes[next] == b'(';
        if LABEL_LISTS.contains(&token) {
            // Skip the label names, if any (`group_left` may stand alone).
            while call && i < bytes.len() && bytes[i] != b')' {
                i += 1;
            }
            continue;
        }
        let starts_like_a_name = b.is_ascii_alphabetic() || b == b'_' || b == b':';
        if call || !starts_like_a_name || PROMQL_WORDS.contains(&token.to_ascii_lowercase().as_str()) {
            continue;
        }
        names.insert(token.to_owned());
    }
    names
}

/// The selector of a Grafana `label_values(selector, label)` query, or the query itself.
fn variable_selector(query: &str) -> &str {
    let Some(inner) = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
    else {
        return query;
    };
    match inner.rfind(',') {
        Some(comma) => &inner[..comma],
        None => inner,
    }
}

#[test]
fn the_metric_name_extractor_finds_metrics_and_skips_functions_labels_and_keywords() {
    let expr = r#"histogram_quantile(0.99, sum by (kind, le) (rate(a_bucket{kind=~"x|y", s="}"}[5m])))
        / on (kind) group_left (pipeline) max without (pod) (b_total offset 1h) > bool 2
        * on (kind) group_right f
        or absent(c) unless label_replace(d, "dst", "$1", "src", "(.*)") # e_comment"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(names, ["a_bucket", "b_total", "c", "d", "f"]);
    assert_eq!(
        variable_selector(r#"label_values(m{namespace=~"$namespace"}, pipeline)"#),
        r#"m{namespace=~"$namespace"}"#
    );
}

// --- the rules -------------------------------------------------------------

#[test]
fn the_rules_file_passes_promtool_check_rules() -> anyhow::Result<()> {
    let out = promtool(&["check", "rules", path(RULES).to_str().context("path")?])?;
    anyhow::ensure!(out.contains("SUCCESS"), "promtool check rules: {out}");
    Ok(())
}

#[test]
fn the_rules_unit_tests_pass_promtool_test_rules() -> anyhow::Result<()> {
    let out = promtool(&["test", "rules", path(RULES_TEST).to_str().context("path")?])?;
    anyhow::ensure!(out.contains("SUCCESS"), "promtool test rules: {out}");
    Ok(())
}

#[test]
fn every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> anyhow::Result<()> {
    let tests: serde_yaml::Value = serde_yaml::from_str(&read(RULES_TEST)?)?;
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for test in tests["tests"].as_sequence().context("no tests")? {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = text_of(case, "alertname").context("a case without alertname")?;
            let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
            if expected == 0 {
                silent.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    let mut missing = Vec::new();
    for rule in rules()? {
        let Some(alert) = text_of(&rule, "alert") else {
            continue;
        };
        for (cases, what) in [(&fires, "fires"), (&silent, "does not fire")] {
            if !cases.contains(&alert) {
                missing.push(format!("{alert}: no case where it {what}"));
            }
        }
        let annotations = &rule["annotations"];
        for key in ["summary", "description", "runbook"] {
            if text_of(annotations, key).is_none_or(|t| t.trim().is_empty()) {
                missing.push(format!("{alert}: no {key} annotation"));
            }
        }
        let severity = text_of(&rule["labels"], "severity").unwrap_or_default();
        if !["warning", "critical"].contains(&severity.as_str()) {
            missing.push(format!(
                "{alert}: severity {severity:?} is neither warning nor critical"
            ));
        }
    }
    anyhow::ensure!(missing.is_empty(), "{RULES}:\n{}", missing.join("\n"));
    Ok(())
}

#[test]
fn the_rules_query_only_metrics_the_binaries_expose() -> anyhow::Result<()> {
    let rules = rules()?;
    let mut known = exposed();
    known.extend(rules.iter().filter_map(|r| text_of(r, "record")));
    let mut unknown = Vec::new();
    for rule in &rules {
        let name = text_of(rule, "alert")
            .or_else(|| text_of(rule, "record"))
            .unwrap_or_default();
        let expr = text_of(rule, "expr").with_context(|| format!("{name}: no expr"))?;
        let names = metric_names(&expr);
        anyhow::ensure!(!names.is_empty(), "{name}: no metric found in {expr}");
        unknown.extend(names.difference(&known).map(|m| format!("{name}: {m}")));
    }
    anyhow::ensure!(
        unknown.is_empty(),
        "{RULES} queries metrics the binaries do not expose (a typo, or a metric missing \
         from KNOWN_METRICS):\n{}",
        unknown.join("\n")
    );
    Ok(())
}

#[test]
fn the_chart_copy_of_the_rules_is_identical_to_the_canonical_file() -> anyhow::Result<()> {
    anyhow::ensure!(
        read(CHART_RULES)? == read(RULES)?,
        "{CHART_RULES} differs from {RULES}: edit {RULES} and `cp {RULES} {CHART_RULES}`"
    );
    Ok(())
}

// --- the dashboard ---------------------------------------------------------

/// Every panel of the dashboard, rows' collapsed panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

/// (where, PromQL) of every query in the dashboard: panel targets and query variables.
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(DASHBOARD)?).context("the dashboard is not valid JSON")?;
    let mut queries = Vec::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("panel {title:?}: a target without expr"))?;
            queries.push((format!("panel {title:?}"), expr.to_owned()));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if variable["type"] == "query" {
            let query = variable["query"]["query"]
                .as_str()
                .or_else(|| variable["query"].as_str())
                .context("a query variable without a query")?;
            let name = variable["name"].as_str().unwrap_or("?");
            queries.push((format!("variable {name}"), variable_selector(query).to_owned()));
        }
    }
    Ok(queries)
}

#[test]
fn the_dashboard_has_the_datasource_namespace_and_pipeline_variables() -> anyhow::Result<()> {
    let dashboard: serde_json::Value = serde_json::from_str(&read(DASHBOARD)?)?;
    let variables: Vec<(&str, &str)> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (v["name"].as_str().unwrap_or(""), v["type"].as_str().unwrap_or("")))
        .collect();
    for wanted in [
        ("datasource", "datasource"),
        ("namespace", "query"),
        ("pipeline", "query"),
    ] {
        anyhow::ensure!(
            variables.contains(&wanted),
            "no {wanted:?} variable in {variables:?}"
        );
    }
    // Every query runs against the chosen Prometheus.
    for panel in panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            anyhow::ensure!(
                target["datasource"]["uid"] == "${datasource}",
                "panel {}: a target not on ${{datasource}}",
                panel["title"]
            );
        }
    }
    Ok(())
}

#[test]
fn the_dashboard_queries_only_metrics_the_binaries_expose_or_the_rules_use() -> anyhow::Result<()> {
    let mut known = exposed();
    for rule in rules()? {
        known.extend(text_of(&rule, "record"));
        known.extend(
            text_of(&rule, "expr")
                .map(|e| metric_names(&e))
                .unwrap_or_default(),
        );
    }
    let queries = dashboard_queries()?;
    anyhow::ensure!(
        queries.len() > 10,
        "only {} queries in {DASHBOARD}",
        queries.len()
    );
    let mut unknown = Vec::new();
    for (place, expr) in queries {
        let names = metric_names(&expr);
        anyhow::ensure!(!names.is_empty(), "{place}: no metric found in {expr}");
        unknown.extend(names.difference(&known).map(|m| format!("{place}: {m}")));
    }
    anyhow::ensure!(
        unknown.is_empty(),
        "{DASHBOARD} queries metrics neither the binaries expose nor the rules use:\n{}",
        unknown.join("\n")
    );
    Ok(())
}

#[test]
fn the_dashboard_queries_parse_as_promql() -> anyhow::Result<()> {
    // promtool parses each query as a recording rule, with Grafana's variables filled in.
    let queries = dashboard_queries()?;
    let mut rules = Vec::new();
    for (i, (place, expr)) in queries.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$namespace", ".*")
            .replace("$pipeline", ".*");
        anyhow::ensure!(!expr.contains('$'), "{place}: an unknown variable in {expr}");
        rules.push(serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": expr}));
    }
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = std::env::temp_dir().join(format!("ballast-monitoring-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rules_path = dir.join("dashboard.rules.yaml");
    std::fs::write(&rules_path, serde_yaml::to_string(&file)?)?;
    let result = promtool(&["check", "rules", rules_path.to_str().context("path")?]);
    std::fs::remove_dir_all(&dir)?;
    if let Err(error) = result {
        let text = format!("{error:#}");
        let failed: Vec<String> = queries
            .iter()
            .enumerate()
            .filter(|(i, _)| text.contains(&format!("\"dashboard:query_{i}\"")))
            .map(|(i, (place, expr))| format!("dashboard:query_{i} is {place}: {expr}"))
            .collect();
        anyhow::bail!(
            "queries of {DASHBOARD} do not parse:\n{}\n{text}",
            failed.join("\n")
        );
    }
    Ok(())
}

// --- the chart -------------------------------------------------------------

fn prometheus_rules(rendered: &str) -> anyhow::Result<Vec<serde_yaml::Value>> {
    Ok(documents(rendered)?
        .into_iter()
        .filter(|d| d["kind"] == "PrometheusRule")
        .collect())
}

#[test]
fn the_chart_renders_the_rules_file_as_a_prometheus_rule_when_enabled() -> anyhow::Result<()> {
    let chart = path(CHART);
    let rendered = helm(&[
        "template",
        "ballast",
        chart.to_str().context("path")?,
        "--namespace",
        "monitoring-test",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "prometheusRule.labels.release=kube-prometheus-stack",
    ])?;
    let found = prometheus_rules(&rendered)?;
    anyhow::ensure!(found.len() == 1, "{} PrometheusRules rendered", found.len());
    let rule = &found[0];
    anyhow::ensure!(
        rule["apiVersion"] == "monitoring.coreos.com/v1",
        "apiVersion {:?}",
        rule["apiVersion"]
    );
    anyhow::ensure!(
        rule["metadata"]["namespace"] == "monitoring-test",
        "namespace {:?}",
        rule["metadata"]
    );
    anyhow::ensure!(
        rule["metadata"]["labels"]["release"] == "kube-prometheus-stack",
        "prometheusRule.labels not on the PrometheusRule: {:?}",
        rule["metadata"]["labels"]
    );
    let groups = &rules_file()?["groups"];
    anyhow::ensure!(
        &rule["spec"]["groups"] == groups,
        "the PrometheusRule's groups differ from {RULES}'s"
    );
    Ok(())
}

#[test]
fn the_chart_renders_no_prometheus_rule_by_default() -> anyhow::Result<()> {
    let chart = path(CHART);
    let rendered = helm(&["template", "ballast", chart.to_str().context("path")?])?;
    anyhow::ensure!(
        rendered.contains("kind: Deployment"),
        "the chart rendered no Deployment"
    );
    let found = prometheus_rules(&rendered)?;
    anyhow::ensure!(
        found.is_empty(),
        "a PrometheusRule rendered with the default values"
    );
    Ok(())
}

//! The pipeline's SQL: checked before any worker sees it (`ballast_crds::sql`)
//! and published in status only when allowed; a refused SQL, or one the
//! master cannot plan against the source tables, leaves the last valid one
//! running, with the `SqlValid` condition and an Event saying why. Pure.

use ballast_crds::conditions::{self, Desired};
use ballast_crds::{PublishedSql, sql};
use ballast_node::master_report::MasterReport;
use kube::runtime::events::{Event, EventType};

/// What the reconcile publishes about the SQL.
#[derive(Clone, Debug, PartialEq)]
pub struct SqlDecision {
    /// The SQL to publish (the previous one when the new text is refused).
    pub published: Option<PublishedSql>,
    /// The `SqlValid` condition.
    pub condition: Desired,
}

/// Decides from the SQL `text` of the spec (or its ConfigMap) at
/// `generation`, the SQL published before, and the master's report. Pure.
pub fn decide(
    text: Option<&str>,
    generation: i64,
    previous: Option<&PublishedSql>,
    master: &MasterReport,
) -> SqlDecision {
    let running = |previous: Option<&PublishedSql>| match previous {
        Some(p) => format!("SQL {} keeps running", p.id),
        None => "no SQL runs yet".to_owned(),
    };
    let Some(text) = text else {
        return SqlDecision {
            published: previous.cloned(),
            condition: Desired::fails(conditions::SQL_VALID, "SqlMissing", "the pipeline names no SQL"),
        };
    };
    let id = sql::id(text);
    let statements = match sql::check(text) {
        Ok(n) => n,
        Err(refusal) => {
            return SqlDecision {
                published: previous.cloned(),
                condition: Desired::fails(
                    conditions::SQL_VALID,
                    "SqlRefused",
                    format!("SQL {id}: {refusal}; {}", running(previous)),
                ),
            };
        }
    };
    let published = match previous {
        Some(p) if p.id == id => p.clone(),
        _ => PublishedSql {
            id: id.clone(),
            text: text.to_owned(),
            generation,
        },
    };
    let condition = match master.sql_refused.as_ref().filter(|r| r.id == id) {
        Some(refused) => Desired::fails(
            conditions::SQL_VALID,
            "SqlDoesNotPlan",
            format!(
                "SQL {id} does not plan against the source tables: {}; the master keeps the SQL it runs",
                refused.error
            ),
        ),
        None => Desired::holds(
            conditions::SQL_VALID,
            "Accepted",
            format!(
                "SQL {id} ({statements} statements) is published; the master applies it from its next window"
            ),
        ),
    };
    SqlDecision {
        published: Some(published),
        condition,
    }
}

/// The Event of a decision, given the SQL and `SqlValid` condition published
/// before: a SQL replacing another, or a refusal (once per distinct message).
/// A pipeline's first SQL is no change to announce. Pure.
pub fn event(
    decision: &SqlDecision,
    previous: Option<&PublishedSql>,
    previous_message: Option<&str>,
) -> Option<Event> {
    let c = &decision.condition;
    if !c.status {
        return (previous_message != Some(c.message.as_str())).then(|| Event {
            type_: EventType::Warning,
            reason: c.reason.clone(),
            note: Some(c.message.clone()),
            action: "CheckSql".into(),
            secondary: None,
        });
    }
    let new = decision.published.as_ref()?;
    previous.is_some_and(|p| p.id != new.id).then(|| Event {
        type_: EventType::Normal,
        reason: "SqlPublished".into(),
        note: Some(c.message.clone()),
        action: "PublishSql".into(),
        secondary: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_node::master_report::SqlRefused;

    const GOOD: &str = "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id";
    const BETTER: &str =
        "SELECT merchant_id, COUNT(*) AS n, MAX(amount) AS top FROM orders GROUP BY merchant_id";

    fn published(text: &str, generation: i64) -> PublishedSql {
        PublishedSql {
            id: sql::id(text),
            text: text.into(),
            generation,
        }
    }

    #[test]
    fn only_an_allowed_sql_is_published_and_a_refused_one_keeps_the_last() {
        let none = MasterReport::default();
        let good = published(GOOD, 1);
        // (text, previous, published id, condition holds, reason)
        let cases = [
            (Some(GOOD), None, Some(good.id.clone()), true, "Accepted"),
            (Some(GOOD), Some(&good), Some(good.id.clone()), true, "Accepted"),
            (Some(BETTER), Some(&good), Some(sql::id(BETTER)), true, "Accepted"),
            (
                Some("COPY orders TO '/tmp/x'"),
                Some(&good),
                Some(good.id.clone()),
                false,
                "SqlRefused",
            ),
            (Some("SELEC"), None, None, false, "SqlRefused"),
            (None, Some(&good), Some(good.id.clone()), false, "SqlMissing"),
        ];
        for (i, (text, previous, id, holds, reason)) in cases.into_iter().enumerate() {
            let d = decide(text, 2, previous, &none);
            assert_eq!(d.published.map(|p| p.id), id, "case {i}");
            assert_eq!(
                (d.condition.status, d.condition.reason.as_str()),
                (holds, reason),
                "case {i}"
            );
        }
        // The generation is the one the text was first accepted at.
        assert_eq!(
            decide(Some(GOOD), 7, Some(&good), &none)
                .published
                .map(|p| p.generation),
            Some(1)
        );
        let refused = decide(Some("COPY orders TO '/tmp/x'"), 2, Some(&good), &none);
        assert!(
            refused
                .condition
                .message
                .contains(&format!("SQL {} keeps running", good.id))
        );
    }

    #[test]
    fn a_sql_the_master_cannot_plan_is_reported_invalid() {
        let report = MasterReport {
            sql_refused: Some(SqlRefused {
                id: sql::id(BETTER),
                error: "column top_x not found".into(),
            }),
            ..MasterReport::default()
        };
        let d = decide(Some(BETTER), 3, Some(&published(GOOD, 1)), &report);
        assert_eq!(d.condition.reason, "SqlDoesNotPlan");
        assert!(d.condition.message.contains("column top_x not found"));
        // A refusal of another SQL says nothing about this one.
        let d = decide(Some(GOOD), 3, Some(&published(GOOD, 1)), &report);
        assert!(d.condition.status);
    }

    #[test]
    fn events_announce_a_new_sql_and_each_new_refusal_once() {
        let none = MasterReport::default();
        let good = published(GOOD, 1);
        let new = decide(Some(BETTER), 2, Some(&good), &none);
        assert_eq!(
            event(&new, Some(&good), None).map(|e| e.reason),
            Some("SqlPublished".into())
        );
        let same = decide(Some(GOOD), 2, Some(&good), &none);
        assert!(event(&same, Some(&good), None).is_none());
        let first = decide(Some(GOOD), 1, None, &none);
        assert!(event(&first, None, None).is_none());
        let refused = decide(Some("COPY orders TO '/tmp/x'"), 2, Some(&good), &none);
        assert_eq!(
            event(&refused, Some(&good), None).map(|e| e.reason),
            Some("SqlRefused".into())
        );
        let again = Some(refused.condition.message.as_str());
        assert!(event(&refused, Some(&good), again).is_none());
    }
}

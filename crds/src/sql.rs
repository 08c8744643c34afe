//! What a pipeline's SQL may hold, and its identity. The SQL is code from the
//! pipeline's author run inside every slave: only what an analytics statement
//! needs is allowed — queries, and views over them — never statements that
//! read or write files, create tables or change the engine's settings. The
//! operator checks this before it publishes a SQL, and a slave again before
//! it runs one.

use sqlparser::ast::{Query, SetExpr, Statement};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

/// Why a SQL is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SqlRefusal {
    /// It does not parse.
    #[error("the SQL does not parse: {0}")]
    Parse(String),
    /// It holds no statement.
    #[error("the SQL holds no statement")]
    Empty,
    /// A statement is not allowed.
    #[error("statement {number} ({kind}) is not allowed: {why}")]
    Statement {
        /// Which statement (1-based).
        number: usize,
        /// What kind of statement it is.
        kind: String,
        /// Why not.
        why: String,
    },
    /// The last statement does not produce rows.
    #[error("the last statement must be a query: its rows are the results")]
    NoQueryLast,
}

/// What the allowlist says.
const ONLY: &str = "a pipeline's SQL holds queries (SELECT, WITH, UNION) and CREATE VIEW ... AS SELECT only";

/// The kind of a statement, as its AST names it (`Copy`, `CreateTable`, `SetVariable`...).
pub fn kind(statement: &Statement) -> String {
    format!("{statement:?}")
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect()
}

/// Whether `statement` may run in a slave; why not otherwise. Pure.
pub fn allowed(statement: &Statement) -> Result<(), String> {
    match statement {
        Statement::Query(query) => query_allowed(query),
        Statement::CreateView(view) if view.materialized => {
            Err("a materialized view stores data; use CREATE VIEW".into())
        }
        Statement::CreateView(view) => query_allowed(&view.query),
        _ => Err(ONLY.into()),
    }
}

fn query_allowed(query: &Query) -> Result<(), String> {
    body_allowed(&query.body)
}

fn body_allowed(body: &SetExpr) -> Result<(), String> {
    match body {
        SetExpr::Select(select) if select.into.is_some() => Err("SELECT ... INTO creates a table".into()),
        SetExpr::Select(_) | SetExpr::Values(_) => Ok(()),
        SetExpr::Query(query) => query_allowed(query),
        SetExpr::SetOperation { left, right, .. } => {
            body_allowed(left)?;
            body_allowed(right)
        }
        _ => Err(format!("a query may only read: {ONLY}")),
    }
}

/// Checks a whole SQL text: it parses, every statement is allowed, and the
/// last one is a query. The number of statements when it passes. Pure.
pub fn check(text: &str) -> Result<usize, SqlRefusal> {
    let statements = Parser::parse_sql(&GenericDialect {}, text)
        .map_err(|e| refused_by_keyword(text).unwrap_or_else(|| SqlRefusal::Parse(e.to_string())))?;
    let Some(last) = statements.last() else {
        return Err(SqlRefusal::Empty);
    };
    for (i, statement) in statements.iter().enumerate() {
        allowed(statement).map_err(|why| SqlRefusal::Statement {
            number: i + 1,
            kind: kind(statement),
            why,
        })?;
    }
    if !matches!(last, Statement::Query(_)) {
        return Err(SqlRefusal::NoQueryLast);
    }
    Ok(statements.len())
}

/// Statements only DataFusion's own parser reads (`CREATE EXTERNAL TABLE
/// ... STORED AS CSV`, `COPY ... TO`), named by their first keywords, with the
/// kind DataFusion gives them.
const ENGINE_STATEMENTS: [(&str, &str); 4] = [
    ("CREATE EXTERNAL TABLE", "CreateExternalTable"),
    ("CREATE UNBOUNDED EXTERNAL TABLE", "CreateExternalTable"),
    ("COPY", "CopyTo"),
    ("EXPLAIN", "Explain"),
];

/// When a text does not parse as standard SQL: the first statement that is
/// one of [`ENGINE_STATEMENTS`], refused by name rather than as a syntax error.
fn refused_by_keyword(text: &str) -> Option<SqlRefusal> {
    text.split(';').enumerate().find_map(|(i, statement)| {
        let words: Vec<String> = statement
            .lines()
            .map(|line| line.split("--").next().unwrap_or_default())
            .flat_map(str::split_whitespace)
            .take(4)
            .map(str::to_ascii_uppercase)
            .collect();
        let head = words.join(" ");
        ENGINE_STATEMENTS
            .iter()
            .find(|(keywords, _)| head.starts_with(keywords))
            .map(|(_, kind)| SqlRefusal::Statement {
                number: i + 1,
                kind: (*kind).to_owned(),
                why: ONLY.into(),
            })
    })
}

/// A SQL text's identity: 16 hex digits of its FNV-1a hash. Results record it,
/// so that each row says which SQL computed it. Pure.
pub fn id(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_views_pass_and_everything_else_is_refused_naming_it() {
        // (SQL, statements when allowed, or the kind refused and where)
        let allowed = [
            (
                "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id",
                1,
            ),
            (
                "CREATE VIEW paid AS SELECT * FROM orders WHERE status = 'paid'; \
                 SELECT merchant_id, SUM(amount) AS gmv FROM paid GROUP BY merchant_id",
                2,
            ),
            (
                "WITH t AS (SELECT * FROM orders) SELECT merchant_id FROM t UNION ALL SELECT merchant_id FROM refunds",
                1,
            ),
        ];
        for (sql, n) in allowed {
            assert_eq!(check(sql), Ok(n), "{sql}");
        }
        let refused = [
            (
                "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/var/run/secrets/kubernetes.io/serviceaccount/token'; SELECT 1",
                1,
            ),
            ("COPY orders TO '/tmp/out.csv'; SELECT 1", 1),
            ("SET datafusion.execution.memory_pool_size = 0; SELECT 1", 1),
            ("SELECT 1; DROP TABLE orders; SELECT 1", 2),
            ("CREATE TABLE t AS SELECT * FROM orders; SELECT 1", 1),
            ("SELECT * INTO leaked FROM orders; SELECT 1", 1),
            ("INSERT INTO orders VALUES (1); SELECT 1", 1),
            ("CREATE MATERIALIZED VIEW v AS SELECT 1; SELECT 1", 1),
        ];
        for (sql, at) in refused {
            match check(sql) {
                Err(SqlRefusal::Statement { number, kind, why }) => {
                    assert_eq!(number, at, "{sql}: {kind}: {why}");
                    assert!(!kind.is_empty() && !why.is_empty(), "{sql}");
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
        assert!(matches!(check("SELEC nonsense"), Err(SqlRefusal::Parse(_))));
        assert_eq!(check("  -- nothing\n"), Err(SqlRefusal::Empty));
        assert_eq!(check("CREATE VIEW v AS SELECT 1"), Err(SqlRefusal::NoQueryLast));
    }

    #[test]
    fn a_refusal_names_the_statement_and_why() {
        let message = check("COPY orders TO '/tmp/x.csv'")
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("statement 1 (Copy) is not allowed:"),
            "{message}"
        );
    }

    #[test]
    fn the_id_is_a_stable_hash_of_the_text() {
        assert_eq!(id(""), "cbf29ce484222325");
        assert_eq!(id("SELECT 1"), id("SELECT 1"));
        assert_ne!(id("SELECT 1"), id("SELECT 2"));
        assert_eq!(id("SELECT 1").len(), 16);
    }
}

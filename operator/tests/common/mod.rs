//! What the operator's scenario tests share.

use ballast_e2e::scenario;

/// Polls `check` until it yields a value or `secs` pass: `scenario::eventually`
/// for checks that fail with any error (`anyhow`).
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    Ok(scenario::eventually(what, secs, check).await?)
}

//! Elasticsearch answers as this crate reads them: a response checked for
//! its HTTP status, a refusal carrying the error type and reason the cluster
//! gave (never the request, which may hold a caller's values).

use serde_json::Value;

/// Why an Elasticsearch call failed.
#[derive(Debug, thiserror::Error)]
pub enum EsError {
    /// The cluster could not be reached or did not answer in time.
    #[error("Elasticsearch transport: {0}")]
    Transport(#[from] elasticsearch::Error),
    /// The cluster refused the request.
    #[error("Elasticsearch answered HTTP {status}: {reason}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The error's type and reason, as Elasticsearch gives them.
        reason: String,
    },
    /// The answer was not what this crate writes.
    #[error("unexpected Elasticsearch answer: {0}")]
    Decode(String),
}

/// The body of `response` if its status is a success, else the refusal.
pub async fn checked(response: elasticsearch::http::response::Response) -> Result<Value, EsError> {
    let status = response.status_code().as_u16();
    let body: Value = response.json().await?;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let error = &body["error"];
    let reason = match (error["type"].as_str(), error["reason"].as_str()) {
        (Some(kind), Some(reason)) => format!("{kind}: {reason}"),
        _ => body.to_string().chars().take(300).collect(),
    };
    Err(EsError::Refused { status, reason })
}

/// The answer of a get by id, if the document exists (a 404, or an answer
/// saying it was not found, is none).
pub async fn found(response: elasticsearch::http::response::Response) -> Result<Option<Value>, EsError> {
    if response.status_code().as_u16() == 404 {
        return Ok(None);
    }
    let answer = checked(response).await?;
    Ok((answer["found"].as_bool() == Some(true)).then_some(answer))
}

/// Puts the index template `name` (`body`) on `es` within `deadline`. Idempotent.
pub async fn put_template(
    es: &elasticsearch::Elasticsearch,
    name: &str,
    body: Value,
    deadline: std::time::Duration,
) -> Result<(), EsError> {
    let response = es
        .indices()
        .put_index_template(elasticsearch::indices::IndicesPutIndexTemplateParts::Name(name))
        .request_timeout(deadline)
        .body(body)
        .send()
        .await?;
    checked(response).await.map(drop)
}

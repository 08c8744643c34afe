//! A refusal and how it reaches a caller: HTTP 429 or 503 with `Retry-After`,
//! gRPC RESOURCE_EXHAUSTED or UNAVAILABLE with `retry-after-ms` metadata.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ballast_crds::member_store::GuardedDependency;

/// The rule that refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The global rate.
    Global,
    /// A listed caller's own rate.
    Caller(String),
    /// The rate of each caller account not listed.
    UnlistedCaller(String),
    /// The rate of one key (a member id).
    HotKey,
    /// Requests in progress at once.
    Concurrency,
    /// An open circuit breaker on this dependency's server (empty: its only one).
    Breaker(GuardedDependency, String),
}

/// A request refused by flow control, decided at once: it never waits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct Refusal {
    /// Which rule refused it.
    pub refused: Refused,
    /// When a retry may succeed.
    pub retry_after: Duration,
}

impl Refusal {
    /// What the caller reads: which limit, and when to come back.
    pub fn message(&self) -> String {
        let why = match &self.refused {
            Refused::Global => "over the service's global rate limit".to_owned(),
            Refused::Caller(c) => format!("over the rate limit of caller account {c}"),
            Refused::UnlistedCaller(c) => format!("over the rate limit of unlisted caller account {c}"),
            Refused::HotKey => "over the rate limit of this key (a hot key)".to_owned(),
            Refused::Concurrency => "too many requests in progress".to_owned(),
            Refused::Breaker(d, server) => format!(
                "{} is unavailable: its circuit breaker is open",
                crate::Target::new(*d, server)
            ),
        };
        format!("{why}; retry after {} ms", self.retry_millis())
    }

    /// The wait in whole milliseconds, at least 1.
    pub fn retry_millis(&self) -> u64 {
        u64::try_from(self.retry_after.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// `Retry-After`: whole seconds, rounded up, at least 1.
    fn retry_seconds(&self) -> u64 {
        self.retry_millis().div_ceil(1000)
    }

    /// Whether a dependency is down rather than the caller over a limit.
    pub fn unavailable(&self) -> bool {
        matches!(self.refused, Refused::Breaker(..))
    }
}

/// 429 Too Many Requests, or 503 Service Unavailable for an open breaker,
/// with `Retry-After` and a JSON body naming the rule.
impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = if self.unavailable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        let body = json_body(&self);
        let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(self.retry_seconds()));
        response
    }
}

fn json_body(refusal: &Refusal) -> String {
    serde_json::json!({"error": refusal.message(), "retryAfterMillis": refusal.retry_millis()}).to_string()
}

/// RESOURCE_EXHAUSTED, or UNAVAILABLE for an open breaker, with the wait in
/// the `retry-after-ms` metadata (as the backup intake's refusals carry it).
impl From<Refusal> for tonic::Status {
    fn from(refusal: Refusal) -> Self {
        let code = if refusal.unavailable() {
            tonic::Code::Unavailable
        } else {
            tonic::Code::ResourceExhausted
        };
        let mut status = tonic::Status::new(code, refusal.message());
        status.metadata_mut().insert(
            "retry-after-ms",
            tonic::metadata::MetadataValue::from(refusal.retry_millis()),
        );
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(refused: Refused, millis: u64) -> Refusal {
        Refusal {
            refused,
            retry_after: Duration::from_millis(millis),
        }
    }

    #[test]
    fn each_refusal_maps_to_its_http_status_retry_after_and_grpc_code() {
        #[rustfmt::skip]
        let table = [
            (Refused::Global, 20, StatusCode::TOO_MANY_REQUESTS, "1", tonic::Code::ResourceExhausted, "20"),
            (Refused::Caller("orders".into()), 1_500, StatusCode::TOO_MANY_REQUESTS, "2", tonic::Code::ResourceExhausted, "1500"),
            (Refused::HotKey, 0, StatusCode::TOO_MANY_REQUESTS, "1", tonic::Code::ResourceExhausted, "1"),
            (Refused::Concurrency, 100, StatusCode::TOO_MANY_REQUESTS, "1", tonic::Code::ResourceExhausted, "100"),
            (Refused::Breaker(GuardedDependency::Elasticsearch, String::new()), 29_001, StatusCode::SERVICE_UNAVAILABLE, "30", tonic::Code::Unavailable, "29001"),
        ];
        for (refused, millis, http, retry_after, grpc, retry_ms) in table {
            let r = refusal(refused.clone(), millis);
            let response = r.clone().into_response();
            assert_eq!(response.status(), http, "{refused:?}");
            assert_eq!(
                response.headers()[header::RETRY_AFTER],
                retry_after,
                "{refused:?}"
            );
            let status = tonic::Status::from(r);
            assert_eq!(status.code(), grpc, "{refused:?}");
            assert_eq!(
                status.metadata().get("retry-after-ms").map(|v| v.to_str().ok()),
                Some(Some(retry_ms)),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn a_refusal_names_its_rule_and_the_server_of_an_open_breaker() {
        let r = refusal(Refused::Breaker(GuardedDependency::Mysql, String::new()), 2_000);
        assert_eq!(
            r.to_string(),
            "mysql is unavailable: its circuit breaker is open; retry after 2000 ms"
        );
        let r = refusal(Refused::Breaker(GuardedDependency::Redis, "dc-b".into()), 2_000);
        assert_eq!(
            r.to_string(),
            "redis dc-b is unavailable: its circuit breaker is open; retry after 2000 ms"
        );
        let r = refusal(Refused::Caller("orders".into()), 5);
        assert_eq!(
            r.to_string(),
            "over the rate limit of caller account orders; retry after 5 ms"
        );
    }

    #[test]
    fn the_json_body_escapes_a_caller_name_it_quotes() {
        let body = json_body(&refusal(Refused::Caller("a\"b\\c\n".into()), 5));
        let value: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(
            value["error"],
            "over the rate limit of caller account a\"b\\c\n; retry after 5 ms"
        );
        assert_eq!(value["retryAfterMillis"], 5);
    }
}

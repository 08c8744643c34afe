//! The query service's HTTP API: routes, the answers and the refusals (a
//! JSON body naming the reason on every 400, 429 and 503), and the metrics
//! of each request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio::sync::watch;

use super::contract::Source;
use super::contract::{self, Completeness, TodayFacts};
use super::history::{self, Cold, ColdUnavailable, HistoryError};
use super::input::{self, BadInput};
use super::metrics::Metrics;
use super::read::{Reader, Unavailable};
use super::today::{self, TodayHead};
use crate::modes::Modes;
use crate::results::cache::day_of;

/// What every handler shares.
pub struct App {
    /// The hot read path.
    pub reader: Reader,
    /// The cold store.
    pub cold: Cold,
    /// Where history requests are recorded.
    pub log: history::logger::QueryLog,
    /// Today's precomputed cold answers.
    pub precomputed: Arc<history::precomputed::Precomputed>,
    /// The published modes.
    pub modes: watch::Receiver<Modes>,
    /// Length of a window, in ms.
    pub window_ms: i64,
    /// Length of a degraded-mode period (the policy's `granularitySeconds`), in ms.
    pub period_ms: i64,
    /// How long after closing a window late events may still change it.
    pub lateness: Duration,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The OpenAPI document of this API.
const OPENAPI: &str = include_str!("openapi.json");

/// Path of a merchant's today.
const TODAY: &str = "/v1/merchants/{merchant}/today";
/// Path of a merchant's history.
const HISTORY: &str = "/v1/merchants/{merchant}/history";

/// The API's routes, to be served beside `/metrics`, `/healthz` and `/readyz`.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(TODAY, get(today))
        .route(HISTORY, get(history))
        .route("/openapi.json", get(openapi))
        .route("/", get(page))
        .with_state(app)
}

/// The merchant page (`/?merchant=<id>`): one static file, no build step.
const PAGE: &str = include_str!("page.html");

async fn page() -> impl IntoResponse {
    axum::response::Html(PAGE)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error(transparent)]
    Bad(#[from] BadInput),
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error("{0}")]
    Cold(ColdUnavailable, Vec<String>),
    #[error("writing the answer failed: {0}")]
    Render(serde_json::Error),
}

impl Refused {
    fn respond(self, metrics: &Metrics) -> Response {
        match self {
            Refused::Bad(bad) => {
                metrics
                    .bad_requests
                    .get_or_create(&[("reason", bad.code())])
                    .inc();
                problem(StatusCode::BAD_REQUEST, bad.code(), &bad.to_string(), None)
            }
            Refused::Unavailable(Unavailable::Limited(refusal)) => {
                metrics
                    .unavailable
                    .get_or_create(&[("reason", "rateLimited")])
                    .inc();
                refusal.into_response()
            }
            Refused::Render(error) => {
                tracing::error!(%error, "writing an answer failed");
                problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    &error.to_string(),
                    None,
                )
            }
            Refused::Cold(why, covered) => {
                let code = why.code();
                metrics.unavailable.get_or_create(&[("reason", code)]).inc();
                // The precomputed queries, as requests a client can send.
                respond_problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({
                        "error": code,
                        "message": why.to_string(),
                        "covered": "today's answers (at /v1/merchants/{merchant}/today), and this \
                                    merchant's frequent history queries precomputed for today (coveredQueries)",
                        "coveredQueries": covered,
                    }),
                )
            }
            Refused::Unavailable(why) => {
                metrics.unavailable.get_or_create(&[("reason", why.code())]).inc();
                problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    why.code(),
                    &why.to_string(),
                    Some(why.covered()),
                )
            }
        }
    }
}

/// A refusal's JSON body: `{error, message[, covered]}`.
fn problem(status: StatusCode, code: &str, message: &str, covered: Option<&str>) -> Response {
    let mut body = json!({ "error": code, "message": message });
    if let Some(covered) = covered {
        body["covered"] = json!(covered);
    }
    respond_problem(status, body)
}

/// A refusal with `body`; a 503 says when to try again.
fn respond_problem(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // The store may be back within the operator's next probes.
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

async fn today(State(app): State<Arc<App>>, merchant: Result<Path<String>, PathRejection>) -> Response {
    let started = Instant::now();
    let answer = answer_today(&app, merchant).await;
    respond(&app, "today", started, answer)
}

async fn history(
    State(app): State<Arc<App>>,
    merchant: Result<Path<String>, PathRejection>,
    pairs: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let answer = answer_history(&app, merchant, pairs).await;
    respond(&app, "history", started, answer)
}

/// The response to an answer or a refusal, counted.
fn respond(app: &App, endpoint: &'static str, started: Instant, answer: Result<Answer, Refused>) -> Response {
    let response = match answer {
        Ok(answer) => {
            let labels = [
                ("source", answer.source.as_str()),
                ("completeness", answer.status.as_str()),
            ];
            app.metrics.answers.get_or_create(&labels).inc();
            ([(header::CONTENT_TYPE, "application/json")], answer.body).into_response()
        }
        Err(refused) => refused.respond(&app.metrics),
    };
    app.metrics
        .requests
        .get_or_create(&[("endpoint", endpoint), ("code", status_label(response.status()))])
        .inc();
    app.metrics.duration.observe(started.elapsed().as_secs_f64());
    response
}

async fn answer_history(
    app: &App,
    merchant: Result<Path<String>, PathRejection>,
    pairs: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Answer, Refused> {
    let Path(merchant) = merchant.map_err(|e| BadInput::Path(e.body_text()))?;
    let merchant = input::merchant(&merchant)?;
    let Query(pairs) = pairs.map_err(|e| BadInput::Query(e.body_text()))?;
    let modes = app.modes.borrow().clone();
    let today = crate::cold::Day::of_ms(Timestamp::now().as_millisecond());
    let key = crate::cold::log::normalize(&pairs, today);
    let request = history::Request {
        merchant,
        pairs: &pairs,
        today,
        modes: &modes,
    };
    let asked = Instant::now();
    let answered = history::answer(&app.cold, app.reader.flow(), request).await;
    if let (Some(key), Ok(_) | Err(HistoryError::Unavailable(_))) = (&key, &answered) {
        app.log.record(crate::cold::log::Entry {
            merchant: merchant.to_owned(),
            day: today.to_string(),
            key: key.clone(),
            took_ms: if answered.is_ok() {
                u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX)
            } else {
                0
            },
        });
    }
    match answered {
        Ok(answer) => Ok(Answer {
            body: serde_json::to_string(&answer).map_err(Refused::Render)?,
            source: answer.source,
            status: answer.completeness.status,
        }),
        Err(HistoryError::Bad(bad)) => Err(Refused::Bad(bad)),
        Err(HistoryError::Unavailable(why)) => {
            let found = key
                .as_deref()
                .and_then(|k| app.precomputed.answer(merchant, k, today));
            match found.and_then(|text| precomputed_answer(&text, &modes)) {
                Some(answer) => Ok(answer),
                None => Err(Refused::Cold(
                    why,
                    app.precomputed
                        .covered(merchant, today)
                        .iter()
                        .filter_map(|k| crate::cold::log::resolve(k, today))
                        .map(|pairs| {
                            pairs
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join("&")
                        })
                        .collect(),
                )),
            }
        }
    }
}

/// A precomputed answer as served now: its source says so, and the modes are
/// today's (its rows, `asOfMs` and completeness are as computed). Pure.
fn precomputed_answer(text: &str, modes: &Modes) -> Option<Answer> {
    let mut answer: serde_json::Value = serde_json::from_str(text).ok()?;
    answer["source"] = json!(Source::Precomputed);
    answer["modes"] = serde_json::to_value(contract::modes_of(modes)).ok()?;
    let status = match answer["completeness"]["status"].as_str() {
        Some("complete") => contract::Status::Complete,
        _ => contract::Status::Partial,
    };
    Some(Answer {
        body: answer.to_string(),
        source: Source::Precomputed,
        status,
    })
}

/// An answer ready to send.
struct Answer {
    body: String,
    source: Source,
    status: contract::Status,
}

async fn answer_today(app: &App, merchant: Result<Path<String>, PathRejection>) -> Result<Answer, Refused> {
    let Path(merchant) = merchant.map_err(|e| BadInput::Path(e.body_text()))?;
    let merchant = input::merchant(&merchant)?;
    let modes = app.modes.borrow().clone();
    let now = Timestamp::now();
    let now_ms = now.as_millisecond();
    let day_start_ms = day_of(now_ms);
    let found = app.reader.day(&modes, merchant, day_start_ms).await?;
    let series = today::series(&found.day, app.window_ms, app.period_ms);
    let day = now.strftime("%Y-%m-%d").to_string();
    let facts = TodayFacts {
        merchant,
        day_start_ms,
        day: &day,
        now_ms,
        as_of_ms: series.as_of_ms,
        lateness_ms: i64::try_from(app.lateness.as_millis()).unwrap_or(i64::MAX),
        source: found.source,
        unchecked: found.unchecked,
    };
    let completeness = Completeness::of(contract::today_reasons(&modes, &facts));
    let status = completeness.status;
    let head = TodayHead {
        merchant: merchant.to_owned(),
        day,
        source: found.source,
        as_of_ms: series.as_of_ms,
        modes: contract::modes_of(&modes),
        completeness,
        window_seconds: app.window_ms / 1000,
        columns: series.columns.clone(),
    };
    let body = today::render(&head, &series).map_err(Refused::Render)?;
    Ok(Answer {
        body,
        source: found.source,
        status,
    })
}

/// The metric label of an HTTP status (a closed set).
fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "200",
        400 => "400",
        404 => "404",
        429 => "429",
        503 => "503",
        500..=599 => "5xx",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap_or_default();
        let paths: Vec<&String> = doc["paths"]
            .as_object()
            .map(|p| p.keys().collect())
            .unwrap_or_default();
        assert_eq!(paths, vec![HISTORY, TODAY]);
        for path in [HISTORY, TODAY] {
            assert!(
                doc["paths"][path]["get"]["responses"]["200"].is_object(),
                "{path}"
            );
        }
    }
}

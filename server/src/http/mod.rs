//! The REST API: routing, authentication and shared state. Handlers live one file per resource
//! and stay a few lines long over the store and domain layers.

pub mod export;
pub mod extract;
pub mod generations;
pub mod health;
pub mod job_activity;
pub mod jobs;
pub mod openapi;
pub mod prompt_sets;
pub mod ui;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

use crate::db::Db;
use crate::error::ApiError;
use crate::teacher::Teacher;
use crate::worker::WorkerShared;
use extract::BodyLimit;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub teachers: Arc<BTreeMap<String, Arc<dyn Teacher>>>,
    pub workers: Arc<WorkerShared>,
    pub api_token: Option<Arc<str>>,
    pub body_limit: usize,
    /// Cancelled when the server shuts down; ends long-lived responses (event streams).
    pub stopping: tokio_util::sync::CancellationToken,
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/prompt-sets", post(prompt_sets::create).get(prompt_sets::list))
        .route("/v1/prompt-sets/{id}", get(prompt_sets::get).delete(prompt_sets::delete))
        .route("/v1/prompt-sets/{id}/prompts", get(prompt_sets::prompts))
        .route("/v1/teachers", get(health::teachers))
        .route("/v1/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/jobs/preview", post(jobs::preview))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/events", get(job_activity::events))
        .route("/v1/jobs/{id}/throughput", get(job_activity::throughput))
        .route("/v1/jobs/{id}/failures", get(job_activity::failures))
        .route("/v1/jobs/{id}/pause", post(jobs::pause))
        .route("/v1/jobs/{id}/resume", post(jobs::resume))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/retry-failed", post(jobs::retry_failed))
        .route("/v1/jobs/{id}/generations", get(generations::list))
        .route("/v1/jobs/{id}/export", get(export::export))
        .route("/v1/generations/{id}", get(generations::get))
        .route("/metrics", get(health::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .route("/", get(ui::index))
        .route("/ui/{file}", get(ui::file))
        .route("/health", get(health::health))
        .route("/openapi.json", get(openapi::serve))
        .fallback(|| async { ApiError::not_found("route", "for this method and path") })
        // One body limit for every extractor (axum's default is 2 MB).
        .layer(DefaultBodyLimit::max(state.body_limit))
        .layer(axum::Extension(BodyLimit(state.body_limit)))
        .with_state(state)
}

/// Checks `Authorization: Bearer <token>` when the server has a token.
async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    if let Some(token) = &state.api_token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(req).await)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

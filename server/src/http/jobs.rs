//! `/v1/jobs`: create, list, show, and pause / resume / cancel / retry-failed.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{ApiJson, ApiQuery, IdPath};
use super::AppState;
use crate::domain::job::{JobAction, JobRequest};
use crate::error::ApiResult;
use crate::store::jobs::{self as store, JobView};

#[derive(Debug, Serialize, ToSchema)]
pub struct JobCreated {
    pub id: i64,
}

/// Starts a generation job: every prompt of the set is answered greedily by the teacher.
#[utoipa::path(post, path = "/v1/jobs", request_body = JobRequest,
    responses((status = 201, body = JobCreated), (status = 400, body = crate::error::ErrorBody)))]
pub async fn create(State(s): State<AppState>, ApiJson(req): ApiJson<JobRequest>) -> ApiResult<(StatusCode, Json<JobCreated>)> {
    let id = crate::submit::create_job(&s, req).await?;
    Ok((StatusCode::CREATED, Json(JobCreated { id })))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PreviewQuery {
    /// Prompts to render, 1..=20 (default 3).
    pub limit: Option<i64>,
}

/// One prompt as the teacher would be sent it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PreviewItem {
    /// 0-based position in the prompt set.
    pub position: i64,
    pub external_id: Option<String>,
    /// The messages (chat endpoint) or the text (completions endpoint).
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobPreview {
    /// Prompts in the set (items the job would have).
    pub count: i64,
    pub items: Vec<PreviewItem>,
}

/// Renders the first prompts of a submission exactly as the job would send them, with the
/// same validation as `POST /v1/jobs`; nothing is stored.
#[utoipa::path(post, path = "/v1/jobs/preview", params(PreviewQuery), request_body = JobRequest,
    responses((status = 200, body = JobPreview), (status = 400, body = crate::error::ErrorBody)))]
pub async fn preview(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<PreviewQuery>,
    ApiJson(req): ApiJson<JobRequest>,
) -> ApiResult<Json<JobPreview>> {
    let limit = match q.limit {
        None => 3,
        Some(n) if (1..=20).contains(&n) => n,
        Some(n) => return Err(crate::error::ApiError::invalid("limit", format!("limit must be 1..=20, got {n}"))),
    };
    let (count, rows) = crate::submit::preview(&s, &req, limit).await?;
    let items = rows
        .into_iter()
        .map(|p| PreviewItem { position: p.position, external_id: p.external_id, request: p.request.to_json() })
        .collect();
    Ok(Json(JobPreview { count, items }))
}

/// All jobs with their progress.
#[utoipa::path(get, path = "/v1/jobs", responses((status = 200, body = Vec<JobView>)))]
pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Vec<JobView>>> {
    Ok(Json(store::list(&s.db).await?))
}

/// One job: status, counts per item status, tokens, answers/s, ETA.
#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = JobView), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get(State(s): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<JobView>> {
    Ok(Json(store::get(&s.db, id).await?))
}

async fn act(s: &AppState, id: i64, action: JobAction) -> ApiResult<Json<JobView>> {
    store::apply(&s.db, id, action).await?;
    if matches!(action, JobAction::Resume | JobAction::RetryFailed) {
        s.workers.wake.notify_waiters();
    }
    Ok(Json(store::get(&s.db, id).await?))
}

/// Stops claiming new items; requests in flight finish and are kept.
#[utoipa::path(post, path = "/v1/jobs/{id}/pause", params(("id" = i64, Path)),
    responses((status = 200, body = JobView), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn pause(State(s): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<JobView>> {
    act(&s, id, JobAction::Pause).await
}

/// Resumes a paused job.
#[utoipa::path(post, path = "/v1/jobs/{id}/resume", params(("id" = i64, Path)),
    responses((status = 200, body = JobView), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn resume(State(s): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<JobView>> {
    act(&s, id, JobAction::Resume).await
}

/// Cancels queued and running items; done ones are kept.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = i64, Path)),
    responses((status = 200, body = JobView), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn cancel(State(s): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<JobView>> {
    act(&s, id, JobAction::Cancel).await
}

/// Puts failed items back in the queue with fresh attempts.
#[utoipa::path(post, path = "/v1/jobs/{id}/retry-failed", params(("id" = i64, Path)),
    responses((status = 200, body = JobView), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn retry_failed(State(s): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<JobView>> {
    act(&s, id, JobAction::RetryFailed).await
}

//! Liveness, teachers, and Prometheus metrics.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::error::ApiResult;

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` when the database answers.
    pub status: String,
    pub schema_version: i64,
}

/// Liveness: the server runs and its database answers.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
pub async fn health(State(s): State<AppState>) -> ApiResult<Json<Health>> {
    sqlx::query("SELECT 1").execute(&s.db.reader).await?;
    Ok(Json(Health { status: "ok".into(), schema_version: crate::db::SCHEMA_VERSION }))
}

#[derive(Serialize, ToSchema)]
pub struct TeacherInfo {
    pub name: String,
    /// Backend, address and model, e.g. `openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct`.
    pub identity: String,
    pub max_in_flight: usize,
    /// `null` when the teacher answered its health check, else why not.
    pub error: Option<String>,
}

/// The configured teachers and whether each answers.
#[utoipa::path(get, path = "/v1/teachers", responses((status = 200, body = Vec<TeacherInfo>)))]
pub async fn teachers(State(s): State<AppState>) -> Json<Vec<TeacherInfo>> {
    let checks = s.teachers.values().map(|t| async move {
        TeacherInfo {
            name: t.name().to_string(),
            identity: t.identity().to_string(),
            max_in_flight: t.max_in_flight(),
            error: t.health().await.err(),
        }
    });
    Json(futures::future::join_all(checks).await)
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        crate::metrics::global().encode(),
    )
}

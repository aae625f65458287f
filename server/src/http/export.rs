//! `GET /v1/jobs/{id}/export?format=jsonl|parquet`: the done generations of a job.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use super::extract::{ApiQuery, IdPath};
use super::AppState;
use crate::db::Db;
use crate::domain::job::{Endpoint, ItemStatus};
use crate::error::{ApiError, ApiResult};
use crate::export::{self, ExportRow};
use crate::store;
use crate::store::generations::PageFilter;

const PAGE: i64 = 1000;

/// Exports hold the done generations, soft labels included.
fn done_filter() -> PageFilter {
    PageFilter { status: Some(ItemStatus::Done), search: None, soft_labels: true }
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Jsonl,
    Parquet,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// `jsonl` (default) or `parquet`.
    pub format: Option<ExportFormat>,
}

async fn page(db: &Db, job: i64, after: i64, teacher: &str) -> ApiResult<(Vec<ExportRow>, Option<i64>)> {
    let rows = store::generations::page(db, job, &done_filter(), after, PAGE).await?;
    let next = (rows.len() as i64 == PAGE).then(|| rows.last().map(|r| r.id)).flatten();
    Ok((rows.iter().map(|r| ExportRow::from_row(r, teacher)).collect::<ApiResult<_>>()?, next))
}

/// Done generations as JSONL (streamed) or Parquet, ready for TRL SFT and open-r1 scripts.
#[utoipa::path(get, path = "/v1/jobs/{id}/export", params(("id" = i64, Path), ExportQuery),
    responses(
        (status = 200, description = "JSONL lines or a Parquet file; columns: generation_id, job_id, prompt_id, external_id, teacher, model, messages, prompt, completion, problem, generation, finish_reason, prompt_tokens, completion_tokens, metadata, prompt_token_ids, completion_token_ids, and with soft labels token_logprobs, target_token_ids, target_logprobs (top-k per answer token, natural log)"),
        (status = 404, body = crate::error::ErrorBody)
    ))]
pub async fn export(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> ApiResult<Response> {
    let job = store::jobs::get_row(&s.db, id).await?;
    let chat = job.params()?.endpoint == Endpoint::Chat;
    match q.format.unwrap_or(ExportFormat::Jsonl) {
        ExportFormat::Jsonl => {
            let db = s.db.clone();
            let teacher = job.teacher.clone();
            let stream = futures::stream::unfold(Some(0i64), move |after| {
                let db = db.clone();
                let teacher = teacher.clone();
                async move {
                    let after = after?;
                    match page(&db, id, after, &teacher).await {
                        Ok((rows, next)) => {
                            let bytes: Vec<u8> = rows.iter().flat_map(|r| r.jsonl_line()).collect();
                            Some((Ok::<_, std::io::Error>(Bytes::from(bytes)), next))
                        }
                        Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
                    }
                }
            });
            Ok((
                [
                    (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
                    (header::CONTENT_DISPOSITION, format!("attachment; filename=\"job-{id}.jsonl\"")),
                ],
                Body::from_stream(stream),
            )
                .into_response())
        }
        ExportFormat::Parquet => {
            let mut rows = Vec::new();
            let mut after = Some(0);
            while let Some(a) = after {
                let (mut r, next) = page(&s.db, id, a, &job.teacher).await?;
                rows.append(&mut r);
                after = next;
            }
            let bytes = tokio::task::spawn_blocking(move || export::parquet(&rows, chat, 10_000))
                .await
                .map_err(|e| ApiError::Internal(e.into()))??;
            Ok((
                [
                    (header::CONTENT_TYPE, "application/vnd.apache.parquet".to_string()),
                    (header::CONTENT_DISPOSITION, format!("attachment; filename=\"job-{id}.parquet\"")),
                ],
                bytes,
            )
                .into_response())
        }
    }
}

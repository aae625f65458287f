//! `/v1/prompt-sets`: submit as JSON or upload JSONL / CSV / Parquet, list, show, delete.

use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{is_json, parse_json, read_body, ApiQuery, IdPath};
use super::AppState;
use crate::domain::import::{self, ImportOptions};
use crate::domain::prompt_set::{validate_name, NewPromptSet, PromptSetRequest, Source};
use crate::error::{ApiError, ApiResult};
use crate::store::prompt_sets::{self as store, PromptSetDetail, PromptSetSummary, PromptView};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Name of the set (uploads only; default: the file name or `upload`).
    pub name: Option<String>,
    /// `jsonl`, `csv` or `parquet`; default from Content-Type or the uploaded file's extension.
    pub format: Option<Source>,
    /// Column (JSONL key) holding the prompt text; default `prompt`.
    pub column: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Created {
    pub id: i64,
    pub count: i64,
}

fn format_from_mime(headers: &HeaderMap) -> Option<Source> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mime = ct.split(';').next()?.trim().to_ascii_lowercase();
    Some(match mime.as_str() {
        "application/x-ndjson" | "application/jsonl" | "application/x-jsonlines" | "application/jsonlines" => {
            Source::Jsonl
        }
        "text/csv" => Source::Csv,
        "application/vnd.apache.parquet" | "application/x-parquet" | "application/parquet" => Source::Parquet,
        _ => return None,
    })
}

fn format_from_filename(name: &str) -> Option<Source> {
    let ext = name.rsplit('.').next()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "jsonl" | "ndjson" => Source::Jsonl,
        "csv" => Source::Csv,
        "parquet" | "pq" => Source::Parquet,
        _ => return None,
    })
}

async fn parse_upload(
    source: Source,
    bytes: axum::body::Bytes,
    name: String,
    column: Option<String>,
) -> ApiResult<NewPromptSet> {
    let opts = ImportOptions { column: column.unwrap_or_else(|| "prompt".into()) };
    let prompts = tokio::task::spawn_blocking(move || import::parse(source, &bytes, &opts))
        .await
        .map_err(|e| ApiError::Internal(e.into()))??;
    Ok(NewPromptSet { name: validate_name(&name, "name")?, source, prompts })
}

/// Creates a prompt set from a JSON body, a raw JSONL / CSV / Parquet body, or a multipart
/// upload with a `file` part (and optionally a `name` part).
#[utoipa::path(
    post, path = "/v1/prompt-sets", params(UploadQuery),
    request_body(content(
        (PromptSetRequest = "application/json"),
        (String = "application/x-ndjson"),
        (String = "text/csv"),
        (Vec<u8> = "application/vnd.apache.parquet"),
        (Vec<u8> = "multipart/form-data")
    )),
    responses(
        (status = 201, body = Created),
        (status = 400, body = crate::error::ErrorBody, description = "invalid input; `field` names it"),
        (status = 413, body = crate::error::ErrorBody),
        (status = 415, body = crate::error::ErrorBody)
    )
)]
pub async fn create(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    req: Request,
) -> ApiResult<(StatusCode, Json<Created>)> {
    let headers = req.headers().clone();
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let set = if ct.to_ascii_lowercase().starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::invalid("body", e.body_text()))?;
        let mut file: Option<(Option<String>, axum::body::Bytes)> = None;
        let mut name = q.name.clone();
        while let Some(field) = mp.next_field().await.map_err(|e| multipart_error(e, s.body_limit))? {
            match field.name() {
                Some("file") => {
                    let filename = field.file_name().map(str::to_string);
                    let bytes = field.bytes().await.map_err(|e| multipart_error(e, s.body_limit))?;
                    file = Some((filename, bytes));
                }
                Some("name") => name = Some(field.text().await.map_err(|e| multipart_error(e, s.body_limit))?),
                other => {
                    return Err(ApiError::invalid(
                        other.unwrap_or("body"),
                        "unexpected multipart field; send `file` and optionally `name`",
                    ))
                }
            }
        }
        let (filename, bytes) = file.ok_or_else(|| ApiError::invalid("file", "multipart upload needs a `file` part"))?;
        let source = q
            .format
            .or_else(|| filename.as_deref().and_then(format_from_filename))
            .ok_or_else(|| ApiError::invalid("format", "cannot tell the file format; pass ?format=jsonl|csv|parquet"))?;
        let name = name.or(filename).unwrap_or_else(|| "upload".into());
        parse_upload(source, bytes, name, q.column).await?
    } else if let Some(source) = q.format.filter(|f| *f != Source::Json).or_else(|| format_from_mime(&headers)) {
        let bytes = read_body(req.into_body(), s.body_limit).await?;
        parse_upload(source, bytes, q.name.unwrap_or_else(|| "upload".into()), q.column).await?
    } else if is_json(&headers) {
        if q.name.is_some() || q.column.is_some() {
            return Err(ApiError::invalid("name", "query parameters apply to file uploads; put `name` in the JSON body"));
        }
        let bytes = read_body(req.into_body(), s.body_limit).await?;
        let body: PromptSetRequest =
            tokio::task::spawn_blocking(move || parse_json(&bytes)).await.map_err(|e| ApiError::Internal(e.into()))??;
        body.validate()?
    } else {
        return Err(ApiError::UnsupportedMedia(format!(
            "{ct}; send application/json, application/x-ndjson, text/csv, application/vnd.apache.parquet or multipart/form-data"
        )));
    };
    let (id, count) = store::insert(&s.db, set).await?;
    Ok((StatusCode::CREATED, Json(Created { id, count })))
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge { limit }
    } else {
        ApiError::invalid("body", e.body_text())
    }
}

/// All prompt sets.
#[utoipa::path(get, path = "/v1/prompt-sets", responses((status = 200, body = Vec<PromptSetSummary>)))]
pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Vec<PromptSetSummary>>> {
    Ok(Json(store::list(&s.db).await?))
}

/// One prompt set and the jobs that use it.
#[utoipa::path(get, path = "/v1/prompt-sets/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = PromptSetDetail), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get(State(s): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<PromptSetDetail>> {
    Ok(Json(store::get(&s.db, id).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PromptsQuery {
    /// Return prompts after this position (keyset pagination); default -1 (from the start).
    pub after: Option<i64>,
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PromptPage {
    pub items: Vec<PromptView>,
    /// Pass as `after` for the next page; `null` at the end.
    pub next_after: Option<i64>,
}

/// The prompts of a set, in order, a page at a time.
#[utoipa::path(get, path = "/v1/prompt-sets/{id}/prompts", params(("id" = i64, Path), PromptsQuery),
    responses((status = 200, body = PromptPage), (status = 404, body = crate::error::ErrorBody)))]
pub async fn prompts(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    ApiQuery(q): ApiQuery<PromptsQuery>,
) -> ApiResult<Json<PromptPage>> {
    let limit = super::generations::page_limit(q.limit)?;
    store::get(&s.db, id).await?;
    let rows = store::prompts(&s.db, id, q.after.unwrap_or(-1), limit).await?;
    let next_after = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.position)).flatten();
    Ok(Json(PromptPage { items: rows.into_iter().map(PromptView::from).collect(), next_after }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Also delete finished jobs (and their generations) that use the set.
    pub with_jobs: Option<bool>,
}

/// Deletes a prompt set; refused (409) while a job uses it.
#[utoipa::path(delete, path = "/v1/prompt-sets/{id}", params(("id" = i64, Path), DeleteQuery),
    responses((status = 204), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn delete(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> ApiResult<StatusCode> {
    store::delete(&s.db, id, q.with_jobs.unwrap_or(false)).await?;
    Ok(StatusCode::NO_CONTENT)
}

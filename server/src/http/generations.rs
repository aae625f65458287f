//! `/v1/jobs/{id}/generations` (keyset pagination) and `/v1/generations/{id}`.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{ApiQuery, IdPath};
use super::AppState;
use crate::domain::job::ItemStatus;
use crate::error::{ApiError, ApiResult};
use crate::domain::search::TextSearch;
use crate::store::generations::{self as store, GenerationView, PageFilter};

pub const MAX_PAGE: i64 = 1000;

/// Checks a page size (default 100).
pub fn page_limit(limit: Option<i64>) -> ApiResult<i64> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid("limit", format!("limit must be 1..={MAX_PAGE}, got {n}"))),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct GenerationsQuery {
    /// Only items in this status: queued, running, done, failed, cancelled.
    pub status: Option<ItemStatus>,
    /// Return generations with id greater than this (the previous page's `next_after`).
    pub after: Option<i64>,
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<i64>,
    /// Include each generation's soft labels (default false: they are large).
    pub soft_labels: Option<bool>,
    /// Words to find in the prompt or the answer: a generation matches when one of them
    /// contains every word (each a prefix, case- and accent-insensitive).
    pub q: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GenerationPage {
    pub items: Vec<GenerationView>,
    /// Pass as `after` for the next page; `null` at the end.
    pub next_after: Option<i64>,
}

/// A job's generations in id order, a page at a time.
#[utoipa::path(get, path = "/v1/jobs/{id}/generations", params(("id" = i64, Path), GenerationsQuery),
    responses((status = 200, body = GenerationPage), (status = 404, body = crate::error::ErrorBody)))]
pub async fn list(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    ApiQuery(q): ApiQuery<GenerationsQuery>,
) -> ApiResult<Json<GenerationPage>> {
    let limit = page_limit(q.limit)?;
    crate::store::jobs::get_row(&s.db, id).await?;
    let filter = PageFilter {
        status: q.status,
        search: q.q.as_deref().map(TextSearch::parse).transpose()?,
        soft_labels: q.soft_labels.unwrap_or(false),
    };
    let rows = store::page(&s.db, id, &filter, q.after.unwrap_or(0), limit).await?;
    let next_after = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.id)).flatten();
    let items = rows.into_iter().map(GenerationView::try_from).collect::<ApiResult<_>>()?;
    Ok(Json(GenerationPage { items, next_after }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct GenerationQuery {
    /// Add `token_texts`: the text of every token id in the answer and its soft labels, as the
    /// job's teacher decodes it (for showing tokens; default false).
    pub token_texts: Option<bool>,
}

/// One generation: prompt, answer and everything recorded about it.
#[utoipa::path(get, path = "/v1/generations/{id}", params(("id" = i64, Path), GenerationQuery),
    responses((status = 200, body = GenerationView), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    ApiQuery(q): ApiQuery<GenerationQuery>,
) -> ApiResult<Json<GenerationView>> {
    let row = store::get(&s.db, id).await?;
    let job = row.job_id;
    let mut view = GenerationView::try_from(row)?;
    if q.token_texts.unwrap_or(false) {
        // Only the teacher that answered can name its ids: a name now configured with another
        // model (another identity) gives no texts rather than wrong ones.
        let job = crate::store::jobs::get_row(&s.db, job).await?;
        view.token_texts = s
            .teachers
            .get(&job.teacher)
            .filter(|t| t.identity() == job.teacher_identity)
            .and_then(|t| token_texts(t.as_ref(), &view));
    }
    Ok(Json(view))
}

/// Texts of the answer's ids and of every soft-label alternative, each id once.
fn token_texts(teacher: &dyn crate::teacher::Teacher, view: &GenerationView) -> Option<BTreeMap<u32, String>> {
    let mut ids: BTreeSet<u32> = view.completion_token_ids.iter().flatten().copied().collect();
    if let Some(sl) = &view.soft_labels {
        ids.extend(sl.target_token_ids.iter().flatten().copied());
    }
    let ids: Vec<u32> = ids.into_iter().collect();
    let texts = teacher.token_texts(&ids)?;
    Some(ids.into_iter().zip(texts).collect())
}

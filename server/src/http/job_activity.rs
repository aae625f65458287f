//! What the job page watches: live job views over SSE, answers over time, failures by reason.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderName;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures::Stream;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use utoipa::IntoParams;

use super::extract::{ApiQuery, IdPath};
use super::AppState;
use crate::db::Db;
use crate::error::{ApiError, ApiResult};
use crate::store::job_stats::{self, Failures, Throughput, MAX_BUCKETS};
use crate::store::jobs;

/// How often an events stream looks at its job.
const POLL: Duration = Duration::from_millis(500);

/// The job's view as Server-Sent Events: an `event: job` with the `JobView` JSON at once and
/// whenever it changes, keep-alive comments in between. The stream ends when the server shuts
/// down or the job is deleted. Works with `fetch` and the bearer header (EventSource cannot
/// send one).
#[utoipa::path(get, path = "/v1/jobs/{id}/events", params(("id" = i64, Path)),
    responses((status = 200, description = "`event: job` / `data: JobView` messages", content_type = "text/event-stream"),
        (status = 404, body = crate::error::ErrorBody)))]
pub async fn events(
    State(s): State<AppState>,
    IdPath(id): IdPath,
) -> ApiResult<([(HeaderName, &'static str); 1], Sse<impl Stream<Item = Result<Event, Infallible>>>)> {
    let first = serde_json::to_string(&jobs::get(&s.db, id).await?).map_err(anyhow::Error::from)?;
    let state = Watch { db: s.db.clone(), stop: s.stopping.clone(), id, last: None, first: Some(first) };
    let stream = futures::stream::unfold(state, |mut w| async move {
        let json = w.next_change().await?;
        Some((Ok(Event::default().event("job").data(json)), w))
    });
    // Reverse proxies such as nginx would otherwise buffer the stream and the page would not update.
    let no_buffering = [(HeaderName::from_static("x-accel-buffering"), "no")];
    Ok((no_buffering, Sse::new(stream).keep_alive(KeepAlive::default())))
}

struct Watch {
    db: Db,
    stop: CancellationToken,
    id: i64,
    last: Option<String>,
    first: Option<String>,
}

impl Watch {
    /// The next view that differs from the last one sent; `None` ends the stream.
    async fn next_change(&mut self) -> Option<String> {
        loop {
            let json = match self.first.take() {
                Some(j) => j,
                None => {
                    tokio::select! {
                        _ = self.stop.cancelled() => return None,
                        _ = tokio::time::sleep(POLL) => {}
                    }
                    match jobs::get(&self.db, self.id).await {
                        Ok(v) => serde_json::to_string(&v).ok()?,
                        Err(ApiError::NotFound { .. }) => return None,
                        Err(e) => {
                            tracing::warn!(job = self.id, error = %e, "job events: cannot read the job");
                            continue;
                        }
                    }
                }
            };
            if self.last.as_ref() != Some(&json) {
                self.last = Some(json.clone());
                return Some(json);
            }
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ThroughputQuery {
    /// Number of time buckets, 1..=500 (default 60); each is at least a second wide.
    pub buckets: Option<i64>,
}

/// Done answers and their tokens per time bucket, from the job's start to its end (or now).
#[utoipa::path(get, path = "/v1/jobs/{id}/throughput", params(("id" = i64, Path), ThroughputQuery),
    responses((status = 200, body = Throughput), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn throughput(
    State(s): State<AppState>,
    IdPath(id): IdPath,
    ApiQuery(q): ApiQuery<ThroughputQuery>,
) -> ApiResult<Json<Throughput>> {
    let buckets = match q.buckets {
        None => 60,
        Some(n) if (1..=MAX_BUCKETS).contains(&n) => n,
        Some(n) => return Err(ApiError::invalid("buckets", format!("buckets must be 1..={MAX_BUCKETS}, got {n}"))),
    };
    let job = jobs::get_row(&s.db, id).await?;
    Ok(Json(job_stats::throughput(&s.db, &job, buckets).await?))
}

/// The job's failed items grouped by their last error, most frequent first.
#[utoipa::path(get, path = "/v1/jobs/{id}/failures", params(("id" = i64, Path)),
    responses((status = 200, body = Failures), (status = 404, body = crate::error::ErrorBody)))]
pub async fn failures(State(s): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Failures>> {
    jobs::get_row(&s.db, id).await?;
    Ok(Json(job_stats::failures(&s.db, id).await?))
}

//! Creating a job: resolve the teacher and prompt set, render every prompt once (so a template
//! that fails on any prompt is refused up front), and queue one item per prompt.

use std::sync::Arc;

use crate::db::Db;
use crate::domain::job::{JobParams, JobRequest};
use crate::domain::render::{cache_key, render, JobTemplate, RenderedRequest};
use crate::error::{ApiError, ApiResult};
use crate::http::AppState;
use crate::store;
use crate::store::prompt_sets::PromptRow;
use crate::teacher::Teacher;

const PAGE: i64 = 5000;

/// A submission checked against the configured teachers and the store.
struct Resolved<'a> {
    params: JobParams,
    teacher: &'a Arc<dyn Teacher>,
    set_id: i64,
    /// Prompts in the set.
    set_count: i64,
    template: JobTemplate,
}

async fn resolve<'a>(s: &'a AppState, req: &JobRequest) -> ApiResult<Resolved<'a>> {
    let params = req.params()?;
    let teacher = s.teachers.get(&req.teacher).ok_or_else(|| {
        let known: Vec<&str> = s.teachers.keys().map(String::as_str).collect();
        ApiError::invalid(
            "teacher",
            format!("no teacher named `{}`; configured: {known:?} (start the server with --teacher NAME=SPEC)", req.teacher),
        )
    })?;
    if let Some(why) = teacher.load_error() {
        return Err(ApiError::invalid("teacher", why));
    }
    let set = store::prompt_sets::get(&s.db, req.prompt_set).await.map_err(|e| match e {
        ApiError::NotFound { .. } => ApiError::invalid("prompt_set", format!("prompt set {} does not exist", req.prompt_set)),
        other => other,
    })?;
    let template = JobTemplate::for_params(&params)?;
    Ok(Resolved { params, teacher, set_id: set.summary.id, set_count: set.summary.count, template })
}

pub async fn create_job(s: &AppState, req: JobRequest) -> ApiResult<i64> {
    let r = resolve(s, &req).await?;
    if r.params.logprobs > 0 {
        r.teacher.supports(&r.params).await.map_err(|why| ApiError::invalid("logprobs", why))?;
    }
    let identity = r.teacher.identity().to_string();
    let items = keys_for_set(&s.db, r.set_id, &identity, &r.params, &r.template).await?;
    let id = store::jobs::insert(&s.db, r.set_id, &req.teacher, &identity, &r.params, &items).await?;
    s.workers.wake.notify_waiters();
    Ok(id)
}

/// One prompt as the teacher would be sent it.
pub struct Previewed {
    pub position: i64,
    pub external_id: Option<String>,
    pub request: RenderedRequest,
}

/// What a submission would send for the first `limit` prompts of its set, with the same checks
/// as a real submission except the teacher probe; nothing is stored.
pub async fn preview(s: &AppState, req: &JobRequest, limit: i64) -> ApiResult<(i64, Vec<Previewed>)> {
    let r = resolve(s, req).await?;
    let rows = store::prompt_sets::prompts(&s.db, r.set_id, -1, limit).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let request = render_row(&r.params, &r.template, row)?;
        out.push(Previewed { position: row.position, external_id: row.external_id.clone(), request });
    }
    Ok((r.set_count, out))
}

/// Renders one stored prompt; a failure names the field at fault and the prompt's position.
fn render_row(params: &JobParams, template: &JobTemplate, row: &PromptRow) -> ApiResult<RenderedRequest> {
    row.with_view(|view| render(params, template, view))?.map_err(|msg| {
        let field = ["template", "mode"].into_iter().find(|f| msg.starts_with(f)).unwrap_or("endpoint");
        ApiError::invalid(field, format!("prompt at position {} of the set: {msg}", row.position))
    })
}

async fn keys_for_set(
    db: &Db,
    set_id: i64,
    identity: &str,
    params: &JobParams,
    template: &JobTemplate,
) -> ApiResult<Vec<(i64, String)>> {
    let mut items = Vec::new();
    let mut after = -1;
    loop {
        let rows = store::prompt_sets::prompts(db, set_id, after, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.position;
        for row in &rows {
            let request = render_row(params, template, row)?;
            items.push((row.id, cache_key(identity, &request, params)));
        }
        if (rows.len() as i64) < PAGE {
            break;
        }
    }
    Ok(items)
}

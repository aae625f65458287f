//! Creating a job: resolve the teacher and prompt set, render every prompt once (so a template
//! that fails on any prompt is refused up front), and queue one item per prompt.

use crate::db::Db;
use crate::domain::job::JobRequest;
use crate::domain::render::{cache_key, render, JobTemplate, PromptView};
use crate::error::{ApiError, ApiResult};
use crate::http::AppState;
use crate::store;

const PAGE: i64 = 5000;

pub async fn create_job(s: &AppState, req: JobRequest) -> ApiResult<i64> {
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
    if params.logprobs > 0 {
        teacher.supports(&params).await.map_err(|why| ApiError::invalid("logprobs", why))?;
    }
    let set = store::prompt_sets::get(&s.db, req.prompt_set).await.map_err(|e| match e {
        ApiError::NotFound { .. } => ApiError::invalid("prompt_set", format!("prompt set {} does not exist", req.prompt_set)),
        other => other,
    })?;
    let template = JobTemplate::for_params(&params)?;
    let identity = teacher.identity().to_string();
    let items = keys_for_set(&s.db, set.summary.id, &identity, &params, &template).await?;
    let id = store::jobs::insert(&s.db, set.summary.id, &req.teacher, &identity, &params, &items).await?;
    s.workers.wake.notify_waiters();
    Ok(id)
}

async fn keys_for_set(
    db: &Db,
    set_id: i64,
    identity: &str,
    params: &crate::domain::job::JobParams,
    template: &JobTemplate,
) -> ApiResult<Vec<(i64, String)>> {
    let mut items = Vec::new();
    let mut after = -1;
    loop {
        let rows = store::prompt_sets::prompts(db, set_id, after, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = last.position;
        for row in &rows {
            let content = row.content()?;
            let metadata = row.metadata_value();
            let view = PromptView {
                content: &content,
                system: row.system.as_deref(),
                external_id: row.external_id.as_deref(),
                metadata: &metadata,
            };
            let request = render(params, template, &view).map_err(|msg| {
                let field = ["template", "mode"].into_iter().find(|f| msg.starts_with(f)).unwrap_or("endpoint");
                ApiError::invalid(
                    field,
                    format!("prompt at position {} of the set: {msg}", row.position),
                )
            })?;
            items.push((row.id, cache_key(identity, &request, params)));
        }
        if (rows.len() as i64) < PAGE {
            break;
        }
    }
    Ok(items)
}

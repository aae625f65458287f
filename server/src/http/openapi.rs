//! The OpenAPI document, generated from the handlers' annotations. A committed copy lives at
//! `openapi.json` in the repository root; a test fails when it is stale.

use axum::Json;
use utoipa::OpenApi;

use super::{export, generations, health, job_activity, jobs, prompt_sets};

#[derive(OpenApi)]
#[openapi(
    info(title = "distill generation server", description = "Prompt sets in, greedy teacher answers out, recorded in SQLite."),
    paths(
        prompt_sets::create, prompt_sets::list, prompt_sets::get, prompt_sets::prompts, prompt_sets::delete,
        jobs::create, jobs::preview, jobs::list, jobs::get, jobs::pause, jobs::resume, jobs::cancel, jobs::retry_failed,
        job_activity::events, job_activity::throughput, job_activity::failures,
        generations::list, generations::get, export::export,
        health::health, health::teachers, health::metrics,
    ),
    components(schemas(crate::error::ErrorBody, crate::error::ErrorDetail, export::ExportFormat))
)]
pub struct ApiDoc;

/// The document as pretty JSON, newline-terminated (the committed form).
pub fn spec_json() -> String {
    let mut s = ApiDoc::openapi().to_pretty_json().expect("spec serializes");
    s.push('\n');
    s
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

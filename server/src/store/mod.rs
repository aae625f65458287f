//! Typed queries, one module per table group. Handlers and the worker never write SQL.

pub mod generations;
pub mod job_stats;
pub mod jobs;
pub mod prompt_sets;

/// Rows per multi-row INSERT; keeps bound variables well under SQLite's limit.
pub(crate) const INSERT_CHUNK: usize = 500;

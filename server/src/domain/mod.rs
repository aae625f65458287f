//! Request bodies turned into domain types ("parse, don't validate"): once a value of these
//! types exists, it is valid, so nothing invalid can reach the queue or the database.

pub mod import;
pub mod job;
pub mod prompt_set;
pub mod render;
pub mod search;

use crate::error::ApiError;

/// A validation failure: the JSON path of the offending field, and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid { field: field.into(), message: message.into() }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::invalid(e.field, e.message)
    }
}

//! Generation server for knowledge distillation: prompt sets come in over REST, a durable
//! SQLite queue hands every (job, prompt) to a teacher, and each greedy answer is committed the
//! moment it arrives.

pub mod app;
pub mod config;
pub mod db;
pub mod domain;
pub mod engine;
pub mod error;
pub mod export;
pub mod http;
pub mod metrics;
pub mod model;
pub mod queue;
pub mod recorder;
pub mod soft_labels;
pub mod store;
pub mod submit;
pub mod teacher;
pub mod time;
pub mod worker;

pub use app::App;
pub use config::Settings;

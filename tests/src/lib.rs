//! Test support: a mock OpenAI-compatible teacher that can inject faults, a harness that runs
//! the real server in-process on port 0 with a fresh database, and helpers for driving the
//! built `server` binary as a user would.

pub mod harness;
pub mod mock_openai;

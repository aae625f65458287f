//! The trainer: next-token SFT of a student on the teacher's answers that the server recorded
//! in SQLite, with candle. `train` is the run; the other modules are its parts.

pub mod alloc;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod eval;
pub mod init;
pub mod kd;
pub mod model;
pub mod ops;
pub mod optim;
pub mod report;
pub mod train;

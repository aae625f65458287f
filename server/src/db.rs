//! Opening the database: WAL, busy timeout, foreign keys, embedded migrations, and an
//! exclusive lock file so that one server process owns a database at a time.
//!
//! Writes go through a single-connection pool: SQLite has one writer anyway, and one connection
//! avoids busy-wait sleeps between competing writers. Reads use a separate pool.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

/// Schema version written by migrations/ and checked by readers such as the trainer.
pub const SCHEMA_VERSION: i64 = 4;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Both pools plus the lock that proves this process owns the database.
#[derive(Clone)]
pub struct Db {
    pub writer: SqlitePool,
    pub reader: SqlitePool,
    _lock: std::sync::Arc<File>,
}

fn lock_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl Db {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        let lock_file = lock_path(path);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_file)
            .with_context(|| format!("cannot open lock file {}", lock_file.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "database {} is in use by another server process (lock {} is held); stop it or use another --db",
                path.display(),
                lock_file.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_file.display()))
            }
        }

        let opts = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode is durable against process crashes (SIGKILL); only an OS crash
            // or power loss can drop the last commits.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            .pragma("temp_store", "memory")
            .pragma("cache_size", "-65536");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(opts.clone())
            .await
            .with_context(|| format!("cannot open database {}", path.display()))?;
        check_not_newer(&writer, path).await?;
        MIGRATOR
            .run(&writer)
            .await
            .with_context(|| format!("cannot migrate database {}", path.display()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(opts.read_only(true))
            .await?;
        Ok(Db { writer, reader, _lock: std::sync::Arc::new(lock) })
    }
}

/// Refuses a database written by a newer version of the server instead of migrating it wrongly.
async fn check_not_newer(pool: &SqlitePool, path: &Path) -> anyhow::Result<()> {
    let has_meta: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
    )
    .fetch_optional(pool)
    .await
    .with_context(|| format!("{} is not a SQLite database", path.display()))?;
    if has_meta.is_some() {
        let v: Option<String> =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'schema_version'")
                .fetch_optional(pool)
                .await?;
        let v: i64 = v.and_then(|v| v.parse().ok()).unwrap_or(0);
        if v > SCHEMA_VERSION {
            anyhow::bail!(
                "database {} has schema version {v}, newer than this server's {SCHEMA_VERSION}; upgrade the server",
                path.display()
            );
        }
    }
    Ok(())
}

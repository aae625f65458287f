-- Schema version 1 of the generation database. This file is the one source of truth for the
-- layout; docs/schema.md explains it for the trainer and users' own tools.
-- Times are unix epoch milliseconds (INTEGER). JSON columns hold UTF-8 JSON text.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
INSERT INTO meta (key, value) VALUES ('schema_version', '1');

CREATE TABLE prompt_sets (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    source       TEXT    NOT NULL CHECK (source IN ('json', 'jsonl', 'csv', 'parquet')),
    prompt_count INTEGER NOT NULL,
    created_at   INTEGER NOT NULL
) STRICT;

CREATE TABLE prompts (
    id            INTEGER PRIMARY KEY,
    prompt_set_id INTEGER NOT NULL REFERENCES prompt_sets (id) ON DELETE CASCADE,
    position      INTEGER NOT NULL,            -- 0-based order within the set
    external_id   TEXT,                        -- the submitter's own "id", if any
    prompt        TEXT,                        -- plain prompt text ...
    messages      TEXT,                        -- ... or a JSON array of {"role","content"}
    system        TEXT,                        -- per-prompt system prompt (overrides the job's)
    metadata      TEXT,                        -- JSON object, passed through to exports
    UNIQUE (prompt_set_id, position),
    CHECK ((prompt IS NULL) <> (messages IS NULL))
) STRICT;

CREATE TABLE jobs (
    id                INTEGER PRIMARY KEY,
    prompt_set_id     INTEGER NOT NULL REFERENCES prompt_sets (id),
    teacher           TEXT    NOT NULL,         -- teacher name given at submission
    teacher_identity  TEXT    NOT NULL,         -- backend identity, e.g. openai:http://host/v1#model
    status            TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'paused', 'done', 'cancelled')),
    params            TEXT    NOT NULL,         -- JSON: endpoint, max_new_tokens, template, system, stop, seed
    prompt_tokens     INTEGER NOT NULL DEFAULT 0, -- sums over this job's done generations
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cache_hits        INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER,
    updated_at        INTEGER NOT NULL
) STRICT;

-- Teacher outputs. One row per distinct request: the dedup cache. A generation whose request
-- hashes to an existing cache_key reuses the row instead of calling the teacher again.
CREATE TABLE completions (
    id                 INTEGER PRIMARY KEY,
    cache_key          TEXT    NOT NULL UNIQUE, -- sha256 hex of (teacher identity, request, decoding params)
    teacher_identity   TEXT    NOT NULL,
    endpoint           TEXT    NOT NULL CHECK (endpoint IN ('chat', 'completions')),
    request            TEXT    NOT NULL,        -- what was sent: JSON messages (chat) or the prompt text (completions)
    text               TEXT    NOT NULL,        -- the teacher's answer: the hard label
    finish_reason      TEXT,                    -- 'stop', 'length', ... as the teacher reported it
    prompt_tokens      INTEGER,
    completion_tokens  INTEGER,
    latency_ms         INTEGER NOT NULL,        -- wall time of the successful request
    model              TEXT,                    -- model id the teacher reported
    system_fingerprint TEXT,
    http_attempts      INTEGER NOT NULL,        -- requests sent, including retries
    created_at         INTEGER NOT NULL
) STRICT;

-- One row per (job, prompt): the queue item and its outcome.
CREATE TABLE generations (
    id               INTEGER PRIMARY KEY,
    job_id           INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    prompt_id        INTEGER NOT NULL REFERENCES prompts (id),
    status           TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts         INTEGER NOT NULL DEFAULT 0, -- times claimed; fences writes together with lease_owner
    run_at           INTEGER NOT NULL DEFAULT 0, -- not claimable before this time (retry backoff)
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    cache_key        TEXT    NOT NULL,
    completion_id    INTEGER REFERENCES completions (id),
    cache_hit        INTEGER NOT NULL DEFAULT 0, -- 1 when completion_id came from the dedup cache
    last_error       TEXT,
    started_at       INTEGER,
    finished_at      INTEGER,
    UNIQUE (job_id, prompt_id),
    CHECK ((status = 'done') = (completion_id IS NOT NULL))
) STRICT;

CREATE INDEX generations_claimable ON generations (run_at, id) WHERE status = 'queued';
CREATE INDEX generations_by_job_status ON generations (job_id, status, id);
CREATE INDEX generations_by_job ON generations (job_id, id);
CREATE INDEX generations_by_job_finished ON generations (job_id, finished_at) WHERE status = 'done';
CREATE INDEX generations_running ON generations (lease_owner, lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_by_prompt_set ON jobs (prompt_set_id);
CREATE INDEX prompts_by_set ON prompts (prompt_set_id, position);

-- Job counters and state follow their items inside the same statement, so the queue's writes
-- stay single statements (and batches of them) without extra round trips.
CREATE TRIGGER generations_claimed AFTER UPDATE OF status ON generations
WHEN NEW.status = 'running' AND OLD.status <> 'running'
BEGIN
    UPDATE jobs SET status = 'running', started_at = coalesce(started_at, NEW.started_at), updated_at = NEW.started_at
     WHERE id = NEW.job_id AND status = 'queued';
END;

CREATE TRIGGER generations_done AFTER UPDATE OF status ON generations
WHEN NEW.status = 'done' AND OLD.status <> 'done'
BEGIN
    UPDATE jobs
       SET prompt_tokens = prompt_tokens + coalesce((SELECT prompt_tokens FROM completions WHERE id = NEW.completion_id), 0),
           completion_tokens = completion_tokens + coalesce((SELECT completion_tokens FROM completions WHERE id = NEW.completion_id), 0),
           cache_hits = cache_hits + NEW.cache_hit,
           updated_at = NEW.finished_at
     WHERE id = NEW.job_id;
END;

-- Schema version 4, for the web UI: full-text search over prompt and answer text (the
-- generations browser's `q`), and answers per second (the throughput chart).
--
-- Search: two contentless FTS5 indexes keyed by the source row's id: prompts_fts.rowid =
-- prompts.id (system prompt and prompt text, or every message's content), completions_fts.rowid
-- = completions.id (the answer). Prompts and completions are never updated, only inserted and
-- deleted, so insert and delete triggers keep the indexes in step. Contentless: the text is not
-- stored twice.
CREATE VIRTUAL TABLE prompts_fts USING fts5(
    text, content = '', contentless_delete = 1, tokenize = 'unicode61 remove_diacritics 2'
);
CREATE VIRTUAL TABLE completions_fts USING fts5(
    text, content = '', contentless_delete = 1, tokenize = 'unicode61 remove_diacritics 2'
);

CREATE TRIGGER prompts_fts_insert AFTER INSERT ON prompts
BEGIN
    INSERT INTO prompts_fts (rowid, text) VALUES (
        NEW.id,
        coalesce(NEW.system || ' ', '') || coalesce(
            NEW.prompt,
            (SELECT group_concat(json_extract(m.value, '$.content'), ' ') FROM json_each(NEW.messages) m),
            ''
        )
    );
END;
CREATE TRIGGER prompts_fts_delete AFTER DELETE ON prompts
BEGIN
    DELETE FROM prompts_fts WHERE rowid = OLD.id;
END;
CREATE TRIGGER completions_fts_insert AFTER INSERT ON completions
BEGIN
    INSERT INTO completions_fts (rowid, text) VALUES (NEW.id, NEW.text);
END;
CREATE TRIGGER completions_fts_delete AFTER DELETE ON completions
BEGIN
    DELETE FROM completions_fts WHERE rowid = OLD.id;
END;

-- Rows written before this version.
INSERT INTO prompts_fts (rowid, text)
SELECT p.id, coalesce(p.system || ' ', '') || coalesce(
           p.prompt,
           (SELECT group_concat(json_extract(m.value, '$.content'), ' ') FROM json_each(p.messages) m),
           ''
       )
  FROM prompts p;
INSERT INTO completions_fts (rowid, text) SELECT id, text FROM completions;

-- Answers and their tokens per job and second, for the job page's throughput chart: kept by a
-- trigger as items become done (done is final: retries only touch failed items), so the chart
-- reads one row per active second instead of every answer.
CREATE TABLE job_seconds (
    job_id  INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    second  INTEGER NOT NULL,            -- finished_at / 1000
    answers INTEGER NOT NULL,
    tokens  INTEGER NOT NULL,            -- completion tokens of those answers
    PRIMARY KEY (job_id, second)
) STRICT, WITHOUT ROWID;

CREATE TRIGGER generations_done_per_second AFTER UPDATE OF status ON generations
WHEN NEW.status = 'done' AND OLD.status <> 'done' AND NEW.finished_at IS NOT NULL
BEGIN
    INSERT INTO job_seconds (job_id, second, answers, tokens)
    VALUES (NEW.job_id, NEW.finished_at / 1000, 1,
            coalesce((SELECT completion_tokens FROM completions WHERE id = NEW.completion_id), 0))
    ON CONFLICT (job_id, second) DO UPDATE SET answers = answers + 1, tokens = tokens + excluded.tokens;
END;

INSERT INTO job_seconds (job_id, second, answers, tokens)
SELECT g.job_id, g.finished_at / 1000, count(*), coalesce(sum(c.completion_tokens), 0)
  FROM generations g JOIN completions c ON c.id = g.completion_id
 WHERE g.status = 'done' AND g.finished_at IS NOT NULL
 GROUP BY g.job_id, g.finished_at / 1000;

UPDATE meta SET value = '4' WHERE key = 'schema_version';

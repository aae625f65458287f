-- Schema version 4: full-text search over prompt and answer text (the generations browser's
-- `q`). Two contentless FTS5 indexes keyed by the source row's id: prompts_fts.rowid =
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

UPDATE meta SET value = '4' WHERE key = 'schema_version';

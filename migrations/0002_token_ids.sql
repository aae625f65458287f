-- Schema version 2: the exact token ids a local teacher used, per completion.
-- Each is a little-endian u32 array (4 bytes per id); NULL when the teacher does not report ids
-- (OpenAI-compatible servers). The prompt ids include every special token of the chat template.
ALTER TABLE completions ADD COLUMN prompt_token_ids BLOB;
ALTER TABLE completions ADD COLUMN completion_token_ids BLOB;
UPDATE meta SET value = '2' WHERE key = 'schema_version';

-- Schema version 3: soft labels. One blob per completion with, for every answer token, the
-- teacher's top-k (token id, natural-log probability) pairs and the emitted token's
-- log-probability; layout in docs/schema.md (versioned by its own header). NULL when the job
-- did not ask for logprobs.
ALTER TABLE completions ADD COLUMN soft_labels BLOB;
UPDATE meta SET value = '3' WHERE key = 'schema_version';

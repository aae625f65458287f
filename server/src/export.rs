//! Export rows: one per done generation, in the shapes training tools read as-is.
//!
//! - TRL SFT: `messages` (the conversation with the teacher's answer as the assistant turn), and
//!   `prompt` / `completion` (conversational lists for chat jobs, strings for completions jobs).
//! - open-r1 style scripts: `problem` (the prompt as submitted) and `generation` (the answer).
//! - KD trainers (axolotl's layout): `prompt_token_ids` / `completion_token_ids`, and for jobs
//!   with soft labels `target_token_ids` / `target_logprobs` (top-k per answer token, natural
//!   log) and `token_logprobs` (the emitted token's), each aligned with `completion_token_ids`.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Builder, Int64Builder, ListBuilder, StringBuilder, StructBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::Serialize;

use crate::domain::prompt_set::Message;
use crate::error::ApiResult;
use crate::store::generations::GenerationRow;

/// One exported row.
#[derive(Debug, Serialize)]
pub struct ExportRow {
    pub generation_id: i64,
    pub job_id: i64,
    pub prompt_id: i64,
    pub external_id: Option<String>,
    pub teacher: String,
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub prompt: serde_json::Value,
    pub completion: serde_json::Value,
    pub problem: String,
    pub generation: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub metadata: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_logprobs: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_token_ids: Option<Vec<Vec<u32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_logprobs: Option<Vec<Vec<f32>>>,
}

fn assistant(text: &str) -> Message {
    Message { role: "assistant".into(), content: text.to_string() }
}

impl ExportRow {
    pub fn from_row(r: &GenerationRow, teacher: &str) -> ApiResult<Self> {
        let text = r.text.clone().unwrap_or_default();
        let problem = match (&r.prompt, &r.messages) {
            (Some(p), _) => p.clone(),
            (None, Some(m)) => serde_json::from_str::<Vec<Message>>(m)
                .ok()
                .and_then(|m| m.into_iter().rev().find(|m| m.role == "user").map(|m| m.content))
                .unwrap_or_default(),
            _ => String::new(),
        };
        let (messages, prompt, completion) = match r.request_messages() {
            Some(req) => {
                let mut all = req.clone();
                all.push(assistant(&text));
                (all, serde_json::json!(req), serde_json::json!([assistant(&text)]))
            }
            None => {
                let req = r.request.clone().unwrap_or_default();
                let all = vec![Message { role: "user".into(), content: req.clone() }, assistant(&text)];
                (all, serde_json::Value::String(req), serde_json::Value::String(text.clone()))
            }
        };
        let soft = r.soft_label_columns()?;
        let ids = |b: &Option<Vec<u8>>| b.as_deref().map(crate::queue::blob_ids);
        Ok(ExportRow {
            prompt_token_ids: ids(&r.prompt_token_ids),
            completion_token_ids: ids(&r.completion_token_ids),
            token_logprobs: soft.as_ref().map(|s| s.token_logprobs.clone()),
            target_token_ids: soft.as_ref().map(|s| s.target_token_ids.clone()),
            target_logprobs: soft.map(|s| s.target_logprobs),
            generation_id: r.id,
            job_id: r.job_id,
            prompt_id: r.prompt_id,
            external_id: r.external_id.clone(),
            teacher: teacher.to_string(),
            model: r.model.clone(),
            messages,
            prompt,
            completion,
            problem,
            generation: text,
            finish_reason: r.finish_reason.clone(),
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            metadata: r.metadata_value(),
        })
    }

    /// One JSONL line, newline included.
    pub fn jsonl_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("rows serialize");
        v.push(b'\n');
        v
    }
}

fn message_fields() -> Fields {
    Fields::from(vec![Field::new("role", DataType::Utf8, false), Field::new("content", DataType::Utf8, false)])
}

fn messages_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(message_fields()), true)))
}

fn messages_builder() -> ListBuilder<StructBuilder> {
    ListBuilder::new(StructBuilder::from_fields(message_fields(), 0))
}

fn append_messages(b: &mut ListBuilder<StructBuilder>, msgs: &[Message]) {
    let sb = b.values();
    for m in msgs {
        sb.field_builder::<StringBuilder>(0).expect("role").append_value(&m.role);
        sb.field_builder::<StringBuilder>(1).expect("content").append_value(&m.content);
        sb.append(true);
    }
    b.append(true);
}

/// The Parquet schema; `chat` decides whether prompt/completion are message lists or strings.
pub fn schema(chat: bool) -> Schema {
    let pc = if chat { messages_type() } else { DataType::Utf8 };
    Schema::new(vec![
        Field::new("generation_id", DataType::Int64, false),
        Field::new("job_id", DataType::Int64, false),
        Field::new("prompt_id", DataType::Int64, false),
        Field::new("external_id", DataType::Utf8, true),
        Field::new("teacher", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, true),
        Field::new("messages", messages_type(), false),
        Field::new("prompt", pc.clone(), false),
        Field::new("completion", pc, false),
        Field::new("problem", DataType::Utf8, false),
        Field::new("generation", DataType::Utf8, false),
        Field::new("finish_reason", DataType::Utf8, true),
        Field::new("prompt_tokens", DataType::Int64, true),
        Field::new("completion_tokens", DataType::Int64, true),
        Field::new("metadata", DataType::Utf8, true),
        Field::new("prompt_token_ids", list_of(DataType::UInt32), true),
        Field::new("completion_token_ids", list_of(DataType::UInt32), true),
        Field::new("token_logprobs", list_of(DataType::Float32), true),
        Field::new("target_token_ids", list_of(list_of(DataType::UInt32)), true),
        Field::new("target_logprobs", list_of(list_of(DataType::Float32)), true),
    ])
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

/// Appends an optional list (null when absent).
fn append_list<B: arrow::array::ArrayBuilder, T: Copy>(
    b: &mut ListBuilder<B>,
    v: Option<&[T]>,
    push: impl Fn(&mut B, T),
) {
    match v {
        Some(items) => {
            for &x in items {
                push(b.values(), x);
            }
            b.append(true);
        }
        None => b.append(false),
    }
}

/// Appends an optional list of lists.
fn append_nested<B: arrow::array::ArrayBuilder, T: Copy>(
    b: &mut ListBuilder<ListBuilder<B>>,
    v: Option<&[Vec<T>]>,
    push: impl Fn(&mut B, T),
) {
    match v {
        Some(rows) => {
            for row in rows {
                append_list(b.values(), Some(row.as_slice()), &push);
            }
            b.append(true);
        }
        None => b.append(false),
    }
}

fn batch(rows: &[ExportRow], chat: bool) -> anyhow::Result<RecordBatch> {
    let mut ids = [Int64Builder::new(), Int64Builder::new(), Int64Builder::new()];
    let mut strs: Vec<StringBuilder> = (0..7).map(|_| StringBuilder::new()).collect();
    let mut tokens = [Int64Builder::new(), Int64Builder::new()];
    let mut token_ids = [ListBuilder::new(UInt32Builder::new()), ListBuilder::new(UInt32Builder::new())];
    let mut chosen = ListBuilder::new(Float32Builder::new());
    let mut target_ids = ListBuilder::new(ListBuilder::new(UInt32Builder::new()));
    let mut target_lps = ListBuilder::new(ListBuilder::new(Float32Builder::new()));
    let push_u32 = |b: &mut UInt32Builder, v: u32| b.append_value(v);
    let push_f32 = |b: &mut Float32Builder, v: f32| b.append_value(v);
    let mut messages = messages_builder();
    let (mut prompt_l, mut completion_l) = (messages_builder(), messages_builder());
    let (mut prompt_s, mut completion_s) = (StringBuilder::new(), StringBuilder::new());
    for r in rows {
        ids[0].append_value(r.generation_id);
        ids[1].append_value(r.job_id);
        ids[2].append_value(r.prompt_id);
        strs[0].append_option(r.external_id.as_deref());
        strs[1].append_value(&r.teacher);
        strs[2].append_option(r.model.as_deref());
        append_messages(&mut messages, &r.messages);
        if chat {
            let p: Vec<Message> = serde_json::from_value(r.prompt.clone())?;
            append_messages(&mut prompt_l, &p);
            let c: Vec<Message> = serde_json::from_value(r.completion.clone())?;
            append_messages(&mut completion_l, &c);
        } else {
            prompt_s.append_value(r.prompt.as_str().unwrap_or_default());
            completion_s.append_value(r.completion.as_str().unwrap_or_default());
        }
        strs[3].append_value(&r.problem);
        strs[4].append_value(&r.generation);
        strs[5].append_option(r.finish_reason.as_deref());
        tokens[0].append_option(r.prompt_tokens);
        tokens[1].append_option(r.completion_tokens);
        strs[6].append_option(r.metadata.as_ref().map(|m| m.to_string()));
        append_list(&mut token_ids[0], r.prompt_token_ids.as_deref(), push_u32);
        append_list(&mut token_ids[1], r.completion_token_ids.as_deref(), push_u32);
        append_list(&mut chosen, r.token_logprobs.as_deref(), push_f32);
        append_nested(&mut target_ids, r.target_token_ids.as_deref(), push_u32);
        append_nested(&mut target_lps, r.target_logprobs.as_deref(), push_f32);
    }
    let (p, c): (ArrayRef, ArrayRef) = if chat {
        (Arc::new(prompt_l.finish()), Arc::new(completion_l.finish()))
    } else {
        (Arc::new(prompt_s.finish()), Arc::new(completion_s.finish()))
    };
    let [mut g, mut j, mut pi] = ids;
    let [mut pt, mut ct] = tokens;
    let cols: Vec<ArrayRef> = vec![
        Arc::new(g.finish()),
        Arc::new(j.finish()),
        Arc::new(pi.finish()),
        Arc::new(strs[0].finish()),
        Arc::new(strs[1].finish()),
        Arc::new(strs[2].finish()),
        Arc::new(messages.finish()),
        p,
        c,
        Arc::new(strs[3].finish()),
        Arc::new(strs[4].finish()),
        Arc::new(strs[5].finish()),
        Arc::new(pt.finish()),
        Arc::new(ct.finish()),
        Arc::new(strs[6].finish()),
        Arc::new(token_ids[0].finish()),
        Arc::new(token_ids[1].finish()),
        Arc::new(chosen.finish()),
        Arc::new(target_ids.finish()),
        Arc::new(target_lps.finish()),
    ];
    Ok(RecordBatch::try_new(Arc::new(schema(chat)), cols)?)
}

/// Writes rows as a zstd-compressed Parquet file, one row group per `group` rows.
pub fn parquet(rows: &[ExportRow], chat: bool, group: usize) -> anyhow::Result<Vec<u8>> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, Arc::new(schema(chat)), Some(props))?;
    for chunk in rows.chunks(group.max(1)) {
        w.write(&batch(chunk, chat)?)?;
    }
    if rows.is_empty() {
        w.write(&batch(&[], chat)?)?;
    }
    w.close()?;
    Ok(out)
}

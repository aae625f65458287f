//! Prompt-set uploads as files: JSONL, CSV and Parquet. `column` names the field holding the
//! prompt text (default `prompt`); `id` and `system` columns are recognised; every other
//! column is kept as metadata.

use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use serde_json::{Map, Value};

use super::prompt_set::{check_count, external_id, Message, NewPrompt, PromptContent, PromptInput, Source};
use super::Invalid;

/// Options of an upload, from the query string.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Column (or JSON key) holding the prompt text.
    pub column: String,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions { column: "prompt".into() }
    }
}

/// Parses an uploaded file of the given format.
pub fn parse(source: Source, bytes: &[u8], opts: &ImportOptions) -> Result<Vec<NewPrompt>, Invalid> {
    let prompts = match source {
        Source::Json => unreachable!("JSON bodies are parsed by the handler"),
        Source::Jsonl => parse_jsonl(bytes, opts)?,
        Source::Csv => parse_csv(bytes, opts)?,
        Source::Parquet => parse_parquet(bytes, opts)?,
    };
    check_count(prompts.len(), "body")?;
    Ok(prompts)
}

fn parse_jsonl(bytes: &[u8], opts: &ImportOptions) -> Result<Vec<NewPrompt>, Invalid> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1;
        Invalid::new(format!("line {line}"), "body is not valid UTF-8")
    })?;
    let mut out = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let field = format!("line {}", i + 1);
        let value: Value = serde_json::from_str(line)
            .map_err(|e| Invalid::new(&field, format!("not valid JSON: {e}")))?;
        let Value::Object(mut obj) = value else {
            return Err(Invalid::new(field, "each line must be a JSON object"));
        };
        let mut input = PromptInput {
            id: obj.remove("id"),
            ..Default::default()
        };
        match obj.remove(&opts.column) {
            Some(Value::String(s)) => input.prompt = Some(s),
            Some(_) => {
                return Err(Invalid::new(format!("{field}.{}", opts.column), "prompt must be a string"))
            }
            None => {}
        }
        if let Some(m) = obj.remove("messages") {
            let messages: Vec<Message> = serde_json::from_value(m).map_err(|e| {
                Invalid::new(format!("{field}.messages"), format!("must be a list of {{role, content}}: {e}"))
            })?;
            input.messages = Some(messages);
        }
        match obj.remove("system") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => input.system = Some(s),
            Some(_) => return Err(Invalid::new(format!("{field}.system"), "system must be a string")),
        }
        let mut metadata = match obj.remove("metadata") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(Invalid::new(format!("{field}.metadata"), "metadata must be an object")),
        };
        metadata.extend(obj);
        input.metadata = (!metadata.is_empty()).then_some(metadata);
        if input.prompt.is_none() && input.messages.is_none() {
            return Err(Invalid::new(
                format!("{field}.{}", opts.column),
                format!("line has neither `{}` nor `messages`; choose the prompt column with ?column=NAME", opts.column),
            ));
        }
        out.push(input.validate(&field)?);
    }
    Ok(out)
}

fn row_to_prompt(
    field: &str,
    prompt: Option<String>,
    id: Option<String>,
    system: Option<String>,
    metadata: Map<String, Value>,
    column: &str,
) -> Result<NewPrompt, Invalid> {
    let Some(prompt) = prompt.filter(|p| !p.is_empty()) else {
        return Err(Invalid::new(format!("{field}.{column}"), "prompt is empty"));
    };
    Ok(NewPrompt {
        external_id: id,
        content: PromptContent::Text(prompt),
        system: system.filter(|s| !s.is_empty()),
        metadata: (!metadata.is_empty()).then_some(metadata),
    })
}

fn parse_csv(bytes: &[u8], opts: &ImportOptions) -> Result<Vec<NewPrompt>, Invalid> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|e| Invalid::new("line 1", format!("cannot read the CSV header: {e}")))?
        .clone();
    let col = headers.iter().position(|h| h == opts.column).ok_or_else(|| {
        Invalid::new(
            "column",
            format!(
                "CSV has no column `{}` (columns: {}); choose one with ?column=NAME",
                opts.column,
                headers.iter().collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let field = format!("line {}", i + 2);
        let record = record.map_err(|e| Invalid::new(&field, format!("bad CSV record: {e}")))?;
        let mut prompt = None;
        let mut id = None;
        let mut system = None;
        let mut metadata = Map::new();
        for (j, value) in record.iter().enumerate() {
            let name = headers.get(j).unwrap_or("");
            if j == col {
                prompt = Some(value.to_string());
            } else if name == "id" {
                id = Some(value.to_string()).filter(|v| !v.is_empty());
            } else if name == "system" {
                system = Some(value.to_string());
            } else {
                metadata.insert(name.to_string(), Value::String(value.to_string()));
            }
        }
        out.push(row_to_prompt(&field, prompt, id, system, metadata, &opts.column)?);
    }
    Ok(out)
}

fn cell_to_json(array: &dyn Array, row: usize) -> Value {
    if array.is_null(row) {
        return Value::Null;
    }
    match array.data_type() {
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Value::String(array.as_string_view().value(row).to_string()),
        DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
        _ => {
            let fmt = arrow::util::display::ArrayFormatter::try_new(array, &Default::default());
            match fmt {
                Ok(f) => {
                    let s = f.value(row).to_string();
                    match serde_json::from_str::<serde_json::Number>(&s) {
                        Ok(n) if array.data_type().is_numeric() => Value::Number(n),
                        _ => Value::String(s),
                    }
                }
                Err(_) => Value::Null,
            }
        }
    }
}

fn parse_parquet(bytes: &[u8], opts: &ImportOptions) -> Result<Vec<NewPrompt>, Invalid> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let data = bytes::Bytes::copy_from_slice(bytes);
    let builder = ParquetRecordBatchReaderBuilder::try_new(data)
        .map_err(|e| Invalid::new("body", format!("not a readable Parquet file: {e}")))?;
    let schema = Arc::clone(builder.schema());
    let col = schema.index_of(&opts.column).map_err(|_| {
        Invalid::new(
            "column",
            format!(
                "Parquet file has no column `{}` (columns: {}); choose one with ?column=NAME",
                opts.column,
                schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    if !matches!(schema.field(col).data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
        return Err(Invalid::new(
            "column",
            format!("column `{}` is {}, not a string column", opts.column, schema.field(col).data_type()),
        ));
    }
    let reader = builder
        .with_batch_size(8192)
        .build()
        .map_err(|e| Invalid::new("body", format!("cannot read Parquet: {e}")))?;
    let mut out = Vec::new();
    let mut row_no = 0usize;
    for batch in reader {
        let batch = batch.map_err(|e| Invalid::new("body", format!("cannot read Parquet: {e}")))?;
        for r in 0..batch.num_rows() {
            let field = format!("row {row_no}");
            row_no += 1;
            let mut prompt = None;
            let mut id = None;
            let mut system = None;
            let mut metadata = Map::new();
            for (j, f) in schema.fields().iter().enumerate() {
                let v = cell_to_json(batch.column(j).as_ref(), r);
                if j == col {
                    prompt = v.as_str().map(str::to_string);
                } else if f.name() == "id" {
                    id = external_id(Some(v), &format!("{field}.id"))?;
                } else if f.name() == "system" {
                    system = v.as_str().map(str::to_string);
                } else {
                    metadata.insert(f.name().clone(), v);
                }
            }
            out.push(row_to_prompt(&field, prompt, id, system, metadata, &opts.column)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_with_custom_column_and_metadata() {
        let body = b"{\"problem\": \"1+1?\", \"id\": 1, \"level\": 2}\n\n{\"problem\": \"2+2?\"}\r\n";
        let p = parse(Source::Jsonl, body, &ImportOptions { column: "problem".into() }).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].content, PromptContent::Text("1+1?".into()));
        assert_eq!(p[0].metadata.as_ref().unwrap()["level"], 2);
        let err = parse(Source::Jsonl, body, &ImportOptions::default()).unwrap_err();
        assert_eq!(err.field, "line 1.prompt");
    }

    #[test]
    fn jsonl_reports_line_of_bad_json_and_bad_utf8() {
        let err = parse(Source::Jsonl, b"{\"prompt\":\"a\"}\n{oops\n", &ImportOptions::default()).unwrap_err();
        assert_eq!(err.field, "line 2");
        let err = parse(Source::Jsonl, b"{\"prompt\":\"a\"}\n{\"prompt\":\"\xff\"}\n", &ImportOptions::default())
            .unwrap_err();
        assert_eq!(err.field, "line 2");
    }

    #[test]
    fn csv_quoted_fields() {
        let body = "id,prompt,topic\n1,\"say \"\"hi\"\", please\nnow\",greeting\n";
        let p = parse(Source::Csv, body.as_bytes(), &ImportOptions::default()).unwrap();
        assert_eq!(p[0].content, PromptContent::Text("say \"hi\", please\nnow".into()));
        assert_eq!(p[0].external_id.as_deref(), Some("1"));
        let err = parse(Source::Csv, body.as_bytes(), &ImportOptions { column: "q".into() }).unwrap_err();
        assert_eq!(err.field, "column");
    }
}

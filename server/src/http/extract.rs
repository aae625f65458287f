//! Extractors that turn malformed input into our JSON error naming the field, instead of
//! axum's plain-text rejections.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Reads a whole body up to `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let inner = e.into_inner();
            if is_length_limit(inner.as_ref()) {
                Err(ApiError::TooLarge { limit })
            } else {
                Err(ApiError::invalid("body", format!("could not read the request body: {inner}")))
            }
        }
    }
}

fn is_length_limit(mut e: &(dyn std::error::Error + 'static)) -> bool {
    loop {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        match e.source() {
            Some(s) => e = s,
            None => return false,
        }
    }
}

/// Turns a serde error at `path` into the field it names (unknown fields included).
fn field_of(path: &str, message: &str) -> String {
    let unknown = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))
        .and_then(|rest| rest.split('`').next());
    match (path, unknown) {
        (".", Some(f)) | ("", Some(f)) => f.to_string(),
        (p, Some(f)) if !p.ends_with(f) => format!("{p}.{f}"),
        (".", None) | ("", None) => "body".to_string(),
        (p, _) => p.to_string(),
    }
}

/// Parses JSON bytes into `T`, naming the failing field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::invalid("body", "request body is empty; expected a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let field = if inner.is_syntax() || inner.is_eof() { "body".to_string() } else { field_of(&path, &message) };
        ApiError::invalid(field, format!("invalid JSON: {message}"))
    })?;
    de.end().map_err(|e| ApiError::invalid("body", format!("invalid JSON: {e}")))?;
    Ok(value)
}

/// Whether the request says its body is JSON (or says nothing).
pub fn is_json(headers: &HeaderMap) -> bool {
    match headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(ct) => {
            let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        }
    }
}

/// A JSON body, with our error format and `deny_unknown_fields` honoured.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            return Err(ApiError::UnsupportedMedia(format!("{ct}; send application/json")));
        }
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0).unwrap_or(64 << 20);
        let bytes = read_body(req.into_body(), limit).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// The configured body limit, put into request extensions by the router.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

/// Query parameters, unknown ones refused, errors naming the parameter.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded_parse(q));
        serde_path_to_error::deserialize(de).map(ApiQuery).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            ApiError::invalid(field_of(&path, &message), format!("invalid query parameter: {message}"))
        })
    }
}

fn form_urlencoded_parse(q: &str) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(q.as_bytes())
}

/// A numeric id in the path.
pub struct IdPath(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw): axum::extract::Path<String> =
            axum::extract::Path::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::invalid("id", e.body_text()))?;
        match raw.parse::<i64>() {
            Ok(id) if id > 0 => Ok(IdPath(id)),
            _ => Err(ApiError::invalid("id", format!("`{raw}` is not a valid id (a positive integer)"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        items: Vec<Inner>,
    }

    fn field(json: &str) -> String {
        match parse_json::<Outer>(json.as_bytes()).unwrap_err() {
            ApiError::Invalid { field, .. } => field.unwrap(),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn names_fields() {
        assert_eq!(field(r#"{"items":[{"n":1},{"n":"x"}]}"#), "items[1].n");
        assert_eq!(field(r#"{"items":[{"n":1,"m":2}]}"#), "items[0].m");
        assert_eq!(field(r#"{"itemz":[]}"#), "itemz");
        assert_eq!(field(r#"{}"#), "items");
        assert_eq!(field(r#"{"items":[{}]}"#), "items[0].n");
        assert_eq!(field(r#"{"items":[{"n":-1}]}"#), "items[0].n");
        assert_eq!(field(r#"{"items":["#), "body");
        assert_eq!(field(r#"{"items":[]} x"#), "body");
        assert_eq!(field(""), "body");
    }
}

//! Log-probabilities as OpenAI-compatible servers return them, turned into soft labels.
//!
//! Chat responses carry `choices[0].logprobs.content[]` = `{token, logprob, top_logprobs:
//! [{token, logprob}]}`; completions responses `choices[0].logprobs` = `{tokens,
//! token_logprobs, top_logprobs: [{text: logprob}]}`. Tokens are `token_id:N` (vLLM with
//! `return_tokens_as_token_ids`) or texts, mapped through the teacher's tokenizer
//! ([`TokenMap`]). Values are converted to natural logs.

use serde_json::Value;

use super::token_map::{parse_token_id, TokenMap};
use crate::config::LogprobBase;
use crate::soft_labels::Position;

/// One answer token as the server reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerToken {
    pub token: String,
    pub logprob: Option<f64>,
    /// The alternatives, as given (a completions response's map has no order).
    pub top: Vec<(String, f64)>,
}

/// Reads the per-token log-probabilities of a response's first choice (`logprobs` field).
pub fn parse(logprobs: &Value, chat: bool) -> Result<Vec<ServerToken>, String> {
    let num = |v: &Value| v.as_f64();
    if chat {
        let content = logprobs.get("content").and_then(Value::as_array).ok_or("logprobs has no `content` list")?;
        content
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let token = t.get("token").and_then(Value::as_str).ok_or(format!("logprobs.content[{i}] has no token"))?;
                let top = t
                    .get("top_logprobs")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| Some((e.get("token")?.as_str()?.to_string(), num(e.get("logprob")?)?)))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(ServerToken { token: token.to_string(), logprob: t.get("logprob").and_then(num), top })
            })
            .collect()
    } else {
        let tokens = logprobs.get("tokens").and_then(Value::as_array).ok_or("logprobs has no `tokens` list")?;
        let lps = logprobs.get("token_logprobs").and_then(Value::as_array).ok_or("logprobs has no `token_logprobs`")?;
        let tops = logprobs.get("top_logprobs").and_then(Value::as_array);
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let token = t.as_str().ok_or(format!("logprobs.tokens[{i}] is not a string"))?;
                let top = tops
                    .and_then(|a| a.get(i))
                    .and_then(Value::as_object)
                    .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), num(v)?))).collect())
                    .unwrap_or_default();
                Ok(ServerToken { token: token.to_string(), logprob: lps.get(i).and_then(num), top })
            })
            .collect()
    }
}

/// The id of a returned token: the server's own (`token_id:N`) or the tokenizer's.
fn id_of(token: &str, map: Option<&TokenMap>) -> Result<u32, String> {
    if let Some(id) = parse_token_id(token) {
        return Ok(id);
    }
    match map {
        Some(m) => m.id(token).map_err(|e| e.to_string()),
        None => Err(format!("the server returned the text {token:?}, not an id, and the teacher has no --teacher-tokenizer")),
    }
}

/// Soft labels of an answer: its ids, and per token the chosen log-probability and the
/// top-`k` pairs (natural log, highest first). Alternatives whose id cannot be vouched for
/// (no or several vocabulary entries decode to their text) are left out and the position is
/// padded with (0, −∞): their mass counts as the rest outside the top-k. An answer token whose
/// id cannot be vouched for, a missing or NaN value, or a chosen token that is not the most
/// likely when `greedy` (the server did not decode greedily) is an error. Returns the number
/// left out too.
pub fn to_soft_labels(
    tokens: &[ServerToken],
    k: usize,
    base: LogprobBase,
    map: Option<&TokenMap>,
    greedy: bool,
) -> Result<(Vec<u32>, Vec<Position>, usize), String> {
    let f = base.to_natural();
    let natural = |i: usize, v: f64| -> Result<f32, String> {
        let n = v * f;
        if n.is_nan() {
            return Err(format!("answer token {i}: log-probability is NaN"));
        }
        // ≤ 0 by definition; a dominant token can round to +1e-7.
        Ok(n.min(0.0) as f32)
    };
    let mut ids = Vec::with_capacity(tokens.len());
    let mut positions = Vec::with_capacity(tokens.len());
    let mut dropped = 0;
    for (i, t) in tokens.iter().enumerate() {
        let id = id_of(&t.token, map).map_err(|e| format!("answer token {i}: cannot vouch for its id: {e}"))?;
        let chosen = natural(i, t.logprob.ok_or(format!("answer token {i} has no log-probability"))?)?;
        let mut top: Vec<(u32, f32)> = Vec::with_capacity(t.top.len() + 1);
        for (text, lp) in &t.top {
            match id_of(text, map) {
                Ok(tid) if !top.iter().any(|p| p.0 == tid) => top.push((tid, natural(i, *lp)?)),
                Ok(_) => {}
                Err(_) => dropped += 1,
            }
        }
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        top.truncate(k);
        if let Some(best) = top.first().filter(|_| greedy) {
            // Greedy decoding emits the most likely token (allowing the server's rounding).
            if chosen < best.1 - 1e-3 * best.1.abs().max(1.0) {
                return Err(format!(
                    "answer token {i}: the server emitted a token of log-probability {chosen} while another had {}; \
                     it did not decode greedily",
                    best.1
                ));
            }
        }
        top.resize(k, (0, f32::NEG_INFINITY));
        ids.push(id);
        positions.push(Position { chosen_logprob: chosen, top });
    }
    Ok((ids, positions, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_chat_and_completions_logprobs() {
        let chat = json!({"content": [
            {"token": "token_id:5", "logprob": -0.1, "top_logprobs": [{"token": "token_id:5", "logprob": -0.1}, {"token": "token_id:9", "logprob": -2.5}]},
            {"token": "token_id:2", "logprob": -0.01, "top_logprobs": [{"token": "token_id:2", "logprob": -0.01}]},
        ]});
        let t = parse(&chat, true).unwrap();
        let (ids, pos, dropped) = to_soft_labels(&t, 3, LogprobBase::E, None, true).unwrap();
        assert_eq!((ids, dropped), (vec![5, 2], 0));
        assert_eq!(pos[0].top, vec![(5, -0.1), (9, -2.5), (0, f32::NEG_INFINITY)]);
        assert_eq!(pos[1].chosen_logprob, -0.01);
        // Completions: an unordered map per position, and base 10 (mistral.rs).
        let comp = json!({"tokens": ["token_id:7"], "token_logprobs": [-0.5], "top_logprobs": [{"token_id:8": -1.0, "token_id:7": -0.5}]});
        let t = parse(&comp, false).unwrap();
        let (_, pos, _) = to_soft_labels(&t, 2, LogprobBase::Ten, None, true).unwrap();
        let ln10 = std::f32::consts::LN_10;
        assert_eq!(pos[0].top, vec![(7, -0.5 * ln10), (8, -1.0 * ln10)]);
    }

    #[test]
    fn refuses_what_it_cannot_vouch_for() {
        let t = |token: &str, lp: Option<f64>, top: Vec<(&str, f64)>| ServerToken {
            token: token.into(),
            logprob: lp,
            top: top.into_iter().map(|(a, b)| (a.to_string(), b)).collect(),
        };
        // A text without a tokenizer.
        assert!(to_soft_labels(&[t("Paris", Some(-0.1), vec![])], 2, LogprobBase::E, None, true).unwrap_err().contains("no --teacher-tokenizer"));
        // No value.
        assert!(to_soft_labels(&[t("token_id:1", None, vec![])], 2, LogprobBase::E, None, true).unwrap_err().contains("no log-probability"));
        // Not greedy: another token was more likely than the one emitted.
        let e = to_soft_labels(&[t("token_id:1", Some(-2.0), vec![("token_id:3", -0.2), ("token_id:1", -2.0)])], 2, LogprobBase::E, None, true);
        assert!(e.unwrap_err().contains("did not decode greedily"));
        // An alternative given as text without a tokenizer is left out, not guessed.
        let (_, pos, dropped) =
            to_soft_labels(&[t("token_id:1", Some(-0.2), vec![("token_id:1", -0.2), ("Lyon", -3.0)])], 2, LogprobBase::E, None, true).unwrap();
        assert_eq!((dropped, pos[0].top.clone()), (1, vec![(1, -0.2), (0, f32::NEG_INFINITY)]));
    }
}

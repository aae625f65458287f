//! The generations browser's text search: what a user types, turned into an FTS5 query that
//! cannot be a syntax error. Every word becomes a quoted prefix phrase and all must match, so
//! `reason step` finds "Reasoning, step by step" and `<script>` searches for the word "script".

use super::Invalid;

/// Longest search text accepted (a search box, not a document).
pub const MAX_QUERY_BYTES: usize = 512;
const MAX_WORDS: usize = 16;

/// A validated search: an FTS5 MATCH expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSearch(String);

impl TextSearch {
    pub fn parse(q: &str) -> Result<Self, Invalid> {
        if q.len() > MAX_QUERY_BYTES {
            return Err(Invalid::new("q", format!("search text is longer than {MAX_QUERY_BYTES} bytes")));
        }
        // unicode61 splits on everything that is not a letter or digit; do the same, so the
        // phrases hold only what the index can contain.
        let words: Vec<&str> = q.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
        if words.is_empty() {
            return Err(Invalid::new("q", "search text has no letters or digits to search for"));
        }
        if words.len() > MAX_WORDS {
            return Err(Invalid::new("q", format!("search text has more than {MAX_WORDS} words")));
        }
        let expr = words.iter().map(|w| format!("\"{w}\"*")).collect::<Vec<_>>().join(" AND ");
        Ok(TextSearch(expr))
    }

    /// The FTS5 MATCH expression.
    pub fn fts_expr(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_become_prefix_phrases() {
        assert_eq!(TextSearch::parse("reason  step").unwrap().fts_expr(), "\"reason\"* AND \"step\"*");
        assert_eq!(TextSearch::parse("<script>alert(1)</script>").unwrap().fts_expr(),
            "\"script\"* AND \"alert\"* AND \"1\"* AND \"script\"*");
        assert_eq!(TextSearch::parse("café\"OR").unwrap().fts_expr(), "\"café\"* AND \"OR\"*");
    }

    #[test]
    fn empty_or_huge_searches_are_refused() {
        assert_eq!(TextSearch::parse(" <> ").unwrap_err().field, "q");
        assert!(TextSearch::parse(&"a ".repeat(17)).is_err());
        assert!(TextSearch::parse(&"a".repeat(513)).is_err());
    }
}

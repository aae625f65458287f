//! Our tokenizer, rebuilt from the GGUF metadata, against llama.cpp on the same file: the
//! reference ids in tests/fixtures/smollm2/ come from `scripts/make-reference-fixtures.py`.

use distill_tests::harness::{repo_root, smollm2_gguf};
use serde_json::Value;
use server::model::gguf::GgufMetadata;
use server::model::tokenizer::ModelTokenizer;

fn tokenizer() -> ModelTokenizer {
    ModelTokenizer::from_metadata(&GgufMetadata::read(&smollm2_gguf()).unwrap()).unwrap()
}

fn cases() -> Vec<Value> {
    let path = repo_root().join("tests/fixtures/smollm2/tokenizer-cases.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn token_ids_equal_llama_cpp_on_every_reference_string() {
    let tok = tokenizer();
    let cases = cases();
    assert!(cases.len() >= 300, "only {} cases", cases.len());
    let mut mismatches = Vec::new();
    for c in &cases {
        let text = c["text"].as_str().unwrap();
        let special = c["special"].as_bool().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text, special).unwrap();
        if got != want {
            mismatches.push(format!("{text:?} (special={special}):\n  llama.cpp {want:?}\n  ours      {got:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} strings tokenize differently; first ones:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn decoding_restores_the_text() {
    let tok = tokenizer();
    for c in cases() {
        let text = c["text"].as_str().unwrap();
        let ids = tok.encode(text, c["special"].as_bool().unwrap()).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn special_tokens_come_from_the_metadata() {
    let tok = tokenizer();
    let im_end = tok.encode("<|im_end|>", true).unwrap();
    assert_eq!(im_end.len(), 1);
    assert!(tok.special.stop.contains(&im_end[0]), "{:?}", tok.special);
    assert_eq!(tok.vocab_size, 49152);
    assert!(tok.encode("<|im_end|>", false).unwrap().len() > 1, "as plain text it is not one token");
}

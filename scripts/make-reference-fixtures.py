#!/usr/bin/env python3
"""Generate llama.cpp reference fixtures for SmolLM2-135M-Instruct (Q4_1 GGUF).

The fixtures let the Rust tests check our own tokenizer and model against an
independent implementation (llama.cpp, through llama-cpp-python) without needing
llama.cpp in CI. Outputs (all under tests/fixtures/smollm2/):

  tokenizer-cases.jsonl  one {"text", "special", "ids"} object per line;
                         ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
  greedy.jsonl           24 greedy (exact argmax) chat answers, up to 64 new tokens each
  README.md              versions, GGUF tokenizer metadata, special ids, chat template,
                         generation settings and the determinism check results

Regenerate (from the repository root; needs the model and the llama-cpp-python venv):

  scripts/fetch-model.sh
  PY="$(scripts/setup-llama-server.sh | tail -n1)"
  "$PY" -m pip install gguf        # optional: GGUF array sizes / token_type histogram
  "$PY" scripts/make-reference-fixtures.py

Options: --model PATH (default models/SmolLM2-135M-Instruct.Q4_1.gguf),
--out DIR (default tests/fixtures/smollm2), --skip-greedy (rewrite only
tokenizer-cases.jsonl; greedy.jsonl and README.md are left untouched).

The output is deterministic: no randomness, fixed case list, JSON written with
ensure_ascii=True and compact separators, greedy decoding by exact argmax over the
float32 logits with n_threads=1 and n_batch=n_ubatch=1 (every token decoded alone,
so results do not depend on batch split / KV-cache history).
"""

import argparse
import collections
import ctypes
import hashlib
import json
import os
import sys
import time

import numpy as np

import llama_cpp
from llama_cpp import llama_chat_format

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "smollm2")
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MAX_NEW_TOKENS = 64
N_CTX = 2048
GREEDY_PER_SET = 12


def dumps(obj):
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_prompts(name):
    rows = []
    with open(os.path.join(REPO, "prompts", name), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


# --------------------------------------------------------------------------------------
# Tokenizer cases
# --------------------------------------------------------------------------------------

CHAT_SYS_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def tokenizer_texts():
    """Return a list of (text, special) pairs, fixed order, duplicates removed later."""
    plain = []  # texts tokenized with special=False
    both = []  # texts tokenized with special=False and special=True

    # --- trivial -----------------------------------------------------------------------
    plain += ["", " ", "  ", "a", "A", "I", "hello", "Hello", "HELLO", " hello", "hello ",
              "Hello, world!", "Hello world", "The quick brown fox jumps over the lazy dog.",
              "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG"]

    # --- digits and numbers ------------------------------------------------------------
    plain += ["0", "1", "7", "12", "123", "1234", "12345", "123456", "1234567", "12345678",
              "123456789", "1234567890", "12345678901234567890", "00", "007", "0000000",
              "3.14159", "3.14159265358979323846", "-42", "+42", "-0.5", ".5", "5.",
              "1e10", "1E-10", "6.022e23", "1,000,000", "1.000.000,00", "1 000 000",
              "0x1F", "0xDEADBEEF", "0b1011", "1_000_000", "50%", "99.9%", "$100", "$1,234.56",
              "€20", "£7.50", "¥1000", "12kg", "5km/h", "3rd", "21st", "2nd place", "100th",
              "v1.2.3", "1/2", "3/4 cup", "½", "²", "x²", "10⁻³", "①②③", "٣٤٥", "४२", "１２３",
              "+1 (555) 123-4567", "555-0199", "+44 20 7946 0958", "+49 30 123456",
              "2024-01-15", "15/01/2024", "01.15.2024", "2024-01-15T13:45:30Z",
              "13:45", "1:05:33 PM", "January 15, 2024", "In 1999 there were 42 cats.",
              "Call me at 555 1234.", "Room 101", "pi is 3.14", "version 10.0.19045",
              "IPv4 192.168.0.1", "port 8080", " 1", " 12", " 123", "  42", "a1", "a12b34",
              "abc123def", "x1y2z3",
              # whitespace before digits: the only place where the digit split (HF
              # Digits(individual_digits) / llama.cpp \\p{N}) changes ids for this vocab
              "  1", "   123", "a  12", "x\n 5", "\t7", " \t9", "1  2", "Total:   100",
              "  \u00bd cup", "  \u2460", "  \u216b", "  \u0663\u0664", "  \uff14\uff12", " \u00b2"]

    # --- arithmetic --------------------------------------------------------------------
    plain += ["2+2", "2 + 2 = 4", "2+2=4", "12*34=408", "7 × 8 = 56", "10 ÷ 2 = 5",
              "(3 + 4) * 5 - 6 / 2", "a^2 + b^2 = c^2", "x = -b ± √(b² - 4ac) / 2a",
              "1+1=2, 2+2=4, 3+3=6", "100 - 37 = 63", "5! = 120", "2**10 == 1024",
              "3 < 5 and 5 > 3", "x <= y >= z != w", "12 muffins * 7 trays = 84 muffins",
              "84 - 59 = 25", "The answer is 25.", "#### 42", "= 1/3 ≈ 0.333"]

    # --- code --------------------------------------------------------------------------
    plain += [
        "def add(a, b):\n    return a + b\n",
        "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
        "class Foo:\n    def __init__(self, x):\n        self.x = x\n\n    def __repr__(self):\n        return f\"Foo({self.x!r})\"\n",
        "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\nprint(x.shape)",
        "for i in range(10):\n\tprint(i)\n",
        "if __name__ == \"__main__\":\n    main()",
        "# comment\n# another comment\n",
        "lambda x: x ** 2",
        "[x for x in range(100) if x % 3 == 0]",
        "fn main() {\n    println!(\"Hello, world!\");\n}\n",
        "pub fn add(a: i32, b: i32) -> i32 {\n    a + b\n}",
        "let v: Vec<u8> = vec![1, 2, 3];",
        "impl<'a> Iterator for Foo<'a> {\n    type Item = &'a str;\n}",
        "#[derive(Debug, Clone, PartialEq)]\nstruct Point { x: f64, y: f64 }",
        "match x {\n    Some(v) => v,\n    None => return Err(\"none\".into()),\n}",
        "use std::collections::HashMap;",
        "let s = String::from(\"héllo\");",
        "{\"name\": \"Alice\", \"age\": 30, \"tags\": [\"a\", \"b\"], \"ok\": true, \"x\": null}",
        "{\n  \"id\": \"math-001\",\n  \"prompt\": \"2+2?\",\n  \"metadata\": {\"answer\": \"4\"}\n}",
        "[1,2,3,{\"a\":{\"b\":[]}}]",
        "<!DOCTYPE html>\n<html>\n  <head><title>Test</title></head>\n  <body>\n    <p class=\"x\">Hi &amp; bye</p>\n  </body>\n</html>",
        "<div id=\"main\"><span>text</span></div>",
        "<br/>", "&lt;&gt;&amp;&quot;",
        "SELECT id, name FROM users WHERE age > 21 ORDER BY name LIMIT 10;",
        "INSERT INTO t (a, b) VALUES (1, 'x');",
        "CREATE TABLE jobs (\n    id INTEGER PRIMARY KEY,\n    state TEXT NOT NULL\n);",
        "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do\n  echo \"$f\"\ndone",
        "ls -la | grep '^d' | wc -l",
        "curl -sS -X POST http://127.0.0.1:8080/v1/chat -d '{\"a\":1}'",
        "export PATH=\"$HOME/.cargo/bin:$PATH\"",
        "cd /tmp && make -j4 2>&1 | tee build.log",
        "const f = (x) => { return x * 2; };",
        "console.log(`value: ${x}`);",
        "int main(void) {\n\treturn 0;\n}",
        "#include <stdio.h>",
        "x += 1; y -= 2; z *= 3; w /= 4;",
        "a && b || !c",
        "foo->bar::baz",
        "$ cargo test --release -- --nocapture",
        "key: value\nlist:\n  - one\n  - two\n",
        "[section]\nname = \"x\"\nversion = \"0.1.0\"",
        "    indented four",
        "        indented eight",
        "\tone tab", "\t\ttwo tabs", "\t\t\tthree tabs",
        "snake_case_name", "camelCaseName", "PascalCaseName", "SCREAMING_SNAKE_CASE",
        "kebab-case-name", "__dunder__", "self.x_y.z", "a.b.c.d", "path/to/file.rs",
        "C:\\Users\\name\\file.txt", "regex: ^[a-z0-9_]+$",
    ]

    # --- whitespace --------------------------------------------------------------------
    for n in range(1, 18):
        plain.append(" " * n)
        plain.append("a" + " " * n + "b")
    for n in (1, 2, 3, 4, 5, 8, 16):
        plain.append(" " * n + "x")
        plain.append("x" + " " * n)
        plain.append(" " * n + "hello world" + " " * n)
    plain += ["\t", "\t\t", "\t\t\t\t", "a\tb", "a\t\tb", "\tx", "x\t", " \t ", "\t \t",
              "\n", "\n\n", "\n\n\n", "\n" * 8, "\n" * 20, "\r\n", "\r\n\r\n", "\r", "\r\r",
              "a\nb", "a\n\nb", "a\n\n\nb", "a\r\nb", "a\rb", "line1\nline2\nline3",
              "para one.\n\npara two.", " \n", "\n ", " \n ", "  \n  ", "\n  x", "x  \n",
              "x \n y", "\t\n", "\n\t", " \t\n\r\n ", "a \t\n b", "end.\n", "end. \n",
              "hello\n\n\n\nworld", "word   word", "   leading", "trailing   ",
              "\u00a0", "a\u00a0b", "\u3000", "a\u2003b", "\u2028", "a\u2029b", "\x0b", "\x0c",
              "a\x0bb", "\u0085", "a\u0085b", " \u00a0 ", "\u200b", "a\u200bb",
              "\u200c\u200d", "\ufeffBOM", "a\u2060b", "\u00ad", "soft\u00adhyphen"]

    # --- punctuation -------------------------------------------------------------------
    plain += ["!", "?", ".", ",", "...", "!!!", "???", "?!", "!?!?", "....", ". . .", "…",
              "--", "---", "—", "–", "-", "==", "===", "=====", "***", "___", "~~~", "```",
              "```python\nprint(1)\n```", "(((", ")))", "[[[", "]]]", "{{{", "}}}", "<<<",
              ">>>", "@@", "##", "$$", "%%", "^^", "&&", "||", "\\\\", "//", "/*", "*/",
              "'", "''", "'''", "\"", "\"\"", "\"\"\"", "`", "``", "“quoted”", "‘single’",
              "«guillemets»", "„German“", "「Japanese」", "『double』", "¿Qué?", "¡Hola!",
              "Wait... what?!", "Hello!!!", "Yes.No.Maybe.", "a,b,c", "a, b, c", "a;b;c",
              "a:b", "(a)", "[a]", "{a}", "<a>", "a-b", "a_b", "a.b", "a/b", "a\\b", "a|b",
              "!@#$%^&*()_+-=[]{}|;':\",./<>?`~", " !", " ?", " ...", "hi!", "hi !",
              "•", "→", "⇒", "✓", "✗", "©", "®", "™", "°C", "±", "§", "¶", "†"]

    # --- contractions --------------------------------------------------------------------
    plain += ["it's", "don't", "we're", "I've", "I'm", "you'll", "he'd", "'s", "'t", "'re",
              "'ve", "'m", "'ll", "'d", "IT'S", "DON'T", "WE'RE", "I'VE", "I'M", "YOU'LL",
              "HE'D", "'S", "'T", "'RE", "'VE", "'M", "'LL", "'D", "It'S", "We'Re", "You'Ll",
              "don't you'll we've they're I'd she's", "It's John's book, isn't it?",
              "rock 'n' roll", "'twas", "'tis", "o'clock", "y'all", "ma'am", "can't won't shan't",
              "the '90s", "'hello'", "'s'", "don’t", "it’s", "I’m", "x's", "1's", "'1",
              " 's", " 'll", "''s", "'''s", "John'S", "isn't", "ISN'T", "there'd've"]

    # --- scripts ----------------------------------------------------------------------
    plain += [
        "Привет, мир!", "Москва — столица России.", "ПРИВЕТ", "ёжик", "Съешь же ещё этих мягких французских булок.",
        "Γειά σου Κόσμε", "Αθήνα", "αβγδεζηθ", "ΑΒΓΔ", "λόγος",
        "مرحبا بالعالم", "السلام عليكم", "العربية", "١٢٣",
        "שלום עולם", "עברית", "ירושלים",
        "नमस्ते दुनिया", "हिन्दी", "भारत एक देश है।", "क्षत्रिय",
        "你好，世界！", "中文", "我爱你", "北京是中国的首都。", "人工智能", "汉字漢字",
        "こんにちは世界", "ひらがな", "カタカナ", "日本語のテキストです。", "東京タワー", "ｶﾀｶﾅ",
        "안녕하세요 세계", "한국어", "서울특별시", "ㄱㄴㄷ",
        "ภาษาไทย", "Tiếng Việt có dấu", "ქართული", "Հայերեն", "தமிழ்", "বাংলা",
        "English 中文 Русский العربية mixed", "abcабв", "Hello世界", "test测试test",
    ]

    # --- emoji ------------------------------------------------------------------------
    plain += ["😀", "😀😀😀", "👍", "👍🏽", "👍🏿", "❤️", "❤", "🔥🔥", "🎉 party", "I ❤️ NY",
              "👨‍👩‍👧‍👦", "👩‍💻", "🏳️‍🌈", "🧑🏾‍🚀", "🇺🇸", "🇯🇵🇫🇷", "🇬🇧 UK", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
              "1️⃣", "#️⃣", "©️", "☀️🌧️", "hello 👋 world", "😂🤣😅", "🤖", "🦀 Rust", "🐍",
              "emoji at end 🚀", "🚀 emoji at start"]

    # --- accented latin / combining ----------------------------------------------------
    plain += ["café", "naïve", "résumé", "Ångström", "façade", "jalapeño", "Zürich",
              "Crème brûlée", "ÀÉÎÕÜ", "ñ", "ß", "straße", "STRASSE", "æøå", "Æsir",
              "œuvre", "Łódź", "Kraków", "Dvořák", "İstanbul", "ı", "ŝ", "ǅ", "ﬁ", "ﬂour",
              "cafe\u0301", "e\u0301", "a\u0300\u0301\u0302", "n\u0303", "\u0301",
              "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dalgo",
              "o\u0308", "A\u030a", "\u1e9b\u0323"]

    # --- URLs, emails, markdown, latex ---------------------------------------------------
    plain += ["https://example.com", "https://www.example.com/path/to/page?query=1&b=two#frag",
              "http://127.0.0.1:8080/v1/models", "ftp://files.example.org/pub/file.tar.gz",
              "www.github.com/huggingface/smollm", "Visit https://huggingface.co/HuggingFaceTB today!",
              "user@example.com", "first.last+tag@sub.example.co.uk", "Email me: a.b@c.de.",
              "# Heading", "## Subheading\n\nText", "**bold** and *italic* and `code`",
              "- item one\n- item two\n  - nested", "1. first\n2. second\n3. third",
              "[link](https://example.com)", "![alt](img.png)", "> quote\n> more",
              "| a | b |\n|---|---|\n| 1 | 2 |", "---\ntitle: x\n---", "~~strike~~",
              "\\boxed{42}", "The answer is \\boxed{25}.", "\\frac{a}{b}", "\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}",
              "$x^2$", "$$\\int_0^1 x\\,dx = \\frac{1}{2}$$", "\\sqrt{2}", "\\alpha + \\beta = \\gamma",
              "\\begin{align} a &= b \\\\ c &= d \\end{align}", "\\left( \\sum_{i=1}^{n} i \\right)",
              "\\(x\\)", "\\[ y = mx + b \\]", "\\text{km/h}"]

    # --- long words / repetition ---------------------------------------------------------
    plain += ["pneumonoultramicroscopicsilicovolcanoconiosis", "Supercalifragilisticexpialidocious",
              "Donaudampfschifffahrtsgesellschaftskapitänswitwe", "antidisestablishmentarianism",
              "Llanfairpwllgwyngyllgogerychwyrndrobwllllantysiliogogogoch",
              "a" * 10, "a" * 64, "a" * 257, "ab" * 50, "abc" * 33, "A" * 40, "z" * 31,
              "!" * 20, "." * 50, "=" * 80, "-" * 40, "#" * 10, "*" * 16, "_" * 30,
              "0" * 30, "9" * 17, "1234567890" * 5, "é" * 20, "中" * 15, "😀" * 8,
              "ha" * 20, "hahahaha", "loooooooooooooooool", "Noooooooooo!!!!",
              "the the the the the", "buffalo " * 8, "xXxXxXxX", "aAaAaAaA",
              "tokenization tokenizer tokenized tokenize", "unbelievably", "internationalization",
              "mississippi", "bookkeeper", "aaaaaaaaaabbbbbbbbbb"]

    # --- prose ------------------------------------------------------------------------
    plain += ["Once upon a time, in a land far, far away, there lived a king.",
              "It was the best of times, it was the worst of times.",
              "To be, or not to be: that is the question.",
              "Please answer the following question step by step.",
              "You are a helpful assistant.", "What is the capital of France?",
              "The mitochondria is the powerhouse of the cell.",
              "e.g. i.e. etc. vs. Mr. Mrs. Dr. St.", "U.S.A. U.K. E.U.", "NASA's JWST",
              "COVID-19", "GPT-4o", "SmolLM2-135M-Instruct", "Q4_1", "llama.cpp", "HuggingFace",
              "Knowledge distillation transfers knowledge from a teacher model to a student model."]

    # --- special tokens ------------------------------------------------------------------
    both += ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|><|im_end|>",
             "<|im_start|>user", "<|im_start|>assistant\n", "text<|im_end|>", "<|im_end|>\n",
             " <|im_start|>", "<|im_start|> ", "a<|endoftext|>b", "<|endoftext|><|endoftext|>",
             "<|im_start|>user\nhi<|im_end|>", "<|im_start", "im_start|>", "<|im_start|",
             "<|IM_START|>", "< |im_start| >", "<|im_end |>", "<|im_end|><|im_end|>\n\n",
             "<repo_name>", "<file_sep>", "<filename>main.rs", "<gh_stars>100",
             "<jupyter_code>print(1)<jupyter_output>1", "<empty_output>", "<reponame>x",
             "<issue_start>bug<issue_comment>fix<issue_closed>", "<jupyter_start><jupyter_text>",
             "<jupyter_script>", "<|unknown|>", "<s>", "</s>", "<unk>", "<pad>",
             "\n<|im_start|>\n", "<|im_start|><|im_start|><|im_start|>"]

    # --- rendered chat prompts -------------------------------------------------------------
    def chat(msgs, gen=True):
        s = "".join("<|im_start|>%s\n%s<|im_end|>\n" % (r, c) for r, c in msgs)
        return s + ("<|im_start|>assistant\n" if gen else "")

    chats = [
        chat([("system", "You are a helpful assistant."), ("user", "What is 2+2?")]),
        chat([("system", CHAT_SYS_DEFAULT), ("user", "What is the capital of France?")]),
        chat([("system", CHAT_SYS_DEFAULT), ("user", "Hello!")]),
        chat([("system", "You are terse."), ("user", "Name three colors.")]),
        chat([("system", CHAT_SYS_DEFAULT), ("user", "Hi"), ("assistant", "Hello! How can I help you today?"),
              ("user", "Tell me a joke.")]),
        chat([("user", "No system prompt here.")]),
        chat([("system", "You are a helpful assistant."), ("user", "Write Python:\n\ndef f(x):\n    return x")]),
        chat([("system", CHAT_SYS_DEFAULT),
              ("user", "Please reason step by step, and put your final answer within \\boxed{}: What is 12*7?")]),
        chat([("system", CHAT_SYS_DEFAULT), ("user", "Translate to French: I'm happy."),
              ("assistant", "Je suis content.")], gen=False),
        chat([("system", CHAT_SYS_DEFAULT), ("user", "¿Cómo estás? 你好 😀")]),
        chat([("system", CHAT_SYS_DEFAULT), ("user", "  spaces  \n\n  and newlines  ")]),
        chat([("system", CHAT_SYS_DEFAULT), ("user", "")]),
        chat([("system", CHAT_SYS_DEFAULT), ("user", "What is 2+2?")]) + "4<|im_end|>\n",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2=4<|im_end|><|endoftext|>",
    ]

    out = [(t, False) for t in plain]
    for t in both:
        out.append((t, False))
        out.append((t, True))
    for t in chats:
        out.append((t, True))
        out.append((t, False))
    return out


def tokenizer_cases(vocab_llm):
    pairs = tokenizer_texts()
    # prompts from prompts/*.jsonl, special=False
    for name in ("math-word-problems.jsonl", "general-knowledge.jsonl"):
        for row in read_prompts(name):
            pairs.append((row["prompt"], False))
    seen = set()
    cases = []
    for text, special in pairs:
        if (text, special) in seen:
            continue
        seen.add((text, special))
        ids = vocab_llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        cases.append({"text": text, "special": special, "ids": [int(i) for i in ids]})
    return cases


# --------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------

def gguf_tokenizer_summary(model_path):
    """Return a dict with GGUF tokenizer info via the gguf package, or None if missing."""
    try:
        import gguf  # noqa: F401
        from gguf import GGUFReader
    except ImportError:
        return None
    r = GGUFReader(model_path)
    info = {"keys": {}}
    for name, field in r.fields.items():
        if not name.startswith("tokenizer."):
            continue
        types = [t.name for t in field.types]
        if types[0] == "ARRAY":
            info["keys"][name] = "array<%s>[%d]" % (types[1].lower(), len(field.data))
        elif types[0] == "STRING":
            v = bytes(field.parts[field.data[0]]).decode("utf-8")
            info["keys"][name] = ("string", v)
        else:
            info["keys"][name] = (types[0].lower(), field.parts[field.data[0]].tolist()[0])
    tt = r.fields["tokenizer.ggml.token_type"]
    types = [int(tt.parts[i][0]) for i in tt.data]
    toks = r.fields["tokenizer.ggml.tokens"]
    texts = [bytes(toks.parts[i]).decode("utf-8") for i in toks.data]
    info["token_type_hist"] = dict(sorted(collections.Counter(types).items()))
    info["non_normal"] = [(i, texts[i], types[i]) for i in range(len(types)) if types[i] != 1]
    merges = r.fields["tokenizer.ggml.merges"]
    info["first_merges"] = [bytes(merges.parts[i]).decode("utf-8") for i in merges.data[:5]]
    info["n_tokens"] = len(texts)
    info["n_merges"] = len(merges.data)
    tensor_types = collections.Counter(t.tensor_type.name for t in r.tensors)
    info["tensor_types"] = dict(sorted(tensor_types.items()))
    info["n_tensors"] = len(r.tensors)
    info["has_output_weight"] = any(t.name == "output.weight" for t in r.tensors)
    emb = [t for t in r.tensors if t.name == "token_embd.weight"]
    info["token_embd_type"] = emb[0].tensor_type.name if emb else None
    return info


# --------------------------------------------------------------------------------------
# Greedy decoding
# --------------------------------------------------------------------------------------

def load_full(model_path, n_batch):
    return llama_cpp.Llama(
        model_path,
        n_ctx=N_CTX,
        n_threads=1,
        n_threads_batch=1,
        n_batch=n_batch,
        n_ubatch=n_batch,
        logits_all=False,
        seed=0,
        verbose=False,
    )


def last_logits(llm):
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32, copy=True)


def greedy(llm, prompt_ids, stop_ids):
    llm.reset()
    llm.eval(prompt_ids)
    answer, margins = [], []
    finish = "length"
    for _ in range(MAX_NEW_TOKENS):
        logits = last_logits(llm)
        nxt = int(np.argmax(logits))
        top2 = np.partition(logits, -2)[-2:]
        margins.append(round(float(top2[1]) - float(top2[0]), 4))
        answer.append(nxt)
        if nxt in stop_ids:
            finish = "stop"
            break
        llm.eval([nxt])
    return answer, margins, finish


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--skip-greedy", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    sha = sha256_file(args.model)
    if sha != EXPECTED_SHA256:
        print("WARNING: model sha256 %s != expected %s" % (sha, EXPECTED_SHA256), file=sys.stderr)

    # ---- vocab-only model: tokenizer cases + metadata ----
    vllm = llama_cpp.Llama(args.model, vocab_only=True, verbose=False)
    md = dict(vllm.metadata)
    vocab = vllm._model.vocab
    cases = tokenizer_cases(vllm)
    with open(os.path.join(args.out, "tokenizer-cases.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for c in cases:
            f.write(dumps(c) + "\n")
    # sanity: plain-text cases must round-trip through llama.cpp's detokenizer
    bad_rt = []
    for c in cases:
        if not c["special"]:
            back = detok(vllm, c["ids"], True).decode("utf-8", errors="replace")
            if back != c["text"]:
                bad_rt.append(c["text"])
    print("tokenizer cases: %d (%d special=True), round-trip mismatches: %d %r"
          % (len(cases), sum(c["special"] for c in cases), len(bad_rt), bad_rt[:5]))

    add_bos_md = md.get("tokenizer.ggml.add_bos_token", "").lower() == "true"
    add_bos_vocab = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    n_vocab = vllm.n_vocab()

    def tok_text(i):
        return vocab_text(vllm, i)

    _TOKTEXT.update({i: tok_text(i) for i in range(n_vocab)})

    special = {
        "bos": llama_cpp.llama_vocab_bos(vocab),
        "eos": llama_cpp.llama_vocab_eos(vocab),
        "eot": llama_cpp.llama_vocab_eot(vocab),
        "pad": llama_cpp.llama_vocab_pad(vocab),
        "nl": llama_cpp.llama_vocab_nl(vocab),
        "sep": llama_cpp.llama_vocab_sep(vocab),
    }
    im_start = vllm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    im_end = vllm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    eot_text = vllm.tokenize(b"<|endoftext|>", add_bos=False, special=True)
    assert len(im_start) == 1 and len(im_end) == 1 and len(eot_text) == 1
    eog_ids = [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    stop_ids = set(eog_ids) | {special["eos"], im_end[0]}

    template = md["tokenizer.chat_template"]
    eos_tok = tok_text(special["eos"]) if special["eos"] != -1 else ""
    bos_tok = tok_text(special["bos"]) if special["bos"] != -1 else ""
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=eos_tok, bos_token=bos_tok, add_generation_prompt=True,
        stop_token_ids=[special["eos"]],
    )

    def render(prompt):
        return formatter(messages=[{"role": "user", "content": prompt}]).prompt

    gg = gguf_tokenizer_summary(args.model)
    del vllm

    greedy_rows, det = [], []
    if not args.skip_greedy:
        prompts = (read_prompts("math-word-problems.jsonl")[:GREEDY_PER_SET]
                   + read_prompts("general-knowledge.jsonl")[:GREEDY_PER_SET])
        llm = load_full(args.model, 1)
        for row in prompts:
            rendered = render(row["prompt"])
            pids = llm.tokenize(rendered.encode("utf-8"), add_bos=add_bos_md, special=True)
            ans, margins, finish = greedy(llm, pids, stop_ids)
            body = ans[:-1] if finish == "stop" else ans
            text = detok(llm, body, False).decode("utf-8", errors="replace")
            greedy_rows.append({
                "id": row["id"], "prompt": row["prompt"], "rendered": rendered,
                "prompt_ids": [int(i) for i in pids], "answer_ids": ans, "answer_text": text,
                "finish": finish, "top2_margin": margins,
            })
            print("%s: %d prompt + %d new (%s) min margin %.4f %.1fs"
                  % (row["id"], len(pids), len(ans), finish, min(margins), time.time() - t0))
        with open(os.path.join(args.out, "greedy.jsonl"), "w", encoding="utf-8", newline="\n") as f:
            for g in greedy_rows:
                f.write(dumps(g) + "\n")

        # ---- determinism checks: 2 prompts re-decoded, same instance, and n_batch=512 ----
        check = [greedy_rows[0], greedy_rows[GREEDY_PER_SET]]
        for g in check:
            ans, m, fin = greedy(llm, g["prompt_ids"], stop_ids)
            det.append(compare("n_batch=1 repeat (same instance, after other prompts)", g, ans, m))
        del llm
        llm1 = load_full(args.model, 1)
        for g in reversed(check):
            ans, m, fin = greedy(llm1, g["prompt_ids"], stop_ids)
            det.append(compare("n_batch=1 fresh instance (reverse order)", g, ans, m))
        del llm1
        llm512 = load_full(args.model, 512)
        for g in check:
            ans, m, fin = greedy(llm512, g["prompt_ids"], stop_ids)
            det.append(compare("n_batch=n_ubatch=512 fresh instance", g, ans, m))
        # same instance, second run (prefix evaluated as one batch again after reset)
        for g in check:
            ans, m, fin = greedy(llm512, g["prompt_ids"], stop_ids)
            det.append(compare("n_batch=n_ubatch=512 repeat", g, ans, m))
        del llm512
        for d in det:
            print("determinism: %-55s %s" % (d["run"], describe(d)))

        write_readme(args, sha, md, gg, special, im_start[0], im_end[0], eot_text[0], eog_ids,
                     stop_ids, add_bos_md, add_bos_vocab, template, cases, greedy_rows, det,
                     render)
    print("done in %.1fs" % (time.time() - t0))


def detok(llm, ids, special):
    """Concatenate llama_token_to_piece(id, lstrip=0, special) with a large buffer.

    (llama-cpp-python's Llama.detokenize uses a 32-byte buffer and silently mangles longer
    pieces, e.g. the 64-byte token made of '=' characters.)"""
    vocab = llm._model.vocab
    buf = ctypes.create_string_buffer(1024)
    out = b""
    for t in ids:
        n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(t), buf, len(buf), 0, special)
        assert 0 <= n <= len(buf), (t, n)
        out += buf.raw[:n]
    return out


def vocab_text(vllm, i):
    return vllm._model.token_get_text(i)


def compare(run, ref, ans, margins):
    """Compare a re-decoded answer with the fixture row."""
    a, b = ref["answer_ids"], ans
    first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    common = len(a) if first is None else first
    # margin differences over the common prefix (same context => comparable)
    diff = max((abs(x - y) for x, y in zip(ref["top2_margin"][:common], margins[:common])), default=0.0)
    return {"run": run, "id": ref["id"], "identical": a == b and ref["top2_margin"] == margins,
            "same_ids": a == b, "first_diff": first, "n": len(a),
            "ref_margin_at_diff": ref["top2_margin"][first] if first is not None and first < len(a) else None,
            "max_margin_diff_prefix": round(diff, 4)}


def max_det_drift(det):
    return "%.2f" % max([d["max_margin_diff_prefix"] for d in det] + [0.0])


def describe(d):
    if d["identical"]:
        return "%s: identical ids and margins (%d tokens)" % (d["id"], d["n"])
    if d["same_ids"]:
        return "%s: identical ids, margins differ by up to %.4f" % (d["id"], d["max_margin_diff_prefix"])
    return ("%s: ids DIFFER from answer position %d (fixture margin there %s); margins over the "
            "common prefix differ by up to %.4f"
            % (d["id"], d["first_diff"], d["ref_margin_at_diff"], d["max_margin_diff_prefix"]))


def write_readme(args, sha, md, gg, special, im_start, im_end, eot_text, eog_ids, stop_ids,
                 add_bos_md, add_bos_vocab, template, cases, greedy_rows, det, render):
    L = []
    w = L.append
    w("# SmolLM2-135M-Instruct reference fixtures (llama.cpp)")
    w("")
    w("Generated by `scripts/make-reference-fixtures.py` with llama.cpp through "
      "llama-cpp-python, as an independent implementation to test our own tokenizer and "
      "model against. Do not edit by hand. Regenerate from the repository root:")
    w("")
    w("```")
    w("scripts/fetch-model.sh")
    w('PY="$(scripts/setup-llama-server.sh | tail -n1)"')
    w('"$PY" -m pip install gguf        # optional, for the GGUF array sizes below')
    w('"$PY" scripts/make-reference-fixtures.py')
    w("```")
    w("")
    w("## Versions")
    w("")
    w("- llama-cpp-python %s (built from sdist, CPU, AVX2, GGML_NATIVE=OFF; see "
      "docs/notes/llama-cpp-server.md), numpy %s, Python %s" % (llama_cpp.__version__, np.__version__,
                                                                  sys.version.split()[0]))
    try:
        import gguf  # noqa: F401
        from importlib.metadata import version
        w("- gguf (python) %s, used only to read the metadata below" % version("gguf"))
    except Exception:
        pass
    w("- model: `models/SmolLM2-135M-Instruct.Q4_1.gguf`, %d bytes, sha256 `%s`"
      % (os.path.getsize(args.model), sha))
    w("")
    w("## Files")
    w("")
    w("- `tokenizer-cases.jsonl`: %d lines `{\"text\", \"special\", \"ids\"}`; "
      "`ids = llm.tokenize(text.encode(\"utf-8\"), add_bos=False, special=special)` with "
      "`Llama(model, vocab_only=True)`. `special=true` (%d cases) means control tokens such as "
      "`<|im_start|>` written in the text are parsed as single tokens; with `special=false` they "
      "are tokenized as plain text. Strings containing special tokens appear with both settings. "
      "Includes the 64 prompts of `prompts/*.jsonl` (special=false). JSON is ASCII-escaped."
      % (len(cases), sum(c["special"] for c in cases)))
    w("- `greedy.jsonl`: %d lines `{\"id\", \"prompt\", \"rendered\", \"prompt_ids\", "
      "\"answer_ids\", \"answer_text\", \"finish\", \"top2_margin\"}` for the first %d prompts of "
      "`prompts/math-word-problems.jsonl` and of `prompts/general-knowledge.jsonl`."
      % (len(greedy_rows), GREEDY_PER_SET))
    w("")
    w("## Greedy decoding settings")
    w("")
    w("- `rendered`: the GGUF's `tokenizer.chat_template` rendered by llama-cpp-python's own "
      "`Jinja2ChatFormatter` (jinja2 ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks) "
      "with `messages=[{\"role\": \"user\", \"content\": prompt}]`, `add_generation_prompt=True`, "
      "`bos_token=%r`, `eos_token=%r`. The template inserts its default system prompt because "
      "there is no system message." % (tok_text_safe(special["bos"], im_start), tok_text_safe(special["eos"], im_end)))
    w("- `prompt_ids = llm.tokenize(rendered, add_bos=%s, special=True)`. add_bos is taken from "
      "GGUF `tokenizer.ggml.add_bos_token` = `%s` (llama.cpp's vocab also reports add_bos=%s), so "
      "**no BOS is prepended**; the prompt starts with `<|im_start|>` (id %d) from the template "
      "text itself." % (add_bos_md, md.get("tokenizer.ggml.add_bos_token"), add_bos_vocab, im_start))
    w("- Model: `Llama(model, n_ctx=%d, n_threads=1, n_threads_batch=1, n_batch=1, n_ubatch=1, "
      "logits_all=False)`; `llm.reset(); llm.eval(prompt_ids)` (one token per decode call), then "
      "repeatedly `next = argmax(logits of the last position)` (float32 logits from "
      "`llama_get_logits_ith(ctx, -1)`, exact `np.argmax`, ties -> lowest id), append, stop if "
      "`next` is an end-of-generation id, else `llm.eval([next])`; at most %d new tokens."
      % (N_CTX, MAX_NEW_TOKENS))
    w("- Stop ids: %s = llama.cpp's EOG set (`llama_vocab_is_eog`) plus eos. `finish` is `stop` "
      "when the last answer id is one of them (it is included in `answer_ids`, not in "
      "`answer_text`), `length` after %d tokens."
      % (", ".join("%d `%s`" % (i, tok_text_safe(i, None)) for i in sorted(stop_ids)), MAX_NEW_TOKENS))
    w("- `answer_text`: concatenated `llama_token_to_piece(id, lstrip=0, special=false)` of answer_ids minus the stop id, decoded "
      "as UTF-8 (errors='replace'; matters only if a `length` answer ends inside a multi-byte char).")
    w("- `top2_margin[i]`: logit(argmax) - second-highest logit at answer position i, rounded to 4 "
      "decimals. Small margins mark near-ties where another implementation with slightly "
      "different float rounding may legitimately pick the other token (and diverge after it).")
    n_stop = sum(g["finish"] == "stop" for g in greedy_rows)
    margins = [m for g in greedy_rows for m in g["top2_margin"]]
    if margins:
        w("- Summary: %d stop, %d length; %d answer tokens; min margin %.4f; positions with margin "
          "< 0.05: %d, < 0.01: %d." % (n_stop, len(greedy_rows) - n_stop, len(margins),
                                       min(margins), sum(m < 0.05 for m in margins),
                                       sum(m < 0.01 for m in margins)))
    w("")
    w("### How to compare another implementation")
    w("")
    w("Even llama.cpp itself moves these margins by up to %s logits when only the batch size "
      "changes (see below), and a different implementation (other kernels, no Q8 activation "
      "quantization, ...) can move them more. So compare `answer_ids[:k]` where k is the first "
      "position whose `top2_margin` is below a tolerance T (then the contexts may legitimately "
      "diverge). Answer tokens covered before the first margin < T, over all %d rows:"
      % (max_det_drift(det), len(greedy_rows)))
    w("")
    w("| T | tokens covered | rows with k = 0 | rows fully covered |")
    w("|---|---|---|---|")
    for T in (0.05, 0.1, 0.25, 0.5, 1.0):
        ks = [next((i for i, m in enumerate(g["top2_margin"]) if m < T), len(g["top2_margin"]))
              for g in greedy_rows]
        w("| %s | %d | %d | %d |" % (T, sum(ks), sum(k == 0 for k in ks),
                                     sum(k == len(g["top2_margin"]) for k, g in zip(ks, greedy_rows))))
    w("")
    w("Numerics of this llama.cpp CPU build: Q4_1 weights are multiplied against activations "
      "quantized to Q8_1 (`vec_dot_type` of Q4_1), the tied output projection uses "
      "`token_embd.weight` (Q8_0) against Q8_0 activations; KV cache f16; everything else f32.")
    w("")
    w("### Determinism check")
    w("")
    w("The first math and the first general-knowledge prompt were decoded again:")
    w("")
    for d in det:
        w("- %s: %s" % (d["run"], describe(d)))
    w("")
    w("With n_batch=1 every token is decoded alone, so results do not depend on how the prompt "
      "is split or on KV-cache history. Larger batches use different matmul kernels/accumulation "
      "order in ggml, so logits (margins) change slightly; ids can change at near-ties.")
    w("")
    w("## Special tokens")
    w("")
    w("| role | id | text |")
    w("|---|---|---|")
    for k in ("bos", "eos", "eot", "pad", "nl", "sep"):
        v = special[k]
        w("| %s (llama_vocab_%s) | %d | %s |" % (k, k, v, "`%s`" % esc(tok_text_safe(v, None)) if v >= 0 else "none"))
    w("| `<\\|im_start\\|>` | %d | |" % im_start)
    w("| `<\\|im_end\\|>` | %d | chat end-of-turn (= eos) |" % im_end)
    w("| `<\\|endoftext\\|>` | %d | |" % eot_text)
    w("")
    w("GGUF ids: bos_token_id=%s, eos_token_id=%s, padding_token_id=%s, unknown_token_id=%s. "
      "llama.cpp EOG set (`llama_vocab_is_eog`; it adds FIM/EOT-like control tokens it "
      "recognises by text, so `<reponame>` is included): %s."
      % (md.get("tokenizer.ggml.bos_token_id"), md.get("tokenizer.ggml.eos_token_id"),
         md.get("tokenizer.ggml.padding_token_id"), md.get("tokenizer.ggml.unknown_token_id"),
         ", ".join("%d `%s`" % (i, tok_text_safe(i, None)) for i in eog_ids)))
    w("")
    w("## GGUF tokenizer metadata")
    w("")
    if gg:
        for k, v in gg["keys"].items():
            if k == "tokenizer.chat_template":
                w("- `%s`: string, %d chars (below)" % (k, len(v[1])))
            elif isinstance(v, tuple):
                w("- `%s`: %s `%s`" % (k, v[0], v[1]))
            else:
                w("- `%s`: %s" % (k, v))
        w("- token_type histogram (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, "
          "6 byte): %s" % ", ".join("%d: %d" % kv for kv in gg["token_type_hist"].items()))
        w("- non-normal tokens: %s" % ", ".join("%d `%s` (type %d)" % t for t in gg["non_normal"]))
        w("- first merges: %s" % ", ".join("`%s`" % m for m in gg["first_merges"]))
        w("- tensors: %d, types %s; token_embd.weight is %s; separate output.weight: %s"
          % (gg["n_tensors"], gg["tensor_types"], gg["token_embd_type"], gg["has_output_weight"]))
    else:
        w("(python package `gguf` not installed; only llama-cpp-python's scalar metadata)")
    w("")
    w("Scalar metadata as llama-cpp-python reports it (`llm.metadata`, arrays are not included):")
    w("")
    w("```")
    for k in sorted(md):
        if k == "tokenizer.chat_template":
            continue
        w("%s = %s" % (k, md[k]))
    w("```")
    w("")
    w("## Pre-tokenizer")
    w("")
    w("`tokenizer.ggml.model = gpt2` (byte-level BPE) and `tokenizer.ggml.pre = %s`, which "
      "llama.cpp (vendored `src/llama-vocab.cpp`) maps to `LLAMA_VOCAB_PRE_TYPE_SMOLLM` with "
      "`clean_spaces = false`, `ignore_merges = false`. Its pre-tokenizer is two regexes applied "
      "in sequence (each further splits the pieces of the previous one):" % md.get("tokenizer.ggml.pre"))
    w("")
    w("```")
    w("\\p{N}")
    w("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)")
    w("```")
    w("")
    w("i.e. every digit is its own piece (HF: `Split(\\p{N}, Isolated)`), then GPT-2's regex "
      "(HF: `ByteLevel(add_prefix_space=false, use_regex=true)`). The first is run with "
      "std::regex on a category-collapsed copy of the text; the second with llama.cpp's "
      "hand-written `unicode_regex_split_custom_gpt2`, which also implements the trailing `\\s+` "
      "alternative of the original GPT-2 regex. Contractions are case-sensitive (`'S` is not a "
      "contraction). Special (control) tokens are split out of the text first when "
      "`special=true`. No BOS/EOS is added (`add_bos_token=false`).")
    w("")
    w("## Chat template (`tokenizer.chat_template`, verbatim)")
    w("")
    w("````jinja")
    w(template)
    w("````")
    w("")
    w("The same, as a JSON string (exact bytes; the template has real newlines inside its "
      "string literals and no trailing newline):")
    w("")
    w("```json")
    w(json.dumps(template, ensure_ascii=True))
    w("```")
    w("")
    w("Rendered for the user message `What is 2+2?`:")
    w("")
    w("````")
    w(render("What is 2+2?").rstrip("\n"))
    w("````")
    w("(followed by a final newline after `assistant`)")
    w("")
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(L))


_TOKTEXT = {}


def tok_text_safe(i, fallback):
    return _TOKTEXT.get(i, fallback)


def esc(s):
    return (s or "").replace("|", "\\|").replace("\n", "\\n")


if __name__ == "__main__":
    main()

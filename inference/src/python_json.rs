//! Python's `json.dumps`, byte for byte: what transformers' `tojson` filter writes in chat
//! templates (`json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//! sort_keys=False)` and its keyword arguments), what DeepSeek-V4's encoding writes, and what
//! the answer parsers restate (the daemon's `python_json` builds on [`float_repr`] and
//! [`write_str`]). Floats as Python's `repr`, strings escaped as Python escapes them; and
//! Python's white space and truth.

use serde_json::Value;

/// `json.dumps`' options, as Python takes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dumps {
    /// Non-ASCII characters as `\uXXXX` escapes (surrogate pairs above the BMP).
    pub ensure_ascii: bool,
    /// `None`: one line; else each item on its own line, indented by this per level.
    pub indent: Option<String>,
    /// `(item, key)` separators; `None`: `(", ", ": ")`, or `(",", ": ")` with an indent.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
}

impl Default for Dumps {
    /// transformers' `tojson`: text kept as it is (`ensure_ascii=False`), one line.
    fn default() -> Self {
        Self { ensure_ascii: false, indent: None, separators: None, sort_keys: false }
    }
}

impl Dumps {
    pub fn dumps(&self, value: &Value) -> String {
        let (item, key) = match (&self.separators, &self.indent) {
            (Some((item, key)), _) => (item.as_str(), key.as_str()),
            (None, None) => (", ", ": "),
            (None, Some(_)) => (",", ": "),
        };
        let mut out = String::new();
        self.write(value, 0, item, key, &mut out);
        out
    }

    fn write(&self, value: &Value, depth: usize, item: &str, key: &str, out: &mut String) {
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => out.push_str(&i.to_string()),
                (_, Some(u), _) => out.push_str(&u.to_string()),
                (_, _, Some(f)) => out.push_str(&float_repr(f)),
                _ => out.push_str(&n.to_string()),
            },
            Value::String(s) => write_str(s, self.ensure_ascii, out),
            Value::Array(items) if items.is_empty() => out.push_str("[]"),
            Value::Object(map) if map.is_empty() => out.push_str("{}"),
            Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    self.separate(i, depth + 1, item, out);
                    self.write(v, depth + 1, item, key, out);
                }
                self.separate(0, depth, item, out);
                out.push(']');
            }
            Value::Object(map) => {
                out.push('{');
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    self.separate(i, depth + 1, item, out);
                    write_str(k, self.ensure_ascii, out);
                    out.push_str(key);
                    self.write(v, depth + 1, item, key, out);
                }
                self.separate(0, depth, item, out);
                out.push('}');
            }
        }
    }

    /// Before the `i`-th item at `depth` (and, as item 0 at the outer depth, before the closing
    /// bracket): the item separator after the first, then with an indent a new line indented
    /// to the depth.
    fn separate(&self, i: usize, depth: usize, item: &str, out: &mut String) {
        if i > 0 {
            out.push_str(item);
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }
}

/// A JSON string as Python writes it: quotes, backslashes and control characters escaped, and
/// with `ensure_ascii` everything outside ASCII too.
pub fn write_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `json.dumps(value, ensure_ascii=False)`, as transformers' `tojson` writes it by default.
pub fn dumps(value: &Value) -> String {
    Dumps::default().dumps(value)
}

/// Python's truth of a JSON value (`bool(x)`; also how vLLM's parsers read template flags).
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Python's `str.strip()`: Unicode white space, and the four ASCII separators (0x1c–0x1f)
/// Python counts as space too.
pub fn python_strip(text: &str) -> &str {
    text.trim_matches(is_python_space)
}

/// Python's white space (`str.isspace`, regular expressions' `\s`).
pub fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `repr` of a float (`json.dumps` writes floats so): the shortest digits that read
/// back to it, in exponent form below 1e-4 and from 1e16 on.
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if x == 0.0 {
        return format!("{sign}0.0");
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "d.ddde±x".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exponent) = sci.split_once('e').expect("`{:e}` writes an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` writes an integer exponent");
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if !(-4..16).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        return format!("{sign}{first}{fraction}e{exp_sign}{:02}", exponent.abs());
    }
    let point = exponent + 1;
    let text = if point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        let (whole, fraction) = digits.split_at(point as usize);
        format!("{whole}.{fraction}")
    };
    format!("{sign}{text}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Each against what CPython 3.11's `json.dumps` writes for the same call.
    #[test]
    fn dumps_writes_what_python_writes() {
        let v = json!({"b": [1, 2.5, 1e20, "東京😀"], "a": {}, "c": [], "d": null, "e": "q\"\n\u{1}"});
        let d = |dumps: Dumps| dumps.dumps(&v);
        assert_eq!(
            d(Dumps::default()),
            r#"{"b": [1, 2.5, 1e+20, "東京😀"], "a": {}, "c": [], "d": null, "e": "q\"\n\u0001"}"#
        );
        assert_eq!(
            d(Dumps { ensure_ascii: true, sort_keys: true, ..Dumps::default() }),
            r#"{"a": {}, "b": [1, 2.5, 1e+20, "\u6771\u4eac\ud83d\ude00"], "c": [], "d": null, "e": "q\"\n\u0001"}"#
        );
        assert_eq!(
            d(Dumps { indent: Some("  ".into()), ..Dumps::default() }),
            "{\n  \"b\": [\n    1,\n    2.5,\n    1e+20,\n    \"東京😀\"\n  ],\n  \"a\": {},\n  \"c\": [],\n  \"d\": null,\n  \"e\": \"q\\\"\\n\\u0001\"\n}"
        );
        let compact = Dumps { separators: Some((",".into(), ":".into())), ..Dumps::default() };
        assert_eq!(compact.dumps(&json!({"a": [1, 2]})), r#"{"a":[1,2]}"#);
        for (x, repr) in [(0.1, "0.1"), (1e16, "1e+16"), (1e15, "1000000000000000.0"), (1e-5, "1e-05"), (-0.0, "-0.0")]
        {
            assert_eq!(float_repr(x), repr);
        }
    }
}

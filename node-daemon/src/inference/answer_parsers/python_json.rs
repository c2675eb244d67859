//! Tool-call arguments as gonka's vLLM fork writes them: each parameter's text coerced to the
//! type the tool's JSON schema names (`tool_parsers/utils.py`: `extract_types_from_schema`,
//! `coerce_to_schema_type`), and the arguments object written by Python's
//! `json.dumps(…, ensure_ascii=False)` — `", "` and `": "` between items, floats as Python's
//! `repr`, integers of any length, text unescaped beyond what JSON needs. Clients read the
//! arguments string itself, so its bytes are the fork's.

use gonka_inference::python_json::write_str;
pub use gonka_inference::python_json::{float_repr, is_python_space, python_strip};
use serde_json::Value;

/// A JSON value as Python's `json` module holds one: integers keep every digit, floats are
/// doubles (NaN and the infinities included), objects keep their keys' first order.
#[derive(Clone, Debug, PartialEq)]
pub enum PyJson {
    Null,
    Bool(bool),
    /// Decimal digits, `-` first if negative, no leading zeros.
    Int(String),
    Float(f64),
    Str(String),
    Array(Vec<PyJson>),
    Object(Vec<(String, PyJson)>),
}

/// A coercion that Python would have failed with an exception other than the `ValueError` the
/// fork catches: `int(float("inf"))`'s `OverflowError`, which ends the fork's whole parse.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

impl PyJson {
    /// `json.dumps(self, ensure_ascii=False)`.
    pub fn dumps(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            PyJson::Null => out.push_str("null"),
            PyJson::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            PyJson::Int(digits) => out.push_str(digits),
            PyJson::Float(x) => out.push_str(&float_repr(*x)),
            PyJson::Str(s) => write_str(s, false, out),
            PyJson::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out);
                }
                out.push(']');
            }
            PyJson::Object(entries) => {
                out.push('{');
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_str(key, false, out);
                    out.push_str(": ");
                    value.write(out);
                }
                out.push('}');
            }
        }
    }

    /// `json.loads(text)`: JSON, plus Python's `NaN`, `Infinity` and `-Infinity`; `None` where
    /// Python raises.
    pub fn loads(text: &str) -> Option<PyJson> {
        let mut reader = Reader { text: text.as_bytes(), at: 0 };
        reader.space();
        let value = reader.value(0)?;
        reader.space();
        (reader.at == text.len()).then_some(value)
    }

    /// An object's entries with a key set again keeping its first place, as a Python dict.
    pub fn object(entries: impl IntoIterator<Item = (String, PyJson)>) -> PyJson {
        let mut out: Vec<(String, PyJson)> = Vec::new();
        for (key, value) in entries {
            match out.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = value,
                None => out.push((key, value)),
            }
        }
        PyJson::Object(out)
    }
}

struct Reader<'a> {
    text: &'a [u8],
    at: usize,
}

/// Deeper than this, Python's parser would have hit its recursion limit long before.
const MAX_DEPTH: usize = 512;

impl Reader<'_> {
    fn space(&mut self) {
        while self.text.get(self.at).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, word: &str) -> bool {
        let found = self.text[self.at..].starts_with(word.as_bytes());
        if found {
            self.at += word.len();
        }
        found
    }

    fn value(&mut self, depth: usize) -> Option<PyJson> {
        if depth > MAX_DEPTH {
            return None;
        }
        match *self.text.get(self.at)? {
            b'{' => {
                self.at += 1;
                let mut entries = Vec::new();
                self.space();
                if self.eat("}") {
                    return Some(PyJson::Object(entries));
                }
                loop {
                    self.space();
                    if self.text.get(self.at) != Some(&b'"') {
                        return None;
                    }
                    let key = self.string()?;
                    self.space();
                    if !self.eat(":") {
                        return None;
                    }
                    self.space();
                    entries.push((key, self.value(depth + 1)?));
                    self.space();
                    if self.eat("}") {
                        return Some(PyJson::object(entries));
                    }
                    if !self.eat(",") {
                        return None;
                    }
                }
            }
            b'[' => {
                self.at += 1;
                let mut items = Vec::new();
                self.space();
                if self.eat("]") {
                    return Some(PyJson::Array(items));
                }
                loop {
                    self.space();
                    items.push(self.value(depth + 1)?);
                    self.space();
                    if self.eat("]") {
                        return Some(PyJson::Array(items));
                    }
                    if !self.eat(",") {
                        return None;
                    }
                }
            }
            b'"' => self.string().map(PyJson::Str),
            _ if self.eat("null") => Some(PyJson::Null),
            _ if self.eat("true") => Some(PyJson::Bool(true)),
            _ if self.eat("false") => Some(PyJson::Bool(false)),
            _ if self.eat("NaN") => Some(PyJson::Float(f64::NAN)),
            _ if self.eat("Infinity") => Some(PyJson::Float(f64::INFINITY)),
            _ if self.eat("-Infinity") => Some(PyJson::Float(f64::NEG_INFINITY)),
            _ => self.number(),
        }
    }

    /// JSON's number: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?`, an int without
    /// fraction or exponent.
    fn number(&mut self) -> Option<PyJson> {
        let start = self.at;
        let digits = |r: &mut Self| {
            let from = r.at;
            while r.text.get(r.at).is_some_and(u8::is_ascii_digit) {
                r.at += 1;
            }
            r.at - from
        };
        self.eat("-");
        let whole_start = self.at;
        let whole = digits(self);
        if whole == 0 || (whole > 1 && self.text[whole_start] == b'0') {
            // Python's scanner reads "01" as 0 then stops; the document then fails as a whole.
            if whole == 0 {
                return None;
            }
            self.at = whole_start + 1;
        }
        let mut float = false;
        if self.text.get(self.at) == Some(&b'.') && self.text.get(self.at + 1).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
            digits(self);
            float = true;
        }
        if matches!(self.text.get(self.at), Some(b'e' | b'E')) {
            let mark = self.at;
            self.at += 1;
            if matches!(self.text.get(self.at), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if digits(self) == 0 {
                self.at = mark;
            } else {
                float = true;
            }
        }
        let text = std::str::from_utf8(&self.text[start..self.at]).ok()?;
        if float { text.parse().ok().map(PyJson::Float) } else { Some(PyJson::Int(int_digits(text)?)) }
    }

    fn string(&mut self) -> Option<String> {
        self.at += 1;
        let mut out = String::new();
        loop {
            let rest = std::str::from_utf8(&self.text[self.at..]).ok()?;
            let c = rest.chars().next()?;
            self.at += c.len_utf8();
            match c {
                '"' => return Some(out),
                // Python's strict mode refuses control characters inside strings.
                c if (c as u32) < 0x20 => return None,
                '\\' => {
                    let escape = *self.text.get(self.at)?;
                    self.at += 1;
                    out.push(match escape {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let high = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&high) && self.eat("\\u") {
                                let low = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return None;
                                }
                                0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
                            } else {
                                high
                            };
                            // A lone surrogate: Python keeps it, but no UTF-8 answer can carry it.
                            char::from_u32(code)?
                        }
                        _ => return None,
                    });
                }
                c => out.push(c),
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let hex = std::str::from_utf8(self.text.get(self.at..self.at + 4)?).ok()?;
        let code = u32::from_str_radix(hex, 16).ok().filter(|_| hex.bytes().all(|b| b.is_ascii_hexdigit()))?;
        self.at += 4;
        Some(code)
    }
}

/// An integer's decimal digits, normalised as Python's `int` prints them (`-0` is `0`, leading
/// zeros go); `None` unless `text` is a sign and ASCII digits.
fn int_digits(text: &str) -> Option<String> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = digits.trim_start_matches('0');
    Some(match (digits.is_empty(), negative) {
        (true, _) => "0".into(),
        (false, true) => format!("-{digits}"),
        (false, false) => digits.into(),
    })
}

/// Python's underscores in numeric literals: single ones between digits are dropped; `None`
/// where Python would refuse the text.
fn without_underscores(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'_' {
            let between =
                i > 0 && i + 1 < bytes.len() && bytes[i - 1].is_ascii_digit() && bytes[i + 1].is_ascii_digit();
            if !between {
                return None;
            }
        }
    }
    Some(text.replace('_', ""))
}

/// The fork's `extract_types_from_schema`: the JSON-schema types a parameter's schema allows,
/// from `type`, the kinds of its `enum` values, and its `anyOf`/`oneOf`/`allOf` branches;
/// `["string"]` when none is named.
pub fn schema_types(schema: &Value) -> Vec<String> {
    let Some(schema) = schema.as_object() else {
        return vec!["string".into()];
    };
    let mut types: Vec<String> = Vec::new();
    let mut add = |t: &str| {
        if !types.iter().any(|have| have == t) {
            types.push(t.to_string());
        }
    };
    match schema.get("type") {
        Some(Value::String(t)) => add(t),
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).for_each(&mut add),
        _ => {}
    }
    if let Some(Value::Array(values)) = schema.get("enum") {
        for value in values {
            add(match value {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_f64() => "number",
                Value::Number(_) => "integer",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            });
        }
    }
    for choice in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(branches)) = schema.get(choice) {
            for branch in branches {
                for t in schema_types(branch) {
                    add(&t);
                }
            }
        }
    }
    if types.is_empty() { vec!["string".into()] } else { types }
}

/// The fork's aliases for type names (`_TYPE_ALIASES`), after `strip().lower()`.
fn normalised_type(name: &str) -> String {
    let name = python_strip(name).to_lowercase();
    let canonical = match name.as_str() {
        "str" | "text" | "varchar" | "char" | "enum" => "string",
        "int" | "int32" | "int64" | "uint" | "uint32" | "uint64" | "long" | "short" | "unsigned" => "integer",
        "float" | "float32" | "float64" | "double" => "number",
        "bool" => "boolean",
        "dict" => "object",
        "arr" | "list" | "sequence" => "array",
        _ => return name,
    };
    canonical.into()
}

/// The fork's `coerce_to_schema_type`: `value` read as the first of `types` it passes for, in
/// the order null, integer, number, boolean, object, array, string; else as JSON, else as text.
pub fn coerce(value: &str, types: &[String]) -> Result<PyJson, Overflow> {
    let types: Vec<String> = types.iter().map(|t| normalised_type(t)).collect();
    let allows = |t: &str| types.iter().any(|have| have == t);
    for candidate in ["null", "integer", "number", "boolean", "object", "array", "string"] {
        if !allows(candidate) {
            continue;
        }
        match candidate {
            "null" if value.to_lowercase() == "null" => return Ok(PyJson::Null),
            "string" => return Ok(PyJson::Str(value.to_string())),
            "integer" => {
                // Python's int() takes surrounding space and underscores between digits.
                if let Some(digits) = without_underscores(python_strip(value)).and_then(|t| int_digits(&t)) {
                    return Ok(PyJson::Int(digits));
                }
            }
            "number" => {
                if let Some(x) = without_underscores(python_strip(value)).and_then(|t| t.parse::<f64>().ok()) {
                    if x.is_infinite() {
                        return Err(Overflow);
                    }
                    if !x.is_nan() {
                        // `val if val != int(val) else int(val)`: whole numbers become ints.
                        return Ok(if x.fract() == 0.0 {
                            let digits = format!("{:.0}", x.abs());
                            PyJson::Int(if x < 0.0 && digits != "0" { format!("-{digits}") } else { digits })
                        } else {
                            PyJson::Float(x)
                        });
                    }
                }
            }
            "boolean" => match python_strip(&value.to_lowercase()) {
                "true" | "1" => return Ok(PyJson::Bool(true)),
                "false" | "0" => return Ok(PyJson::Bool(false)),
                _ => {}
            },
            "object" | "array" => {
                if let Some(parsed) = PyJson::loads(value) {
                    return Ok(parsed);
                }
            }
            _ => {}
        }
    }
    Ok(PyJson::loads(value).unwrap_or_else(|| PyJson::Str(value.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Python 3.11's `repr` of each, written down from the interpreter.
    #[test]
    fn floats_are_written_as_pythons_repr() {
        let cases = [
            (2.5, "2.5"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.125, "123456789.125"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.25e-7, "1.25e-07"),
            (-0.0, "-0.0"),
            (-3.0, "-3.0"),
            (1e300, "1e+300"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
            (0.30000000000000004, "0.30000000000000004"),
        ];
        for (x, repr) in cases {
            assert_eq!(float_repr(x), repr, "{x}");
        }
    }

    #[test]
    fn json_is_read_and_written_as_pythons_json_module_does() {
        let cases = [
            (
                r#"{"a": 1, "b": [1.0, 2e3, -0], "c": "Zürich\n\u00e9\u0001", "a": null}"#,
                "{\"a\": null, \"b\": [1.0, 2000.0, 0], \"c\": \"Zürich\\né\\u0001\"}",
            ),
            (
                "[NaN, Infinity, -Infinity, 12345678901234567890123]",
                "[NaN, Infinity, -Infinity, 12345678901234567890123]",
            ),
            ("  \"\\ud83d\\ude80\"\n", "\"🚀\""),
            ("{}", "{}"),
            ("[]", "[]"),
        ];
        for (text, dumped) in cases {
            assert_eq!(PyJson::loads(text).map(|v| v.dumps()).as_deref(), Some(dumped), "{text}");
        }
        for refused in ["", "[1,]", "{'a': 1}", "01", "1.", "\"a\nb\"", "\"\\ud800\"", "[1] x", "nul", "-", "1e"] {
            assert_eq!(PyJson::loads(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn schema_types_follow_type_enum_and_branches() {
        // The fork returns a set's members, in no particular order; the coercion reads them in
        // its own order.
        let t = |s: Value| {
            let mut types = schema_types(&s);
            types.sort();
            types
        };
        assert_eq!(t(json!({"type": "integer"})), ["integer"]);
        assert_eq!(t(json!({"type": ["string", "null"]})), ["null", "string"]);
        assert_eq!(t(json!({"enum": [1, 1.5, "a", null, true]})), ["boolean", "integer", "null", "number", "string"]);
        assert_eq!(t(json!({"anyOf": [{"type": "array"}, {"oneOf": [{"type": "object"}]}]})), ["array", "object"]);
        assert_eq!(t(json!({})), ["string"]);
        assert_eq!(t(json!("integer")), ["string"]);
    }

    /// What the fork's `coerce_to_schema_type` returns for each, read in Python and written down.
    #[test]
    fn values_are_coerced_as_the_fork_coerces_them() {
        let coerce = |value: &str, types: &[&str]| {
            let types: Vec<String> = types.iter().map(|t| t.to_string()).collect();
            coerce(value, &types).map(|v| v.dumps())
        };
        let ok = |s: &str| Ok(s.to_string());
        assert_eq!(coerce("3", &["integer"]), ok("3"));
        assert_eq!(coerce("+1_000", &["int"]), ok("1000"));
        assert_eq!(coerce("007", &["integer"]), ok("7"));
        assert_eq!(coerce("3.0", &["integer"]), ok("3.0"), "int('3.0') fails: read as JSON");
        assert_eq!(coerce("three", &["integer"]), ok("\"three\""));
        assert_eq!(coerce("2.50", &["number"]), ok("2.5"));
        assert_eq!(coerce("1e20", &["number"]), ok("100000000000000000000"));
        assert_eq!(coerce("-0", &["number"]), ok("0"));
        assert_eq!(coerce("nan", &["number"]), ok("\"nan\""));
        assert_eq!(coerce("inf", &["number"]), Err(Overflow));
        assert_eq!(coerce("True", &["boolean"]), ok("true"));
        assert_eq!(coerce("0", &["bool"]), ok("false"));
        assert_eq!(coerce("yes", &["boolean"]), ok("\"yes\""));
        assert_eq!(coerce("null", &["string", "null"]), ok("null"));
        assert_eq!(coerce("NULL", &["string"]), ok("\"NULL\""));
        assert_eq!(coerce("[1, 2]", &["array"]), ok("[1, 2]"));
        assert_eq!(coerce("\"quoted\"", &["object"]), ok("\"quoted\""));
        assert_eq!(coerce("{\"a\": 1}", &["string"]), ok("\"{\\\"a\\\": 1}\""));
        assert_eq!(coerce("5", &["mystery"]), ok("5"), "an unknown type: read as JSON");
        assert_eq!(coerce("five", &["mystery"]), ok("\"five\""));
        assert_eq!(coerce("7", &["string", "integer"]), ok("7"), "integer comes before string");
    }
}

//! Python's `ast.literal_eval` on a tool-call value, as GLM's parser in gonka's vLLM fork reads
//! values that are not JSON (`safe_literal_eval`: `'single quotes'`, `True`, `None`, tuples),
//! then writes them with `json.dumps`. What it reads: strings (quotes of every kind, the `r`,
//! `u` and `b` prefixes, escapes, adjacent strings joined), numbers (underscores, `0x`/`0o`/`0b`,
//! floats, imaginary ones), `True`/`False`/`None`, signs on numbers, a real plus or minus an
//! imaginary number, tuples, lists, dicts and sets. Not read (the value stays text, where
//! Python might have read it): comments, line continuations and `\N{…}` escapes.

use super::python_json::PyJson;

/// A literal's value, as far as `json.dumps` is concerned.
#[derive(Clone, Debug, PartialEq)]
pub enum PyLiteral {
    None,
    Bool(bool),
    /// Decimal digits, `-` first if negative.
    Int(String),
    Float(f64),
    Str(String),
    List(Vec<PyLiteral>),
    Tuple(Vec<PyLiteral>),
    Dict(Vec<(PyLiteral, PyLiteral)>),
    /// A set, bytes or a complex number: Python reads them, `json.dumps` refuses them.
    Unwritable(&'static str),
}

/// What `literal_eval` does with a text.
#[derive(Clone, Debug, PartialEq)]
pub enum Evaluated {
    Value(PyLiteral),
    /// `ValueError` or `SyntaxError`, which the fork catches: the value stays text.
    NotALiteral,
    /// Another exception (an unhashable dict key or set member), which the fork does not catch.
    Raises(&'static str),
}

/// `ast.literal_eval(text)`.
pub fn literal_eval(text: &str) -> Evaluated {
    let text = text.trim_start_matches([' ', '\t']);
    let mut parser = Parser { chars: text.chars().collect(), at: 0, depth: 0 };
    let value = match parser.expression() {
        Ok(v) => v,
        Err(e) => return e,
    };
    parser.space(false);
    // Eval mode takes trailing line ends.
    while parser.peek().is_some_and(|c| matches!(c, '\n' | '\r' | ' ' | '\t' | '\u{c}')) {
        parser.at += 1;
    }
    if parser.at != parser.chars.len() {
        return Evaluated::NotALiteral;
    }
    Evaluated::Value(value)
}

impl PyLiteral {
    /// What `json.dumps` would write it from: `Err` naming the type it refuses.
    pub fn to_json(&self) -> Result<PyJson, &'static str> {
        Ok(match self {
            PyLiteral::None => PyJson::Null,
            PyLiteral::Bool(b) => PyJson::Bool(*b),
            PyLiteral::Int(d) => PyJson::Int(d.clone()),
            PyLiteral::Float(x) => PyJson::Float(*x),
            PyLiteral::Str(s) => PyJson::Str(s.clone()),
            PyLiteral::List(items) | PyLiteral::Tuple(items) => {
                PyJson::Array(items.iter().map(PyLiteral::to_json).collect::<Result<_, _>>()?)
            }
            PyLiteral::Dict(entries) => {
                let mut out = Vec::new();
                for (key, value) in entries {
                    // json.dumps writes keys as text; other kinds of key it refuses.
                    let key = match key {
                        PyLiteral::Str(s) => s.clone(),
                        PyLiteral::Int(d) => d.clone(),
                        PyLiteral::Float(x) => super::python_json::float_repr(*x),
                        PyLiteral::Bool(b) => b.to_string(),
                        PyLiteral::None => "null".into(),
                        _ => return Err("keys must be str, int, float, bool or None"),
                    };
                    out.push((key, value.to_json()?));
                }
                // Not PyJson::object: keys equal as text (1 and "1") are two keys to Python.
                PyJson::Object(out)
            }
            PyLiteral::Unwritable(kind) => return Err(kind),
        })
    }

    fn number(&self) -> Option<f64> {
        match self {
            PyLiteral::Bool(b) => Some(f64::from(u8::from(*b))),
            PyLiteral::Int(d) => d.parse().ok(),
            PyLiteral::Float(x) => Some(*x),
            _ => None,
        }
    }

    /// Python's `==` between dict keys (1, 1.0 and True are one key).
    fn same_key(&self, other: &PyLiteral) -> bool {
        match (self, other) {
            (PyLiteral::Int(a), PyLiteral::Int(b)) => a == b,
            (a, b) if a.number().is_some() && b.number().is_some() => a.number() == b.number(),
            (a, b) => a == b,
        }
    }

    fn hashable(&self) -> bool {
        match self {
            PyLiteral::List(_) | PyLiteral::Dict(_) => false,
            PyLiteral::Tuple(items) => items.iter().all(PyLiteral::hashable),
            // A set is unhashable; bytes and complex numbers are.
            PyLiteral::Unwritable(kind) => *kind != "set",
            _ => true,
        }
    }
}

struct Parser {
    chars: Vec<char>,
    at: usize,
    /// Brackets open: inside them line ends are space.
    depth: usize,
}

const MAX_DEPTH: usize = 200;

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            let skip = matches!(c, ' ' | '\t' | '\u{c}') || (newlines && matches!(c, '\n' | '\r'));
            if !skip {
                break;
            }
            self.at += 1;
        }
    }

    fn skip(&mut self) {
        let inside = self.depth > 0;
        self.space(inside);
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip();
        let found = self.peek() == Some(c);
        if found {
            self.at += 1;
        }
        found
    }

    /// A signed number, a real ± imaginary sum, or an atom.
    fn expression(&mut self) -> Result<PyLiteral, Evaluated> {
        let left = self.signed()?;
        self.skip();
        match self.peek() {
            Some('+' | '-') => {
                self.at += 1;
                let right = self.signed_or_atom()?;
                // literal_eval takes `real ± complex` only.
                let real = matches!(left, PyLiteral::Int(_) | PyLiteral::Float(_));
                if real && right == PyLiteral::Unwritable("complex") {
                    Ok(PyLiteral::Unwritable("complex"))
                } else {
                    Err(Evaluated::NotALiteral)
                }
            }
            _ => Ok(left),
        }
    }

    fn signed_or_atom(&mut self) -> Result<PyLiteral, Evaluated> {
        self.skip();
        if matches!(self.peek(), Some('+' | '-')) {
            // `1 + -2j` is a BinOp whose right side is not a constant.
            return Err(Evaluated::NotALiteral);
        }
        self.atom()
    }

    fn signed(&mut self) -> Result<PyLiteral, Evaluated> {
        self.skip();
        let negative = match self.peek() {
            Some('-') => true,
            Some('+') => false,
            _ => return self.atom(),
        };
        self.at += 1;
        self.skip();
        let value = self.atom()?;
        match value {
            PyLiteral::Int(d) if negative => Ok(PyLiteral::Int(if d == "0" { d } else { format!("-{d}") })),
            PyLiteral::Float(x) if negative => Ok(PyLiteral::Float(-x)),
            v @ (PyLiteral::Int(_) | PyLiteral::Float(_) | PyLiteral::Unwritable("complex")) => Ok(v),
            _ => Err(Evaluated::NotALiteral),
        }
    }

    fn atom(&mut self) -> Result<PyLiteral, Evaluated> {
        self.skip();
        let c = self.peek().ok_or(Evaluated::NotALiteral)?;
        match c {
            '(' | '[' | '{' => {
                if self.depth >= MAX_DEPTH {
                    return Err(Evaluated::NotALiteral);
                }
                self.at += 1;
                self.depth += 1;
                let value = match c {
                    '(' => self.tuple(),
                    '[' => self.sequence(']').map(PyLiteral::List),
                    _ => self.braces(),
                };
                self.depth -= 1;
                value
            }
            c if c.is_ascii_digit() || (c == '.' && self.chars.get(self.at + 1).is_some_and(char::is_ascii_digit)) => {
                self.number()
            }
            c if c == '\'' || c == '"' || c.is_alphabetic() || c == '_' => self.word_or_string(),
            _ => Err(Evaluated::NotALiteral),
        }
    }

    /// Items up to `close`, commas between, one trailing comma allowed.
    fn sequence(&mut self, close: char) -> Result<Vec<PyLiteral>, Evaluated> {
        let mut items = Vec::new();
        loop {
            if self.eat(close) {
                return Ok(items);
            }
            items.push(self.expression()?);
            if !self.eat(',') {
                return if self.eat(close) { Ok(items) } else { Err(Evaluated::NotALiteral) };
            }
        }
    }

    fn tuple(&mut self) -> Result<PyLiteral, Evaluated> {
        if self.eat(')') {
            return Ok(PyLiteral::Tuple(Vec::new()));
        }
        let first = self.expression()?;
        if self.eat(')') {
            // Parentheses alone group.
            return Ok(first);
        }
        if !self.eat(',') {
            return Err(Evaluated::NotALiteral);
        }
        let mut items = vec![first];
        items.extend(self.sequence(')')?);
        Ok(PyLiteral::Tuple(items))
    }

    fn braces(&mut self) -> Result<PyLiteral, Evaluated> {
        if self.eat('}') {
            return Ok(PyLiteral::Dict(Vec::new()));
        }
        let first = self.expression()?;
        if self.eat(':') {
            let mut entries: Vec<(PyLiteral, PyLiteral)> = Vec::new();
            let mut key = first;
            loop {
                let value = self.expression()?;
                if !key.hashable() {
                    return Err(Evaluated::Raises("unhashable type"));
                }
                match entries.iter_mut().find(|(k, _)| k.same_key(&key)) {
                    Some(entry) => entry.1 = value,
                    None => entries.push((key, value)),
                }
                if self.eat('}') {
                    return Ok(PyLiteral::Dict(entries));
                }
                if !self.eat(',') {
                    return Err(Evaluated::NotALiteral);
                }
                if self.eat('}') {
                    return Ok(PyLiteral::Dict(entries));
                }
                key = self.expression()?;
                if !self.eat(':') {
                    return Err(Evaluated::NotALiteral);
                }
            }
        }
        let mut members = vec![first];
        if self.eat(',') {
            members.extend(self.sequence('}')?);
        } else if !self.eat('}') {
            return Err(Evaluated::NotALiteral);
        }
        if !members.iter().all(PyLiteral::hashable) {
            return Err(Evaluated::Raises("unhashable type"));
        }
        Ok(PyLiteral::Unwritable("set"))
    }

    fn number(&mut self) -> Result<PyLiteral, Evaluated> {
        let start = self.at;
        while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
            let c = self.peek().expect("peeked");
            self.at += 1;
            // An exponent's sign.
            if matches!(c, 'e' | 'E')
                && !self.chars[start..self.at].iter().any(|c| matches!(c, 'x' | 'X' | 'b' | 'B' | 'o' | 'O'))
                && matches!(self.peek(), Some('+' | '-'))
            {
                self.at += 1;
            }
        }
        let text: String = self.chars[start..self.at].iter().collect();
        python_number(&text).ok_or(Evaluated::NotALiteral)
    }

    /// A name (`True`, `False`, `None`; any other is not a literal) or a string with its prefix,
    /// and the strings adjacent to it.
    fn word_or_string(&mut self) -> Result<PyLiteral, Evaluated> {
        let start = self.at;
        while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            self.at += 1;
        }
        let word: String = self.chars[start..self.at].iter().collect();
        if !matches!(self.peek(), Some('\'' | '"')) {
            return match word.as_str() {
                "True" => Ok(PyLiteral::Bool(true)),
                "False" => Ok(PyLiteral::Bool(false)),
                "None" => Ok(PyLiteral::None),
                _ => Err(Evaluated::NotALiteral),
            };
        }
        let mut bytes = None;
        let mut text = String::new();
        let mut prefix = word;
        loop {
            let lower = prefix.to_lowercase();
            let (raw, is_bytes) = match lower.as_str() {
                "" | "u" => (false, false),
                "r" => (true, false),
                "b" => (false, true),
                "br" | "rb" => (true, true),
                // f-strings are not literals; other prefixes do not parse.
                _ => return Err(Evaluated::NotALiteral),
            };
            if *bytes.get_or_insert(is_bytes) != is_bytes {
                // Bytes next to text: a syntax error.
                return Err(Evaluated::NotALiteral);
            }
            text.push_str(&self.string_body(raw)?);
            // Adjacent strings join.
            self.skip();
            let mark = self.at;
            while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                self.at += 1;
            }
            if !matches!(self.peek(), Some('\'' | '"')) {
                self.at = mark;
                break;
            }
            prefix = self.chars[mark..self.at].iter().collect();
        }
        Ok(if bytes == Some(true) { PyLiteral::Unwritable("bytes") } else { PyLiteral::Str(text) })
    }

    /// A quoted string's text, the opening quote next.
    fn string_body(&mut self, raw: bool) -> Result<String, Evaluated> {
        let quote = self.peek().ok_or(Evaluated::NotALiteral)?;
        let triple = self.chars.get(self.at + 1) == Some(&quote) && self.chars.get(self.at + 2) == Some(&quote);
        self.at += if triple { 3 } else { 1 };
        let mut out = String::new();
        loop {
            let c = self.peek().ok_or(Evaluated::NotALiteral)?;
            if c == quote {
                if !triple {
                    self.at += 1;
                    return Ok(out);
                }
                if self.chars.get(self.at + 1) == Some(&quote) && self.chars.get(self.at + 2) == Some(&quote) {
                    self.at += 3;
                    return Ok(out);
                }
            }
            if !triple && matches!(c, '\n' | '\r') {
                return Err(Evaluated::NotALiteral);
            }
            self.at += 1;
            if c != '\\' {
                out.push(c);
                continue;
            }
            let e = self.peek().ok_or(Evaluated::NotALiteral)?;
            self.at += 1;
            if raw {
                // A raw string keeps the backslash (and the escaped quote).
                out.push('\\');
                out.push(e);
                continue;
            }
            match e {
                '\n' => {}
                '\\' => out.push('\\'),
                '\'' => out.push('\''),
                '"' => out.push('"'),
                'a' => out.push('\u{7}'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'v' => out.push('\u{b}'),
                '0'..='7' => {
                    let mut code = e.to_digit(8).expect("octal digit");
                    for _ in 0..2 {
                        match self.peek().and_then(|c| c.to_digit(8)) {
                            Some(d) => {
                                code = code * 8 + d;
                                self.at += 1;
                            }
                            None => break,
                        }
                    }
                    out.push(char::from_u32(code).ok_or(Evaluated::NotALiteral)?);
                }
                'x' | 'u' | 'U' => {
                    let width = match e {
                        'x' => 2,
                        'u' => 4,
                        _ => 8,
                    };
                    let digits: String = self.chars.get(self.at..self.at + width).unwrap_or(&[]).iter().collect();
                    if digits.len() != width || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
                        return Err(Evaluated::NotALiteral);
                    }
                    self.at += width;
                    let code = u32::from_str_radix(&digits, 16).map_err(|_| Evaluated::NotALiteral)?;
                    out.push(char::from_u32(code).ok_or(Evaluated::NotALiteral)?);
                }
                // \N{name} is not read here; any other escape keeps its backslash, as Python's.
                'N' => return Err(Evaluated::NotALiteral),
                other => {
                    out.push('\\');
                    out.push(other);
                }
            }
        }
    }
}

/// A Python number literal's value; `None` where Python would not parse it.
fn python_number(text: &str) -> Option<PyLiteral> {
    // Underscores: single ones between digits (after a base prefix too).
    let digits_ok = |s: &str, valid: &dyn Fn(char) -> bool| {
        !s.is_empty()
            && !s.starts_with('_')
            && !s.ends_with('_')
            && !s.contains("__")
            && s.chars().all(|c| c == '_' || valid(c))
    };
    let lower = text.to_ascii_lowercase();
    for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] {
        if let Some(rest) = lower.strip_prefix(prefix) {
            let rest = rest.strip_prefix('_').unwrap_or(rest);
            if !digits_ok(rest, &|c| c.is_digit(radix)) {
                return None;
            }
            let value = u128::from_str_radix(&rest.replace('_', ""), radix).ok()?;
            return Some(PyLiteral::Int(value.to_string()));
        }
    }
    let (body, imaginary) = match lower.strip_suffix('j') {
        Some(body) => (body, true),
        None => (lower.as_str(), false),
    };
    let (mantissa, exponent) = match body.split_once('e') {
        Some((m, e)) => (m, Some(e)),
        None => (body, None),
    };
    let (whole, fraction) = match mantissa.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (mantissa, None),
    };
    let decimal = |s: &str| digits_ok(s, &|c: char| c.is_ascii_digit());
    let whole_ok = whole.is_empty() || decimal(whole);
    let fraction_ok = fraction.is_none_or(|f| f.is_empty() || decimal(f));
    let has_digits = !whole.is_empty() || fraction.is_some_and(|f| !f.is_empty());
    let exponent_ok = exponent.is_none_or(|e| decimal(e.strip_prefix(['+', '-']).unwrap_or(e)));
    if !(whole_ok && fraction_ok && has_digits && exponent_ok) {
        return None;
    }
    let float = fraction.is_some() || exponent.is_some();
    if imaginary {
        return Some(PyLiteral::Unwritable("complex"));
    }
    if float {
        return body.replace('_', "").parse().ok().map(PyLiteral::Float);
    }
    let digits = whole.replace('_', "");
    // Python refuses leading zeros in a non-zero decimal integer.
    if digits.len() > 1 && digits.starts_with('0') {
        return digits.bytes().all(|b| b == b'0').then(|| PyLiteral::Int("0".into()));
    }
    Some(PyLiteral::Int(digits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Result<String, String> {
        match literal_eval(text) {
            Evaluated::Value(v) => v.to_json().map(|j| j.dumps()).map_err(|e| format!("TypeError: {e}")),
            Evaluated::NotALiteral => Err("not a literal".into()),
            Evaluated::Raises(e) => Err(format!("raises: {e}")),
        }
    }

    /// Python 3.11's `json.dumps(ast.literal_eval(text), ensure_ascii=False)` of each, read in
    /// the interpreter and written down.
    #[test]
    fn literals_read_as_pythons() {
        let ok = |s: &str| Ok(s.to_string());
        let cases: Vec<(&str, Result<String, String>)> = vec![
            ("{'lat': 1.5, 'n': None}", ok(r#"{"lat": 1.5, "n": null}"#)),
            ("(1, 2)", ok("[1, 2]")),
            ("(1)", ok("1")),
            ("()", ok("[]")),
            ("[1, (2,), [True, False],]", ok("[1, [2], [true, false]]")),
            ("  'a' \"b\" '''c'''", ok("\"abc\"")),
            (r"'tab\there \x41\u00e9\101 \d'", ok(r#""tab\there AéA \\d""#)),
            (r"r'\n'", ok(r#""\\n""#)),
            ("-1_000", ok("-1000")),
            ("0x_ff", ok("255")),
            ("1e3", ok("1000.0")),
            ("-.5", ok("-0.5")),
            ("{1: 'a', True: 'b', 1.0: 'c', '1': 'd'}", ok(r#"{"1": "c", "1": "d"}"#)),
            ("{None: 1, 2.5: 2, False: 3}", ok(r#"{"null": 1, "2.5": 2, "false": 3}"#)),
            ("{1, 2}", Err("TypeError: set".into())),
            ("b'x'", Err("TypeError: bytes".into())),
            ("1+2j", Err("TypeError: complex".into())),
            ("{(1, 2): 3}", Err("TypeError: keys must be str, int, float, bool or None".into())),
            ("{[1]: 2}", Err("raises: unhashable type".into())),
            ("1 + 2", Err("not a literal".into())),
            ("--1", Err("not a literal".into())),
            ("-True", Err("not a literal".into())),
            ("Beijing", Err("not a literal".into())),
            ("f'x'", Err("not a literal".into())),
            ("012", Err("not a literal".into())),
            ("'a\nb'", Err("not a literal".into())),
            ("[1, 2", Err("not a literal".into())),
            ("1 2", Err("not a literal".into())),
            ("[1,\n 2]\n", ok("[1, 2]")),
        ];
        for (text, expected) in cases {
            assert_eq!(json(text), expected, "{text:?}");
        }
    }
}

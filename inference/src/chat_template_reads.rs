//! What a chat template reads of the messages, worked out as vLLM (0.25.1, the network's;
//! `renderers/hf.py`) works it out before rendering, because it decides the messages the
//! template is given:
//!
//! - **the content format**: a template that loops over a message's content (`{% for part in
//!   message.content %}`, or over a variable named `content`) is given every message's content
//!   as a list of parts (`[{"type": "text", "text": …}]`, "openai"); any other is given text,
//!   its parts joined by a line break ("string"). MiniMax-M2's and GLM's templates loop (their
//!   `visible_text` macro); Qwen's do not.
//! - **whether it knows the developer role** (its text names `"developer"`): where it does not,
//!   vLLM hands developer turns over as system turns.
//!
//! The detection is vLLM's heuristic restated on minijinja's syntax tree (`unstable_machinery`,
//! pinned by `Cargo.lock`): the variables assigned from `messages` (`{% set m = messages[1:]
//! %}`, through filters, tests and slices), the loops over them, and a loop over a message's
//! `content` or over `content`. Where vLLM's own walk would stop on a shape it does not expect
//! (a loop over messages unpacking several names, an attribute set from them), it falls back to
//! "string", and so does this.

use minijinja::machinery::ast::{Expr, Stmt};
use minijinja::machinery::{WhitespaceConfig, parse};
use minijinja::syntax::SyntaxConfig;

/// What of a template decides the messages it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TemplateReads {
    pub content: ContentFormat,
    /// Whether developer turns reach it as they are (else as system turns).
    pub knows_developer: bool,
}

impl TemplateReads {
    /// vLLM's findings for a template's source.
    pub fn of(source: &str) -> Self {
        Self { content: content_format(source), knows_developer: knows_developer(source) }
    }

    /// Text content, every role as it is: what DeepSeek-V4's encoding is given (vLLM's
    /// `deepseek_v4` renderer parses messages with the "string" format and converts nothing).
    pub const ENCODING: Self = Self { content: ContentFormat::String, knows_developer: true };
}

/// How a template is given each message's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentFormat {
    /// Text: text parts joined by a line break.
    String,
    /// A list of parts: `{"type": "text", "text": …}` each, plain text as one part.
    OpenAi,
}

/// The content format vLLM detects for this template's source; "string" where it does not parse.
pub fn content_format(source: &str) -> ContentFormat {
    let whitespace = WhitespaceConfig { keep_trailing_newline: false, lstrip_blocks: true, trim_blocks: true };
    // (A unit struct unless minijinja's `custom_syntax` is on; `Default` works either way.)
    let syntax: SyntaxConfig = Default::default();
    let Ok(template) = parse(source, "chat", syntax, whitespace) else {
        return ContentFormat::String;
    };
    let mut statements = Vec::new();
    walk(&template, &mut statements);
    match loops_over_content(&statements) {
        Some(true) => ContentFormat::OpenAi,
        // No such loop, or a shape vLLM's walk stops on.
        Some(false) | None => ContentFormat::String,
    }
}

/// Whether the template knows the developer role (vLLM: its text has `"developer"` or
/// `'developer'`).
pub fn knows_developer(source: &str) -> bool {
    source.contains("\"developer\"") || source.contains("'developer'")
}

/// Every statement, in the order Jinja2's `find_all` visits them (a node before its children).
fn walk<'s, 'a>(statement: &'s Stmt<'a>, out: &mut Vec<&'s Stmt<'a>>) {
    out.push(statement);
    let children: Vec<&Vec<Stmt<'a>>> = match statement {
        Stmt::Template(t) => vec![&t.children],
        Stmt::ForLoop(f) => vec![&f.body, &f.else_body],
        Stmt::IfCond(i) => vec![&i.true_body, &i.false_body],
        Stmt::WithBlock(w) => vec![&w.body],
        Stmt::SetBlock(s) => vec![&s.body],
        Stmt::AutoEscape(a) => vec![&a.body],
        Stmt::FilterBlock(f) => vec![&f.body],
        Stmt::Macro(m) => vec![&m.body],
        Stmt::CallBlock(c) => vec![&c.macro_decl.body],
        _ => Vec::new(),
    };
    for child in children.into_iter().flatten() {
        walk(child, out);
    }
}

/// `varname` itself, or (with `key`) its `key` attribute or item, seen through filters, tests
/// and slices (vLLM's `_is_var_or_elems_access`).
fn accesses(expr: &Expr, varname: &str, key: Option<&str>) -> bool {
    match expr {
        Expr::Filter(f) => f.expr.as_ref().is_some_and(|e| accesses(e, varname, key)),
        Expr::Test(t) => accesses(&t.expr, varname, key),
        Expr::Slice(s) => accesses(&s.expr, varname, key),
        _ => match key {
            None => is_var(expr, varname),
            Some(key) => match expr {
                Expr::GetAttr(g) => g.name == key && is_var(&g.expr, varname),
                Expr::GetItem(g) => {
                    matches!(&g.subscript_expr, Expr::Const(c) if c.value.as_str() == Some(key))
                        && is_var(&g.expr, varname)
                }
                _ => false,
            },
        },
    }
}

fn is_var(expr: &Expr, varname: &str) -> bool {
    matches!(expr, Expr::Var(v) if v.id == varname)
}

fn var_name<'a>(expr: &Expr<'a>) -> Option<&'a str> {
    match expr {
        Expr::Var(v) => Some(v.id),
        _ => None,
    }
}

/// `Some(true)` where a loop goes over a message's content (or over `content`), `Some(false)`
/// where none does, `None` where vLLM's walk would stop first.
fn loops_over_content(statements: &[&Stmt]) -> Option<bool> {
    // `messages` and every variable assigned from one of them.
    let mut messages = vec!["messages"];
    let mut queue = vec!["messages"];
    while let Some(related) = queue.pop() {
        for statement in statements {
            let Stmt::Set(set) = statement else { continue };
            if accesses(&set.expr, related, None) {
                let name = var_name(&set.target)?;
                if !messages.contains(&name) {
                    messages.push(name);
                    queue.push(name);
                }
            }
        }
    }
    // The loops over them name a message.
    let mut message_vars = Vec::new();
    for statement in statements {
        let Stmt::ForLoop(l) = statement else { continue };
        if messages.iter().any(|m| accesses(&l.iter, m, None)) {
            message_vars.push(var_name(&l.target)?);
        }
    }
    for statement in statements {
        let Stmt::ForLoop(l) = statement else { continue };
        let over_content =
            message_vars.iter().any(|m| accesses(&l.iter, m, Some("content"))) || is_var(&l.iter, "content");
        if over_content {
            return var_name(&l.target).map(|_| true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes vLLM's heuristic tells apart (its own verdicts on these are recorded in the
    /// daemon's conversation tests).
    #[test]
    fn loops_over_a_messages_content_make_it_openai() {
        use ContentFormat::{OpenAi, String};
        let cases = [
            ("{% for m in messages %}{{ m.content }}{% endfor %}", String),
            ("{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}", OpenAi),
            ("{% for m in messages %}{% for p in m['content'] %}{{ p }}{% endfor %}{% endfor %}", OpenAi),
            ("{% for m in messages %}{% for p in m.content | list %}{{ p }}{% endfor %}{% endfor %}", OpenAi),
            // Through an assignment and a slice.
            (
                "{% set rest = messages[1:] %}{% for m in rest %}{% for p in m.content %}{% endfor %}{% endfor %}",
                OpenAi,
            ),
            // A loop over a variable called `content`, wherever it comes from (a macro's argument).
            ("{% macro text(content) %}{% for p in content %}{{ p.text }}{% endfor %}{% endmacro %}", OpenAi),
            // A message's other fields, or content of something that is not a message.
            ("{% for m in messages %}{% for c in m.tool_calls %}{% endfor %}{% endfor %}", String),
            ("{% for t in tools %}{% for p in t.content %}{% endfor %}{% endfor %}", String),
            // vLLM's walk stops on a loop over messages that unpacks two names.
            ("{% for a, b in messages|batch(2) %}{% endfor %}{% for p in content %}{% endfor %}", String),
            ("{% for m in messages %}", String),
        ];
        for (template, expected) in cases {
            assert_eq!(content_format(template), expected, "{template}");
        }
        assert!(knows_developer("{% if m.role == 'developer' %}"));
        assert!(!knows_developer("{% if m.role == 'system' %}developer{% endif %}"));
    }
}

//! Rule-file text to the [`RuleFile`] syntax tree: a hand-written recursive-descent
//! parser straight over the source (no separate token stream), so every node and
//! every error carries an exact byte span. Predicates after `where`/`when` are handed
//! to [`Query::parse_prefix`]. Blocks, lists and maps are capped at [`MAX_DEPTH`]
//! levels, so no input can exhaust the stack. The first error ends the parse.

use std::fmt::Display;

use super::ast::{
    Arg, Block, Ident, OutputDecl, RuleFile, Span, Stmt, TestAction, TestCase, TestStep, Value,
    ValueKind, WhenClause,
};
use super::diag::{Diagnostic, closest, line_col};
use crate::clock::Micros;
use crate::query::Query;

/// How many blocks, lists and maps may be open at once.
const MAX_DEPTH: usize = 64;

/// Words with a meaning of their own; none of them can name a stream or an output.
const KEYWORDS: &[&str] = &[
    "where", "split", "when", "else", "output", "streams", "test",
];

/// The top-level item keywords, for "did you mean" hints.
const ITEMS: [&str; 3] = ["output", "streams", "test"];

/// What the query language skips between tokens (it treats commas as whitespace).
fn is_query_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n' | ',')
}

/// Parses a whole rule file; the error is the first syntax error found.
pub fn parse(source: &str) -> Result<RuleFile, Diagnostic> {
    // Editors on Windows may save a byte-order mark; it is not part of the text.
    let start = if source.starts_with('\u{feff}') {
        '\u{feff}'.len_utf8()
    } else {
        0
    };
    Parser {
        src: source,
        pos: start,
        last_end: start,
        depth: 0,
    }
    .file()
}

type Parsed<T> = Result<T, Diagnostic>;

struct Parser<'a> {
    src: &'a str,
    /// Where reading continues; may sit after whitespace and comments already skipped.
    pos: usize,
    /// End of the last consumed token: spans end here, never in trailing trivia.
    last_end: usize,
    /// Blocks, lists and maps currently open.
    depth: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_continue(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn did_you_mean(found: &str, candidates: &[&'static str]) -> Option<String> {
    closest(found, candidates.iter().copied()).map(|word| format!("did you mean `{word}`?"))
}

impl<'a> Parser<'a> {
    // ---- low-level reading -------------------------------------------------------

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn bump(&mut self, bytes: usize) {
        self.pos += bytes;
        self.last_end = self.pos;
    }

    /// The position after any whitespace and `#` comments starting at `from`.
    fn trivia_end(&self, from: usize) -> usize {
        let mut pos = from;
        loop {
            let rest = &self.src[pos..];
            let trimmed = rest.trim_start();
            pos += rest.len() - trimmed.len();
            if !trimmed.starts_with('#') {
                return pos;
            }
            pos += trimmed.find('\n').unwrap_or(trimmed.len());
        }
    }

    fn skip_trivia(&mut self) {
        self.pos = self.trivia_end(self.pos);
    }

    /// Skips trivia and reports whether the next character is `c`.
    fn at_char(&mut self, c: char) -> bool {
        self.skip_trivia();
        self.peek() == Some(c)
    }

    fn eat_char(&mut self, c: char) -> bool {
        let found = self.at_char(c);
        if found {
            self.bump(c.len_utf8());
        }
        found
    }

    /// The identifier starting exactly at `at`, without consuming it.
    fn ident_at(&self, at: usize) -> Option<&'a str> {
        let rest = &self.src[at..];
        if !rest.starts_with(is_ident_start) {
            return None;
        }
        let len = rest.find(|c| !is_ident_continue(c)).unwrap_or(rest.len());
        Some(&rest[..len])
    }

    /// Skips trivia and returns the identifier that follows, without consuming it.
    fn peek_ident(&mut self) -> Option<&'a str> {
        self.skip_trivia();
        self.ident_at(self.pos)
    }

    fn at_word(&mut self, word: &str) -> bool {
        self.peek_ident() == Some(word)
    }

    /// Consumes `word`, which the caller has just peeked.
    fn take_ident(&mut self, word: &str) -> Ident {
        let start = self.pos;
        self.bump(word.len());
        Ident {
            name: word.to_owned(),
            span: start..self.pos,
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        line_col(self.src, offset).0
    }

    // ---- errors ------------------------------------------------------------------

    /// The span and description of the token at `pos` (trivia already skipped). At
    /// the end of the file the span is an empty one right after the last text, so the
    /// caret lands where something is missing rather than on a blank last line.
    fn found(&self) -> (Span, String) {
        const MAX_CHARS: usize = 24;
        let rest = &self.src[self.pos..];
        let Some(first) = rest.chars().next() else {
            let end = self.src.trim_end().len();
            return (end..end, "end of file".to_owned());
        };
        let len = if first == '"' {
            return (self.pos..self.pos + 1, "a string".to_owned());
        } else if is_ident_continue(first)
            || (first == '-' && rest[1..].starts_with(|c: char| c.is_ascii_digit()))
        {
            // A word or a number (with its unit), shown whole.
            1 + rest[1..]
                .find(|c: char| !(is_ident_continue(c) || c == '.'))
                .unwrap_or(rest.len() - 1)
        } else {
            first.len_utf8()
        };
        let text = &rest[..len];
        let shown = match text.char_indices().nth(MAX_CHARS) {
            Some((cut, _)) => format!("`{}…`", &text[..cut]),
            None => format!("`{text}`"),
        };
        (self.pos..self.pos + len, shown)
    }

    /// "expected X, found Y" at the next token.
    fn unexpected(&mut self, expected: impl Display) -> Diagnostic {
        self.skip_trivia();
        let (span, found) = self.found();
        Diagnostic::new(span, format!("expected {expected}, found {found}"))
    }

    /// The error for a bracket opened at `open` that the file never closes.
    fn unclosed(&mut self, close: char, what: &str, open: usize) -> Diagnostic {
        let line = self.line_of(open);
        self.unexpected(format_args!(
            "`{close}` to close the {what} opened at line {line}"
        ))
    }

    /// Skips trivia and reports whether `close` comes next; the end of the file
    /// there is an error about the `what` opened at `open`.
    fn at_close(&mut self, close: char, what: &str, open: usize) -> Parsed<bool> {
        if self.at_char(close) {
            return Ok(true);
        }
        if self.peek().is_none() {
            return Err(self.unclosed(close, what, open));
        }
        Ok(false)
    }

    /// After an element of a list opened at `open`: a `,`, or the `close` that ends
    /// the list (left for the caller's loop to consume).
    fn separator(&mut self, close: char, what: &str, open: usize) -> Parsed<()> {
        if self.eat_char(',') || self.at_close(close, what, open)? {
            return Ok(());
        }
        Err(self.unexpected(format_args!("`,` or `{close}` in the {what}")))
    }

    /// Opens one nesting level at the bracket at `open`.
    fn enter(&mut self, open: usize) -> Parsed<()> {
        if self.depth >= MAX_DEPTH {
            return Err(Diagnostic::new(
                open..open + 1,
                format!("nested too deeply (max {MAX_DEPTH})"),
            ));
        }
        self.depth += 1;
        Ok(())
    }

    // ---- top level ---------------------------------------------------------------

    fn file(mut self) -> Parsed<RuleFile> {
        let mut file = RuleFile::default();
        loop {
            let start = self.trivia_end(self.pos);
            let Some(word) = self.peek_ident() else {
                if self.peek().is_none() {
                    return Ok(file);
                }
                return Err(self.unexpected("`output`, `streams` or `test`"));
            };
            match word {
                "output" => file.outputs.push(self.output(start)?),
                "streams" => {
                    self.bump(word.len());
                    let block = self.block("`streams` block")?;
                    file.streams.extend(block.stmts);
                }
                "test" => file.tests.push(self.test(start)?),
                other => {
                    let hint = did_you_mean(other, &ITEMS).unwrap_or_else(|| {
                        "a rule file holds `output`, `streams` and `test` items; \
                         streams go inside `streams { … }`"
                            .to_owned()
                    });
                    return Err(Diagnostic::new(
                        start..start + other.len(),
                        format!("unknown item `{other}`"),
                    )
                    .with_hint(hint));
                }
            }
        }
    }

    /// `output NAME = KIND(args)`; `start` is at `output`.
    fn output(&mut self, start: usize) -> Parsed<OutputDecl> {
        self.bump("output".len());
        let Some(word) = self.peek_ident() else {
            return Err(self.unexpected("a name for the output"));
        };
        if KEYWORDS.contains(&word) {
            return Err(Diagnostic::new(
                self.pos..self.pos + word.len(),
                format!("`{word}` is a keyword and cannot name an output"),
            ));
        }
        let name = self.take_ident(word);
        if !self.eat_char('=') {
            return Err(self.unexpected("`=` after the output's name"));
        }
        let Some(word) = self.peek_ident() else {
            return Err(self.unexpected("an output kind, e.g. `graphite`"));
        };
        let kind = self.take_ident(word);
        if !self.at_char('(') {
            return Err(self.unexpected("`(` after the output kind").with_hint(
                "write `output NAME = KIND(args)`, with `()` when there are no arguments",
            ));
        }
        let args = self.args()?;
        Ok(OutputDecl {
            name,
            kind,
            args,
            span: start..self.last_end,
        })
    }

    /// `test "name" { step* }`; `start` is at `test`.
    fn test(&mut self, start: usize) -> Parsed<TestCase> {
        self.bump("test".len());
        if !self.at_char('"') {
            return Err(self.unexpected("the test's name as a string, e.g. `test \"pages\" {`"));
        }
        let name = self.string()?;
        if !self.at_char('{') {
            return Err(self.unexpected("`{` to open the test"));
        }
        let open = self.pos;
        self.enter(open)?;
        self.bump(1);
        let mut steps = Vec::new();
        loop {
            if self.at_close('}', "test", open)? {
                break;
            }
            steps.push(self.step()?);
            self.eat_char(';');
        }
        self.bump(1);
        self.depth -= 1;
        Ok(TestCase {
            name,
            steps,
            span: start..self.last_end,
        })
    }

    /// `[at DURATION] (send VALUE | expect [no] TARGET VALUE)`.
    fn step(&mut self) -> Parsed<TestStep> {
        let start = self.pos;
        let at = if self.at_word("at") {
            self.bump("at".len());
            let value = self.value()?;
            let ValueKind::Duration(micros) = value.kind else {
                return Err(Diagnostic::new(
                    value.span,
                    "expected a duration after `at`, e.g. `at 5s`",
                )
                .with_hint("durations take a unit: ms, s, m, h or d"));
            };
            Some(micros)
        } else {
            None
        };
        let action = match self.peek_ident() {
            Some("send") => {
                self.bump("send".len());
                TestAction::Send(self.value()?)
            }
            Some("expect") => {
                self.bump("expect".len());
                // `no` negates only when a target follows; `expect no {…}` targets `no`.
                let negated = self.peek_ident() == Some("no")
                    && self.ident_at(self.trivia_end(self.pos + 2)).is_some();
                if negated {
                    self.bump("no".len());
                }
                let Some(word) = self.peek_ident() else {
                    return Err(self.unexpected("`index` or an output name after `expect`"));
                };
                let target = self.take_ident(word);
                TestAction::Expect {
                    target,
                    fields: self.value()?,
                    negated,
                }
            }
            Some(other) => {
                let span = self.pos..self.pos + other.len();
                let hint = did_you_mean(other, &["send", "expect", "at"]).unwrap_or_else(|| {
                    "a step is `send {…}` or `expect TARGET {…}`, optionally after `at DURATION`"
                        .to_owned()
                });
                return Err(
                    Diagnostic::new(span, format!("unknown test step `{other}`")).with_hint(hint),
                );
            }
            None => return Err(self.unexpected("`send`, `expect` or `}`")),
        };
        Ok(TestStep {
            at,
            action,
            span: start..self.last_end,
        })
    }

    // ---- statements --------------------------------------------------------------

    /// `{ stmt* }`; `what` names the block in errors.
    fn block(&mut self, what: &str) -> Parsed<Block> {
        if !self.at_char('{') {
            return Err(self.unexpected(format_args!("`{{` to open the {what}")));
        }
        let open = self.pos;
        self.enter(open)?;
        self.bump(1);
        let mut stmts = Vec::new();
        loop {
            if self.at_close('}', "block", open)? {
                break;
            }
            let stmt = self.stmt(&stmts)?;
            stmts.push(stmt);
            self.eat_char(';');
        }
        self.bump(1);
        self.depth -= 1;
        Ok(Block {
            stmts,
            span: open..self.last_end,
        })
    }

    /// One statement at `pos` (trivia skipped); `before` are the block's earlier
    /// statements, used to explain a misspelt `where`.
    fn stmt(&mut self, before: &[Stmt]) -> Parsed<Stmt> {
        let start = self.pos;
        let Some(word) = self.ident_at(start) else {
            return Err(self.not_a_stream(before));
        };
        let word_span = start..start + word.len();
        match word {
            "where" => {
                self.bump(word.len());
                let (pred, pred_span) = self.predicate(word)?;
                let body = self.block("`where` body")?;
                let else_body = self.else_block()?;
                Ok(Stmt::Where {
                    pred,
                    pred_span,
                    body,
                    else_body,
                    span: start..self.last_end,
                })
            }
            "split" => self.split(start),
            "else" => Err(
                Diagnostic::new(word_span, "`else` without a preceding block").with_hint(
                    "`else { … }` goes right after the `}` of a `where` or a stream's block",
                ),
            ),
            "when" => Err(Diagnostic::new(word_span, "`when` outside `split`")
                .with_hint("write `split { when PREDICATE { … } … }`")),
            "output" | "streams" | "test" => Err(Diagnostic::new(
                word_span,
                format!("`{word}` is only allowed at the top level of a file"),
            )
            .with_hint("is a `}` missing before it?")),
            _ => {
                let name = self.take_ident(word);
                let args = if self.at_char('(') {
                    Some(self.args()?)
                } else {
                    None
                };
                let body = if self.at_char('{') {
                    Some(self.block("block")?)
                } else {
                    None
                };
                // The compiler decides which streams accept an `else`.
                let else_body = if body.is_some() {
                    self.else_block()?
                } else {
                    None
                };
                Ok(Stmt::Call {
                    name,
                    args,
                    body,
                    else_body,
                    span: start..self.last_end,
                })
            }
        }
    }

    /// The error for something that cannot start a statement. A predicate-looking
    /// token after a bare name like `wher` on the same line is most likely a
    /// misspelt `where`.
    fn not_a_stream(&mut self, before: &[Stmt]) -> Diagnostic {
        let diagnostic = self.unexpected("a stream or `}`");
        let same_line = before
            .iter()
            .rev()
            .take_while(|stmt| !self.src[stmt.span().end..self.pos].contains('\n'));
        let hint = same_line
            .filter_map(|stmt| match stmt {
                Stmt::Call {
                    name,
                    args: None,
                    body: None,
                    ..
                } => did_you_mean(&name.name, &["where"]),
                _ => None,
            })
            .next();
        match hint {
            Some(hint) => diagnostic.with_hint(hint),
            None => diagnostic,
        }
    }

    fn else_block(&mut self) -> Parsed<Option<Block>> {
        if !self.at_word("else") {
            return Ok(None);
        }
        self.bump("else".len());
        Ok(Some(self.block("`else` body")?))
    }

    /// `split { (when PRED block)* [else block] }`; `start` is at `split`.
    fn split(&mut self, start: usize) -> Parsed<Stmt> {
        self.bump("split".len());
        if !self.at_char('{') {
            return Err(self.unexpected("`{` after `split`"));
        }
        let open = self.pos;
        self.enter(open)?;
        self.bump(1);
        let mut clauses = Vec::new();
        let mut default = None;
        loop {
            if self.at_close('}', "`split`", open)? {
                break;
            }
            if default.is_some() {
                return Err(self
                    .unexpected("`}` to close the `split`")
                    .with_hint("`else` must be the last clause of `split`"));
            }
            match self.peek_ident() {
                Some("when") => {
                    self.bump("when".len());
                    let (pred, pred_span) = self.predicate("when")?;
                    let body = self.block("`when` body")?;
                    clauses.push(WhenClause {
                        pred,
                        pred_span,
                        body,
                    });
                }
                Some("else") => {
                    self.bump("else".len());
                    default = Some(self.block("`else` body")?);
                }
                word => {
                    let hint = word.and_then(|word| did_you_mean(word, &["when", "else"]));
                    let diagnostic = self.unexpected("`when`, `else` or `}` in `split`");
                    return Err(match hint {
                        Some(hint) => diagnostic.with_hint(hint),
                        None => diagnostic,
                    });
                }
            }
        }
        self.bump(1);
        self.depth -= 1;
        Ok(Stmt::Split {
            clauses,
            default,
            span: start..self.last_end,
        })
    }

    /// The predicate after `keyword`, up to the first token that cannot continue it.
    fn predicate(&mut self, keyword: &str) -> Parsed<(Query, Span)> {
        self.skip_trivia();
        let start = self.pos;
        match Query::parse_prefix(&self.src[start..]) {
            Ok((query, consumed)) => {
                let text = &self.src[start..start + consumed];
                let leading = text.len() - text.trim_start_matches(is_query_space).len();
                let end = start + text.trim_end_matches(is_query_space).len();
                self.pos = end;
                self.last_end = end;
                Ok((query, start + leading..end))
            }
            Err(error) => {
                let at = (start + error.offset).min(self.src.len());
                let len = self.src[at..].chars().next().map_or(0, char::len_utf8);
                Err(Diagnostic::new(
                    at..at + len,
                    format!("invalid `{keyword}` predicate: {}", error.message),
                ))
            }
        }
    }

    /// `( [arg (, arg)* [,]] )`, at the `(`.
    fn args(&mut self) -> Parsed<Vec<Arg>> {
        let open = self.pos;
        self.bump(1);
        let mut args = Vec::new();
        loop {
            if self.at_close(')', "argument list", open)? {
                break;
            }
            args.push(self.arg()?);
            self.separator(')', "argument list", open)?;
        }
        self.bump(1);
        Ok(args)
    }

    /// `name: value` or a positional `value` (trivia skipped).
    fn arg(&mut self) -> Parsed<Arg> {
        let start = self.pos;
        let name = match self.ident_at(start) {
            Some(word) if self.src[self.trivia_end(start + word.len())..].starts_with(':') => {
                let name = self.take_ident(word);
                self.eat_char(':');
                Some(name)
            }
            _ => None,
        };
        let value = self.value()?;
        Ok(Arg {
            name,
            value,
            span: start..self.last_end,
        })
    }

    // ---- values ------------------------------------------------------------------

    fn value(&mut self) -> Parsed<Value> {
        self.skip_trivia();
        let start = self.pos;
        let kind = match self.peek() {
            Some('"') => ValueKind::String(self.string()?),
            Some('[') => self.list()?,
            Some('{') => self.map()?,
            Some(c) if c == '-' || c.is_ascii_digit() => self.number()?,
            Some(c) if is_ident_start(c) => self.word_value()?,
            _ => return Err(self.unexpected("a value")),
        };
        Ok(Value {
            kind,
            span: start..self.last_end,
        })
    }

    /// A value spelt as a word: a constant, `env("NAME")` or a bare name.
    fn word_value(&mut self) -> Parsed<ValueKind> {
        let word = self.ident_at(self.pos).unwrap_or_default();
        self.bump(word.len());
        Ok(match word {
            "true" => ValueKind::Bool(true),
            "false" => ValueKind::Bool(false),
            "null" | "nil" => ValueKind::Null,
            "env" if self.eat_char('(') => {
                if !self.at_char('"') {
                    return Err(
                        self.unexpected("the variable's name as a string, e.g. `env(\"KEY\")`")
                    );
                }
                let name = self.string()?;
                if !self.eat_char(')') {
                    return Err(self.unexpected("`)` after the variable's name"));
                }
                ValueKind::Env(name)
            }
            _ => ValueKind::Ident(word.to_owned()),
        })
    }

    /// A double-quoted string at `pos`; strings end on their own line.
    fn string(&mut self) -> Parsed<String> {
        let start = self.pos;
        let mut out = String::new();
        let mut chars = self.src[start + 1..].char_indices();
        while let Some((i, c)) = chars.next() {
            let at = start + 1 + i;
            match c {
                '"' => {
                    self.bump(at + 1 - start);
                    return Ok(out);
                }
                '\n' => break,
                '\\' => match chars.next() {
                    Some((_, '"')) => out.push('"'),
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, 'r')) => out.push('\r'),
                    Some((_, '\n')) | None => break,
                    Some((_, other)) => {
                        return Err(Diagnostic::new(
                            at..at + 1 + other.len_utf8(),
                            format!("unknown escape `\\{other}` in string"),
                        )
                        .with_hint(r#"the escapes are \" \\ \n \t and \r"#));
                    }
                },
                c => out.push(c),
            }
        }
        let line_end = self.src[start..]
            .find('\n')
            .map_or(self.src.len(), |i| start + i);
        Err(Diagnostic::new(start..line_end, "unterminated string")
            .with_hint(r#"close it with `"` on the same line; write a line break as \n"#))
    }

    /// A number, or a duration when a unit follows it directly (`500ms`, `1.5s`).
    fn number(&mut self) -> Parsed<ValueKind> {
        let start = self.pos;
        let bytes = self.src.as_bytes();
        let digits_from = |i: usize| {
            bytes[i.min(bytes.len())..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count()
        };
        let mut end = start + usize::from(bytes[start] == b'-');
        let integer = digits_from(end);
        if integer == 0 {
            return Err(Diagnostic::new(
                start..start + 1,
                "expected a digit after `-`",
            ));
        }
        end += integer;
        if bytes.get(end) == Some(&b'.') && digits_from(end + 1) > 0 {
            end += 1 + digits_from(end + 1);
        }
        if matches!(bytes.get(end), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(bytes.get(end + 1), Some(b'+' | b'-')));
            let exponent = digits_from(end + 1 + sign);
            if exponent > 0 {
                end += 1 + sign + exponent;
            }
        }
        let unit_len = self.src[end..]
            .find(|c: char| !is_ident_continue(c))
            .unwrap_or(self.src.len() - end);
        let text = &self.src[start..end];
        let unit = &self.src[end..end + unit_len];
        self.bump(end + unit_len - start);
        if unit.is_empty() {
            return match text.parse::<f64>() {
                Ok(number) if number.is_finite() => Ok(ValueKind::Number(number)),
                _ => Err(Diagnostic::new(
                    start..end,
                    format!("number `{text}` is out of range"),
                )),
            };
        }
        let Some(per_unit) = micros_per_unit(unit) else {
            return Err(Diagnostic::new(
                end..end + unit_len,
                format!("unknown duration unit `{unit}` (use ms, s, m, h or d)"),
            ));
        };
        duration_micros(text, per_unit)
            .map(ValueKind::Duration)
            .map_err(|message| Diagnostic::new(start..self.last_end, message))
    }

    fn list(&mut self) -> Parsed<ValueKind> {
        let open = self.pos;
        self.enter(open)?;
        self.bump(1);
        let mut items = Vec::new();
        loop {
            if self.at_close(']', "list", open)? {
                break;
            }
            items.push(self.value()?);
            self.separator(']', "list", open)?;
        }
        self.bump(1);
        self.depth -= 1;
        Ok(ValueKind::List(items))
    }

    /// `{key: value, …}`; keys are names or strings.
    fn map(&mut self) -> Parsed<ValueKind> {
        let open = self.pos;
        self.enter(open)?;
        self.bump(1);
        let mut entries = Vec::new();
        loop {
            if self.at_close('}', "map", open)? {
                break;
            }
            let key_start = self.pos;
            let key = if let Some(word) = self.ident_at(key_start) {
                self.take_ident(word)
            } else if self.peek() == Some('"') {
                let name = self.string()?;
                Ident {
                    name,
                    span: key_start..self.last_end,
                }
            } else {
                return Err(self.unexpected("a key (a name or a string)"));
            };
            if !self.eat_char(':') {
                return Err(self.unexpected(format_args!("`:` after the key `{}`", key.name)));
            }
            entries.push((key, self.value()?));
            self.separator('}', "map", open)?;
        }
        self.bump(1);
        self.depth -= 1;
        Ok(ValueKind::Map(entries))
    }
}

fn micros_per_unit(unit: &str) -> Option<Micros> {
    Some(match unit {
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        _ => return None,
    })
}

/// `text` (a number literal) times `per_unit`, exact for integers.
fn duration_micros(text: &str, per_unit: Micros) -> Result<Micros, String> {
    if text.starts_with('-') {
        return Err("a duration cannot be negative".to_owned());
    }
    let too_large = || format!("duration `{text}` is too large");
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<Micros>()
            .ok()
            .and_then(|n| n.checked_mul(per_unit))
            .ok_or_else(too_large);
    }
    let micros = (text.parse::<f64>().map_err(|_| too_large())? * per_unit as f64).round();
    // `Micros::MAX as f64` rounds up to 2^63, so `<` keeps the cast in range.
    if micros.is_finite() && micros < Micros::MAX as f64 {
        Ok(micros as Micros)
    } else {
        Err(too_large())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"# Outputs are declared once and referenced by name in streams.
output pager = pagerduty(routing_key: env("VIGIL_PAGERDUTY_KEY"))
output graph = graphite(host: "127.0.0.1", port: 2003)
output push  = webhook(url: "http://127.0.0.1:9000/push", headers: {"X-Token": env("T"), accept: "json"})

streams {
  default(ttl: 300, state: "ok") {                  # fill fields the event lacks
    index
    where tagged "push" { push }
    where service = "curl json-rabbitmq/gauge-queue totals-messages" {
      with(ttl: 120, service: "rabbitmq backlog", tags: ["notify"]) {
        where metric > 300 or state = "expired" {
          with(state: "critical") { reinject }      # back to the top of `streams`
        } else {
          with(state: "ok") { reinject }
        }
      }
    }
    split {
      when metric > 60 { with(state: "critical") { index } }
      when metric > 5 { with(state: "warning") { index } }
      else { with(state: "ok") { index } }
    }
    by(host, service) { changed(state) { pager } }
    graph
    rate(5s) {
      with(service: "vigil events/s", host: "vigil", tags: [], description: null) { index }
    }
    fixed_time_window(1m) { mean { index } }
    percentiles(10s, [0.5, 0.95, 0.99]) { graph }
    throttle(5, 1h) { log(warn) }
  }
}

test "backlog pages" {
  at 0s send {host: "rmq1", service: "curl json-rabbitmq/gauge-queue totals-messages", metric: 400};
  at 5s expect pager {state: "critical", service: "rabbitmq backlog"}
  expect index {service: "rabbitmq backlog", state: "critical"}
  expect no graph {service: "nope"}
}
"#;

    fn parse_ok(src: &str) -> RuleFile {
        parse(src).unwrap_or_else(|d| panic!("{}", d.render("test.vigil", src)))
    }

    /// The statements of a one-`streams`-block file.
    fn stmts(src: &str) -> Vec<Stmt> {
        parse_ok(src).streams
    }

    /// The only argument value of `streams { x(VALUE) }`.
    fn value(text: &str) -> ValueKind {
        let src = format!("streams {{ x({text}) }}");
        let Stmt::Call {
            args: Some(mut args),
            ..
        } = stmts(&src).remove(0)
        else {
            panic!("not a call with args");
        };
        assert_eq!(args.len(), 1);
        let arg = args.remove(0);
        assert_eq!(&src[arg.value.span.clone()], text);
        arg.value.kind
    }

    fn error(src: &str) -> String {
        match parse(src) {
            Ok(file) => panic!("parsed: {file:?}"),
            Err(diagnostic) => diagnostic.render("rules/x.vigil", src),
        }
    }

    fn call(stmt: &Stmt) -> (&str, Option<&Vec<Arg>>, Option<&Block>, Option<&Block>) {
        match stmt {
            Stmt::Call {
                name,
                args,
                body,
                else_body,
                ..
            } => (
                name.name.as_str(),
                args.as_ref(),
                body.as_ref(),
                else_body.as_ref(),
            ),
            other => panic!("not a call: {other:?}"),
        }
    }

    fn assert_bare(stmt: &Stmt, expected: &str) {
        let (name, args, body, else_body) = call(stmt);
        assert_eq!(name, expected);
        assert!(
            args.is_none() && body.is_none() && else_body.is_none(),
            "{stmt:?}"
        );
    }

    fn names(block: &[Stmt]) -> Vec<&str> {
        block
            .iter()
            .map(|stmt| match stmt {
                Stmt::Call { name, .. } => name.name.as_str(),
                Stmt::Where { .. } => "where",
                Stmt::Split { .. } => "split",
            })
            .collect()
    }

    fn string(text: &str) -> ValueKind {
        ValueKind::String(text.to_owned())
    }

    // ---- the full example ----------------------------------------------------------

    #[test]
    fn example_outputs() {
        let file = parse_ok(EXAMPLE);
        let outputs = &file.outputs;
        assert_eq!(outputs.len(), 3);
        assert_eq!(
            outputs
                .iter()
                .map(|o| (o.name.name.as_str(), o.kind.name.as_str()))
                .collect::<Vec<_>>(),
            [
                ("pager", "pagerduty"),
                ("graph", "graphite"),
                ("push", "webhook")
            ]
        );
        let pager = &outputs[0];
        assert_eq!(
            &EXAMPLE[pager.span.clone()],
            r#"output pager = pagerduty(routing_key: env("VIGIL_PAGERDUTY_KEY"))"#
        );
        assert_eq!(&EXAMPLE[pager.name.span.clone()], "pager");
        assert_eq!(&EXAMPLE[pager.kind.span.clone()], "pagerduty");
        assert_eq!(
            pager.args[0].value.kind,
            ValueKind::Env("VIGIL_PAGERDUTY_KEY".into())
        );
        assert_eq!(
            &EXAMPLE[pager.args[0].span.clone()],
            r#"routing_key: env("VIGIL_PAGERDUTY_KEY")"#
        );

        let graph = &outputs[1];
        assert_eq!(graph.args.len(), 2);
        assert_eq!(graph.args[0].name.as_ref().unwrap().name, "host");
        assert_eq!(graph.args[0].value.kind, string("127.0.0.1"));
        assert_eq!(graph.args[1].value.kind, ValueKind::Number(2003.0));

        let ValueKind::Map(headers) = &outputs[2].args[1].value.kind else {
            panic!("headers is not a map");
        };
        assert_eq!(headers.len(), 2);
        assert_eq!(headers[0].0.name, "X-Token");
        assert_eq!(&EXAMPLE[headers[0].0.span.clone()], "\"X-Token\"");
        assert_eq!(headers[0].1.kind, ValueKind::Env("T".into()));
        assert_eq!(headers[1].0.name, "accept");
        assert_eq!(headers[1].1.kind, string("json"));
    }

    #[test]
    fn example_streams() {
        let file = parse_ok(EXAMPLE);
        assert_eq!(file.streams.len(), 1);
        let (name, args, body, else_body) = call(&file.streams[0]);
        assert_eq!(name, "default");
        assert_eq!(args.unwrap().len(), 2);
        assert!(else_body.is_none());
        let body = body.unwrap();
        assert!(EXAMPLE[body.span.clone()].starts_with("{                  # fill"));
        assert!(EXAMPLE[body.span.clone()].ends_with("log(warn) }\n  }"));
        assert_eq!(
            names(&body.stmts),
            [
                "index",
                "where",
                "where",
                "split",
                "by",
                "graph",
                "rate",
                "fixed_time_window",
                "percentiles",
                "throttle"
            ]
        );
        let stmts = &body.stmts;
        assert_bare(&stmts[0], "index");
        assert_eq!(&EXAMPLE[stmts[0].span().clone()], "index");

        let Stmt::Where {
            pred,
            pred_span,
            body,
            else_body: None,
            span,
        } = &stmts[1]
        else {
            panic!("not a where without else");
        };
        assert_eq!(pred.as_str(), r#"tagged "push""#);
        assert_eq!(&EXAMPLE[pred_span.clone()], r#"tagged "push""#);
        assert_eq!(&EXAMPLE[span.clone()], r#"where tagged "push" { push }"#);
        assert_eq!(&EXAMPLE[body.span.clone()], "{ push }");

        // where … { with(…) { where … { … } else { … } } }
        let Stmt::Where { body, .. } = &stmts[2] else {
            panic!("not a where")
        };
        let (name, args, with_body, _) = call(&body.stmts[0]);
        assert_eq!(name, "with");
        let args = args.unwrap();
        assert_eq!(args[0].value.kind, ValueKind::Number(120.0));
        assert_eq!(
            args[2].value.kind,
            ValueKind::List(vec![Value {
                kind: string("notify"),
                span: args[2].value.span.start + 1..args[2].value.span.end - 1
            }])
        );
        let Stmt::Where {
            pred,
            pred_span,
            body,
            else_body: Some(else_body),
            ..
        } = &with_body.unwrap().stmts[0]
        else {
            panic!("not a where with else");
        };
        assert_eq!(
            &EXAMPLE[pred_span.clone()],
            r#"metric > 300 or state = "expired""#
        );
        assert_eq!(pred.as_str(), r#"metric > 300 or state = "expired""#);
        assert_eq!(names(&body.stmts), ["with"]);
        let (_, args, inner, _) = call(&else_body.stmts[0]);
        assert_eq!(args.unwrap()[0].value.kind, string("ok"));
        assert_eq!(names(&inner.unwrap().stmts), ["reinject"]);

        let Stmt::Split {
            clauses,
            default: Some(default),
            span,
        } = &stmts[3]
        else {
            panic!("not a split with else");
        };
        assert!(EXAMPLE[span.clone()].starts_with("split {"));
        assert!(EXAMPLE[span.clone()].ends_with("{ index } }\n    }"));
        assert_eq!(clauses.len(), 2);
        assert_eq!(&EXAMPLE[clauses[0].pred_span.clone()], "metric > 60");
        assert_eq!(&EXAMPLE[clauses[1].pred_span.clone()], "metric > 5");
        assert_eq!(
            &EXAMPLE[clauses[1].body.span.clone()],
            r#"{ with(state: "warning") { index } }"#
        );
        assert_eq!(
            &EXAMPLE[default.span.clone()],
            r#"{ with(state: "ok") { index } }"#
        );

        let (_, args, body, _) = call(&stmts[4]);
        let fields: Vec<_> = args
            .unwrap()
            .iter()
            .map(|a| (a.name.is_none(), a.value.kind.clone()))
            .collect();
        assert_eq!(
            fields,
            [
                (true, ValueKind::Ident("host".into())),
                (true, ValueKind::Ident("service".into()))
            ]
        );
        assert_eq!(names(&body.unwrap().stmts), ["changed"]);

        assert_bare(&stmts[5], "graph");

        let (_, args, body, _) = call(&stmts[6]);
        assert_eq!(args.unwrap()[0].value.kind, ValueKind::Duration(5_000_000));
        let (_, args, _, _) = call(&body.unwrap().stmts[0]);
        let args = args.unwrap();
        assert_eq!(args[2].value.kind, ValueKind::List(vec![]));
        assert_eq!(args[3].value.kind, ValueKind::Null);

        let (_, args, _, _) = call(&stmts[7]);
        assert_eq!(args.unwrap()[0].value.kind, ValueKind::Duration(60_000_000));

        let (_, args, _, _) = call(&stmts[8]);
        let args = args.unwrap();
        assert_eq!(args[0].value.kind, ValueKind::Duration(10_000_000));
        let ValueKind::List(quantiles) = &args[1].value.kind else {
            panic!("not a list")
        };
        let quantiles: Vec<_> = quantiles.iter().map(|v| v.kind.clone()).collect();
        assert_eq!(quantiles, [0.5, 0.95, 0.99].map(ValueKind::Number));
        assert_eq!(&EXAMPLE[args[1].span.clone()], "[0.5, 0.95, 0.99]");

        let (_, args, body, _) = call(&stmts[9]);
        let args = args.unwrap();
        assert_eq!(args[0].value.kind, ValueKind::Number(5.0));
        assert_eq!(args[1].value.kind, ValueKind::Duration(3_600_000_000));
        let (name, args, _, _) = call(&body.unwrap().stmts[0]);
        assert_eq!(name, "log");
        assert_eq!(args.unwrap()[0].value.kind, ValueKind::Ident("warn".into()));
    }

    #[test]
    fn example_test_case() {
        let file = parse_ok(EXAMPLE);
        assert_eq!(file.tests.len(), 1);
        let test = &file.tests[0];
        assert_eq!(test.name, "backlog pages");
        assert!(EXAMPLE[test.span.clone()].starts_with("test \"backlog pages\" {"));
        assert!(EXAMPLE[test.span.clone()].ends_with("\"nope\"}\n}"));
        let steps = &test.steps;
        assert_eq!(steps.len(), 4);
        assert_eq!(
            steps.iter().map(|s| s.at).collect::<Vec<_>>(),
            [Some(0), Some(5_000_000), None, None]
        );

        let TestAction::Send(event) = &steps[0].action else {
            panic!("not a send")
        };
        let ValueKind::Map(fields) = &event.kind else {
            panic!("not a map")
        };
        assert_eq!(
            fields
                .iter()
                .map(|(k, _)| k.name.as_str())
                .collect::<Vec<_>>(),
            ["host", "service", "metric"]
        );
        assert_eq!(fields[2].1.kind, ValueKind::Number(400.0));
        // The optional `;` is not part of the step.
        assert!(EXAMPLE[steps[0].span.clone()].starts_with("at 0s send {"));
        assert!(EXAMPLE[steps[0].span.clone()].ends_with("metric: 400}"));

        let TestAction::Expect {
            target,
            fields,
            negated: false,
        } = &steps[1].action
        else {
            panic!("not a plain expect")
        };
        assert_eq!(&EXAMPLE[target.span.clone()], "pager");
        assert_eq!(
            &EXAMPLE[fields.span.clone()],
            r#"{state: "critical", service: "rabbitmq backlog"}"#
        );
        assert_eq!(
            &EXAMPLE[steps[1].span.clone()],
            r#"at 5s expect pager {state: "critical", service: "rabbitmq backlog"}"#
        );

        let TestAction::Expect {
            target,
            negated: false,
            ..
        } = &steps[2].action
        else {
            panic!()
        };
        assert_eq!(target.name, "index");
        let TestAction::Expect {
            target,
            negated: true,
            ..
        } = &steps[3].action
        else {
            panic!()
        };
        assert_eq!(target.name, "graph");
        assert_eq!(
            &EXAMPLE[steps[3].span.clone()],
            r#"expect no graph {service: "nope"}"#
        );
    }

    // ---- one construct at a time -----------------------------------------------------

    #[test]
    fn empty_and_comment_only_files() {
        for src in [
            "",
            "  \n\t",
            "# nothing\n# here",
            "streams {}",
            "streams { # c\n }",
            "\u{feff}streams {}",
        ] {
            let file = parse_ok(src);
            assert!(file.outputs.is_empty() && file.streams.is_empty() && file.tests.is_empty());
        }
    }

    #[test]
    fn streams_blocks_concatenate() {
        let file = parse_ok("streams { a b }\noutput o = k()\nstreams { c }");
        assert_eq!(names(&file.streams), ["a", "b", "c"]);
        assert!(file.outputs[0].args.is_empty());
    }

    #[test]
    fn statements_may_end_with_semicolons() {
        let src = "streams { a; b(1); c { d; }; where x { e };\n f }";
        assert_eq!(names(&stmts(src)), ["a", "b", "c", "where", "f"]);
        assert_eq!(&src[stmts(src)[1].span().clone()], "b(1)");
    }

    #[test]
    fn call_forms() {
        let src = "streams { a a() a(1) { b } a { b } else { c } a\n(2) }";
        let stmts = stmts(src);
        assert_bare(&stmts[0], "a");
        assert_eq!(call(&stmts[1]).1.map(Vec::len), Some(0));
        let (_, args, body, else_body) = call(&stmts[2]);
        assert_eq!(
            (
                args.map(Vec::len),
                body.map(|b| b.stmts.len()),
                else_body.is_none()
            ),
            (Some(1), Some(1), true)
        );
        let (_, args, body, else_body) = call(&stmts[3]);
        assert!(args.is_none());
        assert_eq!(names(&body.unwrap().stmts), ["b"]);
        assert_eq!(names(&else_body.unwrap().stmts), ["c"]);
        assert_eq!(&src[stmts[3].span().clone()], "a { b } else { c }");
        assert_eq!(&src[stmts[4].span().clone()], "a\n(2)");
    }

    #[test]
    fn named_and_positional_args_with_trailing_comma() {
        let src = "streams { f(1, b: \"x\", c : true,) }";
        let parsed = stmts(src);
        let args = call(&parsed[0]).1.unwrap();
        assert_eq!(args.len(), 3);
        assert!(args[0].name.is_none());
        assert_eq!(&src[args[1].span.clone()], "b: \"x\"");
        assert_eq!(&src[args[2].name.as_ref().unwrap().span.clone()], "c");
        assert_eq!(args[2].value.kind, ValueKind::Bool(true));
    }

    #[test]
    fn where_with_else_and_multiline_predicate() {
        let src = "streams {\n  where host = \"a\"\n    and not tagged \"x\" # why\n  { a } else { b }\n}";
        let parsed = stmts(src);
        let Stmt::Where {
            pred,
            pred_span,
            body,
            else_body,
            span,
        } = &parsed[0]
        else {
            panic!()
        };
        assert_eq!(
            &src[pred_span.clone()],
            "host = \"a\"\n    and not tagged \"x\""
        );
        assert_eq!(pred.as_str(), &src[pred_span.clone()]);
        assert_eq!(names(&body.stmts), ["a"]);
        assert_eq!(names(&else_body.as_ref().unwrap().stmts), ["b"]);
        assert!(src[span.clone()].starts_with("where") && src[span.clone()].ends_with("{ b }"));
    }

    #[test]
    fn split_without_else_and_empty_split() {
        let one = stmts("streams { split { when a { x } } }");
        let Stmt::Split {
            clauses,
            default: None,
            ..
        } = &one[0]
        else {
            panic!()
        };
        assert_eq!(clauses.len(), 1);
        let empty = stmts("streams { split {} }");
        let Stmt::Split {
            clauses,
            default: None,
            ..
        } = &empty[0]
        else {
            panic!()
        };
        assert!(clauses.is_empty());
    }

    #[test]
    fn numbers() {
        assert_eq!(value("0"), ValueKind::Number(0.0));
        assert_eq!(value("-12"), ValueKind::Number(-12.0));
        assert_eq!(value("3.25"), ValueKind::Number(3.25));
        assert_eq!(value("1e3"), ValueKind::Number(1000.0));
        assert_eq!(value("-2.5E-2"), ValueKind::Number(-0.025));
    }

    #[test]
    fn durations_in_micros() {
        assert_eq!(value("500ms"), ValueKind::Duration(500_000));
        assert_eq!(value("1.5s"), ValueKind::Duration(1_500_000));
        assert_eq!(value("2m"), ValueKind::Duration(120_000_000));
        assert_eq!(value("1h"), ValueKind::Duration(3_600_000_000));
        assert_eq!(value("7d"), ValueKind::Duration(604_800_000_000));
        assert_eq!(value("0s"), ValueKind::Duration(0));
        assert_eq!(value("1e3ms"), ValueKind::Duration(1_000_000));
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(value(r#""""#), string(""));
        assert_eq!(value(r#""a\"b\\c\nd\te\rf""#), string("a\"b\\c\nd\te\rf"));
        assert_eq!(value(r#""é # not a comment""#), string("é # not a comment"));
    }

    #[test]
    fn constants_idents_and_env() {
        assert_eq!(value("true"), ValueKind::Bool(true));
        assert_eq!(value("false"), ValueKind::Bool(false));
        assert_eq!(value("null"), ValueKind::Null);
        assert_eq!(value("nil"), ValueKind::Null);
        assert_eq!(value("host_2"), ValueKind::Ident("host_2".into()));
        assert_eq!(value("env"), ValueKind::Ident("env".into()));
        assert_eq!(value(r#"env( "HOME" )"#), ValueKind::Env("HOME".into()));
    }

    #[test]
    fn lists_and_maps() {
        let ValueKind::List(items) = value(r#"[1, "a", [], {}, x,]"#) else {
            panic!()
        };
        let kinds: Vec<_> = items.into_iter().map(|v| v.kind).collect();
        assert_eq!(
            kinds,
            [
                ValueKind::Number(1.0),
                string("a"),
                ValueKind::List(vec![]),
                ValueKind::Map(vec![]),
                ValueKind::Ident("x".into())
            ]
        );
        let ValueKind::Map(entries) = value("{a: 1, \"b c\": [2],\n # note\n d: {e: null}}") else {
            panic!()
        };
        let keys: Vec<_> = entries.iter().map(|(k, _)| k.name.as_str()).collect();
        assert_eq!(keys, ["a", "b c", "d"]);
        let ValueKind::Map(inner) = &entries[2].1.kind else {
            panic!()
        };
        assert_eq!(inner[0].1.kind, ValueKind::Null);
    }

    #[test]
    fn test_steps() {
        let src =
            "test \"t\" { send {}; at 1m expect no pager {}; expect no {a: 1} at 90s send {} }";
        let test = &parse_ok(src).tests[0];
        assert_eq!(test.steps.len(), 4);
        assert!(matches!(test.steps[0].action, TestAction::Send(_)));
        assert_eq!(test.steps[1].at, Some(60_000_000));
        assert!(
            matches!(&test.steps[1].action, TestAction::Expect { negated: true, target, .. } if target.name == "pager")
        );
        // `no` followed by fields is the target's name, not a negation.
        assert!(
            matches!(&test.steps[2].action, TestAction::Expect { negated: false, target, .. } if target.name == "no")
        );
        assert_eq!(test.steps[3].at, Some(90_000_000));
        assert_eq!(&src[test.steps[3].span.clone()], "at 90s send {}");
    }

    #[test]
    fn nesting_up_to_the_limit_is_fine() {
        let depth = MAX_DEPTH - 1; // `streams { … }` is one level
        let src = format!("streams {{{}{}}}", "a { ".repeat(depth), "} ".repeat(depth));
        assert_eq!(stmts(&src).len(), 1);
        let list = format!(
            "[{}]",
            "[".repeat(MAX_DEPTH - 2) + &"]".repeat(MAX_DEPTH - 2)
        );
        assert!(matches!(value(&list), ValueKind::List(_)));
    }

    // ---- errors ---------------------------------------------------------------------

    #[test]
    fn error_missing_close_brace() {
        assert_eq!(
            error("streams {\n  where metric > 3 {\n    index\n"),
            "rules/x.vigil:3:10: expected `}` to close the block opened at line 2, found end of file\n\
             \x20       index\n\
             \x20            ^"
        );
    }

    #[test]
    fn error_bad_duration_unit() {
        assert_eq!(
            error("streams { rate(5x) { index } }"),
            "rules/x.vigil:1:17: unknown duration unit `x` (use ms, s, m, h or d)\n\
             \x20   streams { rate(5x) { index } }\n\
             \x20                   ^"
        );
    }

    #[test]
    fn error_negative_and_huge_durations() {
        assert_eq!(
            error("streams { x(-5s) }"),
            "rules/x.vigil:1:13: a duration cannot be negative\n    streams { x(-5s) }\n                ^^^"
        );
        assert!(
            error("streams { x(99999999999d) }")
                .contains(":1:13: duration `99999999999` is too large")
        );
        assert!(error("streams { x(1e300s) }").contains("duration `1e300` is too large"));
        assert!(error("streams { x(1e999) }").contains("number `1e999` is out of range"));
    }

    #[test]
    fn error_unterminated_string() {
        assert_eq!(
            error("output g = graphite(host: \"abc)\nstreams {}"),
            "rules/x.vigil:1:27: unterminated string\n\
             \x20   output g = graphite(host: \"abc)\n\
             \x20                             ^^^^^\n\
             \x20 hint: close it with `\"` on the same line; write a line break as \\n"
        );
    }

    #[test]
    fn error_unknown_escape() {
        assert_eq!(
            error(r#"streams { x("a\q") }"#),
            "rules/x.vigil:1:15: unknown escape `\\q` in string\n\
             \x20   streams { x(\"a\\q\") }\n\
             \x20                 ^^\n\
             \x20 hint: the escapes are \\\" \\\\ \\n \\t and \\r"
        );
    }

    #[test]
    fn error_bad_predicate_points_into_the_predicate() {
        assert_eq!(
            error("streams {\n  where metric >> 3 { index }\n}"),
            "rules/x.vigil:2:17: invalid `where` predicate: expected a value after `>`, found `>`\n\
             \x20     where metric >> 3 { index }\n\
             \x20                   ^"
        );
        assert_eq!(
            error("streams { split { when { a } } }"),
            "rules/x.vigil:1:24: invalid `when` predicate: expected a value, found `{`\n\
             \x20   streams { split { when { a } } }\n\
             \x20                          ^"
        );
    }

    #[test]
    fn error_else_alone() {
        assert_eq!(
            error("streams {\n  index else { x }\n}"),
            "rules/x.vigil:2:9: `else` without a preceding block\n\
             \x20     index else { x }\n\
             \x20           ^^^^\n\
             \x20 hint: `else { … }` goes right after the `}` of a `where` or a stream's block"
        );
    }

    #[test]
    fn error_unknown_item_with_hint() {
        assert_eq!(
            error("outptu g = graphite()"),
            "rules/x.vigil:1:1: unknown item `outptu`\n    outptu g = graphite()\n    ^^^^^^\n  hint: did you mean `output`?"
        );
        assert!(error("index").ends_with("hint: a rule file holds `output`, `streams` and `test` items; streams go inside `streams { … }`"));
    }

    #[test]
    fn error_stray_paren() {
        assert_eq!(
            error("streams { index ) }"),
            "rules/x.vigil:1:17: expected a stream or `}`, found `)`\n    streams { index ) }\n                    ^"
        );
    }

    #[test]
    fn error_missing_value() {
        assert_eq!(
            error("output g = graphite(host: )"),
            "rules/x.vigil:1:27: expected a value, found `)`\n    output g = graphite(host: )\n                              ^"
        );
    }

    #[test]
    fn error_misspelt_where() {
        assert_eq!(
            error("streams {\n  wher metric > 3 { index }\n}"),
            "rules/x.vigil:2:15: expected a stream or `}`, found `>`\n\
             \x20     wher metric > 3 { index }\n\
             \x20                 ^\n\
             \x20 hint: did you mean `where`?"
        );
    }

    #[test]
    fn error_keywords_out_of_place() {
        assert!(
            error("output where = x()")
                .starts_with("rules/x.vigil:1:8: `where` is a keyword and cannot name an output")
        );
        assert!(error("streams { when a { } }").contains("`when` outside `split`"));
        assert!(
            error("streams {\n index\n test \"t\" {}\n}")
                .contains(":3:2: `test` is only allowed at the top level")
        );
        assert!(
            error("streams { split { else { } when a { } } }")
                .contains("expected `}` to close the `split`, found `when`")
        );
        assert!(
            error("streams { split { x } }")
                .contains("expected `when`, `else` or `}` in `split`, found `x`")
        );
    }

    #[test]
    fn error_unclosed_brackets_name_their_line() {
        assert!(
            error("output o = k(\n[1,\n").contains(
                ":2:4: expected `]` to close the list opened at line 2, found end of file"
            )
        );
        assert!(
            error("output o = k(a: {b: 1}")
                .contains("expected `)` to close the argument list opened at line 1")
        );
        assert!(
            error("output o = k({\"b\" 1})").contains("expected `:` after the key `b`, found `1`")
        );
        assert!(
            error("test \"t\" { send {}")
                .contains("expected `}` to close the test opened at line 1")
        );
    }

    #[test]
    fn error_test_steps() {
        assert!(
            error("test \"t\" { at 5 send {} }")
                .contains(":1:15: expected a duration after `at`, e.g. `at 5s`")
        );
        assert!(error("test \"t\" { sendd {} }").ends_with("hint: did you mean `send`?"));
        assert!(error("test t { }").contains("expected the test's name as a string"));
        assert!(
            error("test \"t\" { expect {} }")
                .contains("expected `index` or an output name after `expect`, found `{`")
        );
    }

    #[test]
    fn error_deep_nesting() {
        let blocks = format!("streams {{ {}", "a { ".repeat(100_000));
        assert_eq!(
            error(&blocks).lines().next().unwrap(),
            "rules/x.vigil:1:265: nested too deeply (max 64)"
        );
        let lists = format!("output o = k({}", "[".repeat(100_000));
        assert_eq!(
            error(&lists),
            format!(
                "rules/x.vigil:1:78: nested too deeply (max 64)\n    {lists}\n{}^",
                " ".repeat(81)
            )
        );
        let maps = format!("output o = k({}", "{a: ".repeat(100_000));
        assert!(error(&maps).contains("nested too deeply (max 64)"));
        let braces = format!("streams {}", "{".repeat(100_000));
        assert!(error(&braces).contains("expected a stream or `}`, found `{`"));
        let parens = format!("streams {{ where {} }}", "(".repeat(100_000));
        assert!(error(&parens).contains("nested too deeply"));
    }

    // ---- robustness -----------------------------------------------------------------

    /// Deterministic xorshift64 so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn fuzz_never_panics_and_errors_point_into_the_source() {
        const FRAGMENTS: &[&str] = &[
            "streams",
            "{",
            "}",
            "(",
            ")",
            "[",
            "]",
            ",",
            ":",
            ";",
            "=",
            "\n",
            " ",
            "\t",
            "# c\n",
            "where",
            "split",
            "when",
            "else",
            "output",
            "test",
            "at",
            "send",
            "expect",
            "no",
            "index",
            "with",
            "metric > 3",
            "tagged \"x\"",
            "state = \"ok\"",
            "and",
            "or",
            "not",
            "\"str\"",
            "\"un",
            "\"\\q\"",
            "\\",
            "5s",
            "1.5ms",
            "-3",
            "1e",
            "9999999999999999999d",
            "5x",
            "env(\"K\")",
            "env(",
            "true",
            "null",
            "nil",
            "{a: 1}",
            "é",
            "→",
            "\r\n",
            "-",
            ".",
            "~=",
            "\"[\"",
            "=~",
            "0.5",
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..20_000 {
            let mut src = String::new();
            if round % 10 == 0 {
                // A prefix of the valid example, cut at a random character.
                let cut = rng.below(EXAMPLE.len());
                let cut = (0..=cut)
                    .rev()
                    .find(|&i| EXAMPLE.is_char_boundary(i))
                    .unwrap_or(0);
                src.push_str(&EXAMPLE[..cut]);
            }
            for _ in 0..1 + rng.below(16) {
                if rng.below(5) == 0 {
                    let bytes: Vec<u8> = (0..1 + rng.below(4)).map(|_| rng.next() as u8).collect();
                    src.push_str(&String::from_utf8_lossy(&bytes));
                } else {
                    src.push_str(FRAGMENTS[rng.below(FRAGMENTS.len())]);
                }
            }
            match parse(&src) {
                Ok(_) => {}
                Err(diagnostic) => {
                    let span = &diagnostic.span;
                    assert!(
                        span.start <= span.end && span.end <= src.len(),
                        "span {span:?} outside {} bytes for {src:?}",
                        src.len()
                    );
                    assert!(
                        src.is_char_boundary(span.start) && src.is_char_boundary(span.end),
                        "{src:?}"
                    );
                    assert!(diagnostic.render("f", &src).contains('^'));
                }
            }
        }
    }
}

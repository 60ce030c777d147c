//! Query text to a compiled [`Node`] tree: a nom-based lexer and a recursive-descent
//! parser for `not` > `and` > `or`. `and`/`or` chains are read in loops, and
//! parentheses and `not` are capped at [`MAX_DEPTH`], so no input can exhaust the stack.

use std::ops::Range;

use super::QueryError;
use super::eval::{CmpOp, LikePattern, Lit, Node, Operand};
use super::pattern;
use crate::event::Field;
use nom::IResult;
use nom::branch::alt;
use nom::bytes::complete::{tag, take_while, take_while1};
use nom::character::complete::{char, digit1, one_of, satisfy};
use nom::combinator::{opt, recognize, value};
use nom::multi::many0_count;
use nom::sequence::{pair, tuple};

/// How many parentheses and `not`s may be open at once.
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, Copy)]
enum Op {
    Cmp(CmpOp),
    Like,
    Regex,
}

#[derive(Debug, Clone)]
enum Kind {
    LParen,
    RParen,
    Op(Op),
    /// Identifier or keyword; the text is the token's span.
    Word,
    Str(String),
    Num(Lit),
    /// A character that starts no token, e.g. the `{` after a rule's predicate.
    Other,
    End,
    /// A malformed token (e.g. an unterminated string). Only an error if the
    /// parser needs it, so `parse_prefix` can stop in front of it instead.
    Invalid(QueryError),
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// Commas are whitespace, as in Riemann.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n' | ',')
}

fn operator(input: &str) -> IResult<&str, Op> {
    // Two-character operators first so `<=` is not read as `<`.
    alt((
        value(Op::Cmp(CmpOp::Ne), tag("!=")),
        value(Op::Cmp(CmpOp::Le), tag("<=")),
        value(Op::Cmp(CmpOp::Ge), tag(">=")),
        value(Op::Like, tag("=~")),
        value(Op::Regex, tag("~=")),
        value(Op::Cmp(CmpOp::Eq), tag("=")),
        value(Op::Cmp(CmpOp::Lt), tag("<")),
        value(Op::Cmp(CmpOp::Gt), tag(">")),
    ))(input)
}

/// Riemann's names (`SYMBOL_HEAD SYMBOL_REST* (':' SYMBOL_REST+)*`), narrowed.
/// Riemann's may hold almost any character (not whitespace, quotes, brackets,
/// `^ @ / % # ~`, nor a digit first), so `host="x"` reads there as the name
/// `host=`. vigil keeps out of names the operators' characters, quotes,
/// parentheses, braces (a rule's predicate ends at its `{`), `#` (a rule file's
/// comment) and commas; `-` and `.` first (`-1` and `.5` look like numbers);
/// `+` (`+1` too), `*` (a wildcard to most readers) and `& | ; \` (operators
/// elsewhere). Beyond ASCII, only letters and digits: a pasted `“web”` is an
/// error, not an attribute named `“web”`.
fn is_name_start(c: char) -> bool {
    c.is_alphabetic() || (!c.is_ascii() && c.is_alphanumeric()) || matches!(c, '_' | '?' | '$')
}

fn is_name_continue(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit() || matches!(c, '.' | '-')
}

fn word(input: &str) -> IResult<&str, &str> {
    recognize(tuple((
        satisfy(is_name_start),
        take_while(is_name_continue),
        many0_count(pair(char(':'), take_while1(is_name_continue))),
    )))(input)
}

/// A number starting with `-` or a digit; unsigned `Infinity`/`NaN` are lexed as words.
/// Riemann's `L` (long) and `N` (bigint) suffixes are taken here on any number
/// and refused on a float by [`number_literal`], for a clearer error.
fn number(input: &str) -> IResult<&str, &str> {
    alt((
        tag("-Infinity"),
        tag("-NaN"),
        recognize(tuple((
            opt(char('-')),
            digit1,
            opt(pair(char('.'), digit1)),
            opt(tuple((one_of("eE"), opt(one_of("+-")), digit1))),
            opt(one_of("lLnN")),
        ))),
    ))(input)
}

fn error_at(src: &str, offset: usize, message: impl Into<String>) -> QueryError {
    QueryError {
        offset,
        column: src[..offset].chars().count() + 1,
        message: message.into(),
    }
}

fn number_literal(text: &str) -> Result<Lit, String> {
    let digits = text.strip_suffix(['l', 'L', 'n', 'N']);
    match text {
        "-Infinity" => Ok(Lit::Float(f64::NEG_INFINITY)),
        "-NaN" => Ok(Lit::Float(f64::NAN)),
        _ if digits.is_some() && text.contains(['.', 'e', 'E']) => Err(format!(
            "invalid number `{text}`: `L` and `N` only follow an integer"
        )),
        _ if text.contains(['.', 'e', 'E']) => text
            .parse()
            .map(Lit::Float)
            .map_err(|_| format!("invalid number `{text}`")),
        // Integers stay exact; silently widening to a float would lose digits.
        // A bigint (`N`) is one too, within vigil's 64 bits.
        _ => (digits.unwrap_or(text).parse())
            .map(Lit::Int)
            .map_err(|_| format!("integer `{text}` does not fit in 64 bits")),
    }
}

/// The character a `\uXXXX` escape stands for, given what follows its `u`:
/// exactly four hex digits (as Java's, unlike Rust's `\u{…}`), not a surrogate
/// half. A pair of halves, Java's way to write a character beyond U+FFFF, is
/// refused too: the character itself can be written instead.
fn unicode_escape(after_u: &str) -> Result<char, String> {
    let shown: String = after_u.chars().take_while(|&c| c != '"').take(4).collect();
    if shown.len() != 4 || !shown.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "invalid escape `\\u{shown}` in string: `\\u` takes 4 hex digits"
        ));
    }
    let code = u32::from_str_radix(&shown, 16).expect("four hex digits");
    char::from_u32(code).ok_or_else(|| {
        format!("escape `\\u{shown}` in string is half a UTF-16 surrogate pair, not a character")
    })
}

/// The string literal whose opening quote is at `start`. Its escapes are
/// Java's, as Riemann's reader takes them, octal ones aside.
fn string(src: &str, start: usize) -> Token {
    let body = start + 1;
    let mut out = String::new();
    let mut chars = src[body..].char_indices();
    while let Some((i, c)) = chars.next() {
        let escaped = match c {
            '"' => {
                return Token {
                    kind: Kind::Str(out),
                    start,
                    end: body + i + 1,
                };
            }
            '\\' => match chars.next() {
                Some((_, '"')) => Ok('"'),
                Some((_, '\\')) => Ok('\\'),
                Some((_, 'n')) => Ok('\n'),
                Some((_, 't')) => Ok('\t'),
                Some((_, 'r')) => Ok('\r'),
                Some((_, 'b')) => Ok('\u{8}'),
                Some((_, 'f')) => Ok('\u{c}'),
                Some((u, 'u')) => {
                    let escape = unicode_escape(&src[body + u + 1..]);
                    if escape.is_ok() {
                        chars.nth(3);
                    }
                    escape
                }
                Some((_, other)) => Err(format!("unknown escape `\\{other}` in string")),
                None => break,
            },
            c => Ok(c),
        };
        match escaped {
            Ok(c) => out.push(c),
            Err(message) => {
                return Token {
                    kind: Kind::Invalid(error_at(src, body + i, message)),
                    start,
                    end: start,
                };
            }
        }
    }
    let error = error_at(src, start, "unterminated string");
    Token {
        kind: Kind::Invalid(error),
        start,
        end: start,
    }
}

/// The token at or after byte `from`.
fn lex(src: &str, from: usize) -> Token {
    let rest = src[from..].trim_start_matches(is_space);
    let start = src.len() - rest.len();
    let token = |kind, len| Token {
        kind,
        start,
        end: start + len,
    };
    let Some(first) = rest.chars().next() else {
        return token(Kind::End, 0);
    };
    match first {
        '(' => return token(Kind::LParen, 1),
        ')' => return token(Kind::RParen, 1),
        '"' => return string(src, start),
        _ => {}
    }
    if let Ok((after, op)) = operator(rest) {
        return token(Kind::Op(op), rest.len() - after.len());
    }
    if let Ok((_, text)) = word(rest) {
        let kind = match text {
            "Infinity" => Kind::Num(Lit::Float(f64::INFINITY)),
            "NaN" => Kind::Num(Lit::Float(f64::NAN)),
            _ => Kind::Word,
        };
        return token(kind, text.len());
    }
    if let Ok((_, text)) = number(rest) {
        let kind = match number_literal(text) {
            Ok(lit) => Kind::Num(lit),
            Err(message) => Kind::Invalid(error_at(src, start, message)),
        };
        return token(kind, text.len());
    }
    token(Kind::Other, first.len_utf8())
}

/// What a predicate says that is valid but seldom meant: `vigil check` warns
/// of it in a rule file ([`super::doubts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doubt {
    /// Byte range in the predicate's text.
    pub span: Range<usize>,
    pub message: String,
    pub hint: String,
}

/// A successful parse of a predicate at the start of the input.
pub(super) struct Parsed {
    pub node: Node,
    pub doubts: Vec<Doubt>,
    /// Byte range of the predicate's own text (no surrounding whitespace).
    pub text: Range<usize>,
    /// Byte offset of the first token after the predicate (or the input's length).
    pub consumed: usize,
}

/// Parses the longest predicate at the start of `src`; with `whole`, anything after
/// it is an error.
pub(super) fn parse(src: &str, whole: bool) -> Result<Parsed, QueryError> {
    let mut parser = Parser {
        src,
        next: lex(src, 0),
        depth: 0,
        last_end: 0,
        patterns: pattern::Compiler::default(),
        doubts: Vec::new(),
    };
    let start = parser.next.start;
    let node = parser.disjunction()?;
    if whole && !matches!(parser.next.kind, Kind::End) {
        return Err(parser.unexpected_after_end());
    }
    Ok(Parsed {
        node,
        doubts: parser.doubts,
        text: start..parser.last_end,
        consumed: parser.next.start,
    })
}

struct Parser<'a> {
    src: &'a str,
    /// One token of lookahead.
    next: Token,
    /// Parentheses and `not`s currently open.
    depth: usize,
    /// End of the last consumed token.
    last_end: usize,
    /// Compiles the `~=` patterns within the query's budget.
    patterns: pattern::Compiler,
    doubts: Vec<Doubt>,
}

impl Parser<'_> {
    fn advance(&mut self) -> Token {
        let following = lex(self.src, self.next.end);
        let token = std::mem::replace(&mut self.next, following);
        self.last_end = token.end;
        token
    }

    fn text(&self, token: &Token) -> &str {
        &self.src[token.start..token.end]
    }

    fn next_is_word(&self, word: &str) -> bool {
        matches!(self.next.kind, Kind::Word) && self.text(&self.next) == word
    }

    fn describe_next(&self) -> String {
        const MAX_CHARS: usize = 24;
        if matches!(self.next.kind, Kind::End) {
            return "end of input".to_owned();
        }
        let text = self.text(&self.next);
        match text.char_indices().nth(MAX_CHARS) {
            Some((cut, _)) => format!("`{}…`", &text[..cut]),
            None => format!("`{text}`"),
        }
    }

    /// "expected X, found Y" at the next token; a malformed token reports its own error.
    fn expected(&self, what: &str) -> QueryError {
        match &self.next.kind {
            Kind::Invalid(error) => error.clone(),
            _ => error_at(
                self.src,
                self.next.start,
                format!("expected {what}, found {}", self.describe_next()),
            ),
        }
    }

    fn unexpected_after_end(&self) -> QueryError {
        match &self.next.kind {
            Kind::Invalid(error) => error.clone(),
            _ => error_at(
                self.src,
                self.next.start,
                format!(
                    "unexpected {} after the end of the predicate",
                    self.describe_next()
                ),
            ),
        }
    }

    /// Opens one nesting level at the next token (a `(` or `not`).
    fn enter(&mut self) -> Result<(), QueryError> {
        if self.depth >= MAX_DEPTH {
            let message = format!("nested too deeply (max {MAX_DEPTH})");
            return Err(error_at(self.src, self.next.start, message));
        }
        self.depth += 1;
        Ok(())
    }

    fn disjunction(&mut self) -> Result<Node, QueryError> {
        let mut terms = vec![self.conjunction()?];
        while self.next_is_word("or") {
            self.advance();
            terms.push(self.conjunction()?);
        }
        Ok(Node::any(terms))
    }

    fn conjunction(&mut self) -> Result<Node, QueryError> {
        let mut terms = vec![self.negation()?];
        while self.next_is_word("and") {
            self.advance();
            terms.push(self.negation()?);
        }
        Ok(Node::all(terms))
    }

    fn negation(&mut self) -> Result<Node, QueryError> {
        if !self.next_is_word("not") {
            return self.primary();
        }
        self.enter()?;
        self.advance();
        let inner = self.negation()?;
        self.depth -= 1;
        Ok(Node::Not(Box::new(inner)))
    }

    fn primary(&mut self) -> Result<Node, QueryError> {
        if matches!(self.next.kind, Kind::LParen) {
            self.enter()?;
            self.advance();
            let inner = self.disjunction()?;
            if !matches!(self.next.kind, Kind::RParen) {
                return Err(self.expected("`)`"));
            }
            self.advance();
            self.depth -= 1;
            return Ok(inner);
        }
        if self.next_is_word("tagged") {
            self.advance();
            let Kind::Str(tag) = self.next.kind.clone() else {
                return Err(self.expected("a string after `tagged`"));
            };
            self.advance();
            return Ok(Node::Tagged(tag));
        }
        let left_span = self.next.start..self.next.end;
        let left = self.operand("a value")?;
        let Kind::Op(op) = self.next.kind else {
            if let Operand::Lit(Lit::Str(_) | Lit::Int(_) | Lit::Float(_)) = left {
                self.doubt_bare_value(left_span);
            }
            return Ok(left.truthiness());
        };
        let op_token = self.advance();
        let op_text = self.text(&op_token).to_owned();
        match op {
            Op::Cmp(op) => {
                let right_span = self.next.start..self.next.end;
                let right = self.operand(&format!("a value after `{op_text}`"))?;
                self.doubt_attribute_for_text(&left, &right, right_span);
                self.doubt_attribute_for_text(&right, &left, left_span);
                let (left, right) = at_ttl_precision(left, right);
                Ok(Node::Compare { left, op, right })
            }
            Op::Like | Op::Regex => {
                let Kind::Str(pattern) = self.next.kind.clone() else {
                    return Err(self.expected(&format!("a string pattern after `{op_text}`")));
                };
                let pattern_token = self.advance();
                if matches!(op, Op::Like) {
                    return Ok(Node::Like {
                        left,
                        pattern: LikePattern::new(&pattern),
                    });
                }
                let regex = (self.patterns.compile(&pattern))
                    .map_err(|message| error_at(self.src, pattern_token.start, message))?;
                Ok(Node::Regex { left, regex })
            }
        }
    }

    /// `service = "x" or "y"`: a bare value tests no field, and is true
    /// (but for `nil` and `false`, written so on purpose).
    fn doubt_bare_value(&mut self, span: Range<usize>) {
        let text = &self.src[span.clone()];
        let field = if text.starts_with('"') {
            "service"
        } else {
            "metric"
        };
        self.doubts.push(Doubt {
            span,
            message: format!("`{text}` on its own tests no field: it is always true"),
            hint: format!("compare a field with it, e.g. `{field} = {text}`"),
        });
    }

    /// `state = critical`: an unquoted word is the attribute of that name,
    /// which an event seldom has, not the text. Compared with one of the
    /// event's own fields, it was most likely meant as text.
    fn doubt_attribute_for_text(&mut self, field: &Operand, other: &Operand, span: Range<usize>) {
        let (Operand::Field(field), Operand::Field(Field::Attribute(name))) = (field, other) else {
            return;
        };
        if matches!(field, Field::Attribute(_)) {
            return;
        }
        self.doubts.push(Doubt {
            span,
            message: format!("`{name}` is the attribute named `{name}` here, not the text"),
            hint: format!("quote it to compare with the text: `\"{name}\"`"),
        });
    }

    fn operand(&mut self, what: &str) -> Result<Operand, QueryError> {
        let operand = match &self.next.kind {
            Kind::Str(s) => Operand::Lit(Lit::Str(s.clone())),
            Kind::Num(n) => Operand::Lit(n.clone()),
            Kind::Word => match self.text(&self.next) {
                "true" => Operand::Lit(Lit::Bool(true)),
                "false" => Operand::Lit(Lit::Bool(false)),
                "nil" | "null" => Operand::Lit(Lit::Nil),
                "and" | "or" | "not" | "tagged" => return Err(self.expected(what)),
                name => Operand::Field(Field::named(name)),
            },
            _ => return Err(self.expected(what)),
        };
        self.advance();
        Ok(operand)
    }
}

/// A TTL is an `f32`, as the protocol carries it: a number compared with one
/// is rounded the same way, so `ttl = 12.3` matches the `12.3` an agent sent
/// (as an `f64` that is 12.300000190734863). Done once here, not per event.
fn at_ttl_precision(left: Operand, right: Operand) -> (Operand, Operand) {
    let round = |operand| match operand {
        Operand::Lit(Lit::Float(f)) => Operand::Lit(Lit::Float(f64::from(f as f32))),
        Operand::Lit(Lit::Int(i)) => Operand::Lit(Lit::Float(f64::from(i as f32))),
        other => other,
    };
    match (&left, &right) {
        (Operand::Field(Field::Ttl), Operand::Lit(_)) => (left, round(right)),
        (Operand::Lit(_), Operand::Field(Field::Ttl)) => (round(left), right),
        _ => (left, right),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut from = 0;
        loop {
            let token = lex(src, from);
            let text = &src[token.start..token.end];
            match token.kind {
                Kind::End => return out,
                Kind::Invalid(e) => {
                    out.push(format!("invalid@{}", e.offset));
                    return out;
                }
                Kind::Str(s) => out.push(format!("str:{s}")),
                Kind::Num(Lit::Int(i)) => out.push(format!("int:{i}")),
                Kind::Num(Lit::Float(f)) => out.push(format!("float:{f}")),
                _ => out.push(text.to_owned()),
            }
            from = token.end;
        }
    }

    fn err(src: &str) -> QueryError {
        match parse(src, true) {
            Ok(_) => panic!("{src:?} should not parse"),
            Err(e) => e,
        }
    }

    #[test]
    fn lexes_operators_words_and_numbers() {
        assert_eq!(
            kinds("a<=1,b>=2 c!=-3 d=~\"x\" e~=\"y\" f<g>h=i"),
            [
                "a", "<=", "int:1", "b", ">=", "int:2", "c", "!=", "int:-3", "d", "=~", "str:x",
                "e", "~=", "str:y", "f", "<", "g", ">", "h", "=", "i"
            ]
        );
        assert_eq!(
            kinds("1.5 -2e3 1E-2 Infinity -Infinity NaN Infinityx a.b-c_d"),
            [
                "float:1.5",
                "float:-2000",
                "float:0.01",
                "float:inf",
                "float:-inf",
                "float:NaN",
                "Infinityx",
                "a.b-c_d"
            ]
        );
        assert_eq!(kinds("( ) { -"), ["(", ")", "{", "-"]);
    }

    #[test]
    fn lexes_riemann_names() {
        assert_eq!(
            kinds(r#"k:v="colon" is?="q" Über="u" a:1.b:c-d $x ünï_2 日本"#),
            [
                "k:v",
                "=",
                "str:colon",
                "is?",
                "=",
                "str:q",
                "Über",
                "=",
                "str:u",
                "a:1.b:c-d",
                "$x",
                "ünï_2",
                "日本"
            ]
        );
        // A `:` joins two parts only when a name character follows it.
        assert_eq!(kinds("k: v k:: v"), ["k", ":", "v", "k", ":", ":", "v"]);
        // Operators, quotes, braces and `#` still end a name.
        assert_eq!(
            kinds(r#"a?=1 b?!=2 c<3 d~="x" e=~"y" f{ g} h# “q”"#),
            [
                "a?", "=", "int:1", "b?", "!=", "int:2", "c", "<", "int:3", "d", "~=", "str:x",
                "e", "=~", "str:y", "f", "{", "g", "}", "h", "#", "“", "q", "”"
            ]
        );
        // Characters kept out of names: they would read as syntax or a number.
        assert_eq!(
            kinds("-x +1 .5 *"),
            ["-", "x", "+", "int:1", ".", "int:5", "*"]
        );
    }

    #[test]
    fn lexes_string_escapes() {
        assert_eq!(kinds(r#""a\"b\\c\nd\te\rf""#), ["str:a\"b\\c\nd\te\rf"]);
        assert_eq!(kinds(r#""ü""#), ["str:ü"]);
        assert_eq!(kinds(r#""ab\q""#), ["invalid@3"]);
        assert_eq!(kinds(r#"x "abc"#), ["x", "invalid@2"]);
        assert_eq!(kinds(r#""abc\"#), ["invalid@0"]);
    }

    #[test]
    fn lexes_long_and_bigint_suffixes() {
        assert_eq!(
            kinds("2N 1L -3n 4l 0N 5Lx"),
            ["int:2", "int:1", "int:-3", "int:4", "int:0", "int:5", "x"]
        );
        assert_err(
            "metric = 1.5L",
            10,
            "invalid number `1.5L`: `L` and `N` only follow an integer",
        );
        assert_err(
            "metric = 1e3N",
            10,
            "invalid number `1e3N`: `L` and `N` only follow an integer",
        );
        assert_err(
            "metric = 9223372036854775808N",
            10,
            "integer `9223372036854775808N` does not fit in 64 bits",
        );
    }

    #[test]
    fn lexes_java_string_escapes() {
        assert_eq!(
            kinds(r#""\u00fc\u0041\b\f\u20aC\u0000x" "\u005C\"""#),
            ["str:üA\u{8}\u{c}€\0x", "str:\\\""]
        );
        assert_err(
            r#"host = "a\u12G4""#,
            10,
            r"invalid escape `\u12G4` in string: `\u` takes 4 hex digits",
        );
        assert_err(
            r#"host = "a\u+123""#,
            10,
            r"invalid escape `\u+123` in string: `\u` takes 4 hex digits",
        );
        assert_err(
            r#"host = "é\u12""#,
            10,
            r"invalid escape `\u12` in string: `\u` takes 4 hex digits",
        );
        assert_err(
            r#"host = "\u""#,
            9,
            r"invalid escape `\u` in string: `\u` takes 4 hex digits",
        );
        assert_err(
            r#"host = "üü\uD83D\uDE00""#,
            11,
            r"escape `\uD83D` in string is half a UTF-16 surrogate pair, not a character",
        );
        assert_err(
            r#"host = "\udfff""#,
            9,
            r"escape `\udfff` in string is half a UTF-16 surrogate pair, not a character",
        );
        assert_err(r#"host = "\a""#, 9, r"unknown escape `\a` in string");
    }

    #[test]
    fn integers_stay_exact_or_fail() {
        assert!(matches!(
            parse("9223372036854775807", true).unwrap().node,
            Node::Const(true)
        ));
        let e = err("metric = 9223372036854775808");
        assert_eq!(
            (e.column, e.message.as_str()),
            (10, "integer `9223372036854775808` does not fit in 64 bits")
        );
    }

    #[track_caller]
    fn assert_err(src: &str, column: usize, message: &str) {
        let e = err(src);
        assert_eq!(
            (e.column, e.message.as_str()),
            (column, message),
            "for {src:?}"
        );
    }

    #[test]
    fn error_messages_and_columns() {
        assert_err("", 1, "expected a value, found end of input");
        assert_err("{", 1, "expected a value, found `{`");
        assert_err(
            "host = ",
            8,
            "expected a value after `=`, found end of input",
        );
        assert_err("host = and", 8, "expected a value after `=`, found `and`");
        assert_err(
            "host = \"a\" and",
            15,
            "expected a value, found end of input",
        );
        assert_err("tagged 1", 8, "expected a string after `tagged`, found `1`");
        assert_err(
            "host =~ x",
            9,
            "expected a string pattern after `=~`, found `x`",
        );
        assert_err(
            "host ~= 1",
            9,
            "expected a string pattern after `~=`, found `1`",
        );
        assert_err("(host", 6, "expected `)`, found end of input");
        assert_err(
            "host xyz",
            6,
            "unexpected `xyz` after the end of the predicate",
        );
        assert_err("host )", 6, "unexpected `)` after the end of the predicate");
        assert_err("host = \"ab", 8, "unterminated string");
        assert_err("host = \"a\\x\"", 10, "unknown escape `\\x` in string");
        assert_err(
            "host ~= \"[\"",
            9,
            "invalid regex: unclosed character class",
        );
        assert_err("a or \"é\" \"x", 10, "unterminated string");
        assert_err(
            "state = \"ok\" \"a much too long token indeed\"",
            14,
            "unexpected `\"a much too long token i…` after the end of the predicate",
        );
        // Byte offset and char column differ after multi-byte characters.
        let e = err("\"üüü\" xyz");
        assert_eq!((e.offset, e.column), (9, 7));
    }

    #[test]
    fn nesting_is_capped() {
        let ok = format!("{}host{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(parse(&ok, true).is_ok());
        let ok = format!("{}host", "not ".repeat(MAX_DEPTH));
        assert!(parse(&ok, true).is_ok());

        let e = err(&format!(
            "{}host{}",
            "(".repeat(MAX_DEPTH + 1),
            ")".repeat(MAX_DEPTH + 1)
        ));
        assert_eq!(
            (e.column, e.message.as_str()),
            (MAX_DEPTH + 1, "nested too deeply (max 64)")
        );
        let e = err(&"(".repeat(10_000));
        assert_eq!(e.message, "nested too deeply (max 64)");
        let e = err(&"not ".repeat(10_000));
        assert_eq!(e.message, "nested too deeply (max 64)");
        // Mixed: each `not` and `(` counts.
        let e = err(&"not (".repeat(40));
        assert_eq!(e.column, 5 * 32 + 1);
    }

    #[test]
    fn long_chains_are_flat() {
        let src = vec!["host"; 50_000].join(" and ");
        let Node::And(terms) = parse(&src, true).unwrap().node else {
            panic!("expected And")
        };
        assert_eq!(terms.len(), 50_000);
        let src = vec!["a = 1 and b"; 20_000].join(" or ");
        let Node::Or(terms) = parse(&src, true).unwrap().node else {
            panic!("expected Or")
        };
        assert_eq!(terms.len(), 20_000);
    }
}

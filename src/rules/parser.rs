//! Rule-file text to the [`RuleFile`] syntax tree, built from `nom` combinators straight
//! over the source (no separate token stream). Every parser skips the whitespace and
//! `#` comments before its first token, never after its last, so a node's span runs
//! from its first token to where the remaining input starts. Predicates after
//! `where`/`when` are handed to [`Query::parse_prefix`]. Blocks, lists and maps are
//! capped at `MAX_DEPTH` levels, so no input can exhaust the stack.
//!
//! Errors: a mismatch (`nom::Err::Error`) only lets `alt`, `opt` and loops try the next
//! choice. Once a keyword or an opening bracket commits to a construct, errors are
//! `nom::Err::Failure` carrying the final [`Diagnostic`], and the first one ends its item:
//! [`parse`] goes on at the next line that starts an item, to report every item's error.

use std::collections::HashSet;
use std::fmt::Display;

use nom::IResult;
use nom::branch::alt;
use nom::bytes::complete::{take_till, take_while, take_while1};
use nom::character::complete::{char, digit1, none_of, one_of, satisfy};
use nom::combinator::{cond, cut, eof, map, map_res, not, opt, peek, recognize, value, verify};
use nom::error::{ErrorKind, FromExternalError, ParseError};
use nom::multi::{fold_many0, many0_count};
use nom::sequence::{pair, preceded, terminated, tuple};

use super::ast::{
    Arg, Block, Expected, Ident, OutputDecl, RuleFile, Span, Stmt, TestAction, TestCase, TestStep,
    Value, ValueKind, WhenClause,
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

/// How many syntax errors one parse reports before it stops looking.
const MAX_SYNTAX_ERRORS: usize = 20;

/// Parses a whole rule file. The errors are every syntax error found: after
/// one, parsing goes on at the next line that starts with an item keyword
/// (`output`, `streams`, `test`), so one run of `vigil check` shows them all.
pub fn parse(source: &str) -> Result<RuleFile, Vec<Diagnostic>> {
    let parser = Parser { src: source };
    // Editors on Windows may save a byte-order mark; it is not part of the text.
    let mut input = source.strip_prefix('\u{feff}').unwrap_or(source);
    let mut file = RuleFile::default();
    let mut errors = Vec::new();
    let mut streams_blocks = 0;
    loop {
        let at = skip_trivia(input);
        let error = match parser.item(input) {
            Ok((rest, item)) => {
                match item {
                    Item::Output(output) => file.outputs.push(output),
                    Item::Streams(stmts) => {
                        streams_blocks += 1;
                        file.streams.extend(stmts);
                    }
                    Item::Test(test) => file.tests.push(test),
                }
                input = rest;
                continue;
            }
            Err(nom::Err::Error(_)) if at.is_empty() => break,
            // Not a word where an item goes: `}` or `{`, a string, a number.
            Err(nom::Err::Error(_)) => parser.unexpected(at, "`output`, `streams` or `test`"),
            Err(nom::Err::Failure(Error::Fatal(diagnostic))) => *diagnostic,
            // Only reachable if a committed parser leaks a mismatch through
            // `cut` (or, with these complete parsers, never).
            Err(nom::Err::Failure(Error::Mismatch(leaked))) => parser.unknown(leaked),
            Err(nom::Err::Incomplete(_)) => parser.unknown(at),
        };
        errors.push(error);
        let Some(next) = next_item_line(at) else {
            break;
        };
        if errors.len() == MAX_SYNTAX_ERRORS {
            let at = parser.offset(next);
            errors.push(Diagnostic::new(
                at..at,
                format!("stopped after {MAX_SYNTAX_ERRORS} syntax errors: the rest is not checked"),
            ));
            break;
        }
        input = next;
    }
    if errors.is_empty() && streams_blocks == 0 {
        // Most likely a file emptied or cut short on its way (a full disk,
        // a deploy that failed): taken as it is, every event would be
        // dropped without a word.
        errors.push(Diagnostic::new(
            0..0,
            "no `streams { … }` block: every event would be dropped. \
             To drop them on purpose, write an empty `streams { }`",
        ));
    }
    if errors.is_empty() {
        file.source = source.to_owned();
        Ok(file)
    } else {
        Err(errors)
    }
}

/// Where the next item may start after an item that failed at `failed` (its
/// first token): the next line whose first word is an item keyword.
fn next_item_line(failed: &str) -> Option<&str> {
    let mut rest = failed;
    loop {
        rest = &rest[rest.find('\n')? + 1..];
        let line = rest.trim_start_matches([' ', '\t', '\r']);
        let starts_item = ITEMS.iter().any(|item| {
            line.strip_prefix(item)
                .is_some_and(|after| !after.starts_with(is_ident_continue))
        });
        if starts_item {
            return Some(line);
        }
    }
}

/// The parsers' error type.
enum Error<'a> {
    /// Nothing matched at this input: the caller may try something else.
    Mismatch(&'a str),
    /// The error to report; travels as `nom::Err::Failure`. Boxed to keep every
    /// parser's result small: the grammar recurses, so that is stack per level.
    Fatal(Box<Diagnostic>),
}

impl<'a> ParseError<&'a str> for Error<'a> {
    fn from_error_kind(input: &'a str, _: ErrorKind) -> Self {
        Error::Mismatch(input)
    }

    fn append(_: &'a str, _: ErrorKind, other: Self) -> Self {
        other
    }
}

/// Lets `map_res` report a diagnostic (it arrives as `nom::Err::Error`, so `cut` it).
impl<'a> FromExternalError<&'a str, Diagnostic> for Error<'a> {
    fn from_external_error(_: &'a str, _: ErrorKind, diagnostic: Diagnostic) -> Self {
        Error::Fatal(Box::new(diagnostic))
    }
}

type PResult<'a, O> = IResult<&'a str, O, Error<'a>>;

fn fail<'a, O>(diagnostic: Diagnostic) -> PResult<'a, O> {
    Err(nom::Err::Failure(Error::Fatal(Box::new(diagnostic))))
}

/// Commits to `parser`: where it does not match, fails with `error(input)`.
fn or_fail<'a, O>(
    mut parser: impl FnMut(&'a str) -> PResult<'a, O>,
    error: impl Fn(&'a str) -> Diagnostic,
) -> impl FnMut(&'a str) -> PResult<'a, O> {
    move |input| match parser(input) {
        Err(nom::Err::Error(_)) => fail(error(input)),
        result => result,
    }
}

// ---- lexical layer ----------------------------------------------------------------

/// Whitespace and `#` comments, which run to the end of the line.
fn trivia(input: &str) -> PResult<'_, ()> {
    let comment = recognize(pair(char('#'), take_till(|c| c == '\n')));
    value(
        (),
        many0_count(alt((take_while1(char::is_whitespace), comment))),
    )(input)
}

fn skip_trivia(input: &str) -> &str {
    trivia(input).map_or(input, |(rest, ())| rest)
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_continue(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// An identifier right at the input.
fn ident(input: &str) -> PResult<'_, &str> {
    recognize(pair(satisfy(is_ident_start), take_while(is_ident_continue)))(input)
}

/// The identifier `word`, after trivia.
fn keyword<'a>(word: &'static str) -> impl FnMut(&'a str) -> PResult<'a, &'a str> {
    verify(preceded(trivia, ident), move |found: &str| found == word)
}

/// The character `c`, after trivia.
fn punct<'a>(c: char) -> impl FnMut(&'a str) -> PResult<'a, char> {
    preceded(trivia, char(c))
}

/// A number literal right at the input: `-`? digits, then an optional fraction and
/// exponent (each only when digits follow).
fn number_literal(input: &str) -> PResult<'_, &str> {
    recognize(tuple((
        opt(char('-')),
        digit1,
        opt(pair(char('.'), digit1)),
        opt(tuple((one_of("eE"), opt(one_of("+-")), digit1))),
    )))(input)
}

/// What the query language skips between tokens (it treats commas as whitespace).
fn is_query_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n' | ',')
}

fn did_you_mean(found: &str, candidates: &[&'static str]) -> Option<String> {
    closest(found, candidates.iter().copied()).map(|word| format!("did you mean `{word}`?"))
}

// ---- bracketed sequences ------------------------------------------------------------

#[derive(Clone, Copy)]
enum Sep {
    /// `,` between items, optional after the last.
    Comma,
    /// An optional `;` after each item.
    Semicolon,
    None,
}

/// A bracketed sequence; `what` names it in errors.
#[derive(Clone, Copy)]
struct Brackets {
    open: char,
    close: char,
    what: &'static str,
    sep: Sep,
    /// Counts towards [`MAX_DEPTH`].
    nests: bool,
}

const BLOCK: Brackets = Brackets {
    open: '{',
    close: '}',
    what: "block",
    sep: Sep::Semicolon,
    nests: true,
};
const TEST: Brackets = Brackets {
    what: "test",
    ..BLOCK
};
const SPLIT: Brackets = Brackets {
    what: "`split`",
    sep: Sep::None,
    ..BLOCK
};
const MAP: Brackets = Brackets {
    what: "map",
    sep: Sep::Comma,
    ..BLOCK
};
const LIST: Brackets = Brackets {
    open: '[',
    close: ']',
    what: "list",
    sep: Sep::Comma,
    nests: true,
};
const ARGS: Brackets = Brackets {
    open: '(',
    close: ')',
    what: "argument list",
    sep: Sep::Comma,
    nests: false,
};

/// A top-level item.
enum Item {
    Output(OutputDecl),
    Streams(Vec<Stmt>),
    Test(TestCase),
}

/// One clause of a `split`.
enum Clause {
    When(WhenClause),
    Else(Block),
}

/// The grammar. `depth` arguments count the blocks, lists and maps already open.
struct Parser<'a> {
    src: &'a str,
}

impl<'a> Parser<'a> {
    /// Byte offset of `rest`, a suffix of the source.
    fn offset(&self, rest: &str) -> usize {
        self.src.len() - rest.len()
    }

    /// `parser` after trivia, with the span of what it read.
    fn spanned<O>(
        &self,
        mut parser: impl FnMut(&'a str) -> PResult<'a, O>,
    ) -> impl FnMut(&'a str) -> PResult<'a, (O, Span)> {
        move |input| {
            let input = skip_trivia(input);
            let (rest, output) = parser(input)?;
            Ok((rest, (output, self.offset(input)..self.offset(rest))))
        }
    }

    /// Commits to `parser`, failing with "expected `expected`, found …" where it does
    /// not match.
    fn expect<O>(
        &self,
        expected: impl Display,
        parser: impl FnMut(&'a str) -> PResult<'a, O>,
    ) -> impl FnMut(&'a str) -> PResult<'a, O> {
        or_fail(parser, move |input| self.unexpected(input, &expected))
    }

    // ---- errors ------------------------------------------------------------------

    /// The span and description of the token at `at`. At the end of the file the
    /// span is an empty one right after the last text, so the caret lands where
    /// something is missing rather than on a blank last line.
    fn found(&self, at: usize) -> (Span, String) {
        const MAX_CHARS: usize = 24;
        let rest = &self.src[at..];
        let Some(first) = rest.chars().next() else {
            let end = self.src.trim_end().len();
            return (end..end, "end of file".to_owned());
        };
        let len = if first == '"' {
            return (at..at + 1, "a string".to_owned());
        } else if is_ident_continue(first)
            || (first == '-' && rest[1..].starts_with(|c: char| c.is_ascii_digit()))
        {
            // A word or a number (with its unit), shown whole.
            1 + rest[1..]
                .find(|c: char| !(is_ident_continue(c) || c == '.'))
                .unwrap_or(rest.len() - 1)
        } else if first.is_control() {
            // Shown by its code, e.g. a NUL as `\u{0}`: as itself it is invisible.
            return (
                at..at + first.len_utf8(),
                format!("`{}`", first.escape_unicode()),
            );
        } else {
            first.len_utf8()
        };
        let text = &rest[..len];
        let shown = match text.char_indices().nth(MAX_CHARS) {
            Some((cut, _)) => format!("`{}…`", &text[..cut]),
            None => format!("`{text}`"),
        };
        (at..at + len, shown)
    }

    /// "unexpected …" for the token at `input`.
    fn unknown(&self, input: &str) -> Diagnostic {
        let (span, found) = self.found(self.offset(skip_trivia(input)));
        Diagnostic::new(span, format!("unexpected {found}"))
    }

    /// "expected X, found Y" at the token after trivia.
    fn unexpected(&self, input: &str, expected: impl Display) -> Diagnostic {
        let (span, found) = self.found(self.offset(skip_trivia(input)));
        Diagnostic::new(span, format!("expected {expected}, found {found}"))
    }

    // ---- top level ---------------------------------------------------------------

    fn item(&self, input: &'a str) -> PResult<'a, Item> {
        let output = self.spanned(preceded(keyword("output"), cut(|i| self.output(i))));
        let streams = preceded(
            keyword("streams"),
            cut(|i| self.block(i, 0, "`streams` block")),
        );
        let test = self.spanned(preceded(keyword("test"), cut(|i| self.test(i))));
        alt((
            map(output, |((name, kind, args), span)| {
                Item::Output(OutputDecl {
                    name,
                    kind,
                    args,
                    span,
                })
            }),
            map(streams, |block| Item::Streams(block.stmts)),
            map(test, |((name, steps), span)| {
                Item::Test(TestCase { name, steps, span })
            }),
            |i| self.unknown_item(i),
        ))(input)
    }

    /// Any other word where an item goes.
    fn unknown_item(&self, input: &'a str) -> PResult<'a, Item> {
        let (_, (word, span)) = self.spanned(ident)(input)?;
        let hint = did_you_mean(word, &ITEMS).unwrap_or_else(|| {
            "a rule file holds `output`, `streams` and `test` items; \
             streams go inside `streams { … }`"
                .to_owned()
        });
        fail(Diagnostic::new(span, format!("unknown item `{word}`")).with_hint(hint))
    }

    /// `NAME = KIND(args)`, after `output`.
    fn output(&self, input: &'a str) -> PResult<'a, (Ident, Ident, Vec<Arg>)> {
        let (input, name) = self.expect("a name for the output", |i| self.name(i))(input)?;
        if KEYWORDS.contains(&name.name.as_str()) {
            let message = format!("`{}` is a keyword and cannot name an output", name.name);
            return fail(Diagnostic::new(name.span, message));
        }
        let (input, _) = self.expect("`=` after the output's name", punct('='))(input)?;
        let (input, kind) =
            self.expect("an output kind, e.g. `graphite`", |i| self.name(i))(input)?;
        let (input, args) = or_fail(
            |i| self.args(i, 0),
            |i| {
                self.unexpected(i, "`(` after the output kind").with_hint(
                    "write `output NAME = KIND(args)`, with `()` when there are no arguments",
                )
            },
        )(input)?;
        Ok((input, (name, kind, args)))
    }

    /// `"name" { step* }`, after `test`.
    fn test(&self, input: &'a str) -> PResult<'a, (String, Vec<TestStep>)> {
        let name = self.expect(
            "the test's name as a string, e.g. `test \"pages\" {`",
            |i| self.string(i),
        );
        let steps = self.expect("`{` to open the test", |i| {
            self.seq(i, TEST, 0, |i, _| self.step(i, 1))
        });
        pair(name, map(steps, |(steps, _)| steps))(input)
    }

    /// `[at DURATION] (send VALUE | expect [no] TARGET VALUE)`.
    fn step(&self, input: &'a str, depth: usize) -> PResult<'a, TestStep> {
        let duration = |value: Value| match value.kind {
            ValueKind::Duration(micros) => Ok(micros),
            _ => Err(
                Diagnostic::new(value.span, "expected a duration after `at`, e.g. `at 5s`")
                    .with_hint("durations take a unit: ms, s, m, h or d"),
            ),
        };
        let mut at = opt(preceded(
            keyword("at"),
            cut(map_res(|i| self.value(i, depth), duration)),
        ));
        let step = move |input: &'a str| {
            let (input, at) = at(input)?;
            // After `at DURATION` the step must follow; only before can the test end.
            let expected = if at.is_some() {
                "`send` or `expect` after the `at`"
            } else {
                "`send`, `expect` or `}`"
            };
            let action = self.expect(
                expected,
                alt((
                    map(
                        preceded(keyword("send"), cut(|i| self.value(i, depth))),
                        TestAction::Send,
                    ),
                    preceded(keyword("expect"), cut(|i| self.expectation(i, depth))),
                    |i| self.unknown_step(i, at.is_some()),
                )),
            );
            map(action, move |action| (at, action))(input)
        };
        map(self.spanned(step), |((at, action), span)| TestStep {
            at,
            action,
            span,
        })(input)
    }

    /// `[no] [tap|publish] TARGET VALUE`, after `expect`.
    fn expectation(&self, input: &'a str, depth: usize) -> PResult<'a, TestAction> {
        // `no` negates only when a target follows; `expect no {…}` targets `no`.
        // Likewise `tap` and `publish`, whose name may be a string (a topic
        // may hold `-` and `.`): no output can be named either, streams' names.
        let (input, no) = opt(terminated(keyword("no"), peek(preceded(trivia, ident))))(input)?;
        // Before the fields `tap` and `publish` are the target's name; before
        // anything else the kind of target, whose name is then required.
        let named = || peek(preceded(trivia, not(char('{'))));
        let (input, of) = opt(alt((
            value(Expected::Tap, terminated(keyword("tap"), named())),
            value(Expected::Publish, terminated(keyword("publish"), named())),
        )))(input)?;
        let of = of.unwrap_or(Expected::Output);
        let quoted = |i| {
            let (rest, (name, span)) = self.spanned(|i| self.string(i))(i)?;
            Ok((rest, Ident { name, span }))
        };
        let (input, target) = match of {
            Expected::Output => {
                self.expect("`index` or an output name after `expect`", |i| self.name(i))(input)?
            }
            Expected::Tap | Expected::Publish => {
                let after = if of == Expected::Tap {
                    "tap"
                } else {
                    "publish"
                };
                let what =
                    format!("a tap's or topic's name (a word or a string) after `expect {after}`");
                let (rest, target) = self.expect(what, alt((|i| self.name(i), quoted)))(input)?;
                // `publish(a.b)` is refused too; a topic may hold them quoted.
                if rest.starts_with(['.', '-']) && !self.src[target.span.clone()].starts_with('"') {
                    let start = target.span.start;
                    let name_chars = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
                    let len = self.src[start..].find(|c| !name_chars(c));
                    let span = start..len.map_or(self.src.len(), |len| start + len);
                    let name = &self.src[span.clone()];
                    return fail(
                        Diagnostic::new(span.clone(), format!("`{name}` is not one name unquoted"))
                            .with_hint(format!("quote a name holding `.` or `-`: \"{name}\"")),
                    );
                }
                (rest, target)
            }
        };
        let (input, fields) = self.value(input, depth)?;
        Ok((
            input,
            TestAction::Expect {
                target,
                fields,
                negated: no.is_some(),
                of,
            },
        ))
    }

    /// Any other word where a test step goes (`after_at`: right after `at DURATION`).
    fn unknown_step(&self, input: &'a str, after_at: bool) -> PResult<'a, TestAction> {
        let (_, (word, span)) = self.spanned(ident)(input)?;
        if word == "at" && after_at {
            return fail(
                Diagnostic::new(span, "a second `at` before the step of the first")
                    .with_hint("each `at DURATION` takes one step: `at 5s send {…}`"),
            );
        }
        let hint = did_you_mean(word, &["send", "expect", "at"]).unwrap_or_else(|| {
            "a step is `send {…}` or `expect TARGET {…}`, optionally after `at DURATION`".to_owned()
        });
        fail(Diagnostic::new(span, format!("unknown test step `{word}`")).with_hint(hint))
    }

    // ---- statements --------------------------------------------------------------

    /// `{ stmt* }`, required here; `what` names the block in errors.
    fn block(&self, input: &'a str, depth: usize, what: &str) -> PResult<'a, Block> {
        or_fail(
            |i| self.body(i, depth),
            |i| self.unexpected(i, format_args!("`{{` to open the {what}")),
        )(input)
    }

    /// `{ stmt* }`, or a mismatch if no `{` comes next.
    fn body(&self, input: &'a str, depth: usize) -> PResult<'a, Block> {
        let (input, (stmts, span)) = self.seq(input, BLOCK, depth, |i, before| {
            self.stmt(i, before, depth + 1)
        })?;
        Ok((input, Block { stmts, span }))
    }

    /// `else { … }`, if an `else` comes next.
    fn else_block(&self, input: &'a str, depth: usize) -> PResult<'a, Option<Block>> {
        opt(preceded(
            keyword("else"),
            cut(|i| self.block(i, depth, "`else` body")),
        ))(input)
    }

    /// One statement; `before` are the block's earlier statements, used to explain a
    /// misspelt `where`.
    fn stmt(&self, input: &'a str, before: &[Stmt], depth: usize) -> PResult<'a, Stmt> {
        or_fail(
            alt((
                |i| self.where_stmt(i, depth),
                |i| self.split(i, depth),
                |i| self.misplaced_keyword(i),
                |i| self.call(i, depth),
            )),
            |i| self.not_a_stream(i, before),
        )(input)
    }

    /// `where PREDICATE { … } [else { … }]`
    fn where_stmt(&self, input: &'a str, depth: usize) -> PResult<'a, Stmt> {
        let rest = tuple((
            |i| self.predicate(i, "where"),
            |i| self.block(i, depth, "`where` body"),
            |i| self.else_block(i, depth),
        ));
        map(
            self.spanned(preceded(keyword("where"), cut(rest))),
            |(((pred, pred_span), body, else_body), span)| Stmt::Where {
                pred,
                pred_span,
                body,
                else_body,
                span,
            },
        )(input)
    }

    /// `split { (when PREDICATE { … })* [else { … }] }`
    fn split(&self, input: &'a str, depth: usize) -> PResult<'a, Stmt> {
        let clauses = self.expect("`{` after `split`", |i| {
            self.seq(i, SPLIT, depth, |i, before| {
                self.clause(i, before, depth + 1)
            })
        });
        let (input, ((clauses, _), span)) =
            self.spanned(preceded(keyword("split"), cut(clauses)))(input)?;
        let mut default = None;
        let clauses = clauses
            .into_iter()
            .filter_map(|clause| match clause {
                Clause::When(when) => Some(when),
                Clause::Else(block) => {
                    default = Some(block);
                    None
                }
            })
            .collect();
        Ok((
            input,
            Stmt::Split {
                clauses,
                default,
                span,
            },
        ))
    }

    /// `when PREDICATE { … }` or `else { … }`, which must come last.
    fn clause(&self, input: &'a str, before: &[Clause], depth: usize) -> PResult<'a, Clause> {
        if let Some(Clause::Else(_)) = before.last() {
            return fail(
                self.unexpected(input, "`}` to close the `split`")
                    .with_hint("`else` must be the last clause of `split`"),
            );
        }
        let when = pair(
            |i| self.predicate(i, "when"),
            |i| self.block(i, depth, "`when` body"),
        );
        let when = map(
            preceded(keyword("when"), cut(when)),
            |((pred, pred_span), body)| {
                Clause::When(WhenClause {
                    pred,
                    pred_span,
                    body,
                })
            },
        );
        let otherwise = preceded(
            keyword("else"),
            cut(|i| self.block(i, depth, "`else` body")),
        );
        or_fail(alt((when, map(otherwise, Clause::Else))), |i| {
            let diagnostic = self.unexpected(i, "`when`, `else` or `}` in `split`");
            let word = preceded(trivia, ident)(i).ok();
            match word.and_then(|(_, word)| did_you_mean(word, &["when", "else"])) {
                Some(hint) => diagnostic.with_hint(hint),
                None => diagnostic,
            }
        })(input)
    }

    /// The keywords that cannot start a statement, as errors; a mismatch for any other
    /// input.
    fn misplaced_keyword(&self, input: &'a str) -> PResult<'a, Stmt> {
        let (_, (word, span)) = self.spanned(ident)(input)?;
        match word {
            "else" => fail(
                Diagnostic::new(span, "`else` without a preceding block").with_hint(
                    "`else { … }` goes right after the `}` of a `where` or a stream's block",
                ),
            ),
            "when" => fail(
                Diagnostic::new(span, "`when` outside `split`")
                    .with_hint("write `split { when PREDICATE { … } … }`"),
            ),
            "output" | "streams" | "test" => fail(
                Diagnostic::new(
                    span,
                    format!("`{word}` is only allowed at the top level of a file"),
                )
                .with_hint("is a `}` missing before it?"),
            ),
            _ => Err(nom::Err::Error(Error::Mismatch(input))),
        }
    }

    /// `name`, `name(args)`, `name(args) { … }`, `name { … } else { … }`, …
    fn call(&self, input: &'a str, depth: usize) -> PResult<'a, Stmt> {
        let parts = |input| {
            let (input, name) = self.name(input)?;
            let (input, args) = opt(|i| self.args(i, depth))(input)?;
            let (input, body) = opt(|i| self.body(i, depth))(input)?;
            // The compiler decides which streams accept an `else`.
            let (input, else_body) = cond(body.is_some(), |i| self.else_block(i, depth))(input)?;
            Ok((input, (name, args, body, else_body.flatten())))
        };
        map(
            self.spanned(parts),
            |((name, args, body, else_body), span)| Stmt::Call {
                name,
                args,
                body,
                else_body,
                span,
            },
        )(input)
    }

    /// The error for something that cannot start a statement. A predicate-looking
    /// token after a bare name like `wher` on the same line is most likely a
    /// misspelt `where`; a tag after a bare `tagged`, a tag test without its
    /// parentheses.
    fn not_a_stream(&self, input: &str, before: &[Stmt]) -> Diagnostic {
        let diagnostic = self.unexpected(input, "a stream or `}`");
        let at = self.offset(skip_trivia(input));
        if let Some(word) = self.hyphenated(at) {
            let hint = format!(
                "names are written with `_`: `{}` for Riemann's `{word}`",
                word.replace('-', "_")
            );
            return diagnostic.with_hint(hint);
        }
        let hint = before
            .iter()
            .rev()
            .take_while(|stmt| !self.src[stmt.span().end..at].contains('\n'))
            .find_map(|stmt| match stmt {
                Stmt::Call {
                    name,
                    args: None,
                    body: None,
                    ..
                } => match name.name.as_str() {
                    // Riemann's `(tagged "a" …)`, or `where tagged "a"` half-changed.
                    tag_test @ ("tagged" | "tagged_all" | "tagged_any") => Some(format!(
                        "the tags go in parentheses: `{tag_test}(\"a\") {{ … }}`"
                    )),
                    other => did_you_mean(other, &["where"]),
                },
                _ => None,
            });
        match hint {
            Some(hint) => diagnostic.with_hint(hint),
            None => diagnostic,
        }
    }

    /// The word around the `-` at `at` when one joins two names, as in
    /// Riemann's `changed-state`: the `-` ended the name before it.
    fn hyphenated(&self, at: usize) -> Option<&str> {
        let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let (before, after) = self.src.split_at(at);
        let after = after.strip_prefix('-')?;
        let start = before.trim_end_matches(is_name).len();
        let rest = after
            .find(|c: char| !(is_name(c) || c == '-'))
            .unwrap_or(after.len());
        let joins = start < at && after.starts_with(|c: char| c.is_ascii_alphabetic());
        joins.then(|| &self.src[start..at + 1 + rest])
    }

    /// The predicate after `keyword`, up to the first token that cannot continue it.
    fn predicate(&self, input: &'a str, keyword: &str) -> PResult<'a, (Query, Span)> {
        let input = skip_trivia(input);
        let start = self.offset(input);
        match Query::parse_prefix(input) {
            Ok((query, consumed)) => {
                let text = &input[..consumed];
                let leading = text.len() - text.trim_start_matches(is_query_space).len();
                let len = text.trim_end_matches(is_query_space).len();
                Ok((&input[len..], (query, start + leading..start + len)))
            }
            Err(error) => {
                let at = (start + error.offset).min(self.src.len());
                let len = self.src[at..].chars().next().map_or(0, char::len_utf8);
                fail(Diagnostic::new(
                    at..at + len,
                    format!("invalid `{keyword}` predicate: {}", error.message),
                ))
            }
        }
    }

    /// `( [arg (, arg)* [,]] )`, or a mismatch if no `(` comes next.
    fn args(&self, input: &'a str, depth: usize) -> PResult<'a, Vec<Arg>> {
        let (input, (args, _)) = self.seq(input, ARGS, depth, |i, _| self.arg(i, depth))?;
        Ok((input, args))
    }

    /// `name: value` or a positional `value`.
    fn arg(&self, input: &'a str, depth: usize) -> PResult<'a, Arg> {
        let label = terminated(|i| self.name(i), punct(':'));
        map(
            self.spanned(pair(opt(label), |i| self.value(i, depth))),
            |((name, value), span)| Arg { name, value, span },
        )(input)
    }

    fn name(&self, input: &'a str) -> PResult<'a, Ident> {
        map(self.spanned(ident), |(name, span)| Ident {
            name: name.to_owned(),
            span,
        })(input)
    }

    /// `open item* close`, with `brackets.sep` between the items, or a mismatch if
    /// `brackets.open` does not come next. `item` also gets the items read so far.
    fn seq<O>(
        &self,
        input: &'a str,
        brackets: Brackets,
        depth: usize,
        mut item: impl FnMut(&'a str, &[O]) -> PResult<'a, O>,
    ) -> PResult<'a, (Vec<O>, Span)> {
        let Brackets {
            open,
            close,
            what,
            sep,
            nests,
        } = brackets;
        let (mut input, _) = punct(open)(input)?;
        let open_at = self.offset(input) - open.len_utf8();
        if nests && depth >= MAX_DEPTH {
            let message = format!("nested too deeply (max {MAX_DEPTH})");
            return fail(Diagnostic::new(open_at..open_at + 1, message));
        }
        let mut items = Vec::new();
        loop {
            if let (rest, Some(_)) = opt(punct(close))(input)? {
                return Ok((rest, (items, open_at..self.offset(rest))));
            }
            if skip_trivia(input).is_empty() {
                let line = line_col(self.src, open_at).0;
                let expected = format_args!("`{close}` to close the {what} opened at line {line}");
                return fail(self.unexpected(input, expected));
            }
            let (rest, next) = cut(|i| item(i, &items))(input)?;
            items.push(next);
            input = match sep {
                Sep::Comma => {
                    let end = alt((
                        value((), punct(',')),
                        value((), peek(punct(close))),
                        value((), preceded(trivia, eof)),
                    ));
                    let error =
                        |i| self.unexpected(i, format_args!("`,` or `{close}` in the {what}"));
                    or_fail(end, error)(rest)?.0
                }
                Sep::Semicolon => opt(punct(';'))(rest)?.0,
                Sep::None => rest,
            };
        }
    }

    // ---- values ------------------------------------------------------------------

    fn value(&self, input: &'a str, depth: usize) -> PResult<'a, Value> {
        let kind = alt((
            map(|i| self.string(i), ValueKind::String),
            |i| self.list(i, depth),
            |i| self.map_value(i, depth),
            |i| self.number(i),
            |i| self.word_value(i),
        ));
        map(
            self.spanned(self.expect("a value", kind)),
            |(kind, span)| Value { kind, span },
        )(input)
    }

    /// A value spelt as a word: a constant, `env("NAME")` or a bare name.
    fn word_value(&self, input: &'a str) -> PResult<'a, ValueKind> {
        let name = self.expect(
            "the variable's name as a string, e.g. `env(\"KEY\")`",
            |i| self.string(i),
        );
        let close = self.expect("`)` after the variable's name", punct(')'));
        let env = preceded(
            pair(keyword("env"), punct('(')),
            cut(terminated(name, close)),
        );
        let word = map(preceded(trivia, ident), |word| match word {
            "true" => ValueKind::Bool(true),
            "false" => ValueKind::Bool(false),
            "null" | "nil" => ValueKind::Null,
            _ => ValueKind::Ident(word.to_owned()),
        });
        alt((map(env, ValueKind::Env), word))(input)
    }

    /// A double-quoted string; strings end on their own line.
    fn string(&self, input: &'a str) -> PResult<'a, String> {
        let (body, _) = punct('"')(input)?;
        let start = self.offset(body) - 1;
        // A line break or the end of the file after `\` leaves the string unterminated.
        let unknown = |rest: &'a str| {
            let (_, other) = none_of("\n")(rest)?;
            let at = self.offset(rest) - 1;
            fail(
                Diagnostic::new(
                    at..at + 1 + other.len_utf8(),
                    format!("unknown escape `\\{other}` in string"),
                )
                .with_hint(r#"the escapes are \" \\ \n \t and \r"#),
            )
        };
        let escape = preceded(
            char('\\'),
            alt((
                value("\"", char('"')),
                value("\\", char('\\')),
                value("\n", char('n')),
                value("\t", char('t')),
                value("\r", char('r')),
                unknown,
            )),
        );
        let piece = alt((take_while1(|c| !matches!(c, '"' | '\\' | '\n')), escape));
        let text = fold_many0(piece, String::new, |mut text, piece| {
            text.push_str(piece);
            text
        });
        let unterminated = |_| {
            let line_end = self.src[start..]
                .find('\n')
                .map_or(self.src.len(), |i| start + i);
            Diagnostic::new(start..line_end, "unterminated string")
                .with_hint(r#"close it with `"` on the same line; write a line break as \n"#)
        };
        terminated(text, or_fail(char('"'), unterminated))(body)
    }

    /// A number, or a duration when a unit follows it directly (`500ms`, `1.5s`).
    fn number(&self, input: &'a str) -> PResult<'a, ValueKind> {
        let (input, _) =
            preceded(trivia, peek(satisfy(|c| c == '-' || c.is_ascii_digit())))(input)?;
        let start = self.offset(input);
        let literal = or_fail(pair(number_literal, take_while(is_ident_continue)), |_| {
            Diagnostic::new(start..start + 1, "expected a digit after `-`")
        });
        cut(map_res(literal, |(text, unit)| {
            number_kind(start, text, unit)
        }))(input)
    }

    fn list(&self, input: &'a str, depth: usize) -> PResult<'a, ValueKind> {
        let (input, (items, _)) = self.seq(input, LIST, depth, |i, _| self.value(i, depth + 1))?;
        Ok((input, ValueKind::List(items)))
    }

    /// `{key: value, …}`; keys are names or strings, each given once.
    fn map_value(&self, input: &'a str, depth: usize) -> PResult<'a, ValueKind> {
        let mut keys = HashSet::new();
        let (input, (entries, _)) = self.seq(input, MAP, depth, |i, _| {
            let (rest, (key, value)) = self.entry(i, depth + 1)?;
            if !keys.insert(key.name.clone()) {
                return fail(Diagnostic::new(
                    key.span,
                    format!("`{}` is given twice", key.name),
                ));
            }
            Ok((rest, (key, value)))
        })?;
        Ok((input, ValueKind::Map(entries)))
    }

    fn entry(&self, input: &'a str, depth: usize) -> PResult<'a, (Ident, Value)> {
        let quoted = map(self.spanned(|i| self.string(i)), |(name, span)| Ident {
            name,
            span,
        });
        let (input, key) = self.expect(
            "a key (a name or a string)",
            alt((|i| self.name(i), quoted)),
        )(input)?;
        let (input, _) = or_fail(punct(':'), |i| {
            self.unexpected(i, format_args!("`:` after the key `{}`", key.name))
        })(input)?;
        let (input, value) = self.value(input, depth)?;
        Ok((input, (key, value)))
    }
}

/// The value of a number literal `text` at byte `start`, with its `unit` (if any).
fn number_kind(start: usize, text: &str, unit: &str) -> Result<ValueKind, Diagnostic> {
    let end = start + text.len();
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
            end..end + unit.len(),
            format!("unknown duration unit `{unit}` (use ms, s, m, h or d)"),
        ));
    };
    duration_micros(text, per_unit)
        .map(ValueKind::Duration)
        .map_err(|message| Diagnostic::new(start..end + unit.len(), message))
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
    use crate::rules::render_all;

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
        parse(src).unwrap_or_else(|d| panic!("{}", render_all(&d, "test.vigil", src)))
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
            Err(diagnostics) => render_all(&diagnostics, "rules/x.vigil", src),
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
            of: Expected::Output,
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
    fn empty_streams_blocks_drop_everything_on_purpose() {
        for src in ["streams {}", "streams { # c\n }", "\u{feff}streams {}"] {
            let file = parse_ok(src);
            assert!(file.outputs.is_empty() && file.streams.is_empty() && file.tests.is_empty());
        }
    }

    /// An emptied file is refused rather than run, dropping every event.
    #[test]
    fn a_file_without_streams_is_refused() {
        let tests_only = "output p = pagerduty(routing_key: \"k\")\ntest \"t\" { send {} }";
        for src in ["", "  \n\t", "# nothing\n# here", tests_only] {
            let errors = parse(src).unwrap_err();
            assert_eq!(errors.len(), 1, "{src:?}");
            assert_eq!(errors[0].span, 0..0);
            assert!(
                errors[0].message.starts_with("no `streams { … }` block"),
                "{}",
                errors[0].message
            );
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
        let src = "streams {} test \"t\" { send {}; at 1m expect no pager {}; expect no {a: 1} at 90s send {} }";
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

    /// `tap` or `publish` followed by anything but the fields is a tap's or
    /// a topic's name missing or misspelt, said where it is: it was read as
    /// the target `tap` or `publish`, the next token as its fields, and the
    /// error fell on what came after.
    #[test]
    fn expect_tap_or_publish_without_a_name_says_so_where_it_is() {
        let cases = [
            (
                "expect publish 5 {}",
                (1, 38),
                "expected a tap's or topic's name (a word or a string) after `expect publish`, found `5`",
            ),
            (
                "expect no tap 5 {}",
                (1, 37),
                "expected a tap's or topic's name (a word or a string) after `expect tap`, found `5`",
            ),
            (
                "expect publish\n}",
                (2, 1),
                "expected a tap's or topic's name (a word or a string) after `expect publish`, found `}`",
            ),
            (
                "expect publish [] {}",
                (1, 38),
                "expected a tap's or topic's name (a word or a string) after `expect publish`, found `[`",
            ),
        ];
        for (step, at, message) in cases {
            let src = format!("streams {{}} test \"t\" {{ {step} }}");
            let errors = parse(&src).unwrap_err();
            let found: Vec<_> = (errors.iter())
                .map(|d| (line_col(&src, d.span.start), d.message.as_str()))
                .collect();
            assert_eq!(found, [(at, message)], "{step}");
        }
    }

    /// A topic's name holding `.` or `-` (as `publish` allows) must be
    /// quoted after `expect publish`, as in `publish(…)`: unquoted, the
    /// error says so at the name, not "expected a value" at the `.`.
    #[test]
    fn an_unquoted_dotted_topic_after_expect_publish_is_told_to_be_quoted() {
        for (step, name) in [
            ("expect publish a.b {}", "a.b"),
            ("expect no tap x-1 {}", "x-1"),
        ] {
            let src = format!("streams {{}} test \"t\" {{ {step} }}");
            let errors = parse(&src).unwrap_err();
            let found: Vec<_> = (errors.iter())
                .map(|d| (&src[d.span.clone()], d.hint.as_deref().unwrap_or_default()))
                .collect();
            let hint = format!("quote a name holding `.` or `-`: \"{name}\"");
            assert_eq!(found, [(name, hint.as_str())], "{step}");
        }
    }

    /// `tap` or `publish` before a name or a string makes the target a tap
    /// or a topic; before fields, it is the target's name (which compiling
    /// then refuses: no output is `tap` or `publish`).
    #[test]
    fn expect_tap_or_publish_names_a_tap_or_a_topic() {
        let src = "streams {} test \"t\" { expect tap t {}; expect no tap \"t\" {}; expect tap {}; \
                   expect publish \"a.b-c\" {}; expect no publish p {}; expect publish {} }";
        let file = parse_ok(src);
        let steps: Vec<_> = file.tests[0]
            .steps
            .iter()
            .map(|step| match &step.action {
                TestAction::Expect {
                    target,
                    negated,
                    of,
                    ..
                } => (
                    &src[target.span.clone()],
                    target.name.as_str(),
                    *negated,
                    *of,
                ),
                TestAction::Send(_) => panic!("an expect"),
            })
            .collect();
        assert_eq!(
            steps,
            [
                ("t", "t", false, Expected::Tap),
                ("\"t\"", "t", true, Expected::Tap),
                ("tap", "tap", false, Expected::Output),
                ("\"a.b-c\"", "a.b-c", false, Expected::Publish),
                ("p", "p", true, Expected::Publish),
                ("publish", "publish", false, Expected::Output),
            ]
        );
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
    fn every_item_with_an_error_is_reported_and_the_good_ones_parsed() {
        let src = "output p = pager(url: \"http://x\")\n\
                   streams {\n  where metric >> 3 { p }\n}\n\
                   output g = graphite(host: )\n\
                   streams {\n  where service =~ \"a\" {\n    index\n\
                   test \"t\" {\n  at 5x send {host: \"a\"}\n}\n\
                   } oops\n\
                   output ok = graphite(host: \"carbon\")\n";
        let errors = parse(src).unwrap_err();
        let lines: Vec<_> = errors.iter().map(|d| line_col(src, d.span.start)).collect();
        // The predicate, the missing value, the block the `test` line cut
        // short, the step's unit; the rest of that test (`} oops`) is skipped
        // to the next item, which parses.
        assert_eq!(lines, [(3, 17), (5, 27), (9, 1), (10, 7)], "{errors:?}");
        assert_eq!(
            errors[2].hint.as_deref(),
            Some("is a `}` missing before it?")
        );
        assert!(parse("streams { index }\noutput ok = graphite(host: \"c\")").is_ok());
    }

    #[test]
    fn reporting_stops_after_twenty_syntax_errors() {
        let src = "streams { where >> }\n".repeat(50);
        let errors = parse(&src).unwrap_err();
        assert_eq!(errors.len(), MAX_SYNTAX_ERRORS + 1);
        assert_eq!(
            errors[MAX_SYNTAX_ERRORS].message,
            "stopped after 20 syntax errors: the rest is not checked"
        );
        assert_eq!(
            line_col(&src, errors[MAX_SYNTAX_ERRORS].span.start),
            (21, 1)
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
    fn a_riemann_name_with_hyphens_is_told_its_spelling_here() {
        let text = error("streams {\n  by(host) { fixed-time-window(10s) { count } }\n}");
        assert!(
            text.ends_with("hint: names are written with `_`: `fixed_time_window` for Riemann's `fixed-time-window`"),
            "{text}"
        );
        // A `-` that joins no names is only unexpected.
        assert!(!error("streams {\n  index -\n}").contains("hint"));
        assert!(!error("streams {\n  index -5\n}").contains("hint"));
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

    /// Riemann's `(tagged "a" …)` and `where tagged "a"` are near what vigil
    /// writes `tagged("a") { … }`: where the parentheses are left out, the
    /// hint puts them back. With them, a tag test is a call like any.
    #[test]
    fn error_tag_test_without_parentheses() {
        assert_eq!(
            error("streams {\n  tagged_any \"a\" { index }\n}"),
            "rules/x.vigil:2:14: expected a stream or `}`, found a string\n\
             \x20     tagged_any \"a\" { index }\n\
             \x20                ^\n\
             \x20 hint: the tags go in parentheses: `tagged_any(\"a\") { … }`"
        );
        let src = "streams { tagged(\"a\", [\"b\"]) { index } else { drop } }";
        let stmts = stmts(src);
        let (name, args, body, else_body) = call(&stmts[0]);
        assert_eq!(name, "tagged");
        assert_eq!(args.map(Vec::len), Some(2));
        assert_eq!(names(&body.unwrap().stmts), ["index"]);
        assert_eq!(names(&else_body.unwrap().stmts), ["drop"]);
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
        assert!(
            error("test \"t\" { send {host: \"a\", \"host\": \"b\"} }")
                .contains(":1:29: `host` is given twice")
        );
        assert!(
            error("test \"t\" { at 1s at 2s }")
                .contains(":1:18: a second `at` before the step of the first")
        );
        assert!(error("test t { }").contains("expected the test's name as a string"));
        assert!(
            error("test \"t\" { expect {} }")
                .contains("expected `index` or an output name after `expect`, found `{`")
        );
    }

    #[test]
    fn error_messages_of_the_less_common_mistakes() {
        let cases = [
            (
                "streams { x([1 2]) }",
                "1:16: expected `,` or `]` in the list, found `2`",
            ),
            ("streams { x(-) }", "1:13: expected a digit after `-`"),
            ("streams { x(\"a\\\n\") }", "1:13: unterminated string"),
            (
                "streams { x(env(KEY)) }",
                "1:17: expected the variable's name as a string, e.g. `env(\"KEY\")`, found `KEY`",
            ),
            (
                "streams { x(env(\"K\" 1)) }",
                "1:21: expected `)` after the variable's name, found `1`",
            ),
            (
                "output o k()",
                "1:10: expected `=` after the output's name, found `k`",
            ),
            (
                "output o = k",
                "1:13: expected `(` after the output kind, found end of file",
            ),
            (
                "streams { split x }",
                "1:17: expected `{` after `split`, found `x`",
            ),
            (
                "streams { where x }",
                "1:19: expected `{` to open the `where` body, found `}`",
            ),
            (
                "streams { a } }",
                "1:15: expected `output`, `streams` or `test`, found `}`",
            ),
            (
                "test \"t\" { at 1s }",
                "1:18: expected `send` or `expect` after the `at`, found `}`",
            ),
            (
                "streams { \u{feff} }",
                "1:11: expected a stream or `}`, found `\u{feff}`",
            ),
            (
                "output o = k({1: 2})",
                "1:15: expected a key (a name or a string), found `1`",
            ),
            (
                "streams { split { when a { } els { } } }",
                "1:30: expected `when`, `else` or `}` in `split`, found `els`",
            ),
        ];
        for (src, expected) in cases {
            let rendered = error(src);
            let first = rendered.lines().next().unwrap();
            assert_eq!(first, format!("rules/x.vigil:{expected}"), "{src:?}");
        }
        assert!(error("output o = k").ends_with(
            "hint: write `output NAME = KIND(args)`, with `()` when there are no arguments"
        ));
        assert!(
            error("streams { split { when a { } els { } } }")
                .ends_with("hint: did you mean `else`?")
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
        // The 100 000-column line is drawn around the caret.
        assert_eq!(
            error(&lists),
            format!(
                "rules/x.vigil:1:78: nested too deeply (max 64)\n    …{}…\n{}^",
                "[".repeat(120),
                " ".repeat(4 + 41)
            )
        );
        let maps = format!("output o = k({}", "{a: ".repeat(100_000));
        assert!(error(&maps).contains("nested too deeply (max 64)"));
        let braces = format!("streams {}", "{".repeat(100_000));
        assert!(error(&braces).contains("expected a stream or `}`, found `{`"));
        assert!(
            error("streams {\n  index\0\n}\n").contains("expected a stream or `}`, found `\\u{0}`"),
            "a NUL is shown by its code"
        );
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
            for diagnostic in parse(&src).err().into_iter().flatten() {
                {
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

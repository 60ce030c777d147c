//! Diagnostics for rule files: one error with its source span and an optional hint,
//! rendered compiler-style (`file:line:col: message`, the source line, carets), plus
//! the "did you mean" helper shared by the parser and the compiler.

use super::ast::Span;
use crate::limits::start_of;

/// Tab stop used when drawing a source line, so the carets line up under tabs.
const TAB_WIDTH: usize = 4;

/// Most columns of a source line drawn: of a longer one (a generated list, a
/// minified file), the part around the caret, the cut ends marked `…`.
const SHOWN_COLUMNS: usize = 120;

/// Columns drawn before the caret when a long line is cut.
const SHOWN_BEFORE: usize = 40;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Diagnostic {
    /// Byte range into the rule file's source.
    pub span: Span,
    pub message: String,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            span,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Renders the diagnostic against `source` (the text its span points into):
    ///
    /// ```text
    /// rules/x.vigil:3:7: unknown stream `wher`
    ///     where metric > 3 { index }
    ///       ^^^^
    ///   hint: did you mean `where`?
    /// ```
    ///
    /// Lines are joined by `\n`, with no trailing newline. A span that crosses lines
    /// is underlined to the end of its first line; an empty one gets a single caret.
    pub fn render(&self, file_name: &str, source: &str) -> String {
        let start = start_of(source, self.span.start).len();
        let end = start_of(source, self.span.end.max(start)).len();
        let (line, col) = line_col(source, start);
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = source[start..]
            .find('\n')
            .map_or(source.len(), |i| start + i);
        let text = source[line_start..line_end].trim_end_matches('\r');
        let before = display_width(&source[line_start..start], 0);
        let underlined = display_width(&source[start..end.min(line_end)], before);
        let (text, before, underlined) = shown(&expand_tabs(text), before, underlined);
        let mut out = format!(
            "{file_name}:{line}:{col}: {message}\n    {text}\n    {pad}{carets}",
            message = self.message,
            pad = " ".repeat(before),
            carets = "^".repeat(underlined.max(1)),
        );
        if let Some(hint) = &self.hint {
            out.push_str("\n  hint: ");
            out.push_str(hint);
        }
        out
    }
}

/// 1-based line and column (in characters) of byte `offset` in `source`; offsets
/// past the end or inside a character are clamped down to the nearest boundary.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = start_of(source, offset).len();
    let before = &source[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// The candidate closest to `name` by edit distance, if it is within
/// `max(1, len / 3)` edits (len in characters): close enough to be a typo.
/// Ties go to the earliest candidate.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        let distance = levenshtein(name, candidate);
        // Strictly better only, so ties go to the earliest candidate.
        if distance <= limit && best.is_none_or(|(best_distance, _)| distance < best_distance) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

/// Edit distance (insertions, deletions, substitutions) over characters.
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// Width on screen of `text` when it starts at screen column `from` (tabs jump to
/// the next tab stop, every other character is one column).
fn display_width(text: &str, from: usize) -> usize {
    text.chars().fold(from, advance) - from
}

fn advance(col: usize, c: char) -> usize {
    if c == '\t' {
        (col / TAB_WIDTH + 1) * TAB_WIDTH
    } else {
        col + 1
    }
}

/// The part of `line` (tabs expanded: a character a column) drawn, with the
/// caret's column and the underline's width in it.
fn shown(line: &str, caret: usize, underlined: usize) -> (String, usize, usize) {
    let columns: Vec<char> = line.chars().collect();
    if columns.len() <= SHOWN_COLUMNS {
        return (line.to_owned(), caret, underlined);
    }
    let first = caret.saturating_sub(SHOWN_BEFORE).min(columns.len());
    let last = (first + SHOWN_COLUMNS).min(columns.len());
    let cut_before = usize::from(first > 0);
    let mut text: String = "…".repeat(cut_before);
    text.extend(&columns[first..last]);
    if last < columns.len() {
        text.push('…');
    }
    let underlined = underlined.min(last.saturating_sub(caret));
    (text, caret - first + cut_before, underlined)
}

fn expand_tabs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut col = 0;
    for c in text.chars() {
        let next = advance(col, c);
        if c == '\t' {
            out.extend(std::iter::repeat_n(' ', next - col));
        } else {
            out.push(c);
        }
        col = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_line_carets_and_hint() {
        let source = "streams {\n  wher metric > 3 { index }\n}\n";
        let diagnostic =
            Diagnostic::new(12..16, "unknown stream `wher`").with_hint("did you mean `where`?");
        assert_eq!(
            diagnostic.render("rules/x.vigil", source),
            "rules/x.vigil:2:3: unknown stream `wher`\n\
             \x20     wher metric > 3 { index }\n\
             \x20     ^^^^\n\
             \x20 hint: did you mean `where`?"
        );
    }

    #[test]
    fn renders_without_hint_and_with_an_empty_span() {
        let source = "a\nbc";
        let diagnostic = Diagnostic::new(4..4, "expected `}`");
        assert_eq!(
            diagnostic.render("f", source),
            "f:2:3: expected `}`\n    bc\n      ^"
        );
    }

    #[test]
    fn multi_line_span_is_underlined_to_the_end_of_its_first_line() {
        let source = "x \"abc\r\ndef\"";
        let diagnostic = Diagnostic::new(2..12, "unterminated string");
        assert_eq!(
            diagnostic.render("f", source),
            "f:1:3: unterminated string\n    x \"abc\n      ^^^^^"
        );
    }

    #[test]
    fn a_long_line_is_drawn_around_the_caret() {
        let source = format!("{}bad{}", "a|".repeat(5000), "|b".repeat(5000));
        let at = source.find("bad").unwrap();
        let rendered = Diagnostic::new(at..at + 3, "here").render("f", &source);
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines[0], "f:1:10001: here");
        let text = format!("    …{}bad{}|…", "a|".repeat(20), "|b".repeat(38));
        assert_eq!(lines[1], text);
        assert_eq!(lines[2], format!("    {}^^^", " ".repeat(41)));
        // Near the start, nothing is cut before it.
        let rendered = Diagnostic::new(2..3, "here").render("f", &source);
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines[1], format!("    {}…", "a|".repeat(60)));
        assert_eq!(lines[2], "      ^");
    }

    #[test]
    fn tabs_are_expanded_so_carets_align() {
        let source = "\tab\tcd";
        let diagnostic = Diagnostic::new(4..6, "here");
        assert_eq!(
            diagnostic.render("f", source),
            "f:1:5: here\n        ab  cd\n            ^^"
        );
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let source = "é → x";
        assert_eq!(line_col(source, source.find('x').unwrap()), (1, 5));
        let diagnostic = Diagnostic::new(7..8, "x");
        assert_eq!(
            diagnostic.render("f", source),
            "f:1:5: x\n    é → x\n        ^"
        );
    }

    #[test]
    fn out_of_range_spans_are_clamped() {
        assert_eq!(line_col("ab\n", 99), (2, 1));
        assert_eq!(line_col("é", 1), (1, 1));
        let diagnostic = Diagnostic::new(50..60, "eof");
        assert_eq!(diagnostic.render("f", "ab"), "f:1:3: eof\n    ab\n      ^");
    }

    #[test]
    fn closest_finds_typos_within_a_third_of_the_length() {
        let items = ["output", "streams", "test"];
        assert_eq!(closest("outptu", items), Some("output"));
        assert_eq!(closest("tesst", items), Some("test"));
        assert_eq!(closest("tset", items), None);
        assert_eq!(closest("stream", items), Some("streams"));
        assert_eq!(closest("banana", items), None);
        assert_eq!(closest("wher", ["where", "when"]), Some("where"));
        assert_eq!(closest("x", ["y", "z"]), Some("y"));
        assert_eq!(closest("", ["ab"]), None);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
    }
}

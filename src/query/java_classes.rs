//! `~=` patterns read as Riemann reads them: Riemann's regexes are Java's,
//! where `\d`, `\w` and `\s` are ASCII classes. The regex crate makes them
//! Unicode classes, hundreds of times larger once compiled: `\w{24}` did not
//! fit a megabyte. Each is rewritten to its ASCII class before compiling.

use regex_syntax::ast::parse::Parser;
use regex_syntax::ast::{self, Ast, ClassPerl, ClassPerlKind, ClassSetItem, Visitor};

/// `pattern` with each Perl class (`\d \w \s`, negated `\D \W \S`) as Java's
/// ASCII set. A pattern that does not parse is returned as it is, for the
/// compiler to report.
pub(super) fn ascii_perl_classes(pattern: &str) -> String {
    let Ok(tree) = Parser::new().parse(pattern) else {
        return pattern.to_owned();
    };
    let Ok(mut found) = ast::visit(&tree, PerlClasses::default()) else {
        return pattern.to_owned();
    };
    found.sort_by_key(|(class, _)| class.span.start.offset);
    let mut out = String::with_capacity(pattern.len());
    let mut copied = 0;
    for (class, in_set) in found {
        let (start, end) = (class.span.start.offset, class.span.end.offset);
        out.push_str(&pattern[copied..start]);
        let members = match class.kind {
            ClassPerlKind::Digit => "0-9",
            ClassPerlKind::Word => "0-9A-Za-z_",
            // Java's `\s`: space, tab, newline, vertical tab, form feed, return.
            ClassPerlKind::Space => r" \t\n\x0B\x0C\r",
        };
        // Inside `[…]` a plain class adds its members; a negated one is a
        // nested class, which the regex crate reads as a union.
        match (class.negated, in_set) {
            (false, true) => out.push_str(members),
            (false, false) => out.push_str(&format!("[{members}]")),
            (true, _) => out.push_str(&format!("[^{members}]")),
        }
        copied = end;
    }
    out.push_str(&pattern[copied..]);
    out
}

/// Every Perl class of a pattern, and whether it sits inside `[…]`.
#[derive(Default)]
struct PerlClasses(Vec<(ClassPerl, bool)>);

impl Visitor for PerlClasses {
    type Output = Vec<(ClassPerl, bool)>;
    type Err = ();

    fn finish(self) -> Result<Self::Output, ()> {
        Ok(self.0)
    }

    fn visit_pre(&mut self, ast: &Ast) -> Result<(), ()> {
        if let Ast::ClassPerl(class) = ast {
            self.0.push(((**class).clone(), false));
        }
        Ok(())
    }

    fn visit_class_set_item_pre(&mut self, item: &ClassSetItem) -> Result<(), ()> {
        if let ClassSetItem::Perl(class) = item {
            self.0.push((class.clone(), true));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perl_classes_become_javas_ascii_sets() {
        let cases = [
            (
                r"\w+@\w+\.\w{2,30}",
                r"[0-9A-Za-z_]+@[0-9A-Za-z_]+\.[0-9A-Za-z_]{2,30}",
            ),
            (r"^cpu-\d+$", r"^cpu-[0-9]+$"),
            (r"\S\s", r"[^ \t\n\x0B\x0C\r][ \t\n\x0B\x0C\r]"),
            (r"[\d_-]", r"[0-9_-]"),
            (r"[^\w.]", r"[^0-9A-Za-z_.]"),
            (r"[a\D]", r"[a[^0-9]]"),
            // Escaped backslashes, `\p{…}` and everything else stay.
            (r"\\d \p{L} \b", r"\\d \p{L} \b"),
            (r"(unclosed", r"(unclosed"),
        ];
        for (pattern, ascii) in cases {
            assert_eq!(ascii_perl_classes(pattern), ascii, "{pattern}");
        }
    }

    #[test]
    fn the_ascii_sets_match_as_javas_classes_do() {
        let regex = |p: &str| regex_automata::meta::Regex::new(&ascii_perl_classes(p)).unwrap();
        assert!(regex(r"^\w+$").is_match("web_01"));
        assert!(
            !regex(r"^\w+$").is_match("wébé"),
            "`é` is not a Java word character"
        );
        assert!(regex(r"^\W$").is_match("é"));
        assert!(regex(r"^\d$").is_match("7"));
        assert!(
            !regex(r"^\d$").is_match("٣"),
            "an Arabic-Indic digit is not `\\d` in Java"
        );
        assert!(regex(r"^\s$").is_match("\u{b}"));
        assert!(!regex(r"^\s$").is_match("\u{a0}"));
        assert!(regex(r"^[\W]$").is_match("é"));
    }
}

//! The compiled predicate tree and its evaluation against an [`Event`]. Everything
//! costly (regexes, LIKE patterns, field-name lookup) is resolved at compile time, so
//! `eval` only borrows from the event and the tree.

use std::cmp::Ordering;
use std::collections::HashSet;

use super::pattern::Pattern;
use crate::event::{Event, Field, Metric, same_bytes};

/// The value of a field, borrowed from the event. Always inlined, as is
/// [`Operand::get`]: each is on the path of every `where`, and the compiler
/// left them as calls when code elsewhere changed (callgrind, 2026-12-05:
/// 93 instructions more per 1-event message).
#[inline(always)]
fn value<'e>(field: &Field, event: &'e Event) -> Val<'e> {
    let text = |s: &'e Option<String>| s.as_deref().map_or(Val::Nil, Val::Str);
    match field {
        Field::Host => text(&event.host),
        Field::Service => text(&event.service),
        Field::State => text(&event.state),
        Field::Description => text(&event.description),
        Field::Metric => match event.metric {
            Some(Metric::Int(i)) => Val::Int(i),
            Some(Metric::Float(f)) => Val::Float(f),
            None => Val::Nil,
        },
        Field::Ttl => event.ttl.map_or(Val::Nil, |t| Val::Float(f64::from(t))),
        Field::Time => Val::Float(event.time_secs()),
        Field::Attribute(name) => event.attribute(name).map_or(Val::Nil, Val::Str),
    }
}

/// A literal written in the query.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Lit {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Operand {
    Lit(Lit),
    Field(Field),
}

impl Operand {
    /// A value standing alone is a truth test: a field means "is present", a
    /// literal is decided now.
    pub(super) fn truthiness(self) -> Node {
        match self {
            Operand::Field(field) => Node::Present(field),
            Operand::Lit(Lit::Nil | Lit::Bool(false)) => Node::Const(false),
            Operand::Lit(_) => Node::Const(true),
        }
    }

    #[inline(always)]
    fn get<'a>(&'a self, event: &'a Event) -> Val<'a> {
        match self {
            Operand::Field(field) => value(field, event),
            Operand::Lit(Lit::Nil) => Val::Nil,
            Operand::Lit(Lit::Bool(b)) => Val::Bool(*b),
            Operand::Lit(Lit::Int(i)) => Val::Int(*i),
            Operand::Lit(Lit::Float(f)) => Val::Float(*f),
            Operand::Lit(Lit::Str(s)) => Val::Str(s),
        }
    }
}

/// A runtime value, borrowed so that evaluation never allocates.
#[derive(Debug, Clone, Copy)]
enum Val<'a> {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
}

fn equal(a: Val<'_>, b: Val<'_>) -> bool {
    match (a, b) {
        (Val::Nil, Val::Nil) => true,
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Str(x), Val::Str(y)) => same_bytes(x.as_bytes(), y.as_bytes()),
        // Numbers compare by value, exactly, so `metric = 1` matches 1.0.
        _ => order(a, b) == Some(Ordering::Equal),
    }
}

/// Ordering is defined only between numbers; `None` (NaN, or any other kind) makes
/// every ordering comparison false.
#[inline]
fn order(a: Val<'_>, b: Val<'_>) -> Option<Ordering> {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => Some(x.cmp(&y)),
        (Val::Float(x), Val::Float(y)) => x.partial_cmp(&y),
        (Val::Int(x), Val::Float(y)) => int_to_float(x, y),
        (Val::Float(x), Val::Int(y)) => int_to_float(y, x).map(Ordering::reverse),
        _ => None,
    }
}

/// An integer against a float, exactly: converting the integer to a float
/// would round it past 2^53, making 2^53 + 1 equal to 2^53.
#[inline]
fn int_to_float(int: i64, float: f64) -> Option<Ordering> {
    // Within ±2^53 every integer is a float: compared as floats, exactly,
    // which is cheaper than the split below; metrics mostly are.
    const EXACT: i64 = 1 << 53;
    if (-EXACT..=EXACT).contains(&int) {
        return (int as f64).partial_cmp(&float);
    }
    // 2^63, the first float past i64::MAX.
    const PAST_I64: f64 = 9_223_372_036_854_775_808.0;
    if float.is_nan() {
        return None;
    }
    if float >= PAST_I64 {
        return Some(Ordering::Less);
    }
    if float < -PAST_I64 {
        return Some(Ordering::Greater);
    }
    let whole = float.trunc();
    // In range and integral, so the cast is exact; the fraction breaks a tie.
    Some(
        int.cmp(&(whole as i64))
            .then(0.0.partial_cmp(&(float - whole))?),
    )
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn apply(self, a: Val<'_>, b: Val<'_>) -> bool {
        match self {
            CmpOp::Eq => equal(a, b),
            CmpOp::Ne => !equal(a, b),
            CmpOp::Lt => order(a, b) == Some(Ordering::Less),
            CmpOp::Le => matches!(order(a, b), Some(Ordering::Less | Ordering::Equal)),
            CmpOp::Gt => order(a, b) == Some(Ordering::Greater),
            CmpOp::Ge => matches!(order(a, b), Some(Ordering::Greater | Ordering::Equal)),
        }
    }
}

/// An SQL LIKE pattern where only `%` is special, stored as the literal pieces
/// between the `%`s.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LikePattern {
    pieces: Vec<String>,
}

impl LikePattern {
    pub(super) fn new(pattern: &str) -> Self {
        Self {
            pieces: pattern.split('%').map(str::to_owned).collect(),
        }
    }

    /// Whether matching searches the text (a piece between two `%`s), not
    /// only compares its ends.
    fn scans(&self) -> bool {
        self.pieces.len() > 2
    }

    fn matches(&self, text: &str) -> bool {
        let [first, middle @ .., last] = self.pieces.as_slice() else {
            // No `%` at all: the whole text must equal the pattern.
            return self.pieces.first().is_some_and(|p| p == text);
        };
        let Some(rest) = strip_prefix(text, first) else {
            return false;
        };
        // Strip the suffix before searching the middle pieces so they cannot overlap it.
        let Some(mut rest) = strip_suffix(rest, last) else {
            return false;
        };
        // Leftmost placement of each middle piece leaves the most room for the rest.
        for piece in middle {
            match rest.find(piece.as_str()) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        true
    }
}

/// `str::strip_prefix`, compared with [`same_bytes`].
fn strip_prefix<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    let head = text.as_bytes().get(..prefix.len())?;
    same_bytes(head, prefix.as_bytes()).then(|| &text[prefix.len()..])
}

/// `str::strip_suffix`, compared with [`same_bytes`].
fn strip_suffix<'t>(text: &'t str, suffix: &str) -> Option<&'t str> {
    let cut = text.len().checked_sub(suffix.len())?;
    same_bytes(&text.as_bytes()[cut..], suffix.as_bytes()).then(|| &text[..cut])
}

#[derive(Debug, Clone)]
pub(super) enum Node {
    Const(bool),
    Present(Field),
    Tagged(String),
    Compare {
        left: Operand,
        op: CmpOp,
        right: Operand,
    },
    Like {
        left: Operand,
        pattern: LikePattern,
    },
    Regex {
        left: Operand,
        regex: Pattern,
    },
    /// `field = "a" or field = "b" or …`, from [`ONE_OF_MIN`] such terms up:
    /// one lookup per event, where a list of hosts a dashboard asks for
    /// would otherwise cost a comparison per host.
    OneOf {
        field: Field,
        values: HashSet<String>,
    },
    Not(Box<Node>),
    /// And/Or keep their operands flat so a long chain costs no recursion.
    And(Vec<Node>),
    Or(Vec<Node>),
}

/// What a term that scans a string weighs in [`Node::weight`]: as much as
/// 16 comparisons, so that one such term alone is cheap, two are not.
const SCAN_WEIGHT: usize = 16;

/// The heaviest tree [`Query::costly`](super::Query::costly) leaves to be
/// evaluated without a budget: 16 comparisons, or one term that scans a
/// string (whose cost `--max-string` bounds).
pub(super) const CHEAP_WEIGHT: usize = 16;

/// The work [`Node::eval_within`] counts for a term that scans `text`: one,
/// and one per 16 bytes, so a term scanning 4 KiB or more is followed by a
/// look at the clock.
#[inline]
fn scan_units(text: &str) -> u32 {
    u32::try_from(text.len() / 16)
        .unwrap_or(u32::MAX)
        .saturating_add(1)
}

/// Equalities of one field in a disjunction from which they become one
/// [`Node::OneOf`]: fewer are compared as fast as they are looked up.
const ONE_OF_MIN: usize = 8;

/// The same predicate, however it was spaced or parenthesised: a regex is
/// the same when its pattern is.
impl PartialEq for Node {
    fn eq(&self, other: &Node) -> bool {
        match (self, other) {
            (Node::Const(a), Node::Const(b)) => a == b,
            (Node::Present(a), Node::Present(b)) => a == b,
            (Node::Tagged(a), Node::Tagged(b)) => a == b,
            (
                Node::Compare { left, op, right },
                Node::Compare {
                    left: l,
                    op: o,
                    right: r,
                },
            ) => (left, op, right) == (l, o, r),
            (
                Node::Like { left, pattern },
                Node::Like {
                    left: l,
                    pattern: p,
                },
            ) => (left, pattern) == (l, p),
            (Node::Regex { left, regex }, Node::Regex { left: l, regex: r }) => {
                left == l && regex.as_str() == r.as_str()
            }
            (
                Node::OneOf { field, values },
                Node::OneOf {
                    field: f,
                    values: v,
                },
            ) => (field, values) == (f, v),
            (Node::Not(a), Node::Not(b)) => a == b,
            (Node::And(a), Node::And(b)) | (Node::Or(a), Node::Or(b)) => a == b,
            _ => false,
        }
    }
}

impl Node {
    /// Conjunction of `terms`, splicing in nested conjunctions (from parentheses).
    pub(super) fn all(terms: Vec<Node>) -> Node {
        Self::join(terms, Node::And, |n| match n {
            Node::And(inner) => Ok(inner),
            other => Err(other),
        })
    }

    /// Disjunction of `terms`, splicing in nested disjunctions, with the
    /// equalities of a field many terms test made one [`Node::OneOf`].
    pub(super) fn any(terms: Vec<Node>) -> Node {
        match Self::join(terms, Node::Or, |n| match n {
            Node::Or(inner) => Ok(inner),
            other => Err(other),
        }) {
            Node::Or(terms) => Self::one_of_each_field(terms),
            only => only,
        }
    }

    /// A disjunction's order does not matter to its value, and its terms
    /// have no effects: each field's equalities, if there are enough, are
    /// taken out and tested as one.
    fn one_of_each_field(mut terms: Vec<Node>) -> Node {
        let mut counts: Vec<(Field, usize)> = Vec::new();
        for (field, _) in terms.iter().filter_map(Node::field_equals) {
            match counts.iter_mut().find(|(f, _)| f == field) {
                Some((_, n)) => *n += 1,
                None => counts.push((field.clone(), 1)),
            }
        }
        for (field, _) in counts.into_iter().filter(|&(_, n)| n >= ONE_OF_MIN) {
            let mut values = HashSet::new();
            terms.retain(|t| match t.field_equals() {
                Some((f, value)) if *f == field => {
                    values.insert(value.to_owned());
                    false
                }
                _ => true,
            });
            terms.push(Node::OneOf { field, values });
        }
        match <[Node; 1]>::try_from(terms) {
            Ok([only]) => only,
            Err(terms) => Node::Or(terms),
        }
    }

    fn join(
        terms: Vec<Node>,
        make: fn(Vec<Node>) -> Node,
        unwrap_same: fn(Node) -> Result<Vec<Node>, Node>,
    ) -> Node {
        let terms = match <[Node; 1]>::try_from(terms) {
            Ok([only]) => return only,
            Err(terms) => terms,
        };
        let mut flat = Vec::with_capacity(terms.len());
        for term in terms {
            match unwrap_same(term) {
                Ok(inner) => flat.extend(inner),
                Err(other) => flat.push(other),
            }
        }
        make(flat)
    }

    pub(super) fn eval(&self, event: &Event) -> bool {
        match self {
            Node::Const(b) => *b,
            Node::Present(field) => !matches!(value(field, event), Val::Nil),
            Node::Tagged(tag) => event.has_tag(tag),
            Node::Compare { left, op, right } => op.apply(left.get(event), right.get(event)),
            Node::Like { left, pattern } => {
                matches!(left.get(event), Val::Str(s) if pattern.matches(s))
            }
            Node::Regex { left, regex } => {
                matches!(left.get(event), Val::Str(s) if regex.is_match(s))
            }
            Node::OneOf { field, values } => {
                matches!(value(field, event), Val::Str(s) if values.contains(s))
            }
            Node::Not(inner) => !inner.eval(event),
            Node::And(terms) => terms.iter().all(|t| t.eval(event)),
            Node::Or(terms) => terms.iter().any(|t| t.eval(event)),
        }
    }

    /// [`Node::eval`], counting its work in `budget` and giving up once it
    /// is spent: a term at a time, so a chain of thousands of terms, or of
    /// scans of long strings, stops within one term of its deadline.
    pub(super) fn eval_within(
        &self,
        event: &Event,
        budget: &mut super::Budget<'_>,
    ) -> Result<bool, super::Exceeded> {
        let (matched, units) = match self {
            Node::Not(inner) => return Ok(!inner.eval_within(event, budget)?),
            Node::And(terms) => {
                for term in terms {
                    if !term.eval_within(event, budget)? {
                        return Ok(false);
                    }
                }
                return Ok(true);
            }
            Node::Or(terms) => {
                for term in terms {
                    if term.eval_within(event, budget)? {
                        return Ok(true);
                    }
                }
                return Ok(false);
            }
            Node::Like { left, pattern } => match left.get(event) {
                Val::Str(s) => (pattern.matches(s), scan_units(s)),
                _ => (false, 1),
            },
            Node::Regex { left, regex } => match left.get(event) {
                Val::Str(s) => (regex.is_match(s), scan_units(s)),
                _ => (false, 1),
            },
            Node::OneOf { field, values } => match value(field, event) {
                Val::Str(s) => (values.contains(s), scan_units(s)),
                _ => (false, 1),
            },
            other => (other.eval(event), 1),
        };
        // Counted after the term: one that scanned a long string is
        // followed by a look at the clock, before any other runs.
        budget.spend(units)?;
        Ok(matched)
    }

    /// What one event may cost the tree, roughly: a term each, a term that
    /// scans a string (a LIKE with `%` inside, a regex, a set of values to
    /// hash) [`SCAN_WEIGHT`], a constant nothing.
    pub(super) fn weight(&self) -> usize {
        match self {
            Node::Const(_) => 0,
            Node::Not(inner) => inner.weight(),
            Node::And(terms) | Node::Or(terms) => terms.iter().map(Node::weight).sum(),
            Node::Like { pattern, .. } if pattern.scans() => SCAN_WEIGHT,
            Node::Regex { .. } | Node::OneOf { .. } => SCAN_WEIGHT,
            _ => 1,
        }
    }

    /// The tests in the tree: what one event costs to match, within a
    /// constant.
    pub(super) fn terms(&self) -> usize {
        match self {
            Node::Not(inner) => inner.terms(),
            Node::And(terms) | Node::Or(terms) => terms.iter().map(Node::terms).sum(),
            _ => 1,
        }
    }

    /// `(host, service)` when the tree is exactly `host = "X" and service = "Y"`.
    pub(super) fn exact_key(&self) -> Option<(&str, &str)> {
        let Node::And(terms) = self else { return None };
        let [a, b] = terms.as_slice() else {
            return None;
        };
        match (a.field_equals()?, b.field_equals()?) {
            ((Field::Host, host), (Field::Service, service))
            | ((Field::Service, service), (Field::Host, host)) => Some((host, service)),
            _ => None,
        }
    }

    /// `(field, "literal")` for `field = "literal"` in either operand order.
    fn field_equals(&self) -> Option<(&Field, &str)> {
        match self {
            Node::Compare {
                left,
                op: CmpOp::Eq,
                right,
            } => match (left, right) {
                (Operand::Field(f), Operand::Lit(Lit::Str(s)))
                | (Operand::Lit(Lit::Str(s)), Operand::Field(f)) => Some((f, s)),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn like(pattern: &str, text: &str) -> bool {
        LikePattern::new(pattern).matches(text)
    }

    #[test]
    fn like_edge_cases() {
        assert!(like("%", ""));
        assert!(like("%", "anything"));
        assert!(like("a%", "a"));
        assert!(like("a%", "abc"));
        assert!(!like("a%", "ba"));
        assert!(like("%a", "cba"));
        assert!(!like("%a", "ab"));
        assert!(like("%a%b%", "ab"));
        assert!(like("%a%b%", "xxaxxbxx"));
        assert!(!like("%a%b%", "ba"));
        assert!(like("a%a", "aa"));
        assert!(!like("a%a", "a"), "prefix and suffix must not overlap");
        assert!(like("a%b%b", "abb"));
        assert!(!like("a%b%b", "ab"));
        assert!(like("%%", "x"));
        // `_` and regex metacharacters are literal.
        assert!(like("a_c", "a_c"));
        assert!(!like("a_c", "abc"));
        assert!(like("a.c%", "a.cd"));
        assert!(!like("a.c", "abc"));
        // No `%`: exact match, anchored both ends.
        assert!(like("", ""));
        assert!(!like("", "a"));
        assert!(like("abc", "abc"));
        assert!(!like("abc", "abcd"));
        assert!(!like("abc", "xabc"));
        assert!(like("ü%", "über"));
    }

    #[test]
    fn equality_mixes_numeric_kinds() {
        assert!(equal(Val::Int(1), Val::Float(1.0)));
        assert!(equal(Val::Float(1.0), Val::Int(1)));
        assert!(equal(Val::Int(i64::MAX), Val::Int(i64::MAX)));
        assert!(
            !equal(Val::Int(i64::MAX), Val::Int(i64::MAX - 1)),
            "ints compare exactly"
        );
        assert!(!equal(Val::Float(f64::NAN), Val::Float(f64::NAN)));
        assert!(equal(Val::Nil, Val::Nil));
        assert!(!equal(Val::Nil, Val::Int(0)));
        assert!(!equal(Val::Str("1"), Val::Int(1)));
        assert!(!equal(Val::Bool(true), Val::Int(1)));
    }

    #[test]
    fn integers_meet_floats_exactly_beyond_2_pow_53() {
        let big = 9_007_199_254_740_993; // 2^53 + 1: no f64 holds it
        let below = 9_007_199_254_740_992.0;
        assert!(!equal(Val::Int(big), Val::Float(below)));
        assert!(!equal(Val::Float(below), Val::Int(big)));
        assert!(CmpOp::Gt.apply(Val::Int(big), Val::Float(below)));
        assert!(CmpOp::Lt.apply(Val::Float(below), Val::Int(big)));
        assert!(equal(Val::Int(big - 1), Val::Float(below)));
        assert!(CmpOp::Lt.apply(Val::Int(2), Val::Float(2.5)));
        assert!(CmpOp::Gt.apply(Val::Int(-2), Val::Float(-2.5)));
        assert!(CmpOp::Lt.apply(Val::Int(-3), Val::Float(-2.5)));
        assert!(equal(
            Val::Int(i64::MIN),
            Val::Float(-9_223_372_036_854_775_808.0)
        ));
        assert!(CmpOp::Lt.apply(Val::Int(i64::MAX), Val::Float(9_223_372_036_854_775_808.0)));
        assert!(CmpOp::Gt.apply(Val::Int(i64::MIN), Val::Float(-1e300)));
        assert!(CmpOp::Gt.apply(Val::Int(0), Val::Float(f64::NEG_INFINITY)));
    }

    #[test]
    fn ordering_needs_two_numbers() {
        assert!(CmpOp::Lt.apply(Val::Int(1), Val::Float(1.5)));
        assert!(CmpOp::Le.apply(Val::Int(2), Val::Int(2)));
        assert!(CmpOp::Ge.apply(Val::Float(f64::INFINITY), Val::Int(i64::MAX)));
        assert!(!CmpOp::Lt.apply(Val::Str("a"), Val::Str("b")));
        assert!(!CmpOp::Gt.apply(Val::Nil, Val::Int(0)));
        for op in [CmpOp::Lt, CmpOp::Le, CmpOp::Gt, CmpOp::Ge] {
            assert!(!op.apply(Val::Float(f64::NAN), Val::Int(0)));
            assert!(!op.apply(Val::Int(0), Val::Float(f64::NAN)));
        }
    }

    #[test]
    fn join_flattens_and_unwraps() {
        let n = Node::all(vec![Node::Const(true)]);
        assert!(matches!(n, Node::Const(true)));
        let n = Node::all(vec![
            Node::And(vec![Node::Const(true), Node::Const(true)]),
            Node::Or(vec![Node::Const(true), Node::Const(false)]),
        ]);
        assert!(matches!(&n, Node::And(t) if t.len() == 3));
    }
}

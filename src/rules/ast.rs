//! The syntax tree of a rule file, exactly as written: every node carries the
//! byte span it came from, so the compiler and `vigil check` can point at it.
//! Meaning (which names exist, which arguments they take) is the compiler's job.

use crate::clock::Micros;
use crate::query::Query;

/// Byte offsets into the rule file's source.
pub type Span = std::ops::Range<usize>;

#[derive(Debug, Clone, Default)]
pub struct RuleFile {
    /// The text parsed, which the spans index.
    pub source: String,
    pub outputs: Vec<OutputDecl>,
    /// The statements of every `streams { … }` block, in order.
    pub streams: Vec<Stmt>,
    pub tests: Vec<TestCase>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// `output NAME = KIND(args)`
#[derive(Debug, Clone)]
pub struct OutputDecl {
    pub name: Ident,
    pub kind: Ident,
    pub args: Vec<Arg>,
    pub span: Span,
}

/// `name: value` or a positional `value`.
#[derive(Debug, Clone)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Value,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub kind: ValueKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ValueKind {
    Number(f64),
    String(String),
    /// `500ms`, `5s`, `2m`, `1h`.
    Duration(Micros),
    Bool(bool),
    Null,
    List(Vec<Value>),
    /// `{key: value, …}`; keys are identifiers or strings.
    Map(Vec<(Ident, Value)>),
    /// `env("NAME")`: resolved by the compiler, so `vigil check` can report a missing variable.
    Env(String),
    /// A bare name used as a value, e.g. the fields in `by(host, service)`.
    Ident(String),
}

#[derive(Debug, Clone)]
pub struct Block {
    pub stmts: Vec<Stmt>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub enum Stmt {
    /// `name`, `name(args)`, `name(args) { … }`, `name { … } else { … }`: every
    /// stream except the two with a predicate. A bare name may also be an output.
    Call {
        name: Ident,
        /// `None` when written without parentheses.
        args: Option<Vec<Arg>>,
        body: Option<Block>,
        else_body: Option<Block>,
        span: Span,
    },
    /// `where PREDICATE { … } [else { … }]`
    Where {
        pred: Query,
        pred_span: Span,
        body: Block,
        else_body: Option<Block>,
        span: Span,
    },
    /// `split { when PREDICATE { … } … [else { … }] }`
    Split {
        clauses: Vec<WhenClause>,
        default: Option<Block>,
        span: Span,
    },
}

impl Stmt {
    pub fn span(&self) -> &Span {
        match self {
            Stmt::Call { span, .. } | Stmt::Where { span, .. } | Stmt::Split { span, .. } => span,
        }
    }

    /// The blocks directly inside: a call's body and `else`, a `where`'s
    /// body and `else`, a `split`'s clauses and default. What walks a
    /// file's streams (a `by`'s horizon, the taps a test may check) descends.
    pub fn blocks(&self) -> Vec<&Block> {
        match self {
            Stmt::Call {
                body, else_body, ..
            } => body.iter().chain(else_body).collect(),
            Stmt::Where {
                body, else_body, ..
            } => std::iter::once(body).chain(else_body).collect(),
            Stmt::Split {
                clauses, default, ..
            } => clauses.iter().map(|c| &c.body).chain(default).collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct WhenClause {
    pub pred: Query,
    pub pred_span: Span,
    pub body: Block,
}

/// `test "name" { steps }`
#[derive(Debug, Clone)]
pub struct TestCase {
    pub name: String,
    pub steps: Vec<TestStep>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct TestStep {
    /// `at 5s`: virtual time since the test started; `None` means "now".
    pub at: Option<Micros>,
    pub action: TestAction,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub enum TestAction {
    /// `send {host: "a", metric: 1}`
    Send(Value),
    /// `expect TARGET {fields}` / `expect no TARGET {fields}`: TARGET is `index` or
    /// an output name, `tap NAME` or `publish TOPIC` (as `of` says); `negated` for `no`.
    Expect {
        target: Ident,
        fields: Value,
        negated: bool,
        of: Expected,
    },
}

/// What an `expect` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// The index or an output.
    Output,
    /// What reached stage `tap(NAME)`.
    Tap,
    /// What the `publish(TOPIC)` stages published.
    Publish,
}

//! Rule files: the language operators write to say what happens to every event.
//!
//! - [`ast`]: the syntax tree, with a span on every node.
//! - [`parser`]: source text → [`ast::RuleFile`].
//! - [`diag`]: errors rendered as `FILE:LINE:COL: message` with the source line and a caret.
//! - [`compile`]: AST → a tree of stream [`nodes`], validating every name and argument.
//! - [`engine`]: runs the tree as the server's `Streams`.
//! - [`reload`]: `SIGHUP` swaps in an edited rule file, keeping unchanged stages' state.
//! - [`persist`]: the stages' state written to `--data-dir` and read back at start.
//! - [`testing`]: `vigil test`, the `test "…" { … }` blocks on a virtual clock.

pub mod ast;
pub mod compile;
pub mod diag;
pub mod engine;
pub mod nodes;
pub mod parser;
pub mod persist;
pub mod reload;
pub mod testing;

pub use compile::{Compiled, EnvPolicy};
pub use diag::Diagnostic;

/// The rules `vigil run` uses when given no `--rules`: index everything.
pub const DEFAULT_RULES: &str = include_str!("../../rules/default.vigil");
pub const DEFAULT_RULES_NAME: &str = "<embedded rules/default.vigil>";

/// A rule file's text as it was compiled. The running rules keep it, so their
/// stream state is saved with the text that gives it meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleText {
    pub name: String,
    pub text: String,
}

/// A rule file parsed and compiled, its test blocks checked too, or every
/// problem found, rendered for humans.
pub fn load(name: &str, source: &str, env: EnvPolicy) -> Result<(ast::RuleFile, Compiled), String> {
    let file = parser::parse(source).map_err(|d| d.render(name, source))?;
    let compiled = compile::compile(&file, env);
    let mut errors = compiled.as_ref().err().cloned().unwrap_or_default();
    errors.extend(testing::check_tests(&file));
    errors.sort_by_key(|d| d.span.start);
    match compiled {
        Ok(compiled) if errors.is_empty() => Ok((file, compiled)),
        _ => Err(render_all(&errors, name, source)),
    }
}

pub fn render_all(diagnostics: &[Diagnostic], name: &str, source: &str) -> String {
    diagnostics
        .iter()
        .map(|d| d.render(name, source))
        .collect::<Vec<_>>()
        .join("\n")
}

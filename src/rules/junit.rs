//! `vigil test --junit FILE`: what `vigil test` found, as the JUnit XML report
//! CI systems (GitLab, Jenkins, GitHub's test reporters) read.
//!
//! One `<testsuite>` per rule file, named by its path; one `<testcase>` per
//! `test "…"` block, its class the file. A failure carries the text `vigil
//! test` prints for it, so CI shows the same diff; a file whose rules or test
//! steps do not load is one errored case carrying the diagnostics.

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use super::testing::Outcome;

/// The report's name, as CI systems show it above the suites.
const REPORT_NAME: &str = "vigil test";

/// The name of the one case of a file that did not load: it has no tests
/// to name, and CI wants a case to show the diagnostics in.
pub const LOAD_CASE: &str = "loads";

/// The JUnit report being built, a file at a time, in the order `vigil test`
/// ran them.
pub struct Junit(Report);

impl Default for Junit {
    fn default() -> Self {
        Junit(Report::new(REPORT_NAME))
    }
}

impl Junit {
    /// The tests of rule file `file`, as they ran.
    pub fn tested(&mut self, file: &str, outcomes: &[Outcome]) {
        let mut suite = TestSuite::new(file);
        suite.add_test_cases(outcomes.iter().map(|outcome| {
            let status = match outcome.failures.first() {
                None => TestCaseStatus::success(),
                Some(first) => {
                    let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    let summary = first.lines().next().unwrap_or_default();
                    status
                        .set_message(summary)
                        .set_description(outcome.failure_text());
                    status
                }
            };
            let mut case = TestCase::new(outcome.name.as_str(), status);
            case.set_classname(file);
            case
        }));
        self.0.add_test_suite(suite);
    }

    /// Rule file `file`, whose tests could not run for the `diagnostics`
    /// printed (unreadable, rule errors, test steps that cannot run).
    pub fn not_loaded(&mut self, file: &str, diagnostics: &str) {
        let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
        status
            .set_message("the rule file has errors")
            .set_description(diagnostics);
        let mut case = TestCase::new(LOAD_CASE, status);
        case.set_classname(file);
        let mut suite = TestSuite::new(file);
        suite.add_test_case(case);
        self.0.add_test_suite(suite);
    }

    /// The report as XML.
    pub fn to_xml(&self) -> String {
        // Serializing into a `String` only fails on a write error.
        self.0.to_string().expect("writing to a String cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suite_per_file_a_case_per_test_and_the_printed_failure_text() {
        let mut junit = Junit::default();
        let failed = Outcome {
            name: "pages <once> & \"only\"".into(),
            failures: vec![
                "expected out to have\n      {\"a\":1}".into(),
                "and more".into(),
            ],
        };
        let passed = Outcome {
            name: "passes".into(),
            failures: vec![],
        };
        junit.tested("rules/a.vigil", &[failed, passed]);
        junit.not_loaded("rules/b.vigil", "rules/b.vigil:1:1: bad\n  |\n1 | x\n  | ^");
        let expected = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="vigil test" tests="3" skipped="0" failures="1" errors="1">
    <testsuite name="rules/a.vigil" tests="2" skipped="0" errors="0" failures="1">
        <testcase name="pages &lt;once&gt; &amp; &quot;only&quot;" classname="rules/a.vigil">
            <failure message="expected out to have">    expected out to have
      {&quot;a&quot;:1}
    and more
</failure>
        </testcase>
        <testcase name="passes" classname="rules/a.vigil"/>
    </testsuite>
    <testsuite name="rules/b.vigil" tests="1" skipped="0" errors="1" failures="0">
        <testcase name="loads" classname="rules/b.vigil">
            <error message="the rule file has errors">rules/b.vigil:1:1: bad
  |
1 | x
  | ^</error>
        </testcase>
    </testsuite>
</testsuites>
"#;
        assert_eq!(junit.to_xml(), expected);
    }
}

//! Turns a parsed rule file into a tree of stream nodes before any event flows:
//! resolves names (streams, outputs, `env(…)`), checks every argument's type and
//! range, and reports every problem it finds with the span it came from.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::clock::Micros;
use crate::event::Metric;
use crate::pubsub::{INDEX_TOPIC, topic_name_error};
use crate::query::Query;
use crate::tls::{ClientTls, TlsError};

use super::ast::{Arg, Block, Expected, Ident, RuleFile, Span, Stmt, Value, ValueKind};
use super::diag::{Diagnostic, closest, line_col};
use super::nodes::{
    Apdex, By, ByDefinition, Changed, Children, Counter, Ddt, Drop, Ewma, EwmaMode, Field,
    FieldSet, FillIn, Fold, FoldKind, IndexNode, Log, MetricTest, Node, Output, Percentiles,
    PredictLinear, Publish, Rate, Reinject, Rollup, Runs, Scale, Split, Stable, Tag, Tap, Throttle,
    Untag, Where, Window, WindowKind, With,
};
use crate::outputs::template::Template;
use crate::outputs::{OutputKind, OutputSpec, forward, graphite, http, pager, pagerduty, webhook};

/// Every stream name the language knows (for "did you mean" hints).
const STREAMS: &[&str] = &[
    "index",
    "reinject",
    "publish",
    "drop",
    "with",
    "default",
    "by",
    "rate",
    "throttle",
    "rollup",
    "changed",
    "changed_state",
    "counter",
    "runs",
    "fill_in",
    "fill_in_last",
    "apdex",
    "expired",
    "not_expired",
    "over",
    "under",
    "within",
    "fixed_time_window",
    "moving_time_window",
    "fixed_event_window",
    "moving_event_window",
    "coalesce",
    "batch",
    "percentiles",
    "ewma",
    "ewma_timeless",
    "ddt",
    "predict_linear",
    "stable",
    "scale",
    "tag",
    "untag",
    "tagged",
    "tagged_all",
    "tagged_any",
    "tap",
    "log",
    "sum",
    "mean",
    "min",
    "max",
    "count",
    "median",
    "std_dev",
];

const OUTPUT_TYPES: &[&str] = &[
    "pagerduty",
    "paging_webhook",
    "webhook",
    "graphite",
    "forward",
];

/// A compiled rule file.
pub struct Compiled {
    pub outputs: Vec<OutputSpec>,
    /// The top-level streams; `Output` nodes refer to `outputs` by position.
    pub roots: Children,
    /// What `vigil test` records past the outputs, each tap and each topic
    /// a `publish` stage names (once however many publish to it): the
    /// `i`-th records into the sink at `outputs.len() + i`, where `vigil
    /// test` puts one and `vigil run` none.
    pub recorded: Vec<(Expected, String)>,
    /// Problems that do not stop the file from running (e.g. an unset `env(…)`
    /// when compiling for `vigil check`).
    pub warnings: Vec<Diagnostic>,
}

/// What an unset `env("NAME")` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvPolicy {
    /// An error: a pager without its key must not start silently (`vigil run`).
    Strict,
    /// A warning, with a placeholder value, so `vigil check` and `vigil test` can
    /// validate a file where its secrets are absent.
    Lenient,
    /// As `Lenient`, and no file an output names (a forward's TLS files) is
    /// read: the tree only takes back saved stream state and never runs, and
    /// files the saved rules named may be gone with the outputs that used
    /// them ([`super::persist::restore`]).
    StateOnly,
}

pub fn compile(file: &RuleFile, env: EnvPolicy) -> Result<Compiled, Vec<Diagnostic>> {
    let mut c = Compiler {
        env,
        source: &file.source,
        output_table: Arc::default(),
        outputs: Vec::new(),
        output_names: BTreeMap::new(),
        broken_outputs: HashSet::new(),
        recorded: Vec::new(),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    for decl in &file.outputs {
        if c.output_names.contains_key(&decl.name.name) {
            c.error(
                decl.name.span.clone(),
                format!("output `{}` is declared twice", decl.name.name),
            );
            continue;
        }
        if decl.name.name.len() > MAX_OUTPUT_NAME {
            // It names the pager's file in the data directory, whose name a
            // file system bounds (255 bytes), and a label of every metric.
            c.error(
                decl.name.span.clone(),
                format!(
                    "output name of {} bytes: at most {MAX_OUTPUT_NAME}",
                    decl.name.name.len()
                ),
            );
            // Its uses are not errors of their own.
            c.broken_outputs.insert(decl.name.name.clone());
            continue;
        }
        if STREAMS.contains(&decl.name.name.as_str()) {
            c.error(
                decl.name.span.clone(),
                format!(
                    "output name `{}` is a stream name; choose another",
                    decl.name.name
                ),
            );
            continue;
        }
        match c.output_kind(&decl.kind, &decl.args) {
            Some(kind) => {
                c.output_names
                    .insert(decl.name.name.clone(), c.outputs.len());
                c.outputs.push(OutputSpec {
                    name: decl.name.name.clone(),
                    kind,
                });
            }
            None => {
                c.broken_outputs.insert(decl.name.name.clone());
            }
        }
    }
    c.output_table = c.outputs.iter().map(|o| o.name.clone()).collect();
    let roots = c.block(&file.streams);
    if c.errors.is_empty() {
        Ok(Compiled {
            outputs: c.outputs,
            roots,
            recorded: (c.recorded.into_iter())
                .map(|(of, name)| (of, name.name))
                .collect(),
            warnings: c.warnings,
        })
    } else {
        c.errors.sort_by_key(|d| d.span.start);
        Err(c.errors)
    }
}

struct Compiler<'s> {
    env: EnvPolicy,
    /// The rule file's text, for what a `by` was compiled from.
    source: &'s str,
    /// The declared outputs' names in order: `Output` stages refer to them
    /// by position.
    output_table: Arc<[String]>,
    outputs: Vec<OutputSpec>,
    output_names: BTreeMap<String, usize>,
    /// Outputs declared with errors (already reported): naming one in the
    /// streams is not another error.
    broken_outputs: HashSet<String>,
    /// The taps and topics so far, in tree order (the topics each once),
    /// named where they are first written.
    recorded: Vec<(Expected, Ident)>,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

/// Arguments bound to a stream's or output's parameter names.
struct Bound<'v> {
    values: BTreeMap<&'static str, &'v Value>,
    /// Where to point when a required argument is missing.
    call_span: Span,
}

impl<'v> Bound<'v> {
    fn get(&self, name: &str) -> Option<&'v Value> {
        self.values.get(name).copied()
    }
}

impl Compiler<'_> {
    /// What the `by` written at `span` is compiled from: the same definition
    /// compiles to the same stages.
    fn definition(&self, span: &Span) -> Arc<ByDefinition> {
        Arc::new(ByDefinition {
            text: self.source[span.clone()].into(),
            outputs: self.output_table.clone(),
        })
    }

    fn error(&mut self, span: Span, message: impl Into<String>) {
        self.errors.push(Diagnostic::new(span, message));
    }

    fn error_hint(&mut self, span: Span, message: impl Into<String>, hint: impl Into<String>) {
        self.errors
            .push(Diagnostic::new(span, message).with_hint(hint));
    }

    // ---- arguments -------------------------------------------------------

    /// Binds positional arguments to `params` in order and named ones by name;
    /// anything else is an error naming what is accepted.
    fn bind<'v>(
        &mut self,
        what: &str,
        args: &'v [Arg],
        params: &[&'static str],
        call_span: &Span,
    ) -> Option<Bound<'v>> {
        let mut values = BTreeMap::new();
        let mut ok = true;
        let mut position = 0;
        for arg in args {
            let param = match &arg.name {
                Some(name) => match params.iter().find(|p| **p == name.name) {
                    Some(p) => *p,
                    None => {
                        let expected = if params.is_empty() {
                            format!("`{what}` takes no parameters")
                        } else {
                            format!("`{what}` takes {}", list(params))
                        };
                        match closest(&name.name, params.iter().copied()) {
                            Some(guess) => self.error_hint(
                                name.span.clone(),
                                format!("unknown parameter `{}` for `{what}`", name.name),
                                format!("did you mean `{guess}`? ({expected})"),
                            ),
                            None => self.error_hint(
                                name.span.clone(),
                                format!("unknown parameter `{}` for `{what}`", name.name),
                                expected,
                            ),
                        }
                        ok = false;
                        continue;
                    }
                },
                None => {
                    let Some(p) = params.get(position) else {
                        self.error(
                            arg.span.clone(),
                            format!(
                                "too many arguments for `{what}` (it takes {})",
                                if params.is_empty() {
                                    "none".to_owned()
                                } else {
                                    list(params)
                                }
                            ),
                        );
                        ok = false;
                        continue;
                    };
                    position += 1;
                    *p
                }
            };
            if values.insert(param, &arg.value).is_some() {
                self.error(arg.span.clone(), format!("`{param}` is given twice"));
                ok = false;
            }
        }
        ok.then_some(Bound {
            values,
            call_span: call_span.clone(),
        })
    }

    fn require<'v>(&mut self, what: &str, bound: &Bound<'v>, name: &str) -> Option<&'v Value> {
        let value = bound.get(name);
        if value.is_none() {
            self.error(bound.call_span.clone(), format!("`{what}` needs `{name}`"));
        }
        value
    }

    fn string(&mut self, v: &Value) -> Option<String> {
        match &v.kind {
            ValueKind::String(s) => Some(s.clone()),
            ValueKind::Env(name) => match (std::env::var(name), self.env) {
                (Ok(value), _) => Some(value),
                (Err(_), EnvPolicy::Lenient | EnvPolicy::StateOnly) => {
                    self.warnings.push(
                        Diagnostic::new(
                            v.span.clone(),
                            format!("environment variable `{name}` is not set"),
                        )
                        .with_hint("`vigil run` will refuse to start until it is"),
                    );
                    Some(format!("<unset {name}>"))
                }
                (Err(_), EnvPolicy::Strict) => {
                    self.error_hint(
                        v.span.clone(),
                        format!("environment variable `{name}` is not set"),
                        "set it before starting vigil",
                    );
                    None
                }
            },
            _ => self.expected(v, "a string"),
        }
    }

    fn optional_string(&mut self, v: Option<&Value>) -> Option<Option<String>> {
        match v {
            None => Some(None),
            Some(v) if v.kind == ValueKind::Null => Some(None),
            Some(v) => self.string(v).map(Some),
        }
    }

    /// An optional `{field}` template; `Some(None)` when absent.
    fn template(&mut self, v: Option<&Value>) -> Option<Option<Template>> {
        let Some(v) = v else {
            return Some(None);
        };
        let text = self.string(v)?;
        match Template::parse(&text) {
            Ok(t) => Some(Some(t)),
            Err(e) => {
                self.error(v.span.clone(), e.to_string());
                None
            }
        }
    }

    fn number(&mut self, v: &Value) -> Option<f64> {
        match v.kind {
            ValueKind::Number(n) if n.is_finite() => Some(n),
            _ => self.expected(v, "a number"),
        }
    }

    fn count(&mut self, v: &Value) -> Option<u64> {
        match v.kind {
            ValueKind::Number(n) if n >= 1.0 && n.fract() == 0.0 && n <= 1e12 => Some(n as u64),
            _ => self.expected(v, "a whole number of at least 1"),
        }
    }

    fn duration(&mut self, v: &Value) -> Option<Micros> {
        match v.kind {
            ValueKind::Duration(d) if d > 0 => Some(d),
            ValueKind::Duration(_) => self.expected(v, "a duration above zero"),
            _ => self.expected(v, "a duration such as 500ms, 5s, 2m or 1h"),
        }
    }

    fn port(&mut self, v: Option<&Value>, default: u16) -> Option<u16> {
        match v {
            None => Some(default),
            Some(v) => match v.kind {
                ValueKind::Number(n) if (1.0..=65535.0).contains(&n) && n.fract() == 0.0 => {
                    Some(n as u16)
                }
                _ => self.expected(v, "a port number (1-65535)"),
            },
        }
    }

    fn ident_or_string(&mut self, v: &Value) -> Option<String> {
        match &v.kind {
            ValueKind::Ident(s) | ValueKind::String(s) => Some(s.clone()),
            _ => self.expected(v, "a field name"),
        }
    }

    /// Adds `name` (a tap's or a topic's, written at `v`) to what `vigil
    /// test` records, returning the slot of [`Cx::outputs`] its sink takes.
    ///
    /// [`Cx::outputs`]: super::nodes::Cx::outputs
    fn record(&mut self, of: Expected, name: &str, v: &Value) -> usize {
        self.recorded.push((
            of,
            Ident {
                name: name.to_owned(),
                span: v.span.clone(),
            },
        ));
        self.outputs.len() + self.recorded.len() - 1
    }

    fn expected<T>(&mut self, v: &Value, what: &str) -> Option<T> {
        self.error(
            v.span.clone(),
            format!("expected {what}, found {}", describe(&v.kind)),
        );
        None
    }

    // ---- outputs ---------------------------------------------------------

    fn output_kind(&mut self, kind: &Ident, args: &[Arg]) -> Option<OutputKind> {
        let span = kind.span.clone();
        let params: &[&'static str] = match kind.name.as_str() {
            "pagerduty" => &["routing_key", "url", "dedup_key", "resend_interval"],
            "paging_webhook" => &["url", "headers", "dedup_key", "resend_interval"],
            "webhook" => &["url", "headers", "body"],
            "graphite" => &["host", "port", "prefix", "path"],
            "forward" => &["host", "port", "tls_ca", "tls_cert", "tls_key", "tls_name"],
            other => {
                let hint = match closest(other, OUTPUT_TYPES.iter().copied()) {
                    Some(guess) => format!("did you mean `{guess}`?"),
                    None => format!("output types: {}", list(OUTPUT_TYPES)),
                };
                self.error_hint(span, format!("unknown output type `{other}`"), hint);
                return None;
            }
        };
        let what = kind.name.as_str();
        let b = self.bind(what, args, params, &span)?;
        // Every parameter is read before any failure returns, so `check`
        // reports each wrong one, not only the first.
        let kind = match what {
            "pagerduty" => {
                let key = self.require(what, &b, "routing_key");
                let routing_key = key.and_then(|key| self.routing_key(key));
                let url = match b.get("url") {
                    Some(url) => self.url(url),
                    None => Some(pagerduty::DEFAULT_URL.to_owned()),
                };
                let api = routing_key.map(|routing_key| pager::Api::PagerDuty { routing_key });
                OutputKind::Pager(self.pager(&b, url, api)?)
            }
            "paging_webhook" => {
                let url = self.require(what, &b, "url");
                let url = url.and_then(|url| self.url(url));
                let headers = self.headers(b.get("headers"));
                let api = headers.map(|headers| pager::Api::Webhook { headers });
                OutputKind::Pager(self.pager(&b, url, api)?)
            }
            "webhook" => {
                let url = self.require(what, &b, "url");
                let url = url.and_then(|url| self.url(url));
                let headers = self.headers(b.get("headers"));
                let body = self.template(b.get("body"));
                OutputKind::Webhook(webhook::Config {
                    url: url?,
                    headers: headers?,
                    body: body?,
                })
            }
            "graphite" => {
                let host = match b.get("host") {
                    Some(host) => self.host(host),
                    None => Some("127.0.0.1".to_owned()),
                };
                let port = self.port(b.get("port"), 2003);
                let prefix = self.optional_string(b.get("prefix"));
                let path = self.template(b.get("path"));
                OutputKind::Graphite(graphite::Config {
                    host: host?,
                    port: port?,
                    prefix: prefix?,
                    path: path?,
                })
            }
            _ => {
                let host = self.require(what, &b, "host");
                let host = host.and_then(|host| self.host(host));
                let port = self.port(b.get("port"), 5555);
                let tls = self.forward_tls(&b, host.as_deref());
                OutputKind::Forward(forward::Config {
                    host: host?,
                    port: port?,
                    tls: tls?,
                })
            }
        };
        Some(kind)
    }

    /// A forward's TLS: on with `tls_ca` (the CAs the downstream's
    /// certificate must chain to), presenting `tls_cert` and `tls_key` if
    /// given, checking the certificate for `tls_name` or else the host. The
    /// files are read now, so a missing or bad one fails the load (`check`,
    /// start-up, reload) rather than every connection.
    fn forward_tls(&mut self, b: &Bound<'_>, host: Option<&str>) -> Option<Option<ClientTls>> {
        let given = |name| b.get(name).map(|v| (name, v));
        let Some(ca) = b.get("tls_ca") else {
            let stray = given("tls_cert").or(given("tls_key")).or(given("tls_name"));
            if let Some((name, v)) = stray {
                self.error_hint(
                    v.span.clone(),
                    format!("`{name}` without `tls_ca`"),
                    "TLS is on with `tls_ca`: the CA certificates (PEM) the downstream's certificate must chain to",
                );
                return None;
            }
            return Some(None);
        };
        let identity = match (b.get("tls_cert"), b.get("tls_key")) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(v), None) | (None, Some(v)) => {
                self.error(
                    v.span.clone(),
                    "`tls_cert` and `tls_key` go together: the client certificate and its key",
                );
                return None;
            }
        };
        let name = b.get("tls_name");
        let ca_path = self.string(ca)?;
        let server_name = match name {
            Some(v) => self.string(v)?,
            None => host?.to_owned(),
        };
        let identity_paths = match identity {
            Some((cert, key)) => Some((self.string(cert)?, self.string(key)?)),
            None => None,
        };
        // Files named by variables `check` found unset are read by `run`.
        let named = [Some(ca), name, b.get("tls_cert"), b.get("tls_key")];
        if named.into_iter().flatten().any(|v| self.unset_env(v))
            || self.env == EnvPolicy::StateOnly
        {
            return Some(None);
        }
        let files = (identity_paths.as_ref()).map(|(c, k)| (Path::new(c), Path::new(k)));
        let error = match ClientTls::load(&server_name, Path::new(&ca_path), files) {
            Ok(tls) => return Some(Some(tls)),
            Err(error) => error,
        };
        // Pointed at the parameter naming the file at fault, or the name.
        let at_fault = match (&error, error.path(), identity.zip(files)) {
            (TlsError::ServerName(_), _, _) => name.or(b.get("host")),
            (_, Some(path), Some(((cert, key), (cert_path, key_path)))) => {
                let cert = (path == cert_path).then_some(cert);
                cert.or((path == key_path).then_some(key))
            }
            _ => None,
        };
        let span = at_fault.unwrap_or(ca).span.clone();
        self.error(span, format!("TLS for `forward`: {error}"));
        None
    }

    /// What every pager output takes besides its receiver.
    /// `url` and `api`, read by the caller, may have failed already.
    fn pager(
        &mut self,
        b: &Bound<'_>,
        url: Option<String>,
        api: Option<pager::Api>,
    ) -> Option<pager::Config> {
        let resend_interval = match b.get("resend_interval") {
            Some(v) => self
                .duration(v)
                .map(|micros| std::time::Duration::from_micros(micros as u64)),
            None => Some(pager::DEFAULT_RESEND_INTERVAL),
        };
        let dedup_key = self.dedup_key(b.get("dedup_key"));
        Some(pager::Config {
            url: url?,
            dedup_key: dedup_key?,
            resend_interval: resend_interval?,
            api: api?,
        })
    }

    /// A pager's `dedup_key`: a template naming none of the fields that
    /// differ between a trigger and the `ok` that resolves it (an `expired`
    /// event has no metric nor description either), or the resolve would
    /// close nothing and the incident stay open at the receiver.
    fn dedup_key(&mut self, v: Option<&Value>) -> Option<Option<Template>> {
        const CHANGING: [&str; 4] = ["state", "metric", "time", "description"];
        let template = self.template(v)?;
        let changing = (template.iter())
            .flat_map(Template::fields)
            .find(|field| CHANGING.contains(field));
        if let (Some(field), Some(v)) = (changing, v) {
            self.error_hint(
                v.span.clone(),
                format!(
                    "`dedup_key` names `{{{field}}}`, which differs between a trigger and the \
                     page that resolves it: the resolve would close nothing"
                ),
                "name what identifies the incident, e.g. \"{host}/{service}\"",
            );
            return None;
        }
        Some(template)
    }

    /// A webhook's `headers: {"X-Token": "…"}`.
    fn headers(&mut self, v: Option<&Value>) -> Option<BTreeMap<String, String>> {
        let mut headers = BTreeMap::new();
        if let Some(v) = v {
            let ValueKind::Map(entries) = &v.kind else {
                return self.expected(v, "a map like {\"X-Token\": \"…\"}");
            };
            for (k, value) in entries {
                let text = self.string(value)?;
                if !self.unset_env(value)
                    && let Err(reason) = http::header(&k.name, &text)
                {
                    self.error(
                        k.span.start..value.span.end,
                        format!("invalid header `{}`: {reason}", k.name.escape_debug()),
                    );
                    return None;
                }
                headers.insert(k.name.clone(), text);
            }
        }
        Some(headers)
    }

    /// An output's `host`: a name or an address, not empty, without a port.
    fn host(&mut self, v: &Value) -> Option<String> {
        let host = self.string(v)?;
        if self.unset_env(v) {
            return Some(host);
        }
        if let Some(problem) = host_problem(&host) {
            self.error(v.span.clone(), problem);
            return None;
        }
        Some(host)
    }

    /// PagerDuty's `routing_key`: not empty (PagerDuty refuses every event
    /// without one, for good).
    fn routing_key(&mut self, v: &Value) -> Option<String> {
        let key = self.string(v)?;
        if key.trim().is_empty() && !self.unset_env(v) {
            self.error(v.span.clone(), "`routing_key` is empty");
            return None;
        }
        Some(key)
    }

    /// An output's `url`: one that can be posted to.
    fn url(&mut self, v: &Value) -> Option<String> {
        let url = self.string(v)?;
        if self.unset_env(v) {
            return Some(url);
        }
        let Some(problem) = http::url_problem(&url) else {
            return Some(url);
        };
        // A URL from the environment may carry a secret: not shown.
        let shown = match &v.kind {
            ValueKind::Env(name) => format!("env(\"{name}\")"),
            _ => format!("`{url}`"),
        };
        self.error(
            v.span.clone(),
            format!("{shown} is not a URL vigil can post to: {problem}"),
        );
        None
    }

    /// Whether `v` is an environment variable `check` found unset, whose
    /// value cannot be checked until `vigil run`.
    fn unset_env(&self, v: &Value) -> bool {
        matches!(&v.kind, ValueKind::Env(name) if std::env::var(name).is_err())
    }

    // ---- streams ---------------------------------------------------------

    fn block(&mut self, stmts: &[Stmt]) -> Children {
        Children(stmts.iter().filter_map(|s| self.stmt(s)).collect())
    }

    /// The block of stage `name`, written as `written` (its name and
    /// arguments, when it has no block).
    fn body(&mut self, name: &Ident, written: &Span, body: Option<&Block>) -> Option<Children> {
        match body {
            Some(block) => Some(self.block(&block.stmts)),
            None => {
                // The stage as written, so the hint keeps its arguments.
                let head = self.source[written.clone()].trim_end();
                let head = if head.len() <= 60 && !head.contains('\n') {
                    head.to_owned()
                } else {
                    format!("{}(…)", name.name)
                };
                self.error_hint(
                    name.span.clone(),
                    format!("`{}` needs a block of streams to pass events to", name.name),
                    format!("write `{head} {{ index }}` or similar"),
                );
                None
            }
        }
    }

    fn stmt(&mut self, stmt: &Stmt) -> Option<Box<dyn Node>> {
        match stmt {
            Stmt::Where {
                pred,
                pred_span,
                body,
                else_body,
                ..
            } => {
                self.doubts(pred_span);
                Some(Box::new(Where {
                    pred: pred.clone(),
                    then: self.block(&body.stmts),
                    otherwise: else_body
                        .as_ref()
                        .map(|b| self.block(&b.stmts))
                        .unwrap_or_default(),
                }))
            }
            Stmt::Split {
                clauses, default, ..
            } => Some(Box::new(Split {
                clauses: clauses
                    .iter()
                    .map(|c| {
                        self.doubts(&c.pred_span);
                        (c.pred.clone(), self.block(&c.body.stmts))
                    })
                    .collect(),
                default: default
                    .as_ref()
                    .map(|b| self.block(&b.stmts))
                    .unwrap_or_default(),
            })),
            Stmt::Call {
                name,
                args,
                body,
                else_body,
                span,
            } => {
                let tag_test = match name.name.as_str() {
                    "tagged" | "tagged_all" => Some(true),
                    "tagged_any" => Some(false),
                    _ => None,
                };
                if let Some(all) = tag_test {
                    let (args, body) = (args.as_deref(), body.as_ref());
                    return self.tagged(name, args, body, else_body.as_ref(), span, all);
                }
                if let Some(else_body) = else_body {
                    self.error(
                        else_body.span.clone(),
                        format!(
                            "`else` only follows `where`, `split` and the `tagged` streams, not `{}`",
                            name.name
                        ),
                    );
                }
                self.call(
                    name,
                    args.as_deref().unwrap_or_default(),
                    body.as_ref(),
                    span,
                )
            }
        }
    }

    /// `tagged(…)` and `tagged_all(…)` (`all`), or `tagged_any(…)`: the
    /// `where` of `tagged "a" and tagged "b" …` (or `or`), as Riemann's
    /// `tagged-all` and `tagged-any` (its `tagged` is `tagged-all`). The
    /// tags come as strings, lists of them, or both; or as the keyword
    /// `tags` alone, as `tag` and `untag` take theirs.
    fn tagged(
        &mut self,
        name: &Ident,
        args: Option<&[Arg]>,
        body: Option<&Block>,
        else_body: Option<&Block>,
        span: &Span,
        all: bool,
    ) -> Option<Box<dyn Node>> {
        let n = name.name.as_str();
        let mut tags = Vec::new();
        let mut ok = true;
        let args = args.unwrap_or_default();
        let keyword = |arg: &Arg| arg.name.as_ref().is_some_and(|p| p.name == "tags");
        for (i, arg) in args.iter().enumerate() {
            if let Some(param) = arg.name.as_ref().filter(|p| p.name != "tags") {
                self.error_hint(
                    param.span.clone(),
                    format!("unknown parameter `{}` for `{n}`", param.name),
                    format!("did you mean `tags`? (`{n}` takes `tags`)"),
                );
                ok = false;
                continue;
            }
            // The keyword names every tag given: any other argument gives
            // them again, as a second argument to `tag` would.
            if i > 0 && (keyword(arg) || keyword(&args[0])) {
                self.error_hint(
                    arg.span.clone(),
                    "`tags` is given twice",
                    format!(
                        "give the tags by position, `{n}(\"a\", \"b\")`, or as `tags: [\"a\", \"b\"]` alone"
                    ),
                );
                ok = false;
                continue;
            }
            let found = match &arg.value.kind {
                // A tag alone is read as one in a list is: `env(…)` too.
                ValueKind::String(_) | ValueKind::Env(_) => {
                    self.string(&arg.value).map(|tag| vec![tag])
                }
                ValueKind::List(items) if items.is_empty() => {
                    self.error(
                        arg.value.span.clone(),
                        format!("`{n}` needs a tag, not an empty list"),
                    );
                    None
                }
                ValueKind::List(items) => self.strings(items),
                _ => self.expected(&arg.value, "a tag or a list of tags"),
            };
            match found {
                Some(found) => tags.extend(found),
                None => ok = false,
            }
        }
        if ok && tags.is_empty() {
            self.error_hint(
                name.span.clone(),
                format!("`{n}` needs a tag"),
                format!("write `{n}(\"a\") {{ … }}` or `{n}(\"a\", \"b\") {{ … }}`"),
            );
            ok = false;
        }
        // Compiled whatever the tags, so their errors are reported too.
        let then = self.body(name, span, body);
        let otherwise = else_body.map(|b| self.block(&b.stmts)).unwrap_or_default();
        ok.then_some(())?;
        Some(Box::new(Where {
            pred: Query::tagged(&tags, all),
            then: then?,
            otherwise,
        }))
    }

    fn call(
        &mut self,
        name: &Ident,
        args: &[Arg],
        body: Option<&Block>,
        span: &Span,
    ) -> Option<Box<dyn Node>> {
        let n = name.name.as_str();
        if let Some(&id) = self.output_names.get(n) {
            self.leaf(name, args, body)?;
            return Some(Box::new(Output { id }));
        }
        let node: Box<dyn Node> = match n {
            "index" => {
                self.leaf(name, args, body)?;
                Box::new(IndexNode {})
            }
            "reinject" => {
                self.leaf(name, args, body)?;
                Box::new(Reinject {})
            }
            "publish" => {
                if let Some(b) = body {
                    self.error_hint(
                        b.span.clone(),
                        "`publish` takes no block: events end here",
                        "to send events on as well, list the next stream beside it",
                    );
                }
                let b = self.bind(n, args, &["topic"], span)?;
                let v = self.require(n, &b, "topic")?;
                let (ValueKind::Ident(topic) | ValueKind::String(topic)) = &v.kind else {
                    return self.expected(v, "a topic's name, e.g. `publish(\"alerts\")`");
                };
                if topic == INDEX_TOPIC {
                    self.error_hint(
                        v.span.clone(),
                        "`index` is the index's own topic: its subscribers get what the index stores and expires",
                        "`index` the events, or publish them to a topic of another name",
                    );
                    return None;
                }
                if let Some(why) = topic_name_error(topic) {
                    self.error(v.span.clone(), why);
                    return None;
                }
                if body.is_some() {
                    return None;
                }
                let known = (self.recorded.iter())
                    .position(|(of, t)| *of == Expected::Publish && &t.name == topic);
                let slot = match known {
                    Some(i) => self.outputs.len() + i,
                    None => self.record(Expected::Publish, topic, v),
                };
                Box::new(Publish {
                    name: topic.as_str().into(),
                    topic: OnceLock::new(),
                    slot,
                })
            }
            "drop" => {
                self.leaf(name, args, body)?;
                Box::new(Drop {})
            }
            "log" => {
                if let Some(b) = body {
                    self.error(b.span.clone(), "`log` takes no block");
                }
                let b = self.bind(n, args, &["level"], span)?;
                let level = match b.get("level") {
                    None => tracing::Level::INFO,
                    Some(v) => match &v.kind {
                        ValueKind::Ident(l) | ValueKind::String(l) => match l.parse() {
                            Ok(level) => level,
                            Err(_) => {
                                return self
                                    .expected(v, "a log level (error, warn, info, debug, trace)");
                            }
                        },
                        _ => {
                            return self
                                .expected(v, "a log level (error, warn, info, debug, trace)");
                        }
                    },
                };
                Box::new(Log { level })
            }
            "with" | "default" => {
                let sets = self.field_sets(n, args)?;
                let children = self.body(name, span, body)?;
                Box::new(With {
                    sets,
                    only_missing: n == "default",
                    children,
                })
            }
            "expired" | "not_expired" => {
                self.bind(n, args, &[], span)?;
                let children = self.body(name, span, body)?;
                let pred = Query::parse(r#"state = "expired""#).expect("constant query parses");
                let (then, otherwise) = if n == "expired" {
                    (children, Children::default())
                } else {
                    (Children::default(), children)
                };
                Box::new(Where {
                    pred,
                    then,
                    otherwise,
                })
            }
            "over" | "under" => {
                let b = self.bind(n, args, &["threshold"], span)?;
                let threshold = self.require(n, &b, "threshold");
                let x = self.number(threshold?)?;
                let children = self.body(name, span, body)?;
                let (min, max) = if n == "over" {
                    (Some(x), None)
                } else {
                    (None, Some(x))
                };
                Box::new(MetricTest {
                    min,
                    max,
                    inclusive: false,
                    children,
                })
            }
            "within" => {
                let b = self.bind(n, args, &["min", "max"], span)?;
                let (lo, hi) = (self.require(n, &b, "min"), self.require(n, &b, "max"));
                let (lo, hi) = (self.number(lo?)?, self.number(hi?)?);
                if lo > hi {
                    self.error(
                        span.clone(),
                        format!("`within({lo}, {hi})`: min is above max"),
                    );
                }
                let children = self.body(name, span, body)?;
                Box::new(MetricTest {
                    min: Some(lo),
                    max: Some(hi),
                    inclusive: true,
                    children,
                })
            }
            "scale" => {
                let b = self.bind(n, args, &["factor"], span)?;
                let v = self.require(n, &b, "factor")?;
                let factor = metric_of(self.number(v)?);
                let children = self.body(name, span, body)?;
                Box::new(Scale { factor, children })
            }
            "tag" | "untag" => {
                let b = self.bind(n, args, &["tags"], span)?;
                let v = self.require(n, &b, "tags")?;
                let tags = match &v.kind {
                    ValueKind::String(_) | ValueKind::Env(_) => vec![self.string(v)?],
                    ValueKind::List(items) => self.strings(items)?,
                    _ => return self.expected(v, "a tag or a list of tags"),
                };
                let children = self.body(name, span, body)?;
                if n == "tag" {
                    Box::new(Tag { tags, children })
                } else {
                    Box::new(Untag { tags, children })
                }
            }
            "tap" => {
                let b = self.bind(n, args, &["name"], span)?;
                let v = self.require(n, &b, "name")?;
                let (ValueKind::Ident(tap) | ValueKind::String(tap)) = &v.kind else {
                    return self.expected(v, "a tap's name, e.g. `tap(alerts)`");
                };
                let first =
                    (self.recorded.iter()).find(|(of, t)| *of == Expected::Tap && &t.name == tap);
                if let Some((_, first)) = first {
                    let (line, col) = line_col(self.source, first.span.start);
                    self.error_hint(
                        v.span.clone(),
                        format!("tap `{tap}` is declared twice"),
                        format!("the first is at {line}:{col}; `expect tap {tap}` must name one"),
                    );
                }
                let slot = self.record(Expected::Tap, tap, v);
                // Without a block, the tap is where the events end.
                let children = body.map(|b| self.block(&b.stmts)).unwrap_or_default();
                Box::new(Tap {
                    name: tap.clone(),
                    slot,
                    children,
                })
            }
            "by" => {
                let fields = self.by_fields(name, args)?;
                let horizon = body.map_or(0, |b| horizon(&b.stmts));
                let children = self.body(name, span, body)?;
                Box::new(By::new(fields, children, horizon, self.definition(span)))
            }
            "changed" => {
                let b = self.bind(n, args, &["field"], span)?;
                let field = match b.get("field") {
                    Some(v) => {
                        let field = Field::named(&self.ident_or_string(v)?);
                        self.warn_misspelled(
                            &field,
                            v,
                            "Events without the attribute never change",
                        );
                        field
                    }
                    None => Field::State,
                };
                let children = self.body(name, span, body)?;
                Box::new(Changed::new(field, children))
            }
            "changed_state" => {
                self.bind(n, args, &[], span)?;
                let children = self.body(name, span, body)?;
                let changed: Box<dyn Node> = Box::new(Changed::new(Field::State, children));
                Box::new(By::new(
                    vec![Field::Host, Field::Service],
                    Children(vec![changed]),
                    0,
                    self.definition(span),
                ))
            }
            "counter" => {
                let b = self.bind(n, args, &["initial"], span)?;
                let initial = match b.get("initial") {
                    Some(v) => metric_of(self.number(v)?),
                    None => Metric::Int(0),
                };
                let children = self.body(name, span, body)?;
                Box::new(Counter::new(initial, children))
            }
            "runs" => {
                let b = self.bind(n, args, &["count", "field"], span)?;
                let count = self.require(n, &b, "count");
                let count = self.count(count?)?;
                let alike = "Events without the attribute all look alike: one run of them";
                let field = self.field_or_state(&b, alike)?;
                let children = self.body(name, span, body)?;
                Box::new(Runs::new(count, field, children))
            }
            "fill_in" | "fill_in_last" => {
                let last = n == "fill_in_last";
                let param = if last { "fields" } else { "event" };
                let b = self.bind(n, args, &["interval", param], span)?;
                let interval = self.require(n, &b, "interval");
                // `fill_in_last` may emit the latest event as it was.
                let sets = match (b.get(param), last) {
                    (None, true) => Some(Vec::new()),
                    (v, _) => self.require(n, &b, param).and_then(|_| self.field_map(v?)),
                };
                let (interval, sets) = (self.duration(interval?)?, sets?);
                let children = self.body(name, span, body)?;
                Box::new(FillIn::new(interval, sets, last, children))
            }
            "apdex" => {
                let b = self.bind(n, args, &["interval", "satisfied", "tolerated"], span)?;
                let (i, s, t) = (
                    self.require(n, &b, "interval"),
                    self.require(n, &b, "satisfied"),
                    self.require(n, &b, "tolerated"),
                );
                let interval = self.duration(i?)?;
                let (satisfied, tolerated) = (self.predicate(s?), self.predicate(t?));
                let children = self.body(name, span, body)?;
                Box::new(Apdex::new(interval, satisfied?, tolerated?, children))
            }
            "rate" => {
                let interval = self.one_duration(n, args, span)?;
                let children = self.body(name, span, body)?;
                Box::new(Rate::new(interval, children))
            }
            "throttle" => {
                let (count, interval) = self.count_and_interval(n, args, span)?;
                let children = self.body(name, span, body)?;
                Box::new(Throttle::new(count, interval, children))
            }
            "rollup" => {
                let (count, interval) = self.count_and_interval(n, args, span)?;
                let children = self.body(name, span, body)?;
                Box::new(Rollup::new(count, interval, children))
            }
            "stable" => {
                let b = self.bind(n, args, &["interval", "field"], span)?;
                let interval = self.require(n, &b, "interval");
                let interval = self.duration(interval?)?;
                let alike = "Events without the attribute all look alike: it never changes";
                let field = self.field_or_state(&b, alike)?;
                let children = self.body(name, span, body)?;
                Box::new(Stable::new(interval, field, children))
            }
            "ewma" => {
                let interval = self.one_duration_named(n, args, "halflife", span)?;
                let children = self.body(name, span, body)?;
                Box::new(Ewma::new(EwmaMode::HalfLife(interval), children))
            }
            "ewma_timeless" => {
                let b = self.bind(n, args, &["r"], span)?;
                let v = self.require(n, &b, "r")?;
                let r = self.number(v)?;
                if !(0.0..=1.0).contains(&r) {
                    return self.expected(v, "a weight between 0 and 1");
                }
                let children = self.body(name, span, body)?;
                Box::new(Ewma::new(EwmaMode::Timeless(r), children))
            }
            "ddt" => {
                self.bind(n, args, &[], span)?;
                let children = self.body(name, span, body)?;
                Box::new(Ddt::new(children))
            }
            "predict_linear" => {
                let b = self.bind(n, args, &["count", "ahead"], span)?;
                let (c, a) = (self.require(n, &b, "count"), self.require(n, &b, "ahead"));
                let (c, a) = (c?, a?);
                let count = match c.kind {
                    ValueKind::Number(k) if k >= 2.0 && k.fract() == 0.0 && k <= 1e12 => k as u64,
                    _ => {
                        let what = "a whole number of at least 2 (a line needs two points)";
                        return self.expected(c, what);
                    }
                };
                let ahead = self.duration(a)?;
                // Bounded as a moving event window's is: it holds as many.
                let count = usize::try_from(count)
                    .unwrap_or(usize::MAX)
                    .min(super::nodes::WINDOW_MAX);
                let children = self.body(name, span, body)?;
                Box::new(PredictLinear::new(count, ahead, children))
            }
            "percentiles" => {
                let b = self.bind(n, args, &["interval", "points"], span)?;
                let (i, p) = (
                    self.require(n, &b, "interval"),
                    self.require(n, &b, "points"),
                );
                let interval = self.duration(i?)?;
                let p = p?;
                let ValueKind::List(items) = &p.kind else {
                    return self.expected(p, "a list of quantiles like [0.5, 0.95, 0.99]");
                };
                let mut points = Vec::new();
                for item in items {
                    match item.kind {
                        ValueKind::Number(q) if (0.0..=1.0).contains(&q) => points.push(q),
                        _ => return self.expected(item, "a quantile between 0 and 1"),
                    }
                }
                let children = self.body(name, span, body)?;
                Box::new(Percentiles::new(interval, points.into(), children))
            }
            "fixed_time_window" | "moving_time_window" | "coalesce" => {
                let dt = self.one_duration(n, args, span)?;
                let kind = match n {
                    "fixed_time_window" => WindowKind::FixedTime(dt),
                    "moving_time_window" => WindowKind::MovingTime(dt),
                    _ => WindowKind::Coalesce(dt),
                };
                let folds = self.folds(name, span, body)?;
                Box::new(Window::new(kind, folds))
            }
            "batch" => {
                let (count, interval) = self.count_and_interval(n, args, span)?;
                let folds = self.folds(name, span, body)?;
                Box::new(Window::new(WindowKind::Batch(count, interval), folds))
            }
            "fixed_event_window" | "moving_event_window" => {
                let b = self.bind(n, args, &["count"], span)?;
                let v = self.require(n, &b, "count")?;
                let count = self.count(v)?;
                let count = usize::try_from(count).unwrap_or(usize::MAX);
                // A fixed window holds no events, so any count of them.
                let kind = if n == "fixed_event_window" {
                    WindowKind::FixedCount(count)
                } else {
                    WindowKind::MovingCount(count.min(super::nodes::WINDOW_MAX))
                };
                let folds = self.folds(name, span, body)?;
                Box::new(Window::new(kind, folds))
            }
            "sum" | "mean" | "min" | "max" | "count" | "median" | "std_dev" => {
                self.error_hint(
                    name.span.clone(),
                    format!("`{n}` folds a window of events and cannot stand here"),
                    format!("put it directly inside a window, e.g. `fixed_time_window(1m) {{ {n} {{ index }} }}`"),
                );
                return None;
            }
            broken if self.broken_outputs.contains(broken) => return None,
            unknown => {
                self.unknown_stream(name, unknown, args, body);
                return None;
            }
        };
        Some(node)
    }

    /// Warns of what the predicate at `pred_span` says that is valid but
    /// seldom meant ([`Query::doubts`]).
    fn doubts(&mut self, pred_span: &Span) {
        let text = &self.source[pred_span.clone()];
        for doubt in Query::doubts(text) {
            let at = pred_span.start + doubt.span.start..pred_span.start + doubt.span.end;
            let warning = Diagnostic::new(at, doubt.message).with_hint(doubt.hint);
            self.warnings.push(warning);
        }
    }

    fn unknown_stream(&mut self, name: &Ident, unknown: &str, args: &[Arg], body: Option<&Block>) {
        // A declaration with an error still declares its name.
        let declared = self.output_names.keys().chain(&self.broken_outputs);
        let mut outputs: Vec<&str> = declared.map(String::as_str).collect();
        outputs.sort_unstable();
        let candidates = STREAMS.iter().copied().chain(outputs.iter().copied());
        let hint = match (riemanns(unknown), closest(unknown, candidates)) {
            (Some(instead), _) => Some(instead.to_owned()),
            (None, Some(guess)) => Some(format!("did you mean `{guess}`?")),
            // A bare name without arguments or block was most likely meant as an output.
            (None, None) if args.is_empty() && body.is_none() => Some(if outputs.is_empty() {
                "no outputs are declared; declare one with `output NAME = TYPE(…)`".to_owned()
            } else {
                format!("declared outputs: {}", list(&outputs))
            }),
            (None, None) => None,
        };
        let message = if args.is_empty() && body.is_none() {
            format!("unknown stream or output `{unknown}`")
        } else {
            format!("unknown stream `{unknown}`")
        };
        match hint {
            Some(hint) => self.error_hint(name.span.clone(), message, hint),
            None => self.error(name.span.clone(), message),
        }
    }

    /// Leaf stages take no arguments and no block.
    fn leaf(&mut self, name: &Ident, args: &[Arg], body: Option<&Block>) -> Option<()> {
        let mut ok = true;
        if let Some(arg) = args.first() {
            self.error(
                arg.span.clone(),
                format!("`{}` takes no arguments", name.name),
            );
            ok = false;
        }
        if let Some(b) = body {
            self.error_hint(
                b.span.clone(),
                format!("`{}` takes no block: events end here", name.name),
                "to send events on as well, list the next stream beside it",
            );
            ok = false;
        }
        ok.then_some(())
    }

    /// `(count, interval)`, as `throttle`, `rollup` and `batch` take them.
    fn count_and_interval(
        &mut self,
        what: &str,
        args: &[Arg],
        span: &Span,
    ) -> Option<(u64, Micros)> {
        let b = self.bind(what, args, &["count", "interval"], span)?;
        let (c, i) = (
            self.require(what, &b, "count"),
            self.require(what, &b, "interval"),
        );
        Some((self.count(c?)?, self.duration(i?)?))
    }

    /// The optional `field` argument, `state` without it; an attribute name
    /// that looks like a misspelt field is warned of, saying what follows:
    /// `alike`.
    fn field_or_state(&mut self, bound: &Bound<'_>, alike: &str) -> Option<Field> {
        let Some(v) = bound.get("field") else {
            return Some(Field::State);
        };
        let field = Field::named(&self.ident_or_string(v)?);
        self.warn_misspelled(&field, v, alike);
        Some(field)
    }

    fn one_duration(&mut self, what: &str, args: &[Arg], span: &Span) -> Option<Micros> {
        self.one_duration_named(what, args, "interval", span)
    }

    fn one_duration_named(
        &mut self,
        what: &str,
        args: &[Arg],
        param: &'static str,
        span: &Span,
    ) -> Option<Micros> {
        let b = self.bind(what, args, &[param], span)?;
        let v = self.require(what, &b, param)?;
        self.duration(v)
    }

    /// The strings of a list, each bad item reported (not only the first).
    fn strings(&mut self, items: &[Value]) -> Option<Vec<String>> {
        let found: Vec<Option<String>> = items.iter().map(|v| self.string(v)).collect();
        found.into_iter().collect()
    }

    fn folds(&mut self, name: &Ident, written: &Span, body: Option<&Block>) -> Option<Vec<Fold>> {
        let Some(block) = body else {
            self.body(name, written, None);
            return None;
        };
        let mut folds = Vec::new();
        for stmt in &block.stmts {
            let kind = match stmt {
                Stmt::Call {
                    name: fold_name,
                    args,
                    body,
                    ..
                } => {
                    let kind = match fold_name.name.as_str() {
                        "sum" => FoldKind::Sum,
                        "mean" => FoldKind::Mean,
                        "min" => FoldKind::Min,
                        "max" => FoldKind::Max,
                        "count" => FoldKind::Count,
                        "median" => FoldKind::Median,
                        "std_dev" => FoldKind::StdDev,
                        _ => {
                            self.not_a_fold(&name.name, stmt.span());
                            continue;
                        }
                    };
                    if let Some(arg) = args.as_ref().and_then(|a| a.first()) {
                        self.error(
                            arg.span.clone(),
                            format!("`{}` takes no arguments", fold_name.name),
                        );
                    }
                    let Some(children) = self.body(fold_name, stmt.span(), body.as_ref()) else {
                        continue;
                    };
                    Fold { kind, children }
                }
                other => {
                    self.not_a_fold(&name.name, other.span());
                    continue;
                }
            };
            folds.push(kind);
        }
        Some(folds)
    }

    fn not_a_fold(&mut self, window: &str, span: &Span) {
        self.error_hint(
            span.clone(),
            format!("`{window}` emits windows of events; only a fold can take them"),
            "use one of: sum, mean, min, max, count, median, std_dev — e.g. `mean { index }`",
        );
    }

    fn by_fields(&mut self, name: &Ident, args: &[Arg]) -> Option<Vec<Field>> {
        if args.is_empty() {
            self.error_hint(
                name.span.clone(),
                "`by` needs at least one field",
                "e.g. `by(host, service) { … }`",
            );
            return None;
        }
        let mut fields = Vec::new();
        for arg in args {
            if let Some(n) = &arg.name {
                self.error(n.span.clone(), "`by` takes field names, not `name: value`");
                return None;
            }
            let field = Field::named(&self.ident_or_string(&arg.value)?);
            self.warn_misspelled(
                &field,
                &arg.value,
                "Events without the attribute all go to one group",
            );
            fields.push(field);
        }
        Some(fields)
    }

    /// Warns of an attribute `value` names that is spelled like one of the
    /// event's fields (`hsot`): `consequence` says what it does then.
    fn warn_misspelled(&mut self, field: &Field, value: &Value, consequence: &str) {
        let Field::Attribute(attribute) = field else {
            return;
        };
        let Some(meant) = misspelled_field(attribute) else {
            return;
        };
        let warning = Diagnostic::new(
            value.span.clone(),
            format!("`{attribute}` is an attribute, not one of the event's fields"),
        );
        (self.warnings).push(warning.with_hint(format!("did you mean `{meant}`? {consequence}")));
    }

    /// `with`'s and `default`'s `field: value` arguments.
    fn field_sets(&mut self, what: &str, args: &[Arg]) -> Option<Vec<FieldSet>> {
        let mut named = Vec::new();
        let mut ok = true;
        for arg in args {
            match &arg.name {
                Some(field) => named.push((field, &arg.value)),
                None => {
                    self.error_hint(
                        arg.span.clone(),
                        format!("`{what}` takes `field: value` pairs"),
                        format!("e.g. `{what}(state: \"ok\", ttl: 60)`"),
                    );
                    ok = false;
                }
            }
        }
        // Every pair is checked, whatever else is wrong: errors come sorted
        // by where they are.
        let sets = self.named_field_sets(named);
        sets.filter(|_| ok)
    }

    /// Each field set once, each to a value it can take.
    fn named_field_sets<'v>(
        &mut self,
        fields: impl IntoIterator<Item = (&'v Ident, &'v Value)>,
    ) -> Option<Vec<FieldSet>> {
        let mut sets = Vec::new();
        let mut seen = HashSet::new();
        let mut ok = true;
        for (field, value) in fields {
            if !seen.insert(field.name.as_str()) {
                self.error(
                    field.span.clone(),
                    format!("`{}` is given twice", field.name),
                );
                ok = false;
                continue;
            }
            match self.field_set(field, value) {
                Some(set) => sets.push(set),
                None => ok = false,
            }
        }
        ok.then_some(sets)
    }

    /// A predicate of the query language, written as a string; warned of
    /// as a `where`'s is ([`Query::doubts`]).
    fn predicate(&mut self, v: &Value) -> Option<Query> {
        let ValueKind::String(text) = &v.kind else {
            return self.expected(v, "a predicate as a string, e.g. `\"metric < 0.5\"`");
        };
        match Query::parse(text) {
            Ok(query) => {
                // Pointed at in the string where it has no escapes (its
                // text is the source's); at the whole string where it has.
                let inner = v.span.start + 1..v.span.end.saturating_sub(1);
                let verbatim = self.source.get(inner.clone()) == Some(text.as_str());
                for doubt in Query::doubts(text) {
                    let at = if verbatim {
                        inner.start + doubt.span.start..inner.start + doubt.span.end
                    } else {
                        v.span.clone()
                    };
                    // The hint's query text goes in the rule's string: its
                    // quotes escaped, as the operator must write them there.
                    let hint = doubt.hint.replace('"', "\\\"");
                    let warning = Diagnostic::new(at, doubt.message).with_hint(hint);
                    self.warnings.push(warning);
                }
                Some(query)
            }
            Err(e) => {
                self.error(v.span.clone(), format!("predicate {text:?}: {e}"));
                None
            }
        }
    }

    /// `{field: value, …}`, as `with` takes them.
    fn field_map(&mut self, v: &Value) -> Option<Vec<FieldSet>> {
        let ValueKind::Map(entries) = &v.kind else {
            return self.expected(v, "the event's fields, e.g. `{service: \"up\", metric: 0}`");
        };
        self.named_field_sets(entries.iter().map(|(field, value)| (field, value)))
    }

    fn field_set(&mut self, field: &Ident, v: &Value) -> Option<FieldSet> {
        let null = v.kind == ValueKind::Null;
        Some(match field.name.as_str() {
            "host" => FieldSet::Host(self.optional_string(Some(v))?),
            "service" => FieldSet::Service(self.optional_string(Some(v))?),
            "state" => FieldSet::State(self.optional_string(Some(v))?),
            "description" => FieldSet::Description(self.optional_string(Some(v))?),
            "metric" if null => FieldSet::Metric(None),
            "metric" => FieldSet::Metric(Some(metric_of(self.number(v)?))),
            "ttl" if null => FieldSet::Ttl(None),
            // A TTL becomes an f32, as on the wire: past its range it would be infinite.
            "ttl" => match v.kind {
                ValueKind::Number(n) if (0.0..=f64::from(f32::MAX)).contains(&n) => {
                    FieldSet::Ttl(Some(n as f32))
                }
                _ => return self.expected(v, "a TTL in seconds (0 to 3.4e38)"),
            },
            "tags" => match &v.kind {
                ValueKind::Null => FieldSet::Tags(Vec::new()),
                ValueKind::List(items) => FieldSet::Tags(self.strings(items)?),
                _ => return self.expected(v, "a list of tags"),
            },
            "time" | "metric_f" | "metric_d" | "metric_sint64" | "time_micros" => {
                self.error(
                    field.span.clone(),
                    format!("`{}` cannot be set by rules", field.name),
                );
                return None;
            }
            attribute => {
                self.warn_set_misspelled(field);
                FieldSet::Attribute(
                    attribute.to_owned(),
                    match &v.kind {
                        ValueKind::Null => None,
                        ValueKind::Number(n) => Some(crate::event::number_text(*n)),
                        ValueKind::Bool(b) => Some(b.to_string()),
                        _ => Some(self.string(v)?),
                    },
                )
            }
        })
    }

    /// Warns of an attribute `with` or `default` sets that is spelled like
    /// one of the event's fields it could set (`hots: "web1"`).
    fn warn_set_misspelled(&mut self, attribute: &Ident) {
        let name = attribute.name.as_str();
        // Those it can set: `time` cannot be set by rules.
        let meant = misspelled(name, EVENT_FIELDS.into_iter().chain(["tags"]));
        let Some(meant) = meant else {
            return;
        };
        let warning = Diagnostic::new(
            attribute.span.clone(),
            format!("`{name}` is an attribute, not one of the event's fields"),
        );
        let hint = format!("did you mean `{meant}`? As written, it sets the attribute `{name}`");
        self.warnings.push(warning.with_hint(hint));
    }
}

/// The longest duration written anywhere in a subtree (but `predict_linear`'s
/// horizon): how long a `by` group must stay alive after its last event for
/// its windows and timers to finish.
fn horizon(stmts: &[Stmt]) -> Micros {
    fn value(v: &Value) -> Micros {
        match &v.kind {
            ValueKind::Duration(d) => *d,
            ValueKind::List(items) => items.iter().map(value).max().unwrap_or(0),
            _ => 0,
        }
    }
    stmts
        .iter()
        .map(|s| {
            let own = match s {
                // Its `s` is how far ahead it reads its line: no span
                // that runs on after the group's last event.
                Stmt::Call { name, .. } if name.name == "predict_linear" => 0,
                Stmt::Call { args, .. } => (args.iter().flatten())
                    .map(|a| value(&a.value))
                    .max()
                    .unwrap_or(0),
                Stmt::Where { .. } | Stmt::Split { .. } => 0,
            };
            let inner = s.blocks().into_iter().map(|b| horizon(&b.stmts));
            inner.fold(own, Micros::max)
        })
        .max()
        .unwrap_or(0)
}

/// A number written in a rule file as a metric: an integer where it is a
/// whole number a double holds exactly, as Riemann reads `5` as a Long.
fn metric_of(x: f64) -> Metric {
    if x.fract() == 0.0 && x.abs() < 9e15 {
        Metric::Int(x as i64)
    } else {
        Metric::Float(x)
    }
}

/// How a Riemann stream vigil has no stage of that name is written here.
fn riemanns(name: &str) -> Option<&'static str> {
    Some(match name {
        "splitp" => "`split { when metric > 0.9 { … } when metric > 0.5 { … } else { … } }`",
        "sdo" => "list the streams side by side: each gets every event",
        "smap" => {
            "Riemann's stream of that name has no vigil stage (README, \"Rule files\": what vigil lacks)"
        }
        _ => return None,
    })
}

/// The event's field `name` most likely misspells, letters swapped
/// (`hsot`) or one wrong: an attribute so named is seldom meant.
fn misspelled_field(name: &str) -> Option<&'static str> {
    misspelled(name, EVENT_FIELDS.into_iter().chain(["time"]))
}

/// The event's fields a name may be mistaken for, but `time` and `tags`.
const EVENT_FIELDS: [&str; 6] = ["host", "service", "state", "description", "metric", "ttl"];

/// Which of `fields` `name` is spelled like: the same letters, or a typo.
fn misspelled(
    name: &str,
    fields: impl Iterator<Item = &'static str> + Clone,
) -> Option<&'static str> {
    let letters = |s: &str| {
        let mut chars: Vec<char> = s.chars().collect();
        chars.sort_unstable();
        chars
    };
    (fields.clone())
        .find(|field| letters(field) == letters(name))
        .or_else(|| closest(name, fields))
}

fn list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe(kind: &ValueKind) -> String {
    let described = match kind {
        // The value itself: out of range is the only way a number is wrong.
        ValueKind::Number(n) if n.abs() >= 1e15 => return format!("the number {n:e}"),
        ValueKind::Number(n) => return format!("the number {}", crate::event::number_text(*n)),
        ValueKind::Duration(micros) => {
            let d = std::time::Duration::from_micros(u64::try_from(*micros).unwrap_or(0));
            return format!("the duration {}", humantime::format_duration(d));
        }
        ValueKind::String(_) => "a string",
        ValueKind::Bool(_) => "a boolean",
        ValueKind::Null => "null",
        ValueKind::List(_) => "a list",
        ValueKind::Map(_) => "a map",
        ValueKind::Env(_) => "env(…)",
        ValueKind::Ident(_) => "a name",
    };
    described.to_owned()
}

/// The longest output name (it is part of a file name).
pub const MAX_OUTPUT_NAME: usize = 128;

/// What makes `host` unusable as an output's host, if anything: it is
/// joined with the `port` parameter, so one that carries a port of its own
/// (or brackets) would never resolve, and the output would retry it for ever.
fn host_problem(host: &str) -> Option<String> {
    if host.trim().is_empty() {
        return Some("`host` is empty: name a host or an address".to_owned());
    }
    let named_port = host
        .rsplit_once(':')
        .filter(|(name, port)| !name.contains(':') && port.parse::<u16>().is_ok());
    if host.parse::<std::net::SocketAddr>().is_ok() || named_port.is_some() {
        return Some(format!(
            "`host` \"{host}\" includes a port: give the host alone and the port as `port: N`"
        ));
    }
    if host.starts_with('[') {
        return Some(format!(
            "`host` \"{host}\": give an IPv6 address without brackets, e.g. \"::1\""
        ));
    }
    None
}

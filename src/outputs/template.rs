//! `{field}` templates for output settings (webhook bodies, dedup keys,
//! Graphite paths): compiled once, rendered per event without re-parsing.
//!
//! A placeholder names a standard field (`host service state description
//! metric ttl time tags`) or an attribute; an absent field renders empty.
//! `{{` and `}}` are literal braces.

use crate::event::Event;

#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
    source: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Field(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template: {message} (at byte {offset})")]
pub struct TemplateError {
    pub offset: usize,
    pub message: String,
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let rest = &source[at + 1..];
                    let Some(end) = rest.find('}') else {
                        return Err(TemplateError {
                            offset: at,
                            message: "`{` without a closing `}` (write `{{` for a brace)".into(),
                        });
                    };
                    let name = rest[..end].trim();
                    if name.is_empty() || name.contains('{') {
                        return Err(TemplateError {
                            offset: at,
                            message: format!("`{{{}}}` does not name a field", &rest[..end]),
                        });
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field(name.to_owned()));
                    for _ in 0..rest[..=end].chars().count() {
                        chars.next();
                    }
                }
                '}' => {
                    return Err(TemplateError {
                        offset: at,
                        message: "`}` without an opening `{` (write `}}` for a brace)".into(),
                    });
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template {
            parts,
            source: source.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The fields and attributes it names, in order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Field(name) => Some(name.as_str()),
            Part::Text(_) => None,
        })
    }

    pub fn render(&self, event: &Event) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(name) => push_field(&mut out, event, name),
            }
        }
        out
    }
}

fn push_field(out: &mut String, e: &Event, name: &str) {
    use std::fmt::Write;
    let text = |out: &mut String, v: &Option<String>| out.push_str(v.as_deref().unwrap_or(""));
    match name {
        "host" => text(out, &e.host),
        "service" => text(out, &e.service),
        "state" => text(out, &e.state),
        "description" => text(out, &e.description),
        "metric" => {
            if let Some(m) = e.metric {
                let _ = write!(out, "{m}");
            }
        }
        "ttl" => {
            if let Some(t) = e.ttl {
                let _ = write!(out, "{t}");
            }
        }
        "time" => out.push_str(&crate::json::iso8601(e.time)),
        "tags" => out.push_str(&e.tags.join(",")),
        attribute => out.push_str(e.attribute(attribute).unwrap_or("")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Metric;

    fn event() -> Event {
        Event {
            host: Some("web1".into()),
            service: Some("disk /".into()),
            state: Some("critical".into()),
            metric: Some(Metric::Float(0.97)),
            tags: vec!["a".into(), "b".into()],
            attributes: vec![("env".into(), "prod".into())],
            ..Event::default()
        }
    }

    #[test]
    fn renders_fields_attributes_and_literal_braces() {
        let t = Template::parse(
            "{host} {service} is {state} ({metric}) env={env} [{tags}] {{x}} {nope}.",
        )
        .unwrap();
        assert_eq!(
            t.render(&event()),
            "web1 disk / is critical (0.97) env=prod [a,b] {x} ."
        );
    }

    #[test]
    fn rejects_unbalanced_braces_with_position() {
        assert_eq!(Template::parse("a {host").unwrap_err().offset, 2);
        assert_eq!(Template::parse("a } b").unwrap_err().offset, 2);
        assert!(Template::parse("{}").is_err());
        assert_eq!(Template::parse("plain").unwrap().render(&event()), "plain");
    }
}

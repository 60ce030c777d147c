//! Query predicates evaluated against one event: the cost of every `where`.

use criterion::{Criterion, criterion_group, criterion_main};

use vigil::event::{Event, Metric};
use vigil::query::Query;

fn query(c: &mut Criterion) {
    let event = Event {
        host: Some("web12.example.com".into()),
        service: Some("cpu-3/cpu-idle/value".into()),
        state: Some("ok".into()),
        metric: Some(Metric::Float(0.93)),
        tags: vec!["collectd".into(), "prod".into()],
        attributes: vec![("plugin".into(), "cpu".into())],
        ..Event::default()
    };
    // A dashboard's list of hosts, the event's not among them.
    let hosts: Vec<String> = (0..100)
        .map(|i| format!("host = \"web{i}.example.org\""))
        .collect();
    let hosts = hosts.join(" or ");
    let mut group = c.benchmark_group("query");
    for (name, text) in [
        ("one_of_100_hosts", hosts.as_str()),
        ("equality", r#"state = "critical""#),
        ("like_and_metric", r#"service =~ "cpu%" and metric > 0.9"#),
        ("tagged_or_attribute", r#"tagged "page" or plugin = "cpu""#),
        ("regex", r#"host ~= "^web[0-9]+\\.example""#),
        (
            "nested",
            r#"not (state = "ok" and (metric < 0.5 or tagged "x")) or host = "a""#,
        ),
    ] {
        let q = Query::parse(text).expect("parses");
        group.bench_function(name, |b| b.iter(|| q.matches(&event)));
    }
    group.finish();
}

criterion_group!(benches, query);
criterion_main!(benches);

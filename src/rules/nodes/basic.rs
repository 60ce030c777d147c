//! Stateless stages: filters (`where`, `split`, `over`…), field edits (`with`,
//! `default`, `scale`, `tag`, `untag`) and sinks (`index`, `publish`, `reinject`,
//! outputs, `log`, `drop`). None of them holds state, so none of them locks; on reload they
//! only pass [`Node::adopt`] on to their children when their own definition is
//! unchanged.

use std::sync::{Arc, OnceLock};

use crate::event::{Event, Metric};
use crate::pubsub::{Pubsub, Topic};
use crate::query::Query;

use super::saved::{RestoreError, Restorer, Saver};
use super::{Children, Cx, Node, same};

/// `where PRED { … } else { … }`
pub struct Where {
    pub pred: Query,
    pub then: Children,
    pub otherwise: Children,
}

impl Node for Where {
    fn event(&self, event: &Event, cx: &mut Cx) {
        if self.pred.matches(event) {
            self.then.event(event, cx);
        } else {
            self.otherwise.event(event, cx);
        }
    }

    fn tick(&self, cx: &mut Cx) {
        self.then.tick(cx);
        self.otherwise.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Where {
            pred: self.pred.clone(),
            then: self.then.fresh(),
            otherwise: self.otherwise.fresh(),
        })
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<Where>(old).filter(|o| o.pred == self.pred) {
            self.then.adopt(&old.then);
            self.otherwise.adopt(&old.otherwise);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        self.then.save(out);
        self.otherwise.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        self.then.restore(from)?;
        self.otherwise.restore(from)
    }
}

/// `split { when PRED { … } … else { … } }`: the first matching clause wins.
pub struct Split {
    pub clauses: Vec<(Query, Children)>,
    pub default: Children,
}

impl Node for Split {
    fn event(&self, event: &Event, cx: &mut Cx) {
        match self.clauses.iter().find(|(pred, _)| pred.matches(event)) {
            Some((_, children)) => children.event(event, cx),
            None => self.default.event(event, cx),
        }
    }

    fn tick(&self, cx: &mut Cx) {
        for (_, children) in &self.clauses {
            children.tick(cx);
        }
        self.default.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Split {
            clauses: self
                .clauses
                .iter()
                .map(|(p, c)| (p.clone(), c.fresh()))
                .collect(),
            default: self.default.fresh(),
        })
    }

    fn adopt(&self, old: &dyn Node) {
        let Some(old) = same::<Split>(old) else {
            return;
        };
        // A clause sees the same events only if every clause up to it is unchanged.
        let unchanged = self
            .clauses
            .iter()
            .zip(&old.clauses)
            .take_while(|((new, _), (old, _))| new == old)
            .count();
        for ((_, new), (_, old)) in self.clauses.iter().zip(&old.clauses).take(unchanged) {
            new.adopt(old);
        }
        if unchanged == self.clauses.len() && unchanged == old.clauses.len() {
            self.default.adopt(&old.default);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        for (_, children) in &self.clauses {
            children.save(out);
        }
        self.default.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        for (_, children) in &self.clauses {
            children.restore(from)?;
        }
        self.default.restore(from)
    }
}

/// One field assignment of `with`/`default`; `None` values remove the field.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldSet {
    Host(Option<String>),
    Service(Option<String>),
    State(Option<String>),
    Description(Option<String>),
    Metric(Option<Metric>),
    Ttl(Option<f32>),
    Tags(Vec<String>),
    Attribute(String, Option<String>),
}

impl FieldSet {
    fn is_missing_in(&self, e: &Event) -> bool {
        match self {
            FieldSet::Host(_) => e.host.is_none(),
            FieldSet::Service(_) => e.service.is_none(),
            FieldSet::State(_) => e.state.is_none(),
            FieldSet::Description(_) => e.description.is_none(),
            FieldSet::Metric(_) => e.metric.is_none(),
            FieldSet::Ttl(_) => e.ttl.is_none(),
            FieldSet::Tags(_) => e.tags.is_empty(),
            FieldSet::Attribute(k, _) => e.attribute(k).is_none(),
        }
    }

    pub(super) fn apply(&self, e: &mut Event) {
        match self {
            FieldSet::Host(v) => e.host.clone_from(v),
            FieldSet::Service(v) => e.service.clone_from(v),
            FieldSet::State(v) => e.state.clone_from(v),
            FieldSet::Description(v) => e.description.clone_from(v),
            FieldSet::Metric(v) => e.metric = *v,
            FieldSet::Ttl(v) => e.ttl = *v,
            FieldSet::Tags(v) => e.tags.clone_from(v),
            FieldSet::Attribute(k, Some(v)) => e.set_attribute(k, v.clone()),
            FieldSet::Attribute(k, None) => e.attributes.retain(|(key, _)| key != k),
        }
    }
}

/// `with(field: value, …)` sets fields; `default(…)` only fills missing ones.
pub struct With {
    pub sets: Vec<FieldSet>,
    pub only_missing: bool,
    pub children: Children,
}

impl Node for With {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let applies = |set: &FieldSet, e: &Event| !self.only_missing || set.is_missing_in(e);
        // `default` on an event that lacks nothing passes it on as it is.
        if !self.sets.iter().any(|set| applies(set, event)) {
            return self.children.event(event, cx);
        }
        let mut event = event.clone();
        for set in &self.sets {
            if applies(set, &event) {
                set.apply(&mut event);
            }
        }
        self.children.event(&event, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(With {
            sets: self.sets.clone(),
            only_missing: self.only_missing,
            children: self.children.fresh(),
        })
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) =
            same::<With>(old).filter(|o| o.sets == self.sets && o.only_missing == self.only_missing)
        {
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        self.children.restore(from)
    }
}

/// `over(x)`, `under(x)`, `within(a, b)`: events whose metric is in range; events
/// without a metric never pass.
pub struct MetricTest {
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// `over`/`under` are strict, `within` is inclusive (as in Riemann).
    pub inclusive: bool,
    pub children: Children,
}

impl MetricTest {
    fn passes(&self, m: f64) -> bool {
        let above = |lo: f64| if self.inclusive { m >= lo } else { m > lo };
        let below = |hi: f64| if self.inclusive { m <= hi } else { m < hi };
        self.min.is_none_or(above) && self.max.is_none_or(below)
    }
}

impl Node for MetricTest {
    fn event(&self, event: &Event, cx: &mut Cx) {
        if event.metric.is_some_and(|m| self.passes(m.as_f64())) {
            self.children.event(event, cx);
        }
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(MetricTest {
            min: self.min,
            max: self.max,
            inclusive: self.inclusive,
            children: self.children.fresh(),
        })
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<MetricTest>(old)
            .filter(|o| (o.min, o.max, o.inclusive) == (self.min, self.max, self.inclusive))
        {
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        self.children.restore(from)
    }
}

/// `scale(x)`: multiplies the metric; integer × integer stays an integer.
pub struct Scale {
    pub factor: Metric,
    pub children: Children,
}

impl Node for Scale {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let mut event = event.clone();
        event.metric = event.metric.map(|m| match (m, self.factor) {
            (Metric::Int(a), Metric::Int(b)) => a
                .checked_mul(b)
                .map_or(Metric::Float(a as f64 * b as f64), Metric::Int),
            (m, f) => Metric::Float(m.as_f64() * f.as_f64()),
        });
        self.children.event(&event, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Scale {
            factor: self.factor,
            children: self.children.fresh(),
        })
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<Scale>(old).filter(|o| o.factor == self.factor) {
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        self.children.restore(from)
    }
}

/// `tag("x")` / `tag(["a", "b"])`: adds tags the event lacks.
pub struct Tag {
    pub tags: Vec<String>,
    pub children: Children,
}

impl Node for Tag {
    fn event(&self, event: &Event, cx: &mut Cx) {
        if self.tags.iter().all(|tag| event.has_tag(tag)) {
            return self.children.event(event, cx);
        }
        let mut event = event.clone();
        for tag in &self.tags {
            if !event.has_tag(tag) {
                event.tags.push(tag.clone());
            }
        }
        self.children.event(&event, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Tag {
            tags: self.tags.clone(),
            children: self.children.fresh(),
        })
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<Tag>(old).filter(|o| o.tags == self.tags) {
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        self.children.restore(from)
    }
}

/// `untag(t)`, `untag([t, …])`: removes the tags (every copy of each), the
/// mirror of [`Tag`].
pub struct Untag {
    pub tags: Vec<String>,
    pub children: Children,
}

impl Node for Untag {
    fn event(&self, event: &Event, cx: &mut Cx) {
        if !self.tags.iter().any(|tag| event.has_tag(tag)) {
            return self.children.event(event, cx);
        }
        let mut event = event.clone();
        event.tags.retain(|tag| !self.tags.contains(tag));
        self.children.event(&event, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Untag {
            tags: self.tags.clone(),
            children: self.children.fresh(),
        })
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<Untag>(old).filter(|o| o.tags == self.tags) {
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        self.children.restore(from)
    }
}

/// `tap(name)`: passes events on, and under `vigil test` also records them
/// for `expect tap NAME`. Its recorder is the sink at `slot` of
/// [`Cx::outputs`], past the declared outputs: `vigil test` puts one there,
/// `vigil run` none, so that it only passes events on.
pub struct Tap {
    pub name: String,
    pub slot: usize,
    pub children: Children,
}

impl Node for Tap {
    fn event(&self, event: &Event, cx: &mut Cx) {
        if let Some(recorder) = cx.outputs.get(self.slot) {
            recorder.push(event.clone());
        }
        self.children.event(event, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Tap {
            name: self.name.clone(),
            slot: self.slot,
            children: self.children.fresh(),
        })
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<Tap>(old).filter(|o| o.name == self.name) {
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        self.children.restore(from)
    }
}

/// Leaf stages: they consume the event and have no children.
macro_rules! leaf {
    ($name:ident $(, $field:ident : $ty:ty)* ; |$self:ident, $event:ident, $cx:ident| $body:block) => {
        #[derive(Clone)]
        pub struct $name { $(pub $field: $ty),* }

        impl Node for $name {
            fn event(&$self, $event: &Event, $cx: &mut Cx) $body
            fn tick(&self, _cx: &mut Cx) {}
            fn fresh(&self) -> Box<dyn Node> {
                Box::new(self.clone())
            }
            fn adopt(&self, _old: &dyn Node) {}
            fn save(&self, _out: &mut dyn Saver) {}
            fn restore(&self, _from: &mut Restorer<'_>) -> Result<(), RestoreError> {
                Ok(())
            }
        }
    };
}

leaf!(Index; |self, event, cx| {
    cx.index.insert_hashed(event, cx.key_hash(event), cx.now);
});

// The topic (and where it is: the index's topics) is looked up at the
// first event, not per event: publishing to a topic nobody subscribes to
// is then one atomic load. Held, it stays the topic that subscribers
// connected before find. Under `vigil test` the sink at `slot`, past the
// outputs, records what it publishes for `expect publish`, as a `Tap`'s.
leaf!(Publish, name: Arc<str>, topic: OnceLock<(Arc<Pubsub>, Arc<Topic>)>, slot: usize; |self, event, cx| {
    if let Some(recorder) = cx.outputs.get(self.slot) {
        recorder.push(event.clone());
    }
    let (pubsub, topic) = self.topic.get_or_init(|| {
        let pubsub = cx.index.topics().clone();
        let topic = pubsub.topic(&self.name);
        (pubsub, topic)
    });
    pubsub.publish_to(topic, event);
});

leaf!(Reinject; |self, event, cx| {
    cx.reinjected.push(event.clone());
});

leaf!(Drop; |self, event, _cx| {
    let _ = event;
});

leaf!(Output, id: usize; |self, event, cx| {
    cx.outputs[self.id].push(event.clone());
});

leaf!(Log, level: tracing::Level; |self, event, _cx| {
    let json = crate::json::to_json(event);
    match self.level {
        tracing::Level::ERROR => tracing::error!(target: "vigil::rules", event = %json),
        tracing::Level::WARN => tracing::warn!(target: "vigil::rules", event = %json),
        tracing::Level::INFO => tracing::info!(target: "vigil::rules", event = %json),
        tracing::Level::DEBUG => tracing::debug!(target: "vigil::rules", event = %json),
        tracing::Level::TRACE => tracing::trace!(target: "vigil::rules", event = %json),
    }
});

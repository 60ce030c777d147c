//! Hot reload: on `SIGHUP` (which `main` handles), `vigil run` re-reads its
//! rule file, validates and compiles it exactly as at start-up, and swaps it
//! in; batches already running finish on the old rules, the next ones wait
//! for the state to move and run on the new ([`Rules::replace`]). A file that does not load is rejected with
//! the same `FILE:LINE:COL` diagnostics as `vigil check`, logged and counted
//! in `RuleStats::reload_failures`, and the old rules keep running.
//!
//! # What carries over
//! Riemann drops all stream state on reload; vigil keeps it for every stage
//! that did not change. The old and new trees are walked side by side
//! ([`Node::adopt`](super::nodes::Node::adopt)): a stage takes over its
//! predecessor's state when it sits at the same position among its siblings,
//! has the same kind and the same compiled parameters (after `env(…)`;
//! `where`/`split` predicates by what they say, however spaced or
//! parenthesised), and every stage above it passed
//! the same test. This walk stands in for a per-stage identity hash: it needs
//! nothing stored in the stages. Whitespace, comments and edits elsewhere in
//! the file do not matter; edits below a stage do not reset it.
//! - `rate`: the partial sum, the window's end and the latest event.
//! - `by`, `changed_state`: every group. A statement whose text (block
//!   included) and the file's list of outputs are unchanged hands its groups
//!   over as they are, however many; after an edit each group is rebuilt
//!   from the new block and its unchanged stages take over its old state.
//! - `changed`: the last value, so a repeated value does not fire again.
//! - `counter`: the count; `runs`: the last value and its run so far.
//! - `fill_in`, `fill_in_last`: when the next fill is due, when the latest
//!   event expires (and `fill_in_last`'s latest event), also when its `dt`
//!   or fields changed or `fill_in_last` became `fill_in` (the next fill
//!   then a new `dt` after the latest event or fill, at the earliest at the
//!   reload; its children start fresh); `apdex`: its counts so far, the
//!   latest event and when its `dt` ends.
//! - `throttle`, `stable`, `ewma`, `ewma_timeless`, `ddt`: their counters,
//!   held events and last values.
//! - `predict_linear`: the times and metrics of its window.
//! - Time, event-count, `batch` and `coalesce` windows, `percentiles`: the buffered
//!   events or samples (a fixed window: its folds so far) and when the
//!   window closes; a fold keeps its place if its kind is unchanged. A `min`
//!   or `max` new to a fixed window folds the events from the reload on.
//! - The index always: it lives outside the rules.
//! - An output whose declaration is identical (name, type and every argument):
//!   its queue, delivery task, connection and counters.
//!
//! The same walk carries the state over a restart ([`super::persist`]): the
//! saved state is restored into the rules it was saved with, which the new
//! rules then adopt.
//!
//! # What does not
//! - A stage whose kind or parameters changed, that moved (a statement
//!   inserted or removed before it shifts it), or below such a stage: fresh.
//! - An output that was removed or whose declaration changed: it stops taking
//!   events, delivers what it already queued (once no batch still runs on the
//!   old rules), and ends; a changed one starts again, counting on from the
//!   old one's counters, into which the old one settles what it held (a
//!   pager leaves its undelivered pages in flight there: the new one sends
//!   them first, or drops them if its receiver changed). A changed
//!   `webhook` or pager posts only once the old one has ended, so a
//!   receiver never gets an old event after a newer one.
//! - vigil's own series of an output no longer declared: once it has ended,
//!   the self-metrics take them out of the index without expiring them
//!   ([`crate::selfmetrics`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::event_queue::Fill;
use crate::outputs::{self, Kept, OutputKind, OutputSink, OutputSpec, OutputStats, Queue};
use crate::stats::Stats;

use super::engine::{RuleStats, Rules, Tree};
use super::{Compiled, EnvPolicy, RuleText};

/// Loads a rule file meant to replace the running one. On failure the
/// rendered diagnostics are logged, counted, and returned.
pub fn prepare(
    stats: &RuleStats,
    name: &str,
    source: &str,
    env: EnvPolicy,
) -> Result<Compiled, String> {
    let (_, compiled) =
        super::load(name, source, env).map_err(|rendered| reject(stats, name, rendered))?;
    super::log_warnings(&compiled, name, source);
    Ok(compiled)
}

fn reject(stats: &RuleStats, name: &str, reason: String) -> String {
    stats.reload_failures.fetch_add(1, Ordering::Relaxed);
    tracing::error!(rules = %name, diagnostics = %reason, "Reload rejected; the running rules stay.");
    reason
}

/// One started output.
struct Running {
    spec: OutputSpec,
    queue: Arc<Queue>,
    /// A child of the process-wide output shutdown, so one output can stop alone.
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// One output's counters, which every declaration of its name counts into,
/// and the events waiting in their queues.
pub struct OutputCount {
    pub name: String,
    pub stats: Arc<OutputStats>,
    pub queued: u64,
    /// The fullest of its queues (a removed declaration's may still drain).
    pub fill: Fill,
}

impl OutputCount {
    pub fn get(&self, counter: impl Fn(&OutputStats) -> &AtomicU64) -> u64 {
        Stats::get(counter(&self.stats))
    }
}

/// What an output did over the whole run, as the last log line tells it.
#[derive(Debug, PartialEq, Eq)]
pub struct FinalCount {
    pub name: String,
    pub accepted: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub skipped: u64,
}

impl std::fmt::Display for FinalCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            name,
            accepted,
            delivered,
            dropped,
            skipped,
        } = self;
        write!(
            f,
            "{name}: accepted {accepted}, delivered {delivered}, dropped {dropped}, skipped {skipped}"
        )
    }
}

/// The outputs a running vigil delivers to, kept up to date across reloads.
pub struct Outputs {
    running: Vec<Running>,
    /// Removed outputs still delivering what they queued.
    retiring: Vec<JoinHandle<()>>,
    /// Their queues, for the counters while they drain (gone once they end).
    draining: Vec<Weak<Queue>>,
    /// What a redeclared output takes over from the one it replaces.
    kept: Kept,
    shutdown: CancellationToken,
}

impl Outputs {
    /// Starts one delivery task per declaration; cancelling `shutdown` makes
    /// them all deliver what is queued and end. Must run inside tokio.
    pub fn start(specs: &[OutputSpec], kept: Kept, shutdown: CancellationToken) -> Self {
        let mut outputs = Self {
            running: Vec::new(),
            retiring: Vec::new(),
            draining: Vec::new(),
            kept,
            shutdown,
        };
        outputs.update(specs);
        outputs.kept.warn_of_undeclared_pagers(specs);
        outputs
    }

    /// The queues in declaration order: what `Output` stages address.
    pub fn sinks(&self) -> Vec<Arc<dyn OutputSink>> {
        self.running
            .iter()
            .map(|r| r.queue.clone() as Arc<dyn OutputSink>)
            .collect()
    }

    /// Makes the running outputs match `specs`: identical declarations keep
    /// their queue, the others start. Returns the ones no longer declared
    /// as they were.
    fn update(&mut self, specs: &[OutputSpec]) -> Vec<Running> {
        let mut old: Vec<Option<Running>> = std::mem::take(&mut self.running)
            .into_iter()
            .map(Some)
            .collect();
        for spec in specs {
            let kept = old
                .iter_mut()
                .find(|r| r.as_ref().is_some_and(|r| r.spec == *spec))
                .and_then(Option::take);
            let running = kept.unwrap_or_else(|| {
                let stop = self.shutdown.child_token();
                let (queue, task) = outputs::start(spec, &self.kept, stop.clone());
                tracing::info!(output = %spec.name, kind = spec.kind.type_name(), "Output started.");
                Running {
                    spec: spec.clone(),
                    queue,
                    stop,
                    task,
                }
            });
            self.running.push(running);
        }
        let removed: Vec<Running> = old.into_iter().flatten().collect();
        for gone in &removed {
            let name = &gone.spec.name;
            let is_pager = matches!(gone.spec.kind, OutputKind::Pager(_));
            if is_pager && specs.iter().all(|spec| spec.name != *name) {
                self.kept.warn_if_left_open(name);
            }
        }
        removed
    }
}

/// Re-reads the rule file on demand (`SIGHUP`) and swaps it in.
pub struct Reloader {
    /// `None` when running the embedded default rules: nothing to re-read.
    path: Option<PathBuf>,
    rules: Arc<Rules>,
    outputs: Mutex<Outputs>,
}

impl Reloader {
    pub fn new(path: Option<PathBuf>, rules: Arc<Rules>, outputs: Outputs) -> Self {
        Self {
            path,
            rules,
            outputs: Mutex::new(outputs),
        }
    }

    /// Each output's counters and what waits in its queues, in declaration
    /// order, then outputs a reload removed that still deliver what they
    /// queued. A declaration a reload replaced counts into its successor's
    /// counters, and its queue's backlog into its `queued`, until it has
    /// drained.
    pub fn output_counts(&self) -> Vec<OutputCount> {
        counts(self.output_queues())
    }

    /// The current outputs' queues, then those of removed ones still draining.
    fn output_queues(&self) -> Vec<Arc<Queue>> {
        let mut outputs = self.outputs.lock();
        outputs.draining.retain(|q| q.strong_count() > 0);
        let current = outputs.running.iter().map(|r| r.queue.clone());
        let draining = outputs.draining.iter().filter_map(Weak::upgrade);
        current.chain(draining).collect()
    }

    /// Re-reads, validates and swaps in the rule file. Must run inside tokio.
    pub async fn reload(self: &Arc<Self>) -> Result<(), String> {
        let Some(path) = self.path.clone() else {
            tracing::warn!(
                "Rules not reloaded: running the embedded rules; start with --rules FILE to reload them."
            );
            return Ok(());
        };
        // Reading and compiling a large file takes a while, and the swap
        // waits for a tick under way: not on a worker the connections need.
        let reloader = self.clone();
        tokio::task::spawn_blocking(move || reloader.reload_from(&path))
            .await
            .map_err(|e| format!("reload task failed: {e}"))?
    }

    fn reload_from(&self, path: &Path) -> Result<(), String> {
        let name = path.display().to_string();
        let stats = &self.rules.stats;
        let source = super::read_file(path).map_err(|e| reject(stats, &name, e.render(&name)))?;
        let compiled = prepare(stats, &name, &source, EnvPolicy::Strict)?;
        // Before the outputs: what reads their counts (a Prometheus scrape,
        // on a worker) must not wait for the tick, or a state write, too.
        let turn = self.rules.reload_turn();
        let mut outputs = self.outputs.lock();
        // A reload still compiling when vigil stops goes on (it runs on a
        // blocking thread): it must not start outputs no one finishes.
        if outputs.shutdown.is_cancelled() {
            tracing::warn!(rules = %name, "Rules not reloaded: vigil is stopping.");
            return Err("vigil is stopping".to_owned());
        }
        let removed = outputs.update(&compiled.outputs);
        let text = Arc::new(RuleText { name, text: source });
        // Batches wait while the state moves: the log says how long.
        let swapping = std::time::Instant::now();
        let old = self
            .rules
            .replace(&turn, compiled.roots, Some(text.clone()), outputs.sinks());
        drop(turn);
        tracing::info!(
            rules = %text.name,
            outputs = outputs.running.len(),
            outputs_stopped = removed.len(),
            swap = ?swapping.elapsed(),
            "Rules reloaded."
        );
        outputs.retiring.retain(|task| !task.is_finished());
        outputs.draining.retain(|q| q.strong_count() > 0);
        let draining = removed.iter().map(|r| Arc::downgrade(&r.queue));
        outputs.draining.extend(draining);
        if !removed.is_empty() {
            let retire = retire(old, removed, outputs.shutdown.clone());
            outputs.retiring.push(tokio::spawn(retire));
        }
        Ok(())
    }

    /// At shutdown, once the outputs' token is cancelled: waits (up to
    /// `grace`) for every output, removed ones included, to deliver what it
    /// queued; returns each output's final counts, what it had not settled
    /// by then counted as dropped.
    pub async fn finish_outputs(&self, grace: Duration) -> Vec<FinalCount> {
        let queues = self.output_queues();
        let (running, retiring) = {
            let mut outputs = self.outputs.lock();
            let outputs = &mut *outputs;
            (
                std::mem::take(&mut outputs.running),
                std::mem::take(&mut outputs.retiring),
            )
        };
        let tasks: Vec<_> = running
            .into_iter()
            .map(|r| r.task)
            .chain(retiring)
            .collect();
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        let mut ended = futures_util::future::join_all(tasks);
        if tokio::time::timeout(grace, &mut ended).await.is_err() {
            tracing::warn!(
                ?grace,
                "Outputs still delivering after the grace period; stopping anyway."
            );
            // Stopped before their files are written for the last time: a
            // page settling afterwards would leave the file and the counts
            // below telling another story. One whose answer was cut off is
            // sent again by the next run.
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
            ended.await;
            let pagers = self.outputs.lock().kept.pager_memories();
            outputs::save_pagers(pagers).await;
        } else {
            // Saves that failed (a full disk) and had yet to be tried again,
            // removed pagers' too: their tasks are gone.
            let pagers = self.outputs.lock().kept.pager_memories_unsaved();
            outputs::save_pagers(pagers).await;
        }
        // A pager that stopped with its receiver failing left its pages in
        // flight: those its file keeps are the next run's.
        let written_down = self.outputs.lock().kept.pages_written_down();
        counts(queues)
            .into_iter()
            .map(|c| {
                let unsettled = c.queued + c.get(|s| &s.in_flight);
                let kept = (written_down.get(&c.name).copied().unwrap_or(0) as u64).min(unsettled);
                if kept > 0 {
                    // Counted dropped all the same: this run did not deliver them.
                    tracing::warn!(
                        output = %c.name,
                        kept,
                        lost = unsettled - kept,
                        "Pages not delivered when vigil stopped: those kept are in the pager's \
                         file, and the next run sends them first; the others are lost."
                    );
                } else if unsettled > 0 {
                    tracing::error!(
                        output = %c.name,
                        dropped = unsettled,
                        "Events not delivered when vigil stopped; dropped."
                    );
                }
                Stats::add(&c.stats.dropped, unsettled);
                FinalCount {
                    accepted: c.get(|s| &s.accepted),
                    delivered: c.get(|s| &s.delivered),
                    dropped: c.get(|s| &s.dropped),
                    skipped: c.get(|s| &s.skipped),
                    name: c.name,
                }
            })
            .collect()
    }
}

/// `queues` merged by output name (see [`Reloader::output_counts`]).
fn counts(queues: Vec<Arc<Queue>>) -> Vec<OutputCount> {
    let mut counts: Vec<OutputCount> = Vec::new();
    for q in queues {
        match counts.iter_mut().find(|c| c.name == q.name) {
            Some(count) => {
                count.queued += q.queued();
                count.fill = count.fill.fuller(q.fill());
            }
            None => counts.push(OutputCount {
                name: q.name.clone(),
                stats: q.stats.clone(),
                queued: q.queued(),
                fill: q.fill(),
            }),
        }
    }
    counts
}

/// Stops removed outputs once no batch runs on the tree that pushes to them,
/// so every event it pushed is queued (and accounted for) before they drain.
async fn retire(old: Arc<Tree>, removed: Vec<Running>, shutdown: CancellationToken) {
    // The swap turned the batches' borrowed references into counted ones.
    while Arc::strong_count(&old) > 1 && !shutdown.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(old);
    // What each held when the old rules stopped pushing to it. Its counters
    // are not its own to report: a replacement counts on in the same ones.
    let held: Vec<u64> = (removed.iter())
        .map(|r| r.queue.queued() + Stats::get(&r.queue.stats.in_flight))
        .collect();
    for r in &removed {
        r.stop.cancel();
    }
    for (r, held) in removed.into_iter().zip(held) {
        // A failed task has already logged why, and counted what it dropped.
        let _ = r.task.await;
        tracing::info!(
            output = %r.spec.name,
            held,
            "Output replaced or removed by a reload: it settled the events it held \
             (delivered or dropped, in the output's counters) and stopped."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::outputs::{OutputKind, forward};
    use crate::rules::nodes::Children;

    fn forward_to(name: &str, port: u16) -> OutputSpec {
        OutputSpec {
            name: name.to_owned(),
            kind: OutputKind::Forward(forward::Config {
                host: "127.0.0.1".to_owned(),
                port,
                tls: None,
            }),
        }
    }

    /// Rules running `source`, written at `path`, with no outputs; their
    /// reloader, and the outputs' shutdown token.
    fn reloading(path: &Path, source: &str) -> (Arc<Reloader>, Arc<Rules>, CancellationToken) {
        std::fs::write(path, source).unwrap();
        let (_, compiled) = super::super::load("r.vigil", source, EnvPolicy::Strict).unwrap();
        let index = Arc::new(crate::index::Index::new(Default::default()));
        let clock = Arc::new(crate::clock::ManualClock::new(0));
        let text = RuleText {
            name: "r.vigil".into(),
            text: source.into(),
        };
        let text = Some(Arc::new(text));
        let rules = Arc::new(Rules::new(compiled.roots, text, Vec::new(), index, clock));
        let shutdown = CancellationToken::new();
        let outputs = Outputs::start(&[], Kept::default(), shutdown.clone());
        let reloader = Arc::new(Reloader::new(Some(path.to_owned()), rules.clone(), outputs));
        (reloader, rules, shutdown)
    }

    /// A reload that waits for a stream state write (the final one, or
    /// one that gives way to none) must not hold the outputs' lock
    /// meanwhile: a Prometheus scrape reading the outputs' counts, on an
    /// async worker, would wait for the whole write too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_waiting_for_a_state_write_holds_up_no_scrape() {
        let dir = tempfile::tempdir().unwrap();
        let (reloader, rules, shutdown) = reloading(
            &dir.path().join("r.vigil"),
            "streams {\n  changed_state { index }\n}\n",
        );
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held, holding) = std::sync::mpsc::channel();
        let writing = {
            let rules = rules.clone();
            std::thread::spawn(move || {
                rules.saving(|_, _| {
                    held.send(()).unwrap();
                    released.recv_timeout(Duration::from_secs(10)).ok();
                })
            })
        };
        holding.recv().unwrap();
        let reload = tokio::spawn({
            let reloader = reloader.clone();
            async move { reloader.reload().await }
        });
        while !rules.reload_waiting() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let scrape = tokio::task::spawn_blocking({
            let reloader = reloader.clone();
            move || reloader.output_counts().len()
        });
        let scraped = tokio::time::timeout(Duration::from_secs(2), scrape).await;
        release.send(()).unwrap();
        writing.join().unwrap();
        reload.await.unwrap().unwrap();
        assert!(scraped.is_ok(), "the scrape waited for the state write");
        shutdown.cancel();
    }

    /// A reload that reaches its swap once vigil is stopping (the outputs'
    /// token cancelled, their last deliveries awaited) swaps nothing and
    /// starts no output: nothing would finish it.
    #[tokio::test]
    async fn a_reload_once_vigil_is_stopping_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.vigil");
        let (reloader, rules, shutdown) = reloading(&path, "streams {\n  index\n}\n");
        let late = "output late = forward(host: \"127.0.0.1\", port: 9)\n";
        std::fs::write(&path, format!("{late}streams {{\n  late\n}}\n")).unwrap();
        shutdown.cancel();
        let refused = reloader.reload().await;
        assert_eq!(refused, Err("vigil is stopping".to_owned()));
        assert_eq!(rules.stats.reloads.load(Ordering::Relaxed), 0);
        assert!(reloader.output_counts().is_empty(), "an output started");
    }

    /// Declarations of one name count as one output: their queues' backlog
    /// adds up, in the counters they share.
    #[tokio::test]
    async fn an_outputs_declarations_are_counted_as_one() {
        let (kept, stop) = (Kept::default(), CancellationToken::new());
        let (f1, _) = outputs::start(&forward_to("f", 1), &kept, stop.clone());
        let (f2, _) = outputs::start(&forward_to("f", 2), &kept, stop.clone());
        let (g, _) = outputs::start(&forward_to("g", 3), &kept, stop.clone());
        (0..4).for_each(|_| f1.push(Event::default()));
        f2.push(Event::default());
        g.push(Event::default());

        let counts = counts(vec![f1, g, f2]);
        let names: Vec<_> = counts.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["f", "g"]);
        let pending = |c: &OutputCount| c.queued + c.get(|s| &s.in_flight);
        let f = &counts[0];
        assert_eq!(
            (f.get(|s| &s.accepted), pending(f)),
            (5, 5),
            "nothing delivered to port 1 or 2"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn unchanged_outputs_keep_their_queue_and_removed_ones_stop_once_unused() {
        let shutdown = CancellationToken::new();
        let mut outputs = Outputs::start(
            &[forward_to("a", 1), forward_to("b", 2)],
            Kept::default(),
            shutdown,
        );
        let (a, b) = (
            outputs.running[0].queue.clone(),
            outputs.running[1].queue.clone(),
        );

        let removed = outputs.update(&[forward_to("a", 1), forward_to("b", 3), forward_to("c", 4)]);
        let names: Vec<_> = outputs
            .running
            .iter()
            .map(|r| r.spec.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(
            Arc::ptr_eq(&outputs.running[0].queue, &a),
            "identical: kept"
        );
        assert!(
            !Arc::ptr_eq(&outputs.running[1].queue, &b),
            "changed: restarted"
        );
        assert!(
            Arc::ptr_eq(&outputs.running[1].queue.stats, &b.stats),
            "counting on from the old declaration's counters, which it settles into"
        );
        assert!(!Arc::ptr_eq(&outputs.running[2].queue.stats, &b.stats));
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].queue.name, "b");

        let stop = removed[0].stop.clone();
        let old = Arc::new(Tree {
            roots: Children::default(),
            outputs: vec![b],
            text: None,
        });
        let batch_still_running = old.clone();
        let retiring = tokio::spawn(retire(old, removed, CancellationToken::new()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!stop.is_cancelled(), "a batch may still push to it");
        drop(batch_still_running);
        tokio::time::timeout(Duration::from_secs(5), retiring)
            .await
            .expect("retired once unused")
            .expect("no panic");
        assert!(stop.is_cancelled());
    }
}

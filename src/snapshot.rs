//! Index snapshots: the index is written to `--data-dir` periodically and at
//! shutdown, and loaded at start, so a restart forgets nothing and a `kill -9`
//! loses at most one snapshot interval. Every entry loaded lives at least one
//! TTL from the start ([`Index::restore`]): a live agent reports again
//! meanwhile, and a host that died during the restart expires through the
//! rules a TTL after it, so it is still noticed.
//!
//! [`Snapshots`] also writes the rules' stream state beside it, at the same
//! moments; its format is [`crate::rules::persist`]'s.
//!
//! # Format (version 1, integers little-endian)
//!
//! ```text
//! "VIGILIDX"  u32 version
//! { u32 length, protobuf Event (proto::to_pb) } × count
//! u64 count   u32 CRC32 of every byte before it
//! ```
//!
//! The checksum is verified before any entry is decoded, so a truncated or
//! corrupted file is rejected as a whole: a snapshot loads entirely or not at all.
//! Files are replaced atomically (temp file in the same directory, fsync, rename).

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Buf;
use prost::Message;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::blocking::off_workers;
use crate::clock::Micros;
use crate::event::Event;
use crate::index::Index;
use crate::proto::{PbEvent, from_pb, to_pb};
use crate::rules::engine::Rules;
use crate::rules::persist::{self, Occasion, StateError};
use crate::stats::Stats;

/// The snapshot's name inside the data directory.
pub const FILE_NAME: &str = "index.snapshot";

const MAGIC: &[u8; 8] = b"VIGILIDX";
const VERSION: u32 = 1;
const HEADER_LEN: usize = MAGIC.len() + 4;
/// Entry count (u64) and CRC32 (u32).
const TRAILER_LEN: usize = 8 + 4;
/// The smallest possible entry: its length prefix.
const MIN_ENTRY_LEN: usize = 4;

/// Why a snapshot could not be read or written. Causes are part of the message
/// (not `#[source]`) because the logs show only the message.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: io::Error },
    #[error("too short to be a snapshot ({0} bytes): truncated")]
    TooShort(usize),
    #[error("not a vigil index snapshot (bad magic)")]
    BadMagic,
    #[error("unsupported snapshot version {0} (this vigil reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error(
        "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): truncated or corrupted"
    )]
    Checksum { stored: u32, computed: u32 },
    #[error("entry {entry}: length {len} runs past the end of the entries ({left} bytes left)")]
    BadLength { entry: usize, len: u32, left: usize },
    #[error("entry {entry}: length prefix cut short ({left} bytes left)")]
    CutShort { entry: usize, left: usize },
    #[error("entry {entry} does not decode: {cause}")]
    Decode {
        entry: usize,
        cause: prost::DecodeError,
    },
    #[error("the trailer counts {expected} entries but the file holds {found}")]
    CountMismatch { expected: u64, found: usize },
    #[error("not written: the runtime shut down before the write could start")]
    ShutDown,
    #[error("abandoned: vigil is stopping and writes its final state instead")]
    Abandoned,
    #[error("gave way to a rule reload: the next periodic write saves the new rules' state")]
    GaveWay,
    #[error(
        "{} is in use by another vigil{}: give each its own --data-dir",
        .dir.display(),
        .pid.as_ref().map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    InUse { dir: PathBuf, pid: Option<String> },
    #[error("stream state: {0}")]
    Streams(Box<StateError>),
    #[error(
        "cannot make {} a directory: {} is a file, not a directory",
        .dir.display(),
        .file.display()
    )]
    FileInTheWay { dir: PathBuf, file: PathBuf },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |cause| SnapshotError::Io {
        path: path.to_owned(),
        cause,
    }
}

/// Writes a snapshot as its entries come, a batch at a time, so a big index
/// is never copied out whole (at a million keys that copy alone would more
/// than double the process's memory every snapshot interval).
struct Encoder<W: Write> {
    out: CrcWriter<W>,
    buf: Vec<u8>,
    count: u64,
}

impl<W: Write> Encoder<W> {
    fn new(out: W) -> io::Result<Self> {
        let mut out = CrcWriter::new(out);
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        Ok(Encoder {
            out,
            buf: Vec::new(),
            count: 0,
        })
    }

    fn push(&mut self, events: &[Event]) -> io::Result<()> {
        for event in events {
            self.buf.clear();
            to_pb(event)
                .encode(&mut self.buf)
                .expect("a Vec grows to fit any message");
            let len = u32::try_from(self.buf.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "event over 4 GiB"))?;
            self.out.write_all(&len.to_le_bytes())?;
            self.out.write_all(&self.buf)?;
        }
        self.count += events.len() as u64;
        Ok(())
    }

    /// Writes the trailer; returns how many entries the snapshot holds.
    fn finish(mut self) -> io::Result<u64> {
        self.out.write_all(&self.count.to_le_bytes())?;
        self.out.finish()?;
        Ok(self.count)
    }
}

/// Passes bytes through, checksumming them on the way, so the file is written
/// in one streaming pass without a second in-memory copy.
pub(crate) struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> CrcWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        CrcWriter {
            inner,
            crc: crc32fast::Hasher::new(),
            len: 0,
        }
    }

    /// Appends the CRC32 of everything written (little-endian); returns the
    /// total length, CRC included.
    pub(crate) fn finish(mut self) -> io::Result<u64> {
        self.inner.write_all(&self.crc.finalize().to_le_bytes())?;
        Ok(self.len + 4)
    }
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Parses a whole snapshot. Allocation is bounded by the input's size, whatever
/// its length prefixes and count claim.
pub fn decode(bytes: &[u8]) -> Result<Vec<Event>, SnapshotError> {
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(SnapshotError::TooShort(bytes.len()));
    }
    let (header, rest) = bytes.split_at(HEADER_LEN);
    let (magic, mut version) = header.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    // The version comes before the checksum: a newer layout may checksum differently.
    let version = version.get_u32_le();
    if version != VERSION {
        return Err(SnapshotError::UnsupportedVersion(version));
    }
    let (covered, mut stored) = bytes.split_at(bytes.len() - 4);
    let (stored, computed) = (stored.get_u32_le(), crc32fast::hash(covered));
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    let (mut body, mut count) = rest[..rest.len() - 4].split_at(rest.len() - TRAILER_LEN);
    let expected = count.get_u64_le();
    let fits = body.len() / MIN_ENTRY_LEN;
    let mut events = Vec::with_capacity(usize::try_from(expected).map_or(fits, |n| n.min(fits)));
    while body.has_remaining() {
        let entry = events.len();
        let left = body.len();
        if left < 4 {
            return Err(SnapshotError::CutShort { entry, left });
        }
        let len = body.get_u32_le();
        let Some(len) = usize::try_from(len).ok().filter(|&n| n <= body.len()) else {
            return Err(SnapshotError::BadLength {
                entry,
                len,
                left: body.len(),
            });
        };
        let pb = PbEvent::decode(&body[..len])
            .map_err(|cause| SnapshotError::Decode { entry, cause })?;
        body.advance(len);
        // Every stored event has `time_micros`, so "now" is never used.
        events.push(from_pb(pb, 0));
    }
    if events.len() as u64 != expected {
        return Err(SnapshotError::CountMismatch {
            expected,
            found: events.len(),
        });
    }
    Ok(events)
}

/// Atomically replaces the snapshot in `dir` (which must exist): a crash
/// mid-write leaves the previous snapshot in place.
pub fn write(dir: &Path, events: &[Event]) -> Result<(), SnapshotError> {
    write_from(dir, |encoder| encoder.push(events)).map(drop)
}

/// Like [`write`], with the entries pushed by `fill`; returns how many.
fn write_from(
    dir: &Path,
    fill: impl FnOnce(&mut Encoder<&mut BufWriter<File>>) -> io::Result<()>,
) -> Result<u64, SnapshotError> {
    replace_file(&dir.join(FILE_NAME), |out| {
        let mut encoder = Encoder::new(out)?;
        fill(&mut encoder)?;
        encoder.finish()
    })
}

/// Atomically replaces the file at `path` (its directory must exist) with
/// what `fill` writes: through [`temp_of`] beside it, synced, then renamed
/// over it, so a crash mid-write leaves the previous file in place. A write
/// that fails, or whose rename fails, removes its temporary file: on a full disk, a partial index
/// snapshot left there would keep the small files (a pager's incidents)
/// from being written too.
pub(crate) fn replace_file<T>(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> io::Result<T>,
) -> Result<T, SnapshotError> {
    let temp = temp_of(path);
    let written = (|| {
        let file = File::create(&temp)?;
        let mut out = BufWriter::new(file);
        let written = fill(&mut out)?;
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        Ok(written)
    })()
    .map_err(|cause| {
        let _ = fs::remove_file(&temp);
        io_error(&temp)(cause)
    })?;
    fs::rename(&temp, path).map_err(|cause| {
        let _ = fs::remove_file(&temp);
        io_error(path)(cause)
    })?;
    // The rename itself is durable only once the directory is synced.
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))?;
    Ok(written)
}

/// The file in the data directory whose lock says a vigil uses it.
const LOCK_FILE: &str = "vigil.lock";

/// Creates `dir` if needed and takes it for this process until the returned
/// file is closed (at the latest when the process ends, however it ends).
/// Refused while another vigil holds it: both would write the same
/// temporary files and overwrite each other's snapshot, stream state and
/// open incidents, and a crash could leave them interleaved.
pub fn claim(dir: &Path) -> Result<File, SnapshotError> {
    claim_writing(dir, |file| {
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())
    })
}

/// [`claim`], saying who holds `dir` with `holder`.
fn claim_writing(
    dir: &Path,
    holder: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<File, SnapshotError> {
    create_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(SnapshotError::InUse {
                dir: dir.to_owned(),
                pid: (!holder.is_empty()).then(|| holder.to_owned()),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_error(&path)(e)),
    }
    // Who holds it, for the next one's refusal. Only that: the lock keeps
    // others out, so a full disk does not keep vigil from starting.
    if let Err(error) = holder(&mut file) {
        tracing::warn!(
            path = %path.display(),
            %error,
            "Could not write this vigil's pid into the lock file; the directory is \
             taken all the same (a second vigil is refused without the pid)."
        );
    }
    Ok(file)
}

/// Creates `dir` and its parents if missing. A file where one of them
/// goes is named: `create_dir_all` says only "File exists" or "Not a
/// directory".
fn create_dir(dir: &Path) -> Result<(), SnapshotError> {
    fs::create_dir_all(dir).map_err(|cause| {
        let file = (dir.ancestors()).find(|a| fs::metadata(a).is_ok_and(|m| !m.is_dir()));
        match file {
            Some(file) => SnapshotError::FileInTheWay {
                dir: dir.to_owned(),
                file: file.to_owned(),
            },
            None => io_error(dir)(cause),
        }
    })
}

/// Removes the temporary files a write cut short by a crash (or a full
/// disk) left in `dir`: the snapshot's, the stream state's and the pagers'.
/// Call once `dir` is [`claim`]ed, so no other vigil is writing them.
pub fn remove_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(of) = name.strip_suffix(".tmp") else {
            continue;
        };
        let ours = of == FILE_NAME
            || of == persist::FILE_NAME
            || (of.starts_with("pagerduty-") && of.ends_with(".json"));
        if !ours {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                "Removed a temporary file an interrupted write left."
            ),
            Err(error) => tracing::warn!(
                path = %path.display(),
                %error,
                "Could not remove a temporary file an interrupted write left."
            ),
        }
    }
}

/// Renames `path`, which could not be read (`error`), to `path.unreadable`
/// (replacing an earlier one), so the next write does not destroy it: a
/// newer vigil's file after a downgrade, or a damaged one to look into.
/// Says so as an ERROR beginning with `ignoring`, what vigil does instead.
pub fn set_aside(path: &Path, error: &dyn std::fmt::Display, ignoring: &str) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".unreadable");
    let aside = PathBuf::from(aside);
    match fs::rename(path, &aside) {
        Ok(()) => tracing::error!(
            path = %path.display(),
            %error,
            kept_as = %aside.display(),
            "{ignoring} The file is kept aside."
        ),
        Err(cause) => tracing::error!(
            path = %path.display(),
            %error,
            %cause,
            "{ignoring} It could not be kept aside: the next write replaces it."
        ),
    }
}

/// Where [`replace_file`] writes `path`'s next content first.
fn temp_of(path: &Path) -> PathBuf {
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    PathBuf::from(temp)
}

/// The snapshot in `dir`; `None` when there is none yet.
pub fn read(dir: &Path) -> Result<Option<Vec<Event>>, SnapshotError> {
    let path = dir.join(FILE_NAME);
    match fs::read(&path) {
        Ok(bytes) => decode(&bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(&path)(e)),
    }
}

/// Loads the snapshot in `dir` into `index`, vigil starting at `started` (see
/// [`Index::restore`]). Never fails: a snapshot that cannot be read is logged
/// with the reason and vigil starts with an empty index.
pub fn restore(index: &Index, dir: &Path, started: Micros) {
    let loading = Instant::now();
    match read(dir) {
        Ok(None) => tracing::info!(
            dir = %dir.display(),
            "No index snapshot yet; starting with an empty index."
        ),
        Ok(Some(events)) => {
            for event in &events {
                index.restore(event, started);
            }
            tracing::info!(
                entries = events.len(),
                elapsed = ?loading.elapsed(),
                "Loaded the index snapshot."
            );
        }
        // The file may be fine, the disk not: the next write tells.
        Err(error @ SnapshotError::Io { .. }) => tracing::error!(
            %error,
            "Ignoring the unreadable index snapshot; starting with an empty index."
        ),
        Err(error) => set_aside(
            &dir.join(FILE_NAME),
            &error,
            "Ignoring the unreadable index snapshot; starting with an empty index.",
        ),
    }
}

/// How a snapshot write went.
#[derive(Debug, Clone, Copy)]
pub struct Saved {
    pub entries: usize,
    pub elapsed: Duration,
}

/// Writes the index one shard at a time, on a blocking thread so neither the
/// copying nor the I/O holds up the async workers. Once `stop` is cancelled
/// the write is abandoned ([`SnapshotError::Abandoned`]) and the snapshot
/// before it left in place.
pub async fn save(
    index: Arc<Index>,
    dir: PathBuf,
    stop: CancellationToken,
) -> Result<Saved, SnapshotError> {
    off_workers(move || {
        let started = Instant::now();
        let entries = write_from(&dir, |encoder| {
            index.for_each_shard(|events| match stop.is_cancelled() {
                true => Err(interruption()),
                false => encoder.push(events),
            })
        })
        .map_err(|e| unless_abandoned(&stop, e))?;
        Ok(Saved {
            entries: entries as usize,
            elapsed: started.elapsed(),
        })
    })
    .await
    .ok_or(SnapshotError::ShutDown)?
}

/// What a write fails with inside once it is interrupted; the caller, who
/// knows why, reports that instead.
pub(crate) fn interruption() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "write interrupted")
}

/// The error of a write `stop` may have cancelled: [`SnapshotError::Abandoned`]
/// (no failure) if it did, else `error`.
pub(crate) fn unless_abandoned(stop: &CancellationToken, error: SnapshotError) -> SnapshotError {
    match stop.is_cancelled() {
        true => SnapshotError::Abandoned,
        false => error,
    }
}

/// Writes the rules' stream state on a blocking thread, unless the
/// `occasion` interrupts it; `None` for rules without their text.
async fn save_streams(
    rules: Arc<Rules>,
    dir: PathBuf,
    occasion: Occasion,
) -> Result<Option<persist::Written>, SnapshotError> {
    off_workers(move || persist::save(&rules, &dir, &occasion))
        .await
        .ok_or(SnapshotError::ShutDown)?
        .map_err(|e| match e {
            StateError::Write(e @ (SnapshotError::Abandoned | SnapshotError::GaveWay)) => e,
            e => SnapshotError::Streams(Box::new(e)),
        })
}

/// Snapshots for a running server: loaded at start, written every interval
/// and once more by [`Snapshots::finish`], each time with the stream state of
/// `streams` (restored by [`persist::restore`] before the rules start).
pub struct Snapshots {
    index: Arc<Index>,
    streams: Option<Arc<Rules>>,
    dir: PathBuf,
    stop: CancellationToken,
    periodic: JoinHandle<()>,
    /// Where a failed write is counted (`state_write_failures`).
    stats: Arc<Stats>,
}

impl Snapshots {
    /// Creates `dir` if needed, loads its snapshot into `index` (vigil
    /// starting at `started`) and starts the periodic writes. Call before the
    /// server serves, so no event is missed.
    pub fn start(
        index: Arc<Index>,
        streams: Option<Arc<Rules>>,
        dir: PathBuf,
        every: Duration,
        started: Micros,
        stats: Arc<Stats>,
    ) -> Result<Self, SnapshotError> {
        create_dir(&dir)?;
        restore(&index, &dir, started);
        let stop = CancellationToken::new();
        let failing = Arc::new(Failing::default());
        let periodic = tokio::spawn(periodic(every, stop.clone(), {
            let (stats, index, streams, dir, stop) = (
                stats.clone(),
                index.clone(),
                streams.clone(),
                dir.clone(),
                stop.clone(),
            );
            move || {
                let (index, streams) = (index.clone(), streams.clone());
                let (stats, failing) = (stats.clone(), failing.clone());
                write_periodic(stats, failing, index, streams, dir.clone(), stop.clone())
            }
        }));
        Ok(Self {
            index,
            streams,
            dir,
            stop,
            periodic,
            stats,
        })
    }

    /// Stops the periodic writes and writes the final snapshot and stream
    /// state. Call once ingest and the timers have stopped, so both are final.
    /// Each is written even if the other fails; the first error is returned.
    pub async fn finish(self) -> Result<Saved, SnapshotError> {
        // A periodic write in progress is abandoned, not finished: the final
        // one replaces it anyway, and a million `by` groups take seconds.
        self.stop.cancel();
        // Waits for it to let go of the temp files, which both use.
        if let Err(e) = self.periodic.await {
            std::panic::resume_unwind(e.into_panic());
        }
        let saved = save(self.index, self.dir.clone(), CancellationToken::new()).await;
        match &saved {
            Ok(saved) => tracing::info!(
                entries = saved.entries,
                elapsed = ?saved.elapsed,
                path = %self.dir.join(FILE_NAME).display(),
                "Wrote the index snapshot."
            ),
            Err(error) => final_write_failed(&self.stats, error, "the index snapshot"),
        }
        let streams = match self.streams {
            Some(rules) => save_streams(rules, self.dir.clone(), Occasion::Final).await,
            None => Ok(None),
        };
        match &streams {
            Ok(Some(written)) => tracing::info!(
                entries = written.entries,
                bytes = written.bytes,
                elapsed = ?written.elapsed,
                path = %self.dir.join(persist::FILE_NAME).display(),
                "Wrote the stream state."
            ),
            Ok(None) => {}
            Err(error) => final_write_failed(&self.stats, error, "the stream state"),
        }
        let saved = saved?;
        streams?;
        Ok(saved)
    }
}

/// Counts and says that the last write of `what`, at shutdown, failed.
fn final_write_failed(stats: &Stats, error: &SnapshotError, what: &str) {
    Stats::incr(&stats.state_write_failures);
    tracing::error!(
        %error,
        "Could not write {what} at shutdown: the next start reads the last one written."
    );
}

/// Runs `write` every `every` until `stop`, counting each interval from the
/// end of the write before: a write longer than the interval (the stream
/// state of a million `by` groups takes seconds) would otherwise start again
/// at once, keeping a core writing all the time.
async fn periodic<W: Future<Output = ()>>(
    every: Duration,
    stop: CancellationToken,
    mut write: impl FnMut() -> W,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        // Not raced against `stop`: `write` stops early itself and lets go
        // of its files before the final write takes them.
        write().await;
    }
}

/// Whether the last periodic write of each file failed: a failure is
/// logged when it begins and when it ends, not at every interval between
/// (a full disk would fill the log a line per `--snapshot-interval`); the
/// counter counts each.
#[derive(Default)]
struct Failing {
    index: AtomicBool,
    streams: AtomicBool,
    /// The last periodic stream state write gave way to a reload: the next
    /// one does not ([`Occasion::Overdue`]).
    gave_way: AtomicBool,
}

/// One periodic write: the index snapshot, then the stream state of
/// `streams`; a failure is counted, logged unless the write before failed
/// too, and the next write tries again. Abandoned once `stop` is cancelled;
/// the stream state gives way to a reload.
async fn write_periodic(
    stats: Arc<Stats>,
    failing: Arc<Failing>,
    index: Arc<Index>,
    streams: Option<Arc<Rules>>,
    dir: PathBuf,
    stop: CancellationToken,
) {
    match save(index, dir.clone(), stop.clone()).await {
        Ok(saved) => {
            if failing.index.swap(false, Ordering::AcqRel) {
                tracing::info!(entries = saved.entries, "Wrote the index snapshot again.");
            }
            tracing::debug!(
                entries = saved.entries,
                elapsed = ?saved.elapsed,
                "Wrote a periodic index snapshot."
            );
        }
        Err(SnapshotError::Abandoned) => {
            tracing::debug!("Abandoned a periodic index snapshot for the final one.");
            return;
        }
        Err(error) => {
            Stats::incr(&stats.state_write_failures);
            if !failing.index.swap(true, Ordering::AcqRel) {
                tracing::warn!(%error, "Periodic index snapshot failed; {RETRYING}");
            }
        }
    }
    if let Some(rules) = streams {
        let occasion = match failing.gave_way.swap(false, Ordering::AcqRel) {
            true => Occasion::Overdue(stop),
            false => Occasion::Periodic(stop),
        };
        match save_streams(rules, dir, occasion).await {
            Ok(written) => {
                if failing.streams.swap(false, Ordering::AcqRel) {
                    tracing::info!("Wrote the stream state again.");
                }
                tracing::debug!(?written, "Wrote the periodic stream state.");
            }
            Err(SnapshotError::Abandoned) => {
                tracing::debug!("Abandoned a periodic stream state write for the final one.");
            }
            Err(SnapshotError::GaveWay) => {
                failing.gave_way.store(true, Ordering::Release);
                tracing::info!(
                    "A periodic stream state write gave way to a rule reload; the next one saves the new rules' state, giving way to none."
                );
            }
            Err(error) => {
                Stats::incr(&stats.state_write_failures);
                if !failing.streams.swap(true, Ordering::AcqRel) {
                    tracing::warn!(%error, "Periodic stream state write failed; {RETRYING}");
                }
            }
        }
    }
}

/// What a failing periodic write goes on to do, said once as it begins.
const RETRYING: &str = "trying again every --snapshot-interval, counting each failure in \
    vigil_state_write_failures_total and logging again once one succeeds (a restart meanwhile \
    reads the last one written).";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MICROS_PER_SEC;
    use crate::event::Metric;
    use crate::index::IndexConfig;

    const T0: i64 = 1_700_000_000 * MICROS_PER_SEC;

    fn sample() -> Vec<Event> {
        vec![
            Event {
                host: Some("web1".into()),
                service: Some("cpu".into()),
                state: Some("ok".into()),
                time: T0 + 123_456,
                description: Some("user + system".into()),
                tags: vec!["a".into(), "b".into()],
                metric: Some(Metric::Float(0.25)),
                ttl: Some(30.5),
                attributes: vec![("env".into(), "prod".into()), ("dc".into(), "x".into())],
            },
            Event {
                host: Some("web2".into()),
                service: Some("requests".into()),
                time: T0 - 1,
                metric: Some(Metric::Int(i64::MIN)),
                ..Event::default()
            },
            Event {
                service: Some("no host, no metric, no ttl".into()),
                time: -5,
                ..Event::default()
            },
        ]
    }

    fn encoded(events: &[Event]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = Encoder::new(&mut out).unwrap();
        encoder.push(events).unwrap();
        encoder.finish().unwrap();
        out
    }

    /// Re-seals a hand-edited snapshot with a valid checksum.
    fn reseal(bytes: &mut [u8]) {
        let n = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn round_trips_every_field() {
        let events = sample();
        assert_eq!(decode(&encoded(&events)).unwrap(), events);
        assert_eq!(decode(&encoded(&[])).unwrap(), vec![]);
    }

    #[test]
    fn writes_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            read(dir.path()).unwrap().is_none(),
            "missing: empty, no error"
        );
        write(dir.path(), &sample()).unwrap();
        write(dir.path(), &sample()[..1]).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap(), &sample()[..1]);
        assert!(!temp_of(&dir.path().join(FILE_NAME)).exists());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encoded(&sample());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len} bytes");
        }
    }

    #[test]
    fn every_flipped_byte_is_an_error() {
        let bytes = encoded(&sample());
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            let err = decode(&bad).unwrap_err();
            match at {
                0..8 => assert!(matches!(err, SnapshotError::BadMagic), "{at}: {err}"),
                8..12 => assert!(
                    matches!(err, SnapshotError::UnsupportedVersion(_)),
                    "{at}: {err}"
                ),
                _ => assert!(matches!(err, SnapshotError::Checksum { .. }), "{at}: {err}"),
            }
        }
    }

    #[test]
    fn absurd_length_prefix_is_an_error_not_an_allocation() {
        let mut bytes = encoded(&sample());
        bytes[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(&mut bytes);
        let err = decode(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::BadLength {
                    entry: 0,
                    len: u32::MAX,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn absurd_count_is_an_error_not_an_allocation() {
        let mut bytes = encoded(&sample());
        let at = bytes.len() - TRAILER_LEN;
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        reseal(&mut bytes);
        assert!(matches!(
            decode(&bytes),
            Err(SnapshotError::CountMismatch {
                expected: u64::MAX,
                found: 3
            })
        ));
    }

    /// A sealed snapshot around a hand-made entries section.
    fn sealed(entries: &[u8], count: u64) -> Vec<u8> {
        let mut bytes = encoded(&[]);
        bytes.truncate(HEADER_LEN);
        bytes.extend_from_slice(entries);
        bytes.extend_from_slice(&count.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        reseal(&mut bytes);
        bytes
    }

    #[test]
    fn garbled_entries_are_errors() {
        let undecodable = [3, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode(&sealed(&undecodable, 1)),
            Err(SnapshotError::Decode { entry: 0, .. })
        ));
        assert!(matches!(
            decode(&sealed(&[1, 0], 1)),
            Err(SnapshotError::CutShort { entry: 0, left: 2 })
        ));
        assert!(decode(&sealed(&[], 0)).unwrap().is_empty());
    }

    #[test]
    fn other_files_and_versions_are_refused() {
        let mut bytes = encoded(&sample());
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            decode(&bytes),
            Err(SnapshotError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            decode(b"not a snapshot at all, really"),
            Err(SnapshotError::BadMagic)
        ));
    }

    #[test]
    fn a_failed_write_leaves_the_previous_file_and_no_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("incidents.json");
        replace_file(&path, |out| out.write_all(b"before")).unwrap();
        let failed = replace_file(&path, |out| {
            out.write_all(&[0; 100_000])?;
            Err::<(), _>(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
        });
        assert!(failed.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"before");
        assert!(!temp_of(&path).exists(), "its room is given back");
    }

    /// A rename refused (a directory where the file goes) left the whole
    /// temporary file behind.
    #[test]
    fn a_failed_rename_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        fs::create_dir_all(path.join("x")).unwrap();
        let failed = replace_file(&path, |out| out.write_all(b"after"));
        assert!(failed.is_err());
        assert!(path.join("x").is_dir());
        assert!(!temp_of(&path).exists(), "its room is given back");
    }

    #[test]
    fn a_data_directory_is_taken_by_one_vigil_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let held = claim(&data).expect("created and taken");
        let refused = claim(&data).unwrap_err().to_string();
        assert_eq!(
            refused,
            format!(
                "{} is in use by another vigil (pid {}): give each its own --data-dir",
                data.display(),
                std::process::id()
            )
        );
        drop(held);
        claim(&data).expect("free again once the holder is gone");
    }

    #[test]
    fn a_file_where_the_data_directory_goes_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data");
        fs::write(&file, "").unwrap();
        for data in [file.clone(), file.join("sub").join("deeper")] {
            let refused = claim(&data).unwrap_err().to_string();
            let said = format!(
                "cannot make {} a directory: {} is a file, not a directory",
                data.display(),
                file.display()
            );
            assert_eq!(refused, said);
        }
    }

    /// On a full disk the pid cannot be written, but the lock is what keeps
    /// a second vigil out: vigil starts, and reads what the disk holds.
    #[test]
    fn a_data_dir_is_taken_even_when_its_holder_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let full = |_: &mut File| Err(io::Error::from(io::ErrorKind::StorageFull));
        let held = claim_writing(dir.path(), full).expect("taken on a full disk");
        let refused = claim(dir.path());
        assert!(
            matches!(refused, Err(SnapshotError::InUse { pid: None, .. })),
            "{refused:?}"
        );
        drop(held);
    }

    #[test]
    fn restore_loads_and_skips_bad_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::new(IndexConfig::default());
        restore(&index, dir.path(), 0);
        assert!(index.is_empty(), "no snapshot");
        fs::write(dir.path().join(FILE_NAME), b"VIGILIDX garbage").unwrap();
        restore(&index, dir.path(), 0);
        assert!(index.is_empty(), "bad snapshot skipped");
        write(dir.path(), &sample()).unwrap();
        restore(&index, dir.path(), 0);
        assert_eq!(index.len(), 3);
        assert_eq!(index.get("web1", "cpu"), Some(sample()[0].clone()));
    }

    /// Writes longer than the interval are spaced by the interval, from the
    /// end of one to the start of the next, not run back to back.
    #[tokio::test(start_paused = true)]
    async fn the_next_periodic_write_starts_an_interval_after_the_last_one_ended() {
        let every = Duration::from_secs(10);
        let started = tokio::time::Instant::now();
        let writes = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(periodic(every, stop.clone(), {
            let writes = writes.clone();
            move || {
                let writes = writes.clone();
                async move {
                    let start = started.elapsed().as_secs();
                    tokio::time::sleep(every * 3).await;
                    writes.lock().push((start, started.elapsed().as_secs()));
                }
            }
        }));
        tokio::time::sleep(Duration::from_secs(175)).await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!(
            *writes.lock(),
            [(10, 40), (50, 80), (90, 120), (130, 160), (170, 200)]
        );
    }

    /// A periodic write under way when vigil stops is abandoned, leaving the
    /// snapshot before it and no temporary file, and is no failure.
    #[tokio::test]
    async fn a_periodic_write_is_abandoned_once_vigil_stops() {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::new(IndexConfig::default()));
        index.insert(&sample()[0]);
        let never = CancellationToken::new();
        save(index.clone(), dir.path().into(), never).await.unwrap();
        let before = fs::read(dir.path().join(FILE_NAME)).unwrap();

        index.insert(&sample()[1]);
        let stats = Arc::new(Stats::default());
        let stopped = CancellationToken::new();
        stopped.cancel();
        let abandoned = save(index.clone(), dir.path().into(), stopped.clone()).await;
        assert!(
            matches!(abandoned, Err(SnapshotError::Abandoned)),
            "{abandoned:?}"
        );
        let failing = Arc::new(Failing::default());
        write_periodic(
            stats.clone(),
            failing,
            index,
            None,
            dir.path().into(),
            stopped,
        )
        .await;
        assert_eq!(Stats::get(&stats.state_write_failures), 0);
        assert_eq!(fs::read(dir.path().join(FILE_NAME)).unwrap(), before);
        let names: Vec<_> = (fs::read_dir(dir.path()).unwrap())
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
    }

    /// SIGHUPs every few seconds, each while a long periodic stream state
    /// write is under way (a million `by` groups write for seconds), must
    /// not keep the state from ever being written: a write that gave way to
    /// a reload is followed by one that does not.
    #[tokio::test]
    async fn a_periodic_stream_state_write_gives_way_once_in_a_row() {
        use crate::rules::{EnvPolicy, RuleText, engine::Rules};
        use crate::streams::Streams;
        let dir = tempfile::tempdir().unwrap();
        let source = "output out = forward(host: \"127.0.0.1\")\nstreams {\n  by(host) { changed_state { out } }\n}\n";
        let (_, compiled) = crate::rules::load("p.vigil", source, EnvPolicy::Strict).unwrap();
        let text = RuleText {
            name: "p.vigil".into(),
            text: source.into(),
        };
        let index = Arc::new(Index::new(IndexConfig::default()));
        let clock = Arc::new(crate::clock::ManualClock::new(T0));
        let out = Arc::new(crate::rules::testing::Recorder::default());
        let rules = Arc::new(Rules::new(
            compiled.roots,
            Some(Arc::new(text)),
            vec![out],
            index.clone(),
            clock,
        ));
        rules.process(&sample()[..1]);
        let stats = Arc::new(Stats::default());
        let failing = Arc::new(Failing::default());
        let state = dir.path().join(persist::FILE_NAME);
        // A reload waiting at every write.
        let _waiting = rules.pretend_a_reload_waits();
        let write = || {
            write_periodic(
                stats.clone(),
                failing.clone(),
                index.clone(),
                Some(rules.clone()),
                dir.path().into(),
                CancellationToken::new(),
            )
        };
        write().await;
        assert!(!state.exists(), "the first write gave way");
        write().await;
        assert!(state.exists(), "the stream state was never written");
        write().await;
        assert_eq!(Stats::get(&stats.state_write_failures), 0);
    }

    /// A periodic write that fails (here its temporary file's path is taken
    /// by a directory; a full disk in production) is counted, and the next
    /// one, once it can, succeeds.
    #[tokio::test]
    async fn a_failed_periodic_write_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::new(IndexConfig::default()));
        let blocker = temp_of(&dir.path().join(FILE_NAME));
        fs::create_dir_all(blocker.join("taken")).unwrap();
        let stats = Arc::new(Stats::default());
        let snapshots = Snapshots::start(
            index.clone(),
            None,
            dir.path().into(),
            Duration::from_millis(10),
            0,
            stats.clone(),
        )
        .unwrap();
        let failures = || Stats::get(&stats.state_write_failures);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while failures() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "no failure counted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        fs::remove_dir_all(&blocker).unwrap();
        index.insert(&sample()[0]);
        assert_eq!(snapshots.finish().await.unwrap().entries, 1);
    }

    /// The last write, at shutdown, that fails is counted like a periodic
    /// one (and returned, so vigil exits with it).
    #[tokio::test]
    async fn a_failed_final_write_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = temp_of(&dir.path().join(FILE_NAME));
        fs::create_dir_all(blocker.join("taken")).unwrap();
        let stats = Arc::new(Stats::default());
        let index = Arc::new(Index::new(IndexConfig::default()));
        let every = Duration::from_secs(3600);
        let snapshots =
            Snapshots::start(index, None, dir.path().into(), every, 0, stats.clone()).unwrap();
        assert!(snapshots.finish().await.is_err());
        assert_eq!(Stats::get(&stats.state_write_failures), 1);
    }

    #[tokio::test]
    async fn save_then_finish_writes_the_final_index() {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::new(IndexConfig::default()));
        let snapshots = Snapshots::start(
            index.clone(),
            None,
            dir.path().into(),
            Duration::from_secs(3600),
            0,
            Arc::default(),
        )
        .unwrap();
        for event in sample() {
            index.insert(&event);
        }
        let saved = snapshots.finish().await.unwrap();
        assert_eq!(saved.entries, 3);
        let mut back = read(dir.path()).unwrap().unwrap();
        back.sort_by_key(|e| e.time);
        let mut want = sample();
        want.sort_by_key(|e| e.time);
        assert_eq!(back, want);
    }
}

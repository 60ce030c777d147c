//! Riemann over UDP: one bare `Msg` per datagram, never a reply. What cannot be
//! used is counted and dropped.
//!
//! So are the datagrams that never reach vigil: when a burst outruns it, the
//! kernel drops what no longer fits in the socket's receive buffer. Linux
//! counts those per socket (the `drops` column of `/proc/net/udp`);
//! [`ReceiveDrops`] reads that count on a blocking thread and copies it into
//! a counter every second (`udp_receive_drops` here,
//! `graphite_udp_receive_drops` for the Graphite listener's socket), so a
//! sender's losses show on `/metrics` like every other refusal.

use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::ingest::{Ingest, Transport};
use crate::stats::Stats;

/// Riemann's default maximum datagram size.
pub const DEFAULT_MAX_DATAGRAM: usize = 16 * 1024;

/// Largest possible UDP payload; receiving into this much means an oversized
/// datagram is seen whole and counted rather than silently truncated.
const RECV_BUFFER: usize = 64 * 1024;

/// How often the kernel's count of dropped datagrams is read.
const DROPS_REFRESH: Duration = Duration::from_secs(1);

/// Datagrams already queued when one arrives are read with it, up to this
/// many, and go through the streams as one batch (as a TCP read's frames
/// do): one clock read and one pipeline call for all of them, and the index
/// prefetches across their events.
const MAX_BATCH_DATAGRAMS: usize = 16;

pub async fn serve(
    socket: UdpSocket,
    ingest: Arc<Ingest>,
    max_datagram: usize,
    shutdown: CancellationToken,
) {
    // Room for one datagram of any size after those of a batch so far.
    let mut buf = vec![0u8; 2 * RECV_BUFFER];
    let mut batch = Batch::default();
    let mut events = Vec::new();
    let mut replies = Vec::new();
    let mut drops = ReceiveDrops::of(&socket);
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buf[..RECV_BUFFER]) => received,
            dropped = drops.next() => {
                Stats::set(&ingest.stats.udp_receive_drops, dropped);
                continue;
            }
            () = shutdown.cancelled() => return,
        };
        batch.clear();
        batch.take(
            received.map(|(len, _peer)| len),
            &ingest.stats,
            max_datagram,
        );
        while batch.read < MAX_BATCH_DATAGRAMS && buf.len() - batch.end >= RECV_BUFFER {
            let slot = &mut buf[batch.end..batch.end + RECV_BUFFER];
            match socket.try_recv_from(slot) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                received => batch.take(
                    received.map(|(len, _peer)| len),
                    &ingest.stats,
                    max_datagram,
                ),
            }
        }
        // Queries are not answered over UDP, so one call takes every datagram.
        let mut datagrams = batch.datagrams.iter().map(|at| &buf[at.clone()]);
        ingest.begin_all(&mut datagrams, Transport::Udp, &mut events, &mut replies);
        // The replies (acks or errors) are discarded: UDP senders never hear
        // back. In a cluster they are awaited, so a burst waits for JetStream.
        for reply in replies.drain(..) {
            reply.wait().await;
        }
    }
}

/// Where the datagrams of one batch lie in the receive buffer, back to back.
#[derive(Default)]
struct Batch {
    datagrams: Vec<Range<usize>>,
    /// Where the next datagram is received.
    end: usize,
    /// Receives made, whatever came of them.
    read: usize,
}

impl Batch {
    fn clear(&mut self) {
        self.datagrams.clear();
        self.end = 0;
        self.read = 0;
    }

    /// Counts one receive into the buffer at `end`, and keeps its datagram
    /// unless it is over the size limit.
    fn take(&mut self, received: std::io::Result<usize>, stats: &Stats, max_datagram: usize) {
        self.read += 1;
        let len = match received {
            Ok(len) => len,
            Err(e) => {
                // ICMP errors from earlier sends surface here; nothing to do but go on.
                tracing::debug!(error = %e, "UDP receive failed.");
                return;
            }
        };
        Stats::incr(&stats.udp_datagrams);
        if len > max_datagram {
            Stats::incr(&stats.udp_oversized);
            return;
        }
        self.datagrams.push(self.end..self.end + len);
        self.end += len;
    }
}

/// The kernel's count of datagrams it dropped for one socket, read every
/// [`DROPS_REFRESH`].
///
/// The read runs on tokio's blocking pool: the kernel writes `/proc/net/udp`
/// out afresh on each read, a line per UDP socket of the host (tens of
/// thousands on a busy one), which on an async worker would hold every
/// task queued there meanwhile. One read at a time: a read under way when
/// `next` is given up is kept and awaited by the next call, so none starts
/// beside it, and a slow one delays the refresh instead of piling up.
pub struct ReceiveDrops {
    /// `None` where the count cannot be read (off Linux).
    inode: Option<u64>,
    refresh: Interval,
    /// How the count of `inode` is read: [`kernel_drops`].
    read: Reader,
    /// The read under way, if any.
    reading: Option<JoinHandle<Option<u64>>>,
}

type Reader = Arc<dyn Fn(u64) -> Option<u64> + Send + Sync>;

impl ReceiveDrops {
    pub fn of(socket: &UdpSocket) -> ReceiveDrops {
        Self::reading(socket_inode(socket), Arc::new(kernel_drops))
    }

    fn reading(inode: Option<u64>, read: Reader) -> ReceiveDrops {
        let mut refresh = tokio::time::interval(DROPS_REFRESH);
        refresh.set_missed_tick_behavior(MissedTickBehavior::Skip);
        ReceiveDrops {
            inode,
            refresh,
            read,
            reading: None,
        }
    }

    /// The count since the socket was bound, at the next refresh (the first
    /// at once); never where it cannot be read. Cancel-safe, for `select!`.
    pub async fn next(&mut self) -> u64 {
        let Some(inode) = self.inode else {
            return std::future::pending().await;
        };
        loop {
            let reading = match &mut self.reading {
                Some(reading) => reading,
                None => {
                    self.refresh.tick().await;
                    let read = self.read.clone();
                    let read = tokio::task::spawn_blocking(move || read(inode));
                    self.reading.insert(read)
                }
            };
            // Given up here, the read stays in `reading` for the next call.
            let read = reading.await;
            self.reading = None;
            match read {
                Ok(Some(drops)) => return drops,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Unreadable this time, or the runtime is shutting down.
                Ok(None) | Err(_) => {}
            }
        }
    }
}

/// The inode that names `socket` in `/proc/net/udp`; `None` off Linux.
fn socket_inode(socket: &UdpSocket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).ok()?;
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// How many datagrams the kernel dropped for the socket `inode` since it was
/// bound (its receive buffer was full), from `/proc/net/udp` or `udp6`.
fn kernel_drops(inode: u64) -> Option<u64> {
    drops_in(
        &[Path::new("/proc/net/udp"), Path::new("/proc/net/udp6")],
        inode,
    )
}

/// The drops of the socket `inode` in the first of `tables` that lists it.
fn drops_in(tables: &[&Path], inode: u64) -> Option<u64> {
    tables.iter().find_map(|table| {
        let table = std::fs::File::open(table).ok()?;
        drops_of(BufReader::new(table), inode)
    })
}

/// The `drops` column (the last) of the line for `inode` (the tenth column).
/// Read a line at a time, up to that line: the table of a busy host is
/// megabytes (a line of 128 to 168 bytes per UDP socket), read every second.
fn drops_of(mut table: impl BufRead, inode: u64) -> Option<u64> {
    // The header.
    table.skip_until(b'\n').ok()?;
    let mut line = Vec::new();
    loop {
        line.clear();
        // The kernel's lines are short; a longer one is no socket's.
        let read = Read::take(&mut table, LINE_MAX)
            .read_until(b'\n', &mut line)
            .ok()?;
        if read == 0 {
            return None;
        }
        if line.last() != Some(&b'\n') && read as u64 == LINE_MAX {
            table.skip_until(b'\n').ok()?;
            continue;
        }
        let Ok(line) = std::str::from_utf8(&line) else {
            continue;
        };
        let mut columns = line.split_whitespace();
        let Some(socket) = columns.nth(9) else {
            continue;
        };
        if socket.parse::<u64>().ok() != Some(inode) {
            continue;
        }
        if let Ok(drops) = columns.last().unwrap_or(socket).parse() {
            return Some(drops);
        }
    }
}

/// Longer than any line of `/proc/net/udp` or `udp6`.
const LINE_MAX: u64 = 1 << 10;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[test]
    fn drops_are_read_from_the_line_of_the_socket() {
        let table = "\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 4073: 0100007F:15EB 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 98222 2 00000000600115ca 0
 4074: 0100007F:15EC 00000000:0000 07 00000000:00030000 00:00000000 00000000     0        0 98230 2 00000000700115ca 1742
";
        assert_eq!(drops_of(table.as_bytes(), 98230), Some(1742));
        assert_eq!(drops_of(table.as_bytes(), 98222), Some(0));
        assert_eq!(drops_of(table.as_bytes(), 1), None);
    }

    /// A table of `lines` sockets, inodes 1 to `lines`, each socket's
    /// drops its inode times 10.
    fn table_of(lines: u64) -> String {
        let mut table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n".to_owned();
        for inode in 1..=lines {
            table.push_str(&format!(
                " {inode:5}: 0100007F:15EB 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 {inode} 2 00000000600115ca {}\n",
                inode * 10
            ));
        }
        table
    }

    /// How much of a table was read.
    struct Counted<'a> {
        table: &'a [u8],
        read: usize,
    }

    impl std::io::Read for Counted<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.table.read(buf)?;
            self.read += n;
            Ok(n)
        }
    }

    /// A host's table is megabytes (50 000 sockets here, 6 MB): it is read
    /// a line at a time up to the socket's, not whole into memory.
    #[test]
    fn the_table_is_read_up_to_the_sockets_line() {
        let table = table_of(50_000);
        let mut counted = Counted {
            table: table.as_bytes(),
            read: 0,
        };
        let reader = BufReader::with_capacity(8 << 10, &mut counted);
        assert_eq!(drops_of(reader, 20), Some(200));
        assert!(
            counted.read <= 8 << 10,
            "read {} of {}",
            counted.read,
            table.len()
        );

        // A line longer than the kernel's is passed over, not held.
        let long = table.replacen("\n", &format!("\n{}\n", "x ".repeat(1 << 20)), 1);
        assert_eq!(drops_of(long.as_bytes(), 50_000), Some(500_000));
        assert_eq!(drops_of(table.as_bytes(), 50_001), None);
    }

    /// Read from files as from `/proc/net/udp` and `udp6`: the count of the
    /// socket wherever its line is, none for a socket in neither.
    #[test]
    fn the_count_is_read_from_the_first_table_holding_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (udp, udp6) = (dir.path().join("udp"), dir.path().join("udp6"));
        std::fs::write(&udp, table_of(50_000)).unwrap();
        let six = table_of(3).replace(" 3 2 00000000600115ca 30", " 60001 2 00000000600115ca 7");
        std::fs::write(&udp6, six).unwrap();
        let tables = [udp.as_path(), udp6.as_path()];
        assert_eq!(drops_in(&tables, 1), Some(10));
        assert_eq!(drops_in(&tables, 50_000), Some(500_000));
        assert_eq!(drops_in(&tables, 60_001), Some(7));
        assert_eq!(drops_in(&tables, 60_002), None);
        assert_eq!(drops_in(&[dir.path().join("none").as_path()], 1), None);
    }

    /// Whether `future`, polled once, is still pending.
    async fn pending_after_a_poll<F: Future>(future: std::pin::Pin<&mut F>) -> bool {
        let mut future = Some(future);
        std::future::poll_fn(|cx| {
            let pending = future.take().is_some_and(|f| f.poll(cx).is_pending());
            std::task::Poll::Ready(pending)
        })
        .await
    }

    /// The table is read on a blocking thread, not on the async worker
    /// (the only one, here) that waits for its count.
    #[tokio::test]
    async fn the_count_is_read_off_the_async_worker() {
        let worker = std::thread::current().id();
        let read_on = Arc::new(std::sync::Mutex::new(None));
        let reader = read_on.clone();
        let read = move |_inode| {
            *reader.lock().unwrap() = Some(std::thread::current().id());
            Some(3)
        };
        let mut drops = ReceiveDrops::reading(Some(1), Arc::new(read));
        assert_eq!(drops.next().await, 3);
        let read_on = read_on.lock().unwrap().expect("read");
        assert_ne!(read_on, worker);
    }

    /// A `next` given up while its read runs (a datagram came) leaves the
    /// read to the next call: no second read starts beside it, and its
    /// count is not lost.
    #[tokio::test(start_paused = true)]
    async fn a_read_under_way_outlives_a_cancelled_next() {
        let reads = Arc::new(AtomicU64::new(0));
        let (open, gate) = std::sync::mpsc::channel::<()>();
        let gate = std::sync::Mutex::new(gate);
        let counted = reads.clone();
        let read = move |_inode| {
            let nth = counted.fetch_add(1, Ordering::SeqCst) + 1;
            // Closed until the test opens it; dropped, it holds nothing back.
            let _ = gate.lock().unwrap().recv();
            Some(nth)
        };
        let mut drops = ReceiveDrops::reading(Some(1), Arc::new(read));
        for _ in 0..2 {
            let next = std::pin::pin!(drops.next());
            assert!(
                pending_after_a_poll(next).await,
                "the read waits at the gate"
            );
        }
        open.send(()).unwrap();
        drop(open);
        assert_eq!(drops.next().await, 1, "the first read's count");
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn what_overflows_an_unread_socket_is_counted_by_the_kernel() {
        let unread = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let inode = socket_inode(&unread).expect("the socket's inode");
        assert_eq!(kernel_drops(inode), Some(0));
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sender.connect(unread.local_addr().unwrap()).await.unwrap();
        let sent = 5_000;
        for _ in 0..sent {
            sender.send(&[0; 1024]).await.unwrap();
        }
        let mut queued = 0;
        while unread.try_recv(&mut [0; 2048]).is_ok() {
            queued += 1;
        }
        let drops = kernel_drops(inode).unwrap();
        assert!(queued > 0 && drops > 0, "queued {queued}, dropped {drops}");
        assert_eq!(queued + drops, sent);
    }
}

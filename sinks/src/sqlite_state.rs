//! `SqliteStateStore`: the bookings state in SQLite (WAL, `synchronous = FULL`).
//!
//! One transaction per batch holds the rows, the shard position and the batch's outbox
//! entry, so replaying a batch after a crash is a no-op and its derived events exist once.
//! Writes go through one connection; point reads use a second, so the read API never
//! waits behind a batch (WAL lets readers and the writer run together).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use floodgate_core::config::StateConfig;
use floodgate_core::state::{
    Booking, BookingStatus, DeadLetter, Inventory, OutboxCursor, OutboxEntry, StateChanges,
    StateError, StateStore, check_inventory,
};
use floodgate_core::stream::{SequenceNumber, ShardId};
use rusqlite::{Connection, OptionalExtension, params};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inventory (
    event_id TEXT PRIMARY KEY,
    capacity INTEGER NOT NULL,
    reserved INTEGER NOT NULL CHECK (reserved >= 0 AND reserved <= capacity),
    low_notified INTEGER NOT NULL,
    sold_out_notified INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bookings (
    booking_id TEXT PRIMARY KEY,
    event_id TEXT NOT NULL,
    seats INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    updated_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS positions (
    shard TEXT PRIMARY KEY,
    sequence TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    events TEXT NOT NULL -- NDJSON, one derived event per line
);
CREATE TABLE IF NOT EXISTS outbox_meta (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    shard TEXT NOT NULL,
    sequence TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (shard, sequence)
) WITHOUT ROWID;
";

/// The outbox's one partition: every apply goes through the one writer connection, so one
/// counter costs nothing and gives the derived events one total order.
pub const PARTITION: &str = "";

/// What a copy of the state store ([`SqliteStateStore::snapshot`]) holds about its place
/// in the stream and the outbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateSnapshot {
    /// Shard → the sequence of the last record applied.
    pub positions: BTreeMap<String, String>,
    /// The number of the last outbox entry written (entries are numbered from 1).
    pub outbox_last_seq: u64,
}

fn err(e: rusqlite::Error) -> StateError {
    StateError::Unavailable(format!("sqlite: {e}"))
}

#[derive(Debug, Clone)]
pub struct SqliteStateStore {
    writer: Arc<Mutex<Connection>>,
    /// Loads a batch's rows while another shard's batch is being written. A shard's own
    /// previous batch is committed before its next load, and shards touch disjoint
    /// inventories, so a WAL snapshot is current for every row a load asks for.
    loader: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
}

fn open_conn(path: &Path, memory: &StateConfig) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Batches touch rows all over the booking index; keep its hot pages in memory rather
    // than re-reading them from the OS on every batch. Both sizes are the memory budget's
    // (`[state]`): a page cache beyond them would grow with the database, not with the load.
    // A negative cache_size is in KiB.
    let cache_kib = i64::try_from(memory.cache_bytes / 1024).unwrap_or(i64::MAX);
    conn.pragma_update(None, "cache_size", -cache_kib.max(1))?;
    let mmap = i64::try_from(memory.mmap_bytes).unwrap_or(i64::MAX);
    conn.pragma_update(None, "mmap_size", mmap)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

impl SqliteStateStore {
    /// Opens (creating) the database at `path`, each connection with the default `[state]`
    /// page cache and memory map.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        Self::open_with(path, &StateConfig::default())
    }

    /// Opens (creating) the database at `path`; each of its three connections gets the page
    /// cache and memory map `memory` allows.
    pub fn open_with(path: &Path, memory: &StateConfig) -> Result<Self, StateError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StateError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        let writer = open_conn(path, memory).map_err(err)?;
        writer.execute_batch(SCHEMA).map_err(err)?;
        writer
            .execute(
                "INSERT OR IGNORE INTO outbox_meta (id, last_seq) VALUES (0, 0)",
                [],
            )
            .map_err(err)?;
        let loader = open_conn(path, memory).map_err(err)?;
        let reader = open_conn(path, memory).map_err(err)?;
        Ok(Self {
            writer: Arc::new(Mutex::new(writer)),
            loader: Arc::new(Mutex::new(loader)),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Copies the database at `src` (which other processes may be writing) into a new
    /// database at `dst`, through SQLite's online backup API, and returns the shard
    /// positions and the outbox's last entry number the copy holds.
    ///
    /// The whole copy is one backup step, so it reads one snapshot (one read transaction:
    /// the database as a commit left it, every batch whole or absent). A copy in several
    /// steps starts over whenever another connection writes, and under steady load might
    /// never finish. The copy is left in rollback-journal mode (one self-contained file,
    /// fsynced); opening it as a store turns WAL on again.
    pub fn snapshot(src: &Path, dst: &Path) -> Result<StateSnapshot, StateError> {
        let at = |path: &Path, e: rusqlite::Error| {
            StateError::Unavailable(format!("sqlite {}: {e}", path.display()))
        };
        // Read-write without create: a missing database is an error, not a new empty one.
        let from = Connection::open_with_flags(
            src,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| at(src, e))?;
        from.busy_timeout(Duration::from_secs(10))
            .map_err(|e| at(src, e))?;
        let mut to = Connection::open(dst).map_err(|e| at(dst, e))?;
        {
            let backup = rusqlite::backup::Backup::new(&from, &mut to).map_err(|e| at(dst, e))?;
            let mut waits = 0;
            loop {
                match backup.step(-1).map_err(|e| at(src, e))? {
                    rusqlite::backup::StepResult::Done => break,
                    // A writer held a lock the step needed (rare in WAL mode): wait, bounded.
                    rusqlite::backup::StepResult::Busy
                    | rusqlite::backup::StepResult::Locked
                    | rusqlite::backup::StepResult::More
                        if waits < 200 =>
                    {
                        waits += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    other => {
                        return Err(StateError::Unavailable(format!(
                            "sqlite backup of {} did not finish: {other:?}",
                            src.display()
                        )));
                    }
                }
            }
        }
        to.pragma_update(None, "journal_mode", "DELETE")
            .map_err(|e| at(dst, e))?;
        let positions = {
            let mut s = to
                .prepare("SELECT shard, sequence FROM positions ORDER BY shard")
                .map_err(|e| at(dst, e))?;
            let rows = s
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(|e| at(dst, e))?;
            rows.collect::<Result<BTreeMap<_, _>, _>>()
                .map_err(|e| at(dst, e))?
        };
        let outbox_last_seq: i64 = to
            .query_row("SELECT last_seq FROM outbox_meta WHERE id = 0", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| at(dst, e))?
            .unwrap_or(0);
        to.close().map_err(|(_, e)| at(dst, e))?;
        std::fs::File::open(dst)
            .and_then(|f| f.sync_all())
            .map_err(|e| StateError::Unavailable(format!("{}: {e}", dst.display())))?;
        Ok(StateSnapshot {
            positions,
            outbox_last_seq: u64::try_from(outbox_last_seq).unwrap_or(0),
        })
    }

    /// `PRAGMA quick_check` of the database at `path`: `Ok` when SQLite finds it sound.
    pub fn quick_check(path: &Path) -> Result<(), StateError> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| StateError::Unavailable(format!("sqlite {}: {e}", path.display())))?;
        let verdict: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| StateError::Unavailable(format!("sqlite {}: {e}", path.display())))?;
        if verdict != "ok" {
            return Err(StateError::Unavailable(format!(
                "sqlite {}: quick_check says {verdict}",
                path.display()
            )));
        }
        Ok(())
    }

    async fn with<T: Send + 'static>(
        conn: &Arc<Mutex<Connection>>,
        f: impl FnOnce(&mut Connection) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let conn = conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StateError::Unavailable("connection poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StateError::Unavailable(format!("state task failed: {e}")))?
    }
}

fn row_inventory(r: &rusqlite::Row<'_>) -> rusqlite::Result<Inventory> {
    Ok(Inventory {
        event_id: r.get(0)?,
        capacity: r.get(1)?,
        reserved: r.get(2)?,
        low_notified: r.get(3)?,
        sold_out_notified: r.get(4)?,
        updated_at_ms: r.get(5)?,
    })
}

fn row_booking(r: &rusqlite::Row<'_>) -> rusqlite::Result<Booking> {
    let status: String = r.get(3)?;
    Ok(Booking {
        booking_id: r.get(0)?,
        event_id: r.get(1)?,
        seats: r.get(2)?,
        status: BookingStatus::parse(&status).unwrap_or(BookingStatus::Rejected),
        reason: r.get(4)?,
        updated_at_ms: r.get(5)?,
    })
}

const SELECT_INVENTORY: &str = "SELECT event_id, capacity, reserved, low_notified, sold_out_notified, updated_at_ms FROM inventory WHERE event_id = ?1";
const SELECT_BOOKING: &str = "SELECT booking_id, event_id, seats, status, reason, updated_at_ms FROM bookings WHERE booking_id = ?1";

fn position_of(conn: &Connection, shard: &str) -> Result<Option<SequenceNumber>, StateError> {
    conn.prepare_cached("SELECT sequence FROM positions WHERE shard = ?1")
        .and_then(|mut s| s.query_row([shard], |r| r.get::<_, String>(0)).optional())
        .map(|o| o.map(SequenceNumber::new))
        .map_err(err)
}

#[async_trait]
impl StateStore for SqliteStateStore {
    async fn position(&self, shard: &ShardId) -> Result<Option<SequenceNumber>, StateError> {
        let shard = shard.0.clone();
        Self::with(&self.writer, move |c| position_of(c, &shard)).await
    }

    async fn load(
        &self,
        event_ids: Vec<String>,
        booking_ids: Vec<String>,
    ) -> Result<(Vec<Inventory>, Vec<Booking>), StateError> {
        Self::with(&self.loader, move |c| {
            let tx = c.transaction().map_err(err)?;
            let mut inventories = Vec::new();
            let mut bookings = Vec::new();
            {
                let mut s = tx.prepare_cached(SELECT_INVENTORY).map_err(err)?;
                for id in &event_ids {
                    if let Some(i) = s.query_row([id], row_inventory).optional().map_err(err)? {
                        inventories.push(i);
                    }
                }
                let mut s = tx.prepare_cached(SELECT_BOOKING).map_err(err)?;
                for id in &booking_ids {
                    if let Some(b) = s.query_row([id], row_booking).optional().map_err(err)? {
                        bookings.push(b);
                    }
                }
            }
            tx.commit().map_err(err)?;
            Ok((inventories, bookings))
        })
        .await
    }

    async fn apply(&self, changes: StateChanges) -> Result<bool, StateError> {
        Self::with(&self.writer, move |c| {
            let tx = c.transaction().map_err(err)?;
            let current = position_of(&tx, &changes.shard.0)?;
            if let Some(p) = &current
                && changes.last_sequence <= *p
            {
                return Ok(false);
            }
            if let Some(expected) = &changes.expected_position
                && *expected != current
            {
                return Err(StateError::Conflict(format!(
                    "shard {} is at {} now, not {} as the batch was decided: another worker applied it",
                    changes.shard,
                    current.as_ref().map_or("the start", |p| p.as_str()),
                    expected.as_ref().map_or("the start", |p| p.as_str()),
                )));
            }
            {
                let mut s = tx
                    .prepare_cached(
                        "INSERT INTO inventory (event_id, capacity, reserved, low_notified, sold_out_notified, updated_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (event_id) DO UPDATE SET capacity = excluded.capacity, reserved = excluded.reserved,
                           low_notified = excluded.low_notified, sold_out_notified = excluded.sold_out_notified,
                           updated_at_ms = excluded.updated_at_ms",
                    )
                    .map_err(err)?;
                let mut create = tx
                    .prepare_cached(
                        "INSERT INTO inventory (event_id, capacity, reserved, low_notified, sold_out_notified, updated_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .map_err(err)?;
                let mut update = tx
                    .prepare_cached(
                        "UPDATE inventory SET capacity = ?2, reserved = ?3, low_notified = ?4,
                           sold_out_notified = ?5, updated_at_ms = ?6
                         WHERE event_id = ?1 AND capacity = ?7 AND reserved = ?8",
                    )
                    .map_err(err)?;
                let conditioned = changes.inventories_before.len() == changes.inventories.len();
                for (k, i) in changes.inventories.iter().enumerate() {
                    check_inventory(i)?;
                    let values = params![i.event_id, i.capacity, i.reserved, i.low_notified, i.sold_out_notified, i.updated_at_ms];
                    if !conditioned {
                        s.execute(values).map_err(err)?;
                        continue;
                    }
                    let moved = || StateError::Conflict(format!(
                        "inventory {:?} changed since the batch was decided", i.event_id
                    ));
                    match &changes.inventories_before[k] {
                        None => match create.execute(values) {
                            Ok(_) => {}
                            Err(rusqlite::Error::SqliteFailure(e, _))
                                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
                            {
                                return Err(moved());
                            }
                            Err(e) => return Err(err(e)),
                        },
                        Some(b) => {
                            let n = update
                                .execute(params![i.event_id, i.capacity, i.reserved, i.low_notified, i.sold_out_notified, i.updated_at_ms, b.capacity, b.reserved])
                                .map_err(err)?;
                            if n != 1 {
                                return Err(moved());
                            }
                        }
                    }
                }
                let mut s = tx
                    .prepare_cached(
                        "INSERT INTO bookings (booking_id, event_id, seats, status, reason, updated_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (booking_id) DO UPDATE SET event_id = excluded.event_id, seats = excluded.seats,
                           status = excluded.status, reason = excluded.reason, updated_at_ms = excluded.updated_at_ms",
                    )
                    .map_err(err)?;
                // A created booking claims its id: a plain INSERT, which fails on an id that
                // another shard's batch created since this batch loaded its rows. Dropping
                // the transaction then rolls everything back.
                let mut claim = tx
                    .prepare_cached(
                        "INSERT INTO bookings (booking_id, event_id, seats, status, reason, updated_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .map_err(err)?;
                let created: std::collections::HashSet<&str> =
                    changes.created_bookings.iter().map(String::as_str).collect();
                for b in &changes.bookings {
                    let values = params![b.booking_id, b.event_id, b.seats, b.status.as_str(), b.reason, b.updated_at_ms];
                    if created.contains(b.booking_id.as_str()) {
                        match claim.execute(values) {
                            Ok(_) => {}
                            Err(rusqlite::Error::SqliteFailure(e, _))
                                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
                            {
                                return Err(StateError::Conflict(format!(
                                    "booking {:?} exists",
                                    b.booking_id
                                )));
                            }
                            Err(e) => return Err(err(e)),
                        }
                    } else {
                        s.execute(values).map_err(err)?;
                    }
                }
                let mut s = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO dead_letters (shard, sequence, reason, detail, payload)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(err)?;
                for d in &changes.dead_letters {
                    s.execute(params![d.shard.0, d.sequence.as_str(), d.reason, d.detail, d.payload])
                        .map_err(err)?;
                }
                tx.execute(
                    "INSERT INTO positions (shard, sequence) VALUES (?1, ?2)
                     ON CONFLICT (shard) DO UPDATE SET sequence = excluded.sequence",
                    params![changes.shard.0, changes.last_sequence.as_str()],
                )
                .map_err(err)?;
                if !changes.derived.is_empty() {
                    // Outbox seqs grow monotonically even after published entries are
                    // deleted: they come from outbox_meta, not from the table's max.
                    let next: i64 = tx
                        .query_row("UPDATE outbox_meta SET last_seq = last_seq + 1 WHERE id = 0 RETURNING last_seq", [], |r| r.get(0))
                        .map_err(err)?;
                    // Each derived event is one line of JSON: store the entry as NDJSON.
                    let events = changes.derived.join("\n");
                    tx.execute("INSERT INTO outbox (seq, events) VALUES (?1, ?2)", params![next, events])
                        .map_err(err)?;
                }
            }
            tx.commit().map_err(err)?;
            Ok(true)
        })
        .await
    }

    async fn inventory(&self, event_id: &str) -> Result<Option<Inventory>, StateError> {
        let id = event_id.to_owned();
        Self::with(&self.reader, move |c| {
            c.prepare_cached(SELECT_INVENTORY)
                .and_then(|mut s| s.query_row([id], row_inventory).optional())
                .map_err(err)
        })
        .await
    }

    async fn booking(&self, booking_id: &str) -> Result<Option<Booking>, StateError> {
        let id = booking_id.to_owned();
        Self::with(&self.reader, move |c| {
            c.prepare_cached(SELECT_BOOKING)
                .and_then(|mut s| s.query_row([id], row_booking).optional())
                .map_err(err)
        })
        .await
    }

    async fn outbox_after(
        &self,
        cursor: &OutboxCursor,
        max: usize,
    ) -> Result<Vec<OutboxEntry>, StateError> {
        let after = cursor.get(PARTITION).copied().unwrap_or(0);
        Self::with(&self.reader, move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT seq, events FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .map_err(err)?;
            let rows = s
                .query_map(params![after as i64, max as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(err)?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, events) = row.map_err(err)?;
                let events = events.split('\n').map(str::to_owned).collect();
                out.push(OutboxEntry {
                    partition: PARTITION.to_owned(),
                    seq: seq as u64,
                    events,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, StateError> {
        Self::with(&self.reader, move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT shard, sequence, reason, detail, payload FROM dead_letters
                     ORDER BY shard, length(sequence), sequence LIMIT ?1",
                )
                .map_err(err)?;
            let rows = s
                .query_map([max as i64], |r| {
                    Ok(DeadLetter {
                        shard: floodgate_core::stream::ShardId(r.get(0)?),
                        sequence: SequenceNumber::new(r.get::<_, String>(1)?),
                        reason: r.get(2)?,
                        detail: r.get(3)?,
                        payload: r.get(4)?,
                    })
                })
                .map_err(err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(err)
        })
        .await
    }

    async fn outbox_published(&self, upto: &OutboxCursor) -> Result<(), StateError> {
        let Some(&seq) = upto.get(PARTITION) else {
            return Ok(());
        };
        Self::with(&self.writer, move |c| {
            c.execute("DELETE FROM outbox WHERE seq <= ?1", [seq as i64])
                .map_err(err)?;
            Ok(())
        })
        .await
    }
}

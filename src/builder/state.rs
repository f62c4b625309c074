//! The builder's memory: one SQLite database in `--state-dir` (WAL), holding every build
//! asked for (its place in the queue, attempts, outputs, failure), the new builds each
//! client started, and the build time used per month. A restart loses nothing: a build
//! that was running when the process died is queued again by [`State::open`].
//!
//! One connection behind a mutex: every statement is a primary-key or index look-up that
//! takes microseconds, so the lock is never held across I/O other than SQLite's own.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use super::{Failure, FailureClass};

/// The database's file name in `--state-dir`.
pub const DB_FILE: &str = "builder.sqlite";
/// How long a client's new builds count against its hourly limit.
const CLIENT_WINDOW_SECS: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state database: a stored {what} is not valid: {value:?}")]
    Stored { what: &'static str, value: String },
    #[error("state database lock poisoned")]
    Poisoned,
}

/// Where a build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Queued,
    Building,
    Built,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Building => "building",
            Phase::Built => "built",
            Phase::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Phase, StateError> {
        Ok(match s {
            "queued" => Phase::Queued,
            "building" => Phase::Building,
            "built" => Phase::Built,
            "failed" => Phase::Failed,
            _ => {
                return Err(StateError::Stored {
                    what: "state",
                    value: s.to_owned(),
                })
            }
        })
    }
}

/// One build as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub drv_path: String,
    pub phase: Phase,
    pub attempts: u32,
    /// Output name → store path, once read from the derivation.
    pub outputs: BTreeMap<String, String>,
    pub failure: Option<Failure>,
    pub has_log: bool,
    /// Unix seconds of the next try of a transient failure.
    pub retry_at: Option<i64>,
    /// Unix seconds.
    pub created: i64,
    pub started: Option<i64>,
    pub finished: Option<i64>,
    /// Order in the queue (smaller first).
    pub seq: i64,
}

/// What [`State::request`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// Already known: its state, unchanged.
    Existing(Build),
    /// Queued now.
    New(Build),
    /// The client has started `limit` new builds in the last hour.
    OverClientLimit,
}

pub struct State {
    conn: Mutex<Db>,
}

/// The connection, and the queue order kept beside it under the same lock: the `seq` of
/// every queued build, ascending, so a position is a binary search rather than a count
/// over the queue (a look-up of a build deep in a long queue stays O(log n)).
struct Db {
    conn: Connection,
    queued: Vec<i64>,
}

impl Db {
    fn reload_queue(&mut self) -> Result<(), StateError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT seq FROM builds WHERE state = 'queued' ORDER BY seq")?;
        let seqs = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        drop(st);
        self.queued = seqs;
        Ok(())
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS builds (
    drv_path TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    outputs TEXT,
    failure_class TEXT,
    permanent INTEGER,
    reason TEXT,
    dependency TEXT,
    has_log INTEGER NOT NULL DEFAULT 0,
    retry_at INTEGER,
    client TEXT,
    created INTEGER NOT NULL,
    started INTEGER,
    finished INTEGER
);
CREATE INDEX IF NOT EXISTS builds_by_state ON builds(state, seq);
CREATE INDEX IF NOT EXISTS builds_by_seq ON builds(seq);
CREATE TABLE IF NOT EXISTS client_starts (client TEXT NOT NULL, at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS client_starts_by_client ON client_starts(client, at);
CREATE TABLE IF NOT EXISTS usage (month TEXT PRIMARY KEY, seconds REAL NOT NULL);
";

const COLUMNS: &str = "drv_path, state, attempts, outputs, failure_class, permanent, reason, \
                       dependency, has_log, retry_at, created, started, finished, seq";

fn row_to_build(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawBuild> {
    Ok(RawBuild {
        drv_path: r.get(0)?,
        state: r.get(1)?,
        attempts: r.get(2)?,
        outputs: r.get(3)?,
        failure_class: r.get(4)?,
        permanent: r.get(5)?,
        reason: r.get(6)?,
        dependency: r.get(7)?,
        has_log: r.get(8)?,
        retry_at: r.get(9)?,
        created: r.get(10)?,
        started: r.get(11)?,
        finished: r.get(12)?,
        seq: r.get(13)?,
    })
}

/// A row as SQLite gives it, before its text columns are checked.
struct RawBuild {
    drv_path: String,
    state: String,
    attempts: u32,
    outputs: Option<String>,
    failure_class: Option<String>,
    permanent: Option<bool>,
    reason: Option<String>,
    dependency: Option<String>,
    has_log: bool,
    retry_at: Option<i64>,
    created: i64,
    started: Option<i64>,
    finished: Option<i64>,
    seq: i64,
}

impl RawBuild {
    fn check(self) -> Result<Build, StateError> {
        let outputs = match self.outputs {
            Some(o) => serde_json::from_str(&o).map_err(|_| StateError::Stored {
                what: "outputs",
                value: o,
            })?,
            None => BTreeMap::new(),
        };
        let failure = match self.failure_class {
            Some(c) => Some(Failure {
                class: FailureClass::parse(&c).ok_or(StateError::Stored {
                    what: "failure class",
                    value: c,
                })?,
                permanent: self.permanent.unwrap_or(true),
                reason: self.reason.unwrap_or_default(),
                dependency: self.dependency,
            }),
            None => None,
        };
        Ok(Build {
            phase: Phase::parse(&self.state)?,
            drv_path: self.drv_path,
            attempts: self.attempts,
            outputs,
            failure,
            has_log: self.has_log,
            retry_at: self.retry_at,
            created: self.created,
            started: self.started,
            finished: self.finished,
            seq: self.seq,
        })
    }
}

/// `YYYY-MM` of a Unix time (UTC), the key of the monthly budget.
pub fn month_of(unix: i64) -> String {
    // Civil from days (Howard Hinnant's algorithm), for the proleptic Gregorian calendar.
    let days = unix.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}")
}

impl State {
    /// Opens (or creates) the database in `dir` and queues again every build that was
    /// running when the last process ended.
    pub fn open(dir: &Path) -> Result<State, StateError> {
        let conn = Connection::open(dir.join(DB_FILE))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // With WAL, NORMAL loses at most the last transactions on power loss, never
        // consistency; a lost "queued" is asked again by the next request.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute(
            "UPDATE builds SET state = 'queued', started = NULL WHERE state = 'building'",
            [],
        )?;
        let mut db = Db {
            conn,
            queued: Vec::new(),
        };
        db.reload_queue()?;
        Ok(State {
            conn: Mutex::new(db),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let mut db = self.conn.lock().map_err(|_| StateError::Poisoned)?;
        f(&mut db.conn)
    }

    /// [`State::with`] for changes to the queue: the queue order is read again after `f`
    /// when `f` says it changed it in ways other than appending.
    fn with_queue<T>(
        &self,
        f: impl FnOnce(&mut Connection, &mut Vec<i64>) -> Result<(T, bool), StateError>,
    ) -> Result<T, StateError> {
        let mut db = self.conn.lock().map_err(|_| StateError::Poisoned)?;
        let Db { conn, queued } = &mut *db;
        let (t, reload) = f(conn, queued)?;
        if reload {
            db.reload_queue()?;
        }
        Ok(t)
    }

    pub fn get(&self, drv_path: &str) -> Result<Option<Build>, StateError> {
        self.with(|c| get(c, drv_path))
    }

    /// Asks for a build: an existing one is returned as it is; a new one is queued if
    /// `client` has started fewer than `per_client` new builds in the last hour.
    pub fn request(
        &self,
        drv_path: &str,
        client: &str,
        per_client: u32,
        now: i64,
    ) -> Result<Requested, StateError> {
        self.with_queue(|c, queued| {
            let tx = c.transaction()?;
            if let Some(b) = get(&tx, drv_path)? {
                return Ok((Requested::Existing(b), false));
            }
            let started: u32 = tx.query_row(
                "SELECT count(*) FROM client_starts WHERE client = ?1 AND at > ?2",
                params![client, now - CLIENT_WINDOW_SECS],
                |r| r.get(0),
            )?;
            if started >= per_client {
                return Ok((Requested::OverClientLimit, false));
            }
            tx.execute(
                "INSERT INTO client_starts (client, at) VALUES (?1, ?2)",
                params![client, now],
            )?;
            tx.execute(
                "INSERT INTO builds (drv_path, seq, state, client, created)
                 VALUES (?1, (SELECT coalesce(max(seq), 0) + 1 FROM builds), 'queued', ?2, ?3)",
                params![drv_path, client, now],
            )?;
            let b = get(&tx, drv_path)?.ok_or(StateError::Stored {
                what: "new build",
                value: drv_path.to_owned(),
            })?;
            tx.commit()?;
            // The largest seq so far: the queue order stays sorted.
            queued.push(b.seq);
            Ok((Requested::New(b), false))
        })
    }

    /// Number of queued builds ahead of `seq`.
    pub fn position(&self, seq: i64) -> Result<u64, StateError> {
        let db = self.conn.lock().map_err(|_| StateError::Poisoned)?;
        Ok(db.queued.partition_point(|&s| s < seq) as u64)
    }

    /// Transient failures whose time has come go back to the queue (at its end).
    pub fn requeue_due(&self, now: i64) -> Result<usize, StateError> {
        self.with_queue(|c, _| {
            let n = c.execute(
                "UPDATE builds SET state = 'queued', retry_at = NULL,
                     seq = (SELECT coalesce(max(seq), 0) + 1 FROM builds)
                 WHERE state = 'failed' AND retry_at IS NOT NULL AND retry_at <= ?1",
                [now],
            )?;
            Ok((n, n > 0))
        })
    }

    /// The earliest time a transient failure is due, if any.
    pub fn next_retry(&self) -> Result<Option<i64>, StateError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT min(retry_at) FROM builds WHERE state = 'failed' AND retry_at IS NOT NULL",
                [],
                |r| r.get(0),
            )?)
        })
    }

    /// Takes the first queued build and marks it building (one more attempt).
    pub fn start_next(&self, now: i64) -> Result<Option<Build>, StateError> {
        self.with_queue(|c, queued| {
            let tx = c.transaction()?;
            let next: Option<String> = tx
                .query_row(
                    "SELECT drv_path FROM builds WHERE state = 'queued' ORDER BY seq LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(drv) = next else {
                return Ok((None, false));
            };
            tx.execute(
                "UPDATE builds SET state = 'building', attempts = attempts + 1, started = ?2,
                     finished = NULL
                 WHERE drv_path = ?1",
                params![drv, now],
            )?;
            let b = get(&tx, &drv)?;
            tx.commit()?;
            if let Some(b) = &b {
                if let Ok(i) = queued.binary_search(&b.seq) {
                    queued.remove(i);
                }
            }
            Ok((b, false))
        })
    }

    pub fn set_outputs(
        &self,
        drv_path: &str,
        outputs: &BTreeMap<String, String>,
    ) -> Result<(), StateError> {
        let json = serde_json::to_string(outputs).map_err(|e| StateError::Stored {
            what: "outputs",
            value: e.to_string(),
        })?;
        self.with(|c| {
            c.execute(
                "UPDATE builds SET outputs = ?2 WHERE drv_path = ?1",
                params![drv_path, json],
            )?;
            Ok(())
        })
    }

    /// Records the end of an attempt that ran for `seconds` of build time, counted in the
    /// month of `now`. Only a build still marked building is changed (a cancel may have
    /// ended it first).
    pub fn finish(
        &self,
        drv_path: &str,
        outcome: Result<(), (Failure, Option<i64>)>,
        has_log: bool,
        seconds: f64,
        now: i64,
    ) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO usage (month, seconds) VALUES (?1, ?2)
                 ON CONFLICT(month) DO UPDATE SET seconds = seconds + excluded.seconds",
                params![month_of(now), seconds],
            )?;
            match outcome {
                Ok(()) => tx.execute(
                    "UPDATE builds SET state = 'built', failure_class = NULL, permanent = NULL,
                         reason = NULL, dependency = NULL, retry_at = NULL, has_log = ?2,
                         finished = ?3
                     WHERE drv_path = ?1 AND state = 'building'",
                    params![drv_path, has_log, now],
                )?,
                Err((f, retry_at)) => tx.execute(
                    "UPDATE builds SET state = 'failed', failure_class = ?2, permanent = ?3,
                         reason = ?4, dependency = ?5, retry_at = ?6, has_log = ?7, finished = ?8
                     WHERE drv_path = ?1 AND state = 'building'",
                    params![
                        drv_path,
                        f.class.as_str(),
                        f.permanent,
                        f.reason,
                        f.dependency,
                        retry_at,
                        has_log,
                        now
                    ],
                )?,
            };
            tx.commit()?;
            Ok(())
        })
    }

    /// The operator's retry: a failed build goes back to the queue with its attempts
    /// counted from zero. Anything else is left as it is.
    pub fn retry(&self, drv_path: &str) -> Result<Option<Build>, StateError> {
        self.with_queue(|c, _| {
            let n = c.execute(
                "UPDATE builds SET state = 'queued', attempts = 0, failure_class = NULL,
                     permanent = NULL, reason = NULL, dependency = NULL, retry_at = NULL,
                     seq = (SELECT coalesce(max(seq), 0) + 1 FROM builds)
                 WHERE drv_path = ?1 AND state = 'failed'",
                [drv_path],
            )?;
            Ok((get(c, drv_path)?, n > 0))
        })
    }

    /// The operator's cancel: a queued or running build (or a transient failure waiting
    /// for its next try) ends as refused by the operator; returns the build before.
    pub fn cancel(&self, drv_path: &str, now: i64) -> Result<Option<Build>, StateError> {
        self.with_queue(|c, _| {
            let before = get(c, drv_path)?;
            let n = c.execute(
                "UPDATE builds SET state = 'failed', failure_class = 'refused', permanent = 1,
                     reason = 'cancelled by the operator', dependency = NULL, retry_at = NULL,
                     finished = ?2
                 WHERE drv_path = ?1
                   AND (state IN ('queued', 'building') OR (state = 'failed' AND retry_at IS NOT NULL))",
                params![drv_path, now],
            )?;
            Ok((before, n > 0))
        })
    }

    /// Build seconds used in the month of `now`.
    pub fn used_seconds(&self, now: i64) -> Result<f64, StateError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT coalesce((SELECT seconds FROM usage WHERE month = ?1), 0.0)",
                [month_of(now)],
                |r| r.get(0),
            )?)
        })
    }

    /// Build seconds used in all months.
    pub fn total_seconds(&self) -> Result<f64, StateError> {
        self.with(|c| {
            Ok(
                c.query_row("SELECT coalesce(sum(seconds), 0.0) FROM usage", [], |r| {
                    r.get(0)
                })?,
            )
        })
    }

    /// Builds in `phase`, in queue order (oldest first), at most `limit`.
    pub fn list(&self, phase: Phase, limit: u32) -> Result<Vec<Build>, StateError> {
        self.with(|c| {
            let order = match phase {
                Phase::Queued | Phase::Building => "seq",
                Phase::Built | Phase::Failed => "finished DESC, seq DESC",
            };
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM builds WHERE state = ?1 ORDER BY {order} LIMIT ?2"
            ))?;
            let raw: Vec<RawBuild> = st
                .query_map(params![phase.as_str(), limit], row_to_build)?
                .collect::<Result<_, _>>()?;
            raw.into_iter().map(RawBuild::check).collect()
        })
    }

    /// `(state, failure class or "", count)` of every build.
    pub fn counts(&self) -> Result<Vec<(String, String, u64)>, StateError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT state, coalesce(failure_class, ''), count(*) FROM builds
                 GROUP BY state, failure_class ORDER BY state, failure_class",
            )?;
            let rows = st
                .query_map([], |r| {
                    let n: i64 = r.get(2)?;
                    Ok((r.get(0)?, r.get(1)?, n.max(0) as u64))
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }
}

fn get(c: &Connection, drv_path: &str) -> Result<Option<Build>, StateError> {
    let mut st = c.prepare_cached(&format!("SELECT {COLUMNS} FROM builds WHERE drv_path = ?1"))?;
    st.query_row([drv_path], row_to_build)
        .optional()?
        .map(RawBuild::check)
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = "/nix/store/00000000000000000000000000000000-a.drv";

    #[test]
    fn months_are_utc_calendar_months() {
        assert_eq!(month_of(0), "1970-01");
        assert_eq!(month_of(951_782_400), "2000-02");
        assert_eq!(month_of(1_796_000_000), "2026-11");
        assert_eq!(month_of(1_798_761_599), "2026-12");
        assert_eq!(month_of(1_798_761_600), "2027-01");
    }

    #[test]
    fn a_build_running_when_the_process_ended_is_queued_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = State::open(dir.path()).expect("opens");
        state.request(DRV, "c", 10, 100).expect("request");
        let b = state.start_next(101).expect("start").expect("one");
        assert_eq!((b.phase, b.attempts), (Phase::Building, 1));
        drop(state);
        let state = State::open(dir.path()).expect("reopens");
        let b = state.get(DRV).expect("get").expect("known");
        assert_eq!((b.phase, b.attempts), (Phase::Queued, 1));
    }

    #[test]
    fn positions_follow_the_queue_through_starts_and_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = State::open(dir.path()).expect("opens");
        let drv = |i: u32| format!("/nix/store/{i:032}-a.drv");
        let seqs: Vec<i64> = (0..4)
            .map(
                |i| match state.request(&drv(i), "c", 10, 1).expect("request") {
                    Requested::New(b) => b.seq,
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        let pos = |i: usize| state.position(seqs[i]).expect("position");
        assert_eq!((pos(0), pos(3)), (0, 3));
        state.start_next(2).expect("start");
        assert_eq!((pos(1), pos(3)), (0, 2));
        state.cancel(&drv(2), 3).expect("cancel");
        assert_eq!(pos(3), 1);
        drop(state);
        let state = State::open(dir.path()).expect("reopens");
        // The one that was building is queued again, first in line.
        assert_eq!(state.position(seqs[3]).expect("position"), 2);
    }

    #[test]
    fn a_client_starts_at_most_its_limit_of_new_builds_an_hour() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = State::open(dir.path()).expect("opens");
        let drv = |i: u32| format!("/nix/store/{i:032}-a.drv");
        for i in 0..2 {
            assert!(matches!(
                state.request(&drv(i), "c", 2, 1000).expect("request"),
                Requested::New(_)
            ));
        }
        // Asking again for a known one is not a new build.
        assert!(matches!(
            state.request(&drv(0), "c", 2, 1000).expect("request"),
            Requested::Existing(_)
        ));
        assert_eq!(
            state.request(&drv(2), "c", 2, 1000).expect("request"),
            Requested::OverClientLimit
        );
        assert!(matches!(
            state.request(&drv(2), "other", 2, 1000).expect("request"),
            Requested::New(_)
        ));
        assert!(matches!(
            state
                .request(&drv(3), "c", 2, 1000 + 3600)
                .expect("request"),
            Requested::New(_)
        ));
    }
}

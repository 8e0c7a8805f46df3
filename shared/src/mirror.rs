//! A local copy of a KV bucket in an embedded redb database, so reads never wait on NATS.
//!
//! [`Mirror::open`] opens (or creates) `<data dir>/<name>-<n>.redb`, taking the first `n` whose
//! file no other process holds: redb locks its file, and several herald processes (a gateway
//! and a worker side by side) may share one data directory. A restarted process normally gets
//! its old file back and resumes where it stopped. Reads ([`Mirror::get`], [`Mirror::list`])
//! come only from the file, so they work before NATS answers and while it is unreachable.
//!
//! [`Mirror::follow`] keeps the file current: it watches the bucket from the revision after
//! the last one stored, and writes each batch of changes together with that revision in one
//! redb transaction, so the file never holds values newer or older than the revision it
//! records. Deletes and purges remove keys. If the bucket was recreated (a different stream
//! creation time, or a last revision below the stored one) the copy starts over.

use std::{
    ops::Bound,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{self, kv::Operation};
use futures::{FutureExt, StreamExt};
use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition};

/// Key → (revision, value).
const VALUES: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("values");
/// Bookkeeping: [`REVISION`] and [`BUCKET_CREATED`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The last bucket revision whose change is in the file.
const REVISION: &str = "revision";
/// The bucket stream's creation time (ns since the epoch), to notice a recreated bucket.
const BUCKET_CREATED: &str = "bucket_created";
/// How many files of one name a data directory may hold (processes sharing it at once).
const MAX_FILES: usize = 64;
/// Most changes written in one transaction.
const MAX_BATCH: usize = 1024;
/// How often the bucket's last revision is asked for while the watch is quiet.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Why the local copy cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("local copy {path}: {message}")]
    Storage { path: String, message: String },
    #[error("no free {name}-N.redb in {dir}: {MAX_FILES} files are held by other processes")]
    AllTaken { name: String, dir: String },
}

/// How far the copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorStatus {
    /// The last revision applied to the file.
    pub applied: u64,
    /// The bucket's last revision, as last heard from NATS (0 before it answered).
    pub bucket_last: u64,
    /// Changes the copy is behind the bucket: `bucket_last - applied`.
    pub lag: u64,
    /// Changes applied since this process opened the file (a restart that resumes applies
    /// only what it missed).
    pub applied_since_open: u64,
}

/// Every copy this process keeps current, by file name (`users-0`), so whatever serves
/// `/ready` and `/metrics` reports all of them: the gateway's and, in `herald up`, the
/// workers'.
static FOLLOWING: std::sync::Mutex<Vec<(String, std::sync::Weak<Mirror>)>> =
    std::sync::Mutex::new(Vec::new());

/// The status of every copy this process follows, by file name.
pub fn following() -> Vec<(String, MirrorStatus)> {
    let mut all = FOLLOWING.lock().expect("never poisoned");
    all.retain(|(_, m)| m.strong_count() > 0);
    all.iter().filter_map(|(name, m)| m.upgrade().map(|m| (name.clone(), m.status()))).collect()
}

/// The status of every copy this process follows whose file lies in `dir`, by file name.
pub fn following_in(dir: &Path) -> Vec<(String, MirrorStatus)> {
    let mut all = FOLLOWING.lock().expect("never poisoned");
    all.retain(|(_, m)| m.strong_count() > 0);
    all.iter()
        .filter_map(|(name, m)| {
            m.upgrade().filter(|m| m.path.starts_with(dir)).map(|m| (name.clone(), m.status()))
        })
        .collect()
}

/// A bucket's local copy.
pub struct Mirror {
    db: Arc<Database>,
    path: PathBuf,
    /// The revision in the file, published so readers can wait for one.
    applied: tokio::sync::watch::Sender<u64>,
    bucket_last: AtomicU64,
    applied_since_open: AtomicU64,
}

impl Mirror {
    /// Opens the first `<dir>/<name>-<n>.redb` no other process holds, creating it if needed.
    pub fn open(dir: &Path, name: &str) -> Result<Mirror, MirrorError> {
        let storage = |path: &Path| {
            let path = path.display().to_string();
            move |e: &dyn std::fmt::Display| MirrorError::Storage {
                path: path.clone(),
                message: e.to_string(),
            }
        };
        std::fs::create_dir_all(dir).map_err(|e| storage(dir)(&e))?;
        for n in 0..MAX_FILES {
            let path = dir.join(format!("{name}-{n}.redb"));
            let db = match Database::create(&path) {
                Ok(db) => db,
                Err(DatabaseError::DatabaseAlreadyOpen) => continue,
                Err(e) => return Err(storage(&path)(&e)),
            };
            let err = storage(&path);
            let revision = (|| -> Result<u64, redb::Error> {
                let tx = db.begin_write()?;
                let revision = {
                    tx.open_table(VALUES)?;
                    let meta = tx.open_table(META)?;
                    meta.get(REVISION)?.map_or(0, |v| v.value())
                };
                tx.commit()?;
                Ok(revision)
            })()
            .map_err(|e| err(&e))?;
            tracing::info!(path = %path.display(), revision, "local copy opened");
            return Ok(Mirror {
                db: Arc::new(db),
                path,
                applied: tokio::sync::watch::Sender::new(revision),
                bucket_last: AtomicU64::new(0),
                applied_since_open: AtomicU64::new(0),
            });
        }
        Err(MirrorError::AllTaken { name: name.to_owned(), dir: dir.display().to_string() })
    }

    /// The file this copy lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn storage_error(&self, e: impl std::fmt::Display) -> MirrorError {
        MirrorError::Storage { path: self.path.display().to_string(), message: e.to_string() }
    }

    /// One key's value and revision.
    pub fn get(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>, MirrorError> {
        let read = || -> Result<_, redb::Error> {
            let tx = self.db.begin_read()?;
            let table = tx.open_table(VALUES)?;
            Ok(table.get(key)?.map(|v| {
                let (revision, bytes) = v.value();
                (revision, bytes.to_vec())
            }))
        };
        read().map_err(|e| self.storage_error(e))
    }

    /// Up to `limit` entries whose keys start with `prefix`, in key order, after key
    /// `prefix + after` when given: the cursor is the last key a page ended with, so a page
    /// neither skips nor repeats entries that exist throughout, whatever is written meanwhile.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, u64, Vec<u8>)>, MirrorError> {
        let start = match after {
            Some(a) => Bound::Excluded(format!("{prefix}{a}")),
            None => Bound::Included(prefix.to_owned()),
        };
        let read = || -> Result<_, redb::Error> {
            let tx = self.db.begin_read()?;
            let table = tx.open_table(VALUES)?;
            let range = (start.as_ref().map(String::as_str), Bound::Unbounded);
            let mut out = Vec::new();
            for item in table.range::<&str>(range)? {
                let (k, v) = item?;
                let key = k.value();
                if !key.starts_with(prefix) || out.len() >= limit {
                    break;
                }
                let (revision, bytes) = v.value();
                out.push((key.to_owned(), revision, bytes.to_vec()));
            }
            Ok(out)
        };
        read().map_err(|e| self.storage_error(e))
    }

    /// How far the copy is.
    pub fn status(&self) -> MirrorStatus {
        let applied = *self.applied.borrow();
        let bucket_last = self.bucket_last.load(Ordering::Relaxed);
        MirrorStatus {
            applied,
            bucket_last,
            lag: bucket_last.saturating_sub(applied),
            applied_since_open: self.applied_since_open.load(Ordering::Relaxed),
        }
    }

    /// Waits until the copy holds `revision`, for at most `timeout`; says whether it does.
    pub async fn wait_for(&self, revision: u64, timeout: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision)).await.is_ok_and(|r| r.is_ok())
    }

    /// Keeps the copy current with `bucket` until the future is dropped, resuming after NATS
    /// outages from the last revision stored.
    pub async fn follow(self: Arc<Self>, js: jetstream::Context, bucket: String) {
        let name = self.path.file_stem().map_or_else(|| bucket.clone(), |s| s.to_string_lossy().into_owned());
        FOLLOWING.lock().expect("never poisoned").push((name, Arc::downgrade(&self)));
        let mut delay = Duration::from_millis(100);
        loop {
            match self.follow_once(&js, &bucket).await {
                Ok(()) => delay = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(bucket = %bucket, error = %e, "local copy: watch interrupted; resuming");
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Asks for the bucket's stream; resets the file if the bucket is not the one it copied.
    /// Answers the stream (for polling its last revision).
    async fn check_identity(
        &self,
        js: &jetstream::Context,
        bucket: &str,
    ) -> Result<jetstream::stream::Stream, String> {
        let mut stream = js.get_stream(format!("KV_{bucket}")).await.map_err(|e| e.to_string())?;
        let info = stream.info().await.map_err(|e| e.to_string())?;
        let created = u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0);
        let last = info.state.last_sequence;
        self.bucket_last.fetch_max(last, Ordering::Relaxed);
        let db = self.db.clone();
        let applied = *self.applied.borrow();
        let reset = tokio::task::spawn_blocking(move || -> Result<bool, redb::Error> {
            let tx = db.begin_write()?;
            let stored = tx.open_table(META)?.get(BUCKET_CREATED)?.map(|v| v.value());
            let reset = stored != Some(created) || applied > last;
            if reset {
                tx.delete_table(VALUES)?;
                tx.open_table(VALUES)?;
                let mut meta = tx.open_table(META)?;
                meta.insert(BUCKET_CREATED, created)?;
                meta.insert(REVISION, 0)?;
            }
            tx.commit()?;
            Ok(reset)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if reset {
            if applied > 0 {
                tracing::warn!(bucket, path = %self.path.display(), "the bucket was recreated; the local copy starts over");
            }
            self.applied.send_replace(0);
            self.bucket_last.store(last, Ordering::Relaxed);
        }
        Ok(stream)
    }

    async fn follow_once(&self, js: &jetstream::Context, bucket: &str) -> Result<(), String> {
        let mut stream = self.check_identity(js, bucket).await?;
        let kv = js.get_key_value(bucket).await.map_err(|e| e.to_string())?;
        let from = *self.applied.borrow() + 1;
        let mut watch = kv.watch_all_from_revision(from).await.map_err(|e| e.to_string())?;
        let mut poll = tokio::time::interval(POLL_EVERY);
        loop {
            let first = tokio::select! {
                next = watch.next() => next,
                _ = poll.tick() => {
                    // The watch says nothing while idle or cut off; ask the bucket itself.
                    if let Ok(Ok(info)) = tokio::time::timeout(POLL_EVERY, stream.info()).await {
                        self.bucket_last.fetch_max(info.state.last_sequence, Ordering::Relaxed);
                    }
                    continue;
                }
            };
            let Some(first) = first else { return Err("the watch ended".into()) };
            let mut batch = vec![first.map_err(|e| e.to_string())?];
            while batch.len() < MAX_BATCH {
                match watch.next().now_or_never() {
                    Some(Some(Ok(entry))) => batch.push(entry),
                    Some(Some(Err(e))) => return Err(e.to_string()),
                    Some(None) | None => break,
                }
            }
            let last = batch.last().expect("batch has one entry at least");
            let (revision, behind) = (last.revision, last.delta);
            self.bucket_last.fetch_max(revision + behind, Ordering::Relaxed);
            let changes: Vec<(String, Option<(u64, bytes::Bytes)>)> = batch
                .into_iter()
                .map(|e| match e.operation {
                    Operation::Put => (e.key, Some((e.revision, e.value))),
                    Operation::Delete | Operation::Purge => (e.key, None),
                })
                .collect();
            let count = changes.len() as u64;
            let db = self.db.clone();
            tokio::task::spawn_blocking(move || apply(&db, changes, revision))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| self.storage_error(e).to_string())?;
            self.applied_since_open.fetch_add(count, Ordering::Relaxed);
            self.applied.send_replace(revision);
        }
    }
}

/// Writes a batch of changes and the revision they bring the copy to, in one transaction.
fn apply(
    db: &Database,
    changes: Vec<(String, Option<(u64, bytes::Bytes)>)>,
    revision: u64,
) -> Result<(), redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    {
        let mut values = tx.open_table(VALUES)?;
        for (key, change) in &changes {
            match change {
                Some((rev, bytes)) => {
                    values.insert(key.as_str(), (*rev, bytes.as_ref()))?;
                }
                None => {
                    values.remove(key.as_str())?;
                }
            }
        }
        tx.open_table(META)?.insert(REVISION, revision)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_opener_gets_the_next_file_and_a_reopener_its_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = Mirror::open(dir.path(), "users").unwrap();
        let b = Mirror::open(dir.path(), "users").unwrap();
        assert!(a.path().ends_with("users-0.redb"), "{}", a.path().display());
        assert!(b.path().ends_with("users-1.redb"), "{}", b.path().display());
        apply(&a.db, vec![("t_x.u1".into(), Some((7, bytes::Bytes::from_static(b"v"))))], 7).unwrap();
        drop(a);
        let again = Mirror::open(dir.path(), "users").unwrap();
        assert!(again.path().ends_with("users-0.redb"));
        assert_eq!(again.status().applied, 7);
        assert_eq!(again.get("t_x.u1").unwrap(), Some((7, b"v".to_vec())));
    }

    #[test]
    fn lists_stay_within_the_prefix_and_page_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::open(dir.path(), "users").unwrap();
        let v = |r| Some((r, bytes::Bytes::from_static(b"{}")));
        let changes = vec![
            ("t_a.u1".to_owned(), v(1)),
            ("t_a.u2".into(), v(2)),
            ("t_a.u3".into(), v(3)),
            ("t_ab.u1".into(), v(4)),
            ("t_b.u1".into(), v(5)),
        ];
        apply(&m.db, changes, 5).unwrap();
        let keys = |after, limit| {
            m.list("t_a.", after, limit).unwrap().into_iter().map(|(k, _, _)| k).collect::<Vec<_>>()
        };
        assert_eq!(keys(None, 10), ["t_a.u1", "t_a.u2", "t_a.u3"]);
        assert_eq!(keys(None, 2), ["t_a.u1", "t_a.u2"]);
        assert_eq!(keys(Some("u2"), 2), ["t_a.u3"]);
        assert_eq!(keys(Some("u3"), 2), Vec::<String>::new());
        apply(&m.db, vec![("t_a.u2".into(), None)], 6).unwrap();
        assert_eq!(keys(None, 10), ["t_a.u1", "t_a.u3"]);
    }
}

//! The inbox's live view: one reader of every inbox change per gateway, fanned out to the
//! connected streams (`GET /v1/users/{id}/inbox/stream`) by owner.
//!
//! A connection costs a small bounded queue ([`QUEUE`] changes) and an entry in a map: no
//! NATS subscription or consumer of its own, so thousands of idle ones are cheap. A connection
//! whose client does not keep up is closed when its queue is full rather than buffered without
//! bound; the browser reconnects with `Last-Event-ID` and catches up from the streams.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use herald_shared::inbox::{Change, Inbox};
use tokio::sync::mpsc;

/// Changes queued per connection before it is closed as too slow (shared, one pointer each).
pub const QUEUE: usize = 64;

/// The listeners of each inbox (by owner token): connection id and queue.
type Listeners = HashMap<String, Vec<(u64, mpsc::Sender<Arc<Change>>)>>;

/// Who is listening to which inbox.
#[derive(Default)]
pub struct Hub {
    listeners: Mutex<Listeners>,
    next_id: AtomicU64,
    connections: AtomicU64,
}

/// A connection's place in the hub; leaving it (drop) unregisters.
pub struct Listening {
    hub: Arc<Hub>,
    owner: String,
    id: u64,
    pub changes: mpsc::Receiver<Arc<Change>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.hub.remove(&self.owner, self.id);
    }
}

impl Hub {
    /// Registers a listener for `owner` (an inbox's owner token).
    pub fn listen(self: &Arc<Self>, owner: String) -> Listening {
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.listeners.lock().expect("never poisoned").entry(owner.clone()).or_default().push((id, tx));
        self.connections.fetch_add(1, Ordering::Relaxed);
        Listening { hub: self.clone(), owner, id, changes: rx }
    }

    /// Connected live streams.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    fn remove(&self, owner: &str, id: u64) {
        let mut listeners = self.listeners.lock().expect("never poisoned");
        if let Some(list) = listeners.get_mut(owner) {
            let before = list.len();
            list.retain(|(i, _)| *i != id);
            if list.len() < before {
                self.connections.fetch_sub(1, Ordering::Relaxed);
            }
            if list.is_empty() {
                listeners.remove(owner);
            }
        }
    }

    fn dispatch(&self, owner: &str, change: Change) {
        let change = Arc::new(change);
        let mut listeners = self.listeners.lock().expect("never poisoned");
        let Some(list) = listeners.get_mut(owner) else { return };
        let before = list.len();
        // A full queue closes that connection (its sender is dropped, its stream ends).
        list.retain(|(_, tx)| tx.try_send(change.clone()).is_ok());
        let dropped = (before - list.len()) as u64;
        if dropped > 0 {
            self.connections.fetch_sub(dropped, Ordering::Relaxed);
            tracing::info!(dropped, "closed inbox streams that fell behind; they resume with Last-Event-ID");
        }
        if list.is_empty() {
            listeners.remove(owner);
        }
    }

    /// Reads every inbox change and hands each to its owner's listeners, for the life of the
    /// process. If the reader fails it starts again; listeners connected across the gap get the
    /// changes they missed when they reconnect.
    pub async fn run(self: Arc<Self>, inbox: Inbox) {
        loop {
            match inbox.changes().await {
                Ok(changes) => {
                    let mut changes = std::pin::pin!(changes);
                    while let Some(change) = changes.next().await {
                        match change {
                            Ok(change) => {
                                let owner = match &change {
                                    Change::Item { owner, .. } | Change::Mark { owner, .. } => owner.clone(),
                                };
                                self.dispatch(&owner, change);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "reading inbox changes failed; starting again");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read inbox changes; trying again in a second"),
            }
            // Close every listener: what happened while no reader ran reaches each on resume.
            let closed: u64 = {
                let mut listeners = self.listeners.lock().expect("never poisoned");
                let n = listeners.values().map(Vec::len).sum::<usize>() as u64;
                listeners.clear();
                n
            };
            self.connections.fetch_sub(closed, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

//! The crate every other Herald crate uses.
//!
//! - [`intent`]: the versioned [`Intent`] and its codec (MessagePack with named fields, or JSON
//!   from people publishing with the `nats` CLI), and the validation every entry point shares.
//! - [`ledger`]: the delivery ledger in the `herald_notifications` bucket: claimed before a
//!   send, settled after it, with compare-and-set; also what `GET` reads.
//! - [`state`]: what Herald tells about a notification: [`NotificationRecord`] and the
//!   [`StatusEvent`] published for every settled attempt.
//! - [`deadletter`]: how a dead letter is written into HERALD_DLQ and read back.
//! - [`dlq`]: the dead-letter core (list, read, replay, discard, bulk at a rate, audit) the
//!   HTTP API, `herald dlq` and the console share.
//! - [`users`]: users (addresses, devices, locale, time zone, preferences) in the
//!   `herald_users` bucket, per tenant, every write a compare-and-set; RFC 7396 merge patch.
//! - [`preferences`]: a user's [`Preferences`] and [`preferences::decide`], the pure function
//!   that says whether a notification is sent, suppressed or deferred on a channel.
//! - [`mirror`]: a bucket's local copy in redb under `HERALD_DATA_DIR`, kept current by a KV
//!   watch that resumes from the revision it stored; hot-path reads come from it.
//! - [`topology`]: every stream, consumer and bucket, declared once and ensured at start.
//! - [`config`]: every `HERALD_*` variable, read in one place into [`Config`].
//! - [`auth`]: development and production JWTs (HS256) and their scopes.
//! - [`signature`]: the `Herald-Signature` header webhook receivers verify.
//! - [`nats_server`]: finds or provisions a real nats-server and runs it as a child process
//!   (used by `herald up`, the benchmark and every test).
//! - [`templates`]: what a notification says per channel and language: checked when written,
//!   rendered with handlebars (strict, with locale- and time-zone-aware helpers) at send time.
//! - [`template_store`]: templates in the `herald_templates` bucket, versioned, per tenant.
//! - [`telemetry`]: tracing set-up, human-readable or JSON.
//!
//! `shared` does no network I/O except through [`topology`], [`ledger`], [`dlq`], [`users`] and
//! [`mirror`] (JetStream) and [`nats_server`] (the child process); only [`mirror`] touches a
//! database file.

pub mod auth;
pub mod config;
pub mod deadletter;
pub mod dlq;
pub mod history;
pub mod idempotency;
pub mod inbox;
pub mod intent;
pub mod ledger;
pub mod mirror;
pub mod nats_server;
pub mod preferences;
pub mod signature;
pub mod state;
pub mod telemetry;
pub mod template_store;
pub mod templates;
pub mod throttle;
pub mod topology;
pub mod users;

pub use config::Config;
pub use intent::{Channel, Intent};
pub use preferences::Preferences;
pub use state::{NotificationRecord, StatusEvent};

//! Herald's operator tools.
//!
//! - [`cli`]: `herald dlq list|show|replay|discard`, over the dead-letter core
//!   ([`herald_shared::dlq`]).
//! - [`seed`]: `herald seed`, example users and templates for a first notification by
//!   reference.
//! - `herald console` ([`run`]): the terminal console, in four parts kept apart:
//!   - [`App`] (`app`): every bit of state, changed only by keys, ticks and [`Update`]s; keys
//!     that need NATS return an [`Action`].
//!   - [`draw`] (`ui`): the screen as a pure function of the [`App`].
//!   - [`Source`] (`source`): plain async functions reading NATS (`load_overview`,
//!     `load_letters`, `load_detail`, `lookup`, `load_history`), used by the background task and
//!     by tests.
//!   - `worker`: the background task that owns the NATS connection, follows the status events
//!     and carries out actions; `term`: the loop, a `tokio::select!` over a tick, the terminal's
//!     events and the worker's updates, and the terminal's restoration on exit and panic.

pub mod cli;
pub mod seed;

mod app;
mod history;
mod source;
mod term;
mod ui;
mod worker;

pub use app::{Action, App, Confirm, Prompt, Tab, Update, parse_filter};
pub use history::History;
pub use source::{
    ChannelStats, HISTORY, Overview, Source, StreamStats, load_detail, load_history, load_letters,
    load_overview, lookup,
};
pub use term::run;
pub use ui::draw;
pub use worker::handle;

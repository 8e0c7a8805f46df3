//! Herald's operator tools.
//!
//! - [`cli`]: `herald dlq list|show|replay|discard`, over the dead-letter core
//!   ([`herald_shared::dlq`]).
//! - `herald console` ([`run`]): the terminal console.

pub mod cli;

use herald_shared::{Config, dlq::Actor};

/// Runs the console on the current terminal until the operator quits.
pub async fn run(config: Config, actor: Actor) -> anyhow::Result<()> {
    let _ = (config, actor);
    anyhow::bail!("the console is not built yet")
}

//! The console's loop and its terminal: raw mode and the alternate screen on the way in, both
//! undone on the way out, by `q`, an error or a panic alike.

use std::time::Duration;

use chrono::Utc;
use crossterm::event::{Event, EventStream};
use futures::StreamExt as _;
use herald_shared::{Config, dlq::Actor};
use tokio::sync::mpsc;

use crate::{app::App, ui::draw, worker};

/// How often the screen asks for fresh numbers.
const TICK: Duration = Duration::from_secs(1);

/// Runs the console on the current terminal until the operator quits.
pub async fn run(config: Config, actor: Actor) -> anyhow::Result<()> {
    // `try_init` installs a panic hook that restores the terminal before the message prints.
    let mut terminal = ratatui::try_init()?;
    let result = run_on(&mut terminal, config, actor).await;
    ratatui::try_restore()?;
    result
}

async fn run_on(terminal: &mut ratatui::DefaultTerminal, config: Config, actor: Actor) -> anyhow::Result<()> {
    let (actions, actions_rx) = mpsc::unbounded_channel();
    let (updates_tx, mut updates) = mpsc::unbounded_channel();
    let mut app = App::new(config.nats_urls.join(","), Utc::now());
    let worker = tokio::spawn(worker::serve(config, actor, actions_rx, updates_tx));
    let mut events = EventStream::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let result = loop {
        if let Err(e) = terminal.draw(|frame| draw(frame, &app)) {
            break Err(e.into());
        }
        let todo = tokio::select! {
            _ = tick.tick() => app.tick(Utc::now()),
            event = events.next() => match event {
                Some(Ok(Event::Key(key))) => app.on_key(key).into_iter().collect(),
                // A resize needs only the redraw at the top of the loop.
                Some(Ok(_)) => Vec::new(),
                Some(Err(e)) => break Err(e.into()),
                None => break Ok(()),
            },
            Some(update) = updates.recv() => {
                app.apply(update);
                // Take in everything queued before drawing once.
                while let Ok(update) = updates.try_recv() {
                    app.apply(update);
                }
                // A fresh connection deserves numbers now rather than at the next tick.
                if app.connected && app.overview.is_none() { app.tick(Utc::now()) } else { Vec::new() }
            }
        };
        for action in todo {
            let _ = actions.send(action);
        }
        if app.quit {
            break Ok(());
        }
    };
    worker.abort();
    result
}

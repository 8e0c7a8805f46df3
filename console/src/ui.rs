//! Drawing: [`draw`] is a pure function of the [`App`]. No colours are set anywhere, so the
//! console reads the same on dark and light terminals; emphasis is bold, reversed and underline.

use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_shared::{
    Channel,
    dlq::{Detail, Letter, Progress},
    state::Outcome,
};
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style},
    text::{Line, Span, Text},
    widgets::{Block, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState},
};

use crate::app::{App, Confirm, Prompt, Tab};

/// Wider than this, the dead-letter screen shows the list and the open letter side by side,
/// and tables show their optional columns.
const WIDE: u16 = 120;

fn bold() -> Style {
    Style::new().add_modifier(Modifier::BOLD)
}

fn header() -> Style {
    Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)
}

fn selected() -> Style {
    Style::new().add_modifier(Modifier::REVERSED)
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, app: &App) {
    let [top, body, bottom] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(0), Constraint::Length(1)])
            .areas(frame.area());
    draw_top(frame, top, app);
    if !app.connected && app.overview.is_none() {
        draw_connecting(frame, body, app);
    } else {
        match app.tab {
            Tab::Overview => draw_overview(frame, body, app),
            Tab::Retries => draw_retries(frame, body, app),
            Tab::DeadLetters => draw_letters_screen(frame, body, app),
            Tab::Lookup => draw_lookup(frame, body, app),
        }
    }
    draw_bottom(frame, bottom, app);
    if let Some(confirm) = &app.confirm {
        draw_confirm(frame, confirm, app);
    }
    if app.help {
        draw_help(frame);
    }
}

fn draw_top(frame: &mut Frame, area: Rect, app: &App) {
    let mut spans = Vec::new();
    for (i, tab) in Tab::ALL.iter().enumerate() {
        let label = format!(" {} {} ", i + 1, tab.title());
        spans.push(if *tab == app.tab {
            Span::styled(label, selected().add_modifier(Modifier::BOLD))
        } else {
            Span::raw(label)
        });
    }
    let tabs = Line::from(spans);
    let state = match &app.overview {
        Some(o) => {
            let version = match (&o.server_version, app.redact) {
                (Some(_), true) => " <version>".to_owned(),
                (Some(v), false) => format!(" {v}"),
                (None, _) => String::new(),
            };
            format!("NATS {}{version} ", o.connection)
        }
        None if app.connected => "NATS connected ".to_owned(),
        None => "NATS connecting ".to_owned(),
    };
    let down = !app.connected || app.overview.as_ref().is_some_and(|o| o.connection != "connected");
    let state =
        Span::styled(state, if down { bold().add_modifier(Modifier::REVERSED) } else { Style::new() });
    let width = state.width() as u16;
    let [left, right] = Layout::horizontal([Constraint::Min(0), Constraint::Length(width)]).areas(area);
    frame.render_widget(Paragraph::new(tabs), left);
    frame.render_widget(Paragraph::new(Line::from(state)), right);
}

fn draw_connecting(frame: &mut Frame, area: Rect, app: &App) {
    let mut lines = vec![Line::from(format!("Connecting to {} …", app.target)), Line::default()];
    if let Some(e) = &app.connection_error {
        lines.push(Line::styled(e.clone(), bold()));
    }
    lines.push(Line::default());
    lines.push(Line::from("The console keeps trying; q quits."));
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(" Herald ")), area);
}

fn draw_bottom(frame: &mut Frame, area: Rect, app: &App) {
    if let Some(prompt) = &app.prompt {
        let label = match prompt {
            Prompt::Filter => {
                "Filter (channel: reason: class: tenant: id: older: newer:, words: error text): "
            }
            Prompt::DiscardReason { .. } => "Why discard it (kept in the audit trail): ",
            Prompt::BulkRate => "Replay the filtered letters at how many per second: ",
            Prompt::Lookup => "Notification id: ",
        };
        // A long label gives way to the text being typed on a narrow terminal.
        let label = if label.len() + app.input.len() + 1 > area.width as usize {
            label.split(" (").next().unwrap_or(label).trim_end_matches(": ").to_owned() + ": "
        } else {
            label.to_owned()
        };
        let x = area.x
            + (label.chars().count() + app.input.chars().count()).min((area.width as usize).saturating_sub(1))
                as u16;
        frame.render_widget(
            Paragraph::new(Line::from(vec![Span::styled(label, bold()), Span::raw(&app.input)])),
            area,
        );
        frame.set_cursor_position((x, area.y));
        return;
    }
    let hints = match app.tab {
        _ if app.confirm.is_some() => "y confirm  n cancel",
        Tab::DeadLetters if app.detail_open.is_some() => "r replay  d discard  j/k scroll  Esc back  ? help",
        Tab::DeadLetters if app.bulk_running => "x stop bulk  / filter  Enter detail  ? help",
        Tab::DeadLetters => "/ filter  Enter detail  r replay  d discard  B bulk  ? help",
        Tab::Lookup => "Enter type an id  1-4 screens  ? help  q quit",
        _ => "1-4 / Tab screens  ? help  q quit",
    };
    let hints = Span::raw(hints);
    let hint_width = hints.width() as u16;
    let [left, right] = Layout::horizontal([Constraint::Min(0), Constraint::Length(hint_width)]).areas(area);
    if let Some((message, ok)) = &app.message {
        let style = if *ok { Style::new() } else { bold() };
        let mark = if *ok { "" } else { "! " };
        frame.render_widget(Paragraph::new(Span::styled(format!("{mark}{message}"), style)), left);
    }
    frame.render_widget(Paragraph::new(hints), right);
}

fn draw_overview(frame: &mut Frame, area: Rect, app: &App) {
    let Some(overview) = &app.overview else {
        frame.render_widget(Paragraph::new("Reading consumers and streams …").block(Block::bordered()), area);
        return;
    };
    let channels = overview.channels.len().max(1) as u16;
    let [consumers, activity, storage] = Layout::vertical([
        Constraint::Length(channels + 3),
        Constraint::Length(channels * 3 + 2),
        Constraint::Min(3),
    ])
    .areas(area);

    let title = match &overview.error {
        Some(e) => format!(" Consumers (stale: {e}) "),
        None => " Consumers ".to_owned(),
    };
    let rows = overview.channels.iter().map(|(channel, stats)| match stats {
        Some(s) => Row::new(vec![
            Cell::from(channel.to_string()),
            Cell::from(format!("{:>7}", s.pending)),
            Cell::from(format!("{:>9}", s.in_flight)),
            Cell::from(format!("{:>11}", s.redelivered)),
            Cell::from(format!("{:>6}", s.lag.map_or("—".into(), |d| duration(app, d)))),
            // No circuit breakers exist yet; nothing to report.
            Cell::from("—"),
        ]),
        None => Row::new(vec![Cell::from(channel.to_string()), Cell::from("      ?  (no consumer yet)")]),
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Length(9),
            Constraint::Length(11),
            Constraint::Length(6),
            Constraint::Min(7),
        ],
    )
    .header(Row::new(["CHANNEL", "PENDING", "IN FLIGHT", "REDELIVERED", "   LAG", "BREAKER"]).style(header()))
    .block(Block::bordered().title(title));
    frame.render_widget(table, consumers);

    let block = Block::bordered().title(" Status events, last 5 minutes (total, per second now) ");
    let inner = block.inner(activity);
    frame.render_widget(block, activity);
    let mut y = inner.y;
    for (channel, _) in &overview.channels {
        for (i, outcome) in
            [Outcome::Delivered, Outcome::Retrying, Outcome::DeadLettered].into_iter().enumerate()
        {
            if y >= inner.bottom() {
                break;
            }
            let row = Rect { x: inner.x, y, width: inner.width, height: 1 };
            draw_series(frame, row, app, *channel, outcome, i == 0);
            y += 1;
        }
    }

    let rows = overview.streams.iter().map(|s| {
        let used = match (s.max_bytes, app.redact) {
            (Some(_), true) => "<pct>".to_owned(),
            (Some(max), false) => format!("{:.1}%", s.bytes as f64 * 100.0 / max as f64),
            (None, _) => "—".to_owned(),
        };
        Row::new(vec![
            Cell::from(s.name.clone()),
            Cell::from(format!("{:>9}", s.messages)),
            Cell::from(format!("{:>10}", if app.redact { "<bytes>".into() } else { bytes(s.bytes) })),
            Cell::from(format!("{:>10}", s.max_bytes.map_or("—".into(), bytes))),
            Cell::from(format!("{used:>6}")),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(24),
            Constraint::Length(9),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Min(6),
        ],
    )
    .header(Row::new(["STREAM", " MESSAGES", "     BYTES", "       MAX", "  USED"]).style(header()))
    .block(Block::bordered().title(" Storage "));
    frame.render_widget(table, storage);
}

fn draw_series(frame: &mut Frame, row: Rect, app: &App, channel: Channel, outcome: Outcome, first: bool) {
    let name = match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Retrying => "retrying",
        Outcome::DeadLettered => "dead-lettered",
        Outcome::Suppressed => "suppressed",
        Outcome::Throttled => "throttled",
        Outcome::Deferred => "deferred",
        Outcome::Skipped => "skipped",
    };
    let total = app.history.total(channel, outcome, app.now);
    let rate = if app.redact {
        "<rate>".to_owned()
    } else {
        format!("{:.1}/s", app.history.rate(channel, outcome, app.now))
    };
    let label = format!("{:<8} {name:<13} {total:>6} ", if first { channel.as_str() } else { "" });
    let [l, spark, r] = Layout::horizontal([
        Constraint::Length(label.len() as u16),
        Constraint::Min(1),
        Constraint::Length(9),
    ])
    .areas(row);
    frame.render_widget(Paragraph::new(label), l);
    let data = app.history.series(channel, outcome, app.now, spark.width as usize, app.redact);
    frame.render_widget(Sparkline::default().data(&data), spark);
    frame.render_widget(Paragraph::new(format!("{rate:>8}")), r);
}

fn draw_retries(frame: &mut Frame, area: Rect, app: &App) {
    let redelivered = app
        .overview
        .iter()
        .flat_map(|o| &o.channels)
        .map(|(c, s)| format!("{c} {}", s.as_ref().map_or("?".into(), |s| s.redelivered.to_string())))
        .collect::<Vec<_>>()
        .join(", ");
    let [table_area, note] = Layout::vertical([Constraint::Min(3), Constraint::Length(2)]).areas(area);
    let wide = area.width >= WIDE;
    let rows = app.history.retrying.values().map(|e| {
        let next = match e.retry_at {
            Some(_) if app.redact => "<when>".to_owned(),
            Some(t) if t > app.now => {
                format!("in {}", duration(app, (t - app.now).to_std().unwrap_or_default()))
            }
            Some(_) => "due".to_owned(),
            None => "?".to_owned(),
        };
        let mut cells = vec![
            Cell::from(e.notification_id.clone()),
            Cell::from(e.channel.to_string()),
            Cell::from(format!("{:>7}", e.attempt)),
            Cell::from(next),
        ];
        if wide {
            cells.push(Cell::from(e.tenant.clone().unwrap_or_else(|| "—".into())));
            cells.push(Cell::from(time(app, e.at)));
        }
        cells.push(Cell::from(e.error.clone().unwrap_or_default()));
        Row::new(cells)
    });
    let mut widths =
        vec![Constraint::Length(36), Constraint::Length(7), Constraint::Length(7), Constraint::Length(10)];
    let mut titles = vec!["NOTIFICATION", "CHANNEL", "ATTEMPT", "NEXT TRY"];
    if wide {
        widths.extend([Constraint::Length(12), Constraint::Length(8)]);
        titles.extend(["TENANT", "FAILED"]);
    }
    widths.push(Constraint::Min(10));
    titles.push("LAST ERROR");
    let count = app.history.retrying.len();
    let table = Table::new(rows, widths)
        .header(Row::new(titles).style(header()))
        .row_highlight_style(selected())
        .block(Block::bordered().title(format!(" Being retried now: {count} ")));
    let mut state = TableState::default().with_selected((count > 0).then_some(app.retry_selected));
    frame.render_stateful_widget(table, table_area, &mut state);
    let text = vec![
        Line::from(format!("Redelivered by the server (consumer num_redelivered): {redelivered}")),
        Line::from("Listed: notifications whose latest status event (last 5 min) says retrying."),
    ];
    frame.render_widget(Paragraph::new(text), note);
}

fn draw_letters_screen(frame: &mut Frame, area: Rect, app: &App) {
    let (list_area, detail_area) = match app.detail_open {
        Some(_) if area.width >= WIDE => {
            let [l, r] =
                Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area);
            (Some(l), Some(r))
        }
        Some(_) => (None, Some(area)),
        None => (Some(area), None),
    };
    if let Some(list_area) = list_area {
        let (list_area, bulk_area) = match &app.bulk {
            Some(_) => {
                let [l, b] = Layout::vertical([Constraint::Min(3), Constraint::Length(3)]).areas(list_area);
                (l, Some(b))
            }
            None => (list_area, None),
        };
        draw_letters(frame, list_area, app);
        if let (Some(b), Some(p)) = (bulk_area, &app.bulk) {
            draw_bulk(frame, b, app, p);
        }
    }
    if let Some(detail_area) = detail_area {
        draw_detail(frame, detail_area, app);
    }
}

fn draw_letters(frame: &mut Frame, area: Rect, app: &App) {
    let wide = area.width >= WIDE;
    let rows = app.letters.iter().map(|l| letter_row(app, l, wide));
    let mut widths = vec![Constraint::Length(6)];
    let mut titles = vec!["   SEQ"];
    if wide {
        widths.push(Constraint::Length(8));
        titles.push("CHANNEL");
    }
    widths.push(Constraint::Length(18));
    titles.push("REASON");
    if wide {
        widths.extend([Constraint::Length(3), Constraint::Length(7)]);
        titles.extend(["ATT", "    AGE"]);
    }
    widths.extend([Constraint::Length(36), Constraint::Min(8)]);
    titles.extend(["NOTIFICATION", "LAST ERROR"]);
    let filter =
        if app.filter_text.is_empty() { String::new() } else { format!(", filter: {}", app.filter_text) };
    let more = if app.letters_more { "+" } else { "" };
    let mut title = format!(" Dead letters: {}{more}{filter} ", app.letters.len());
    if let Some(e) = &app.letters_error {
        title = format!(" Dead letters (stale: {e}) ");
    }
    let empty = app.letters.is_empty();
    let table = Table::new(rows, widths)
        .header(Row::new(titles).style(header()))
        .row_highlight_style(selected())
        .block(Block::bordered().title(title));
    let mut state = TableState::default().with_selected((!empty).then_some(app.selected));
    frame.render_stateful_widget(table, area, &mut state);
    if empty {
        let text =
            if app.letters_loaded { "No dead letters match." } else { "Reading the dead-letter queue …" };
        let inner = Block::bordered().inner(area);
        if inner.height > 2 {
            frame.render_widget(Paragraph::new(text), Rect { y: inner.y + 1, height: 1, ..inner });
        }
    }
}

fn letter_row<'a>(app: &App, l: &'a Letter, wide: bool) -> Row<'a> {
    let (reason, attempts, error) = match &l.parked {
        Some(p) => (p.reason.as_str(), p.attempts.to_string(), p.last_error.as_str()),
        None => ("?", "?".into(), "not in Herald's dead-letter format"),
    };
    let mut cells = vec![Cell::from(format!("{:>6}", l.sequence))];
    if wide {
        cells.push(Cell::from(l.channel.map_or("?".into(), |c| c.to_string())));
    }
    cells.push(Cell::from(reason));
    if wide {
        cells.push(Cell::from(format!("{attempts:>3}")));
        cells.push(Cell::from(format!("{:>7}", age(app, l.dead_at))));
    }
    cells.push(Cell::from(l.notification_id.clone().unwrap_or_else(|| "?".into())));
    cells.push(Cell::from(error));
    Row::new(cells)
}

fn draw_bulk(frame: &mut Frame, area: Rect, app: &App, p: &Progress) {
    let state = if app.bulk_running {
        "running, x stops it"
    } else if p.finished {
        "finished"
    } else {
        "stopped"
    };
    let block = Block::bordered().title(format!(" Bulk replay: {state} "));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let counts = format!(
        " {}/{}  requeued {}  already delivered {}  skipped {}{}",
        p.done,
        p.matched,
        p.requeued,
        p.already_delivered,
        p.skipped,
        p.error.as_ref().map(|e| format!("  ({e})")).unwrap_or_default()
    );
    let bar_width = (inner.width as usize).saturating_sub(counts.chars().count() + 2).clamp(0, 40);
    let filled = if p.matched == 0 { 0 } else { (p.done as usize * bar_width) / p.matched as usize };
    let bar = format!("[{}{}]", "#".repeat(filled), "·".repeat(bar_width - filled.min(bar_width)));
    frame.render_widget(Paragraph::new(format!("{bar}{counts}")), inner);
}

fn draw_detail(frame: &mut Frame, area: Rect, app: &App) {
    let seq = app.detail_open.unwrap_or_default();
    let block = Block::bordered().title(format!(" Dead letter {seq} "));
    let text = match &app.detail {
        None => Text::from("Reading …"),
        Some((_, Err(e))) => Text::from(Line::styled(format!("Could not read it: {e}"), bold())),
        Some((_, Ok(None))) => {
            Text::from("It is no longer in the dead-letter queue (replayed or discarded).")
        }
        Some((_, Ok(Some(d)))) => detail_text(app, d),
    };
    frame.render_widget(Paragraph::new(text).block(block).scroll((app.detail_scroll, 0)), area);
}

fn detail_text(app: &App, d: &Detail) -> Text<'static> {
    let l = &d.letter;
    let mut lines: Vec<Line<'static>> = Vec::new();
    let field = |name: &str, value: String| {
        Line::from(vec![Span::styled(format!("{name:<13} "), bold()), Span::raw(value)])
    };
    lines.push(field("channel", l.channel.map_or("?".into(), |c| c.to_string())));
    lines.push(field("notification", l.notification_id.clone().unwrap_or_else(|| "?".into())));
    lines.push(field("tenant", l.tenant.clone().unwrap_or_else(|| "—".into())));
    lines.push(field("correlation", l.correlation_id.clone().unwrap_or_else(|| "—".into())));
    lines.push(field("dead at", format!("{} ({} ago)", time(app, l.dead_at), age(app, l.dead_at))));
    if let Some(p) = &l.parked {
        lines.push(field("reason", format!("{} ({})", p.reason.as_str(), p.error_class.as_str())));
        lines.push(field("attempts", p.attempts.to_string()));
        lines.push(field("last error", p.last_error.clone()));
        lines.push(field("came from", format!("{} #{}", p.original_subject, p.original_sequence)));
    }
    if let Some(n) = l.truncated_from {
        lines.push(field("truncated", format!("only the first {} of {n} bytes were kept", l.payload.len())));
    }
    if let Some(e) = &l.decode_error {
        lines.push(field("cannot decode", e.clone()));
    }
    lines.push(Line::default());
    lines.push(Line::styled("Ledger", header()));
    match &d.entry {
        Some(e) => {
            lines.push(field(
                "status",
                format!("{} since {}", serde_name(&e.status), time(app, e.updated_at)),
            ));
            lines.push(field(
                "attempts",
                format!(
                    "{} over its life, {} this round, {} resends",
                    e.attempts, e.round_attempts, e.resends
                ),
            ));
            if let Some(err) = &e.last_error {
                lines.push(field("last error", err.clone()));
            }
            if let Some(p) = &e.parking {
                lines.push(field("parked", format!("{} ({})", p.reason.as_str(), p.error)));
            }
        }
        None => lines.push(Line::from("no ledger entry (expired, or the letter names no notification)")),
    }
    let events = l.notification_id.as_deref().map(|id| app.history.of(id)).unwrap_or_default();
    if !events.is_empty() {
        lines.push(Line::default());
        lines.push(Line::styled("Attempts (status events of the last 5 minutes)", header()));
        for e in events {
            lines.push(Line::from(event_line(app, e)));
        }
    }
    lines.push(Line::default());
    lines.push(Line::styled("Headers", header()));
    // Sorted: NATS keeps headers in no particular order, and a stable one is easier to scan.
    let mut headers: Vec<&(String, String)> = l.headers.iter().collect();
    headers.sort();
    for (name, value) in headers {
        lines.push(Line::from(format!("{name}: {value}")));
    }
    lines.push(Line::default());
    lines.push(Line::styled("Intent", header()));
    match &d.intent {
        Some(i) => {
            for line in serde_json::to_string_pretty(i).unwrap_or_default().lines() {
                lines.push(Line::from(line.to_owned()));
            }
        }
        None => lines.push(Line::from(format!("{} bytes that do not decode", l.payload.len()))),
    }
    Text::from(lines)
}

fn event_line(app: &App, e: &herald_shared::StatusEvent) -> String {
    format!(
        "{} {} attempt {} {}{}",
        time(app, e.at),
        e.channel,
        e.attempt,
        e.outcome,
        e.error.as_ref().map(|err| format!(": {err}")).unwrap_or_default()
    )
}

fn draw_lookup(frame: &mut Frame, area: Rect, app: &App) {
    let title = if app.lookup_id.is_empty() {
        " Lookup: press Enter and type a notification id ".to_owned()
    } else {
        format!(" Lookup: {} ", app.lookup_id)
    };
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let found = match &app.lookup {
        None if app.lookup_id.is_empty() => {
            frame.render_widget(
                Paragraph::new(
                    "Shows a notification's state on every channel, from the ledger, whatever its tenant.",
                ),
                inner,
            );
            return;
        }
        None => {
            frame.render_widget(Paragraph::new("Looking it up …"), inner);
            return;
        }
        Some(Err(e)) => {
            frame.render_widget(Paragraph::new(Line::styled(format!("Lookup failed: {e}"), bold())), inner);
            return;
        }
        Some(Ok(found)) => found,
    };
    if found.is_empty() {
        frame.render_widget(Paragraph::new("The ledger has no notification with this id."), inner);
        return;
    }
    let wide = area.width >= WIDE;
    let events = app.history.of(&app.lookup_id);
    let [table_area, history_area] =
        Layout::vertical([Constraint::Length(found.len() as u16 + 1), Constraint::Min(0)]).areas(inner);
    let rows = found.iter().map(|(channel, e)| {
        let mut cells = vec![
            Cell::from(channel.to_string()),
            Cell::from(serde_name(&e.status)),
            Cell::from(format!("{:>8}", e.attempts)),
            Cell::from(time(app, e.updated_at)),
        ];
        if wide {
            cells.push(Cell::from(e.tenant.clone().unwrap_or_else(|| "—".into())));
            cells.push(Cell::from(e.delivered_at.map_or("—".into(), |t| time(app, t))));
            cells.push(Cell::from(e.retry_at.map_or("—".into(), |t| time(app, t))));
        }
        cells.push(Cell::from(e.last_error.clone().unwrap_or_else(|| "—".into())));
        Row::new(cells)
    });
    let mut widths =
        vec![Constraint::Length(8), Constraint::Length(13), Constraint::Length(8), Constraint::Length(8)];
    let mut titles = vec!["CHANNEL", "STATUS", "ATTEMPTS", "UPDATED"];
    if wide {
        widths.extend([Constraint::Length(12), Constraint::Length(9), Constraint::Length(9)]);
        titles.extend(["TENANT", "DELIVERED", "NEXT TRY"]);
    }
    widths.push(Constraint::Min(10));
    titles.push("LAST ERROR");
    frame.render_widget(Table::new(rows, widths).header(Row::new(titles).style(header())), table_area);
    let mut lines =
        vec![Line::default(), Line::styled("History (status events of the last 5 minutes)", header())];
    if events.is_empty() {
        lines.push(Line::from("none in memory"));
    }
    for e in events {
        lines.push(Line::from(event_line(app, e)));
    }
    frame.render_widget(Paragraph::new(lines), history_area);
}

fn draw_confirm(frame: &mut Frame, confirm: &Confirm, app: &App) {
    let (title, body) = match confirm {
        Confirm::Replay { sequence } => (
            " Replay ",
            format!(
                "Replay dead letter {sequence}{}? It goes back to its channel with a fresh attempt budget \
                 (never sent again if the ledger says delivered).",
                about(app, *sequence)
            ),
        ),
        Confirm::Discard { sequence, reason } => (
            " Discard ",
            format!("Discard dead letter {sequence}{} for good? Reason: {reason}", about(app, *sequence)),
        ),
        Confirm::BulkReplay { filter, rate, count } => (
            " Bulk replay ",
            format!(
                "Replay every dead letter the filter matches ({count}{} shown{}) at {rate} per second?",
                if app.letters_more { "+" } else { "" },
                if *filter == Default::default() { ", no filter" } else { "" }
            ),
        ),
    };
    // Tall enough for the wrapped question, a blank line and the answer keys.
    let height = body.chars().count() as u16 / 50 + 1 + 4;
    let area = centered(frame.area(), 60, height);
    frame.render_widget(Clear, area);
    let text = vec![Line::from(body), Line::default(), Line::styled("y yes    n no", bold())];
    frame.render_widget(
        Paragraph::new(text)
            .wrap(ratatui::widgets::Wrap { trim: true })
            .block(Block::bordered().title(title)),
        area,
    );
}

fn about(app: &App, sequence: u64) -> String {
    app.letters
        .iter()
        .find(|l| l.sequence == sequence)
        .map(|l| {
            format!(
                " ({}, {})",
                l.channel.map_or("?".into(), |c| c.to_string()),
                l.notification_id.as_deref().unwrap_or("?")
            )
        })
        .unwrap_or_default()
}

const HELP: &[(&str, &str)] = &[
    ("1 2 3 4  Tab", "switch screens (Shift-Tab back)"),
    ("?", "this help; any key closes it"),
    ("q  Ctrl-C", "quit"),
    ("↑ ↓ j k", "move (PgUp PgDn, g G: ends)"),
    ("", ""),
    ("Dead letters", ""),
    ("Enter", "open the letter; Esc closes it"),
    ("/", "filter: channel: reason: class:"),
    ("", "tenant: id: older:10m newer:1h;"),
    ("", "other words: text of the error"),
    ("c", "clear the filter"),
    ("r", "replay it (asks first)"),
    ("d", "discard it (asks why, then asks)"),
    ("B", "replay all that match, at a rate"),
    ("x", "stop a running bulk replay"),
    ("", ""),
    ("Lookup", ""),
    ("Enter", "type a notification id"),
];

fn draw_help(frame: &mut Frame) {
    let area = centered(frame.area(), 52, HELP.len() as u16 + 2);
    frame.render_widget(Clear, area);
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(keys, what)| {
            if what.is_empty() {
                Line::styled(keys.to_string(), header())
            } else {
                Line::from(vec![Span::styled(format!("{keys:<13}"), bold()), Span::raw(*what)])
            }
        })
        .collect();
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(" Keys ")), area);
}

/// A box of at most `width`×`height` in the middle of `area`.
fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height }
}

/// A status as it is spelled in the API.
fn serde_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn time(app: &App, t: DateTime<Utc>) -> String {
    if app.redact { "<time>".into() } else { t.format("%H:%M:%S").to_string() }
}

fn age(app: &App, t: DateTime<Utc>) -> String {
    duration(app, (app.now - t).to_std().unwrap_or_default())
}

fn duration(app: &App, d: Duration) -> String {
    if app.redact {
        return "<dur>".into();
    }
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::app::Update;

    /// Any terminal size, however small, draws without a panic (a resize can go anywhere).
    #[test]
    fn every_screen_draws_at_any_size() {
        let mut app = App::new("nats://127.0.0.1:4222", Utc::now());
        for connected in [false, true] {
            if connected {
                app.apply(Update::Connected);
                app.apply(Update::Overview(Default::default()));
            }
            for tab in Tab::ALL {
                app.tab = tab;
                for (help, prompt) in [(false, None), (true, None), (false, Some(Prompt::Filter))] {
                    app.help = help;
                    app.prompt = prompt;
                    app.input = "reason:rejected".into();
                    for (w, h) in [(1, 1), (2, 3), (20, 5), (40, 10), (80, 24)] {
                        let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
                        terminal.draw(|frame| draw(frame, &app)).unwrap();
                    }
                }
            }
        }
    }
}

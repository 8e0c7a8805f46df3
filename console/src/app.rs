//! All of the console's state, and the only code that changes it: keys ([`App::on_key`]), the
//! clock ([`App::tick`]) and answers from NATS ([`App::apply`]). Nothing here does I/O; whatever
//! needs NATS comes back as an [`Action`] for the background task.

use chrono::{DateTime, Utc};
use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use herald_shared::{
    Channel, StatusEvent,
    config::parse_duration,
    deadletter::{ErrorClass, Reason},
    dlq::{Detail, Filter, Letter, Page, Progress},
    ledger::Entry,
};

use crate::{history::History, source::Overview};

/// The screens, in the order of their number keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Overview,
    Retries,
    DeadLetters,
    Lookup,
}

impl Tab {
    pub const ALL: [Tab; 4] = [Tab::Overview, Tab::Retries, Tab::DeadLetters, Tab::Lookup];

    pub fn title(self) -> &'static str {
        match self {
            Tab::Overview => "Overview",
            Tab::Retries => "Retries",
            Tab::DeadLetters => "Dead letters",
            Tab::Lookup => "Lookup",
        }
    }

    fn index(self) -> usize {
        Tab::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }
}

/// A line the operator is typing, and what it is for.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// `channel:webhook reason:rejected text…` narrowing the dead-letter list.
    Filter,
    /// Why letter `sequence` is being discarded (the audit trail keeps it).
    DiscardReason { sequence: u64 },
    /// Letters per second for a bulk replay of the filtered set.
    BulkRate,
    /// A notification id to look up.
    Lookup,
}

/// A question the operator must answer with `y` before anything changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Confirm {
    Replay { sequence: u64 },
    Discard { sequence: u64, reason: String },
    BulkReplay { filter: Filter, rate: f64, count: usize },
}

/// Work for the background task: everything that touches NATS.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    LoadOverview,
    LoadLetters(Filter),
    LoadDetail(u64),
    Replay(u64),
    Discard { sequence: u64, reason: String },
    BulkReplay { filter: Filter, rate: f64 },
    CancelBulk,
    Lookup(String),
}

/// What the background task sends back.
#[derive(Debug, Clone)]
pub enum Update {
    /// Not connected yet (or the topology could not be read): why.
    Connecting(String),
    Connected,
    Overview(Overview),
    /// A page of letters for the filter it was asked for.
    Letters(Filter, Result<Page, String>),
    /// Boxed: a detail is large, and every other update would pay for its size.
    Detail(u64, Box<Result<Option<Detail>, String>>),
    Events(Vec<StatusEvent>),
    Lookup(String, Result<Vec<(Channel, Entry)>, String>),
    /// A single action finished: what to tell the operator, and whether it worked.
    Done {
        message: String,
        ok: bool,
    },
    Bulk(Progress),
}

/// The console's whole state.
#[derive(Debug, Clone)]
pub struct App {
    /// Which screen is showing.
    pub tab: Tab,
    /// The key overlay is up (it swallows the next key).
    pub help: bool,
    /// A line being typed, with its purpose; keys go to it while it is set.
    pub prompt: Option<Prompt>,
    /// What has been typed into the prompt so far.
    pub input: String,
    /// A question awaiting `y`/`n`; nothing else reacts while it is up.
    pub confirm: Option<Confirm>,
    /// Set by `q`: the loop ends after this key.
    pub quit: bool,
    /// The clock drawing measures ages and "next try in" against, moved by ticks so that
    /// drawing stays a pure function of the state.
    pub now: DateTime<Utc>,
    /// Where the console connects, shown until it is connected.
    pub target: String,
    /// Whether the background task has the topology; before that, screens say "connecting".
    pub connected: bool,
    /// Why it is not connected, or the last connection problem.
    pub connection_error: Option<String>,
    /// The latest overview; kept (and marked stale) when a later read fails.
    pub overview: Option<Overview>,
    /// Status events folded for the sparklines, the retries screen and lookups.
    pub history: History,
    /// The dead letters the filter matched at the last read.
    pub letters: Vec<Letter>,
    /// The listing stopped at a page's end: more letters match than are shown.
    pub letters_more: bool,
    /// The last listing failed: why (the previous list stays on screen).
    pub letters_error: Option<String>,
    /// The letters have been read at least once (an empty list then means "none").
    pub letters_loaded: bool,
    /// When the letters were last read, to space out listings.
    pub letters_read_at: Option<DateTime<Utc>>,
    /// Which letter the cursor is on.
    pub selected: usize,
    /// Which row of the retries table the cursor is on.
    pub retry_selected: usize,
    /// The filter in force, and the text it was parsed from (to edit it again).
    pub filter: Filter,
    pub filter_text: String,
    /// The detail pane is open for this sequence.
    pub detail_open: Option<u64>,
    /// The detail read for it (`Ok(None)`: the letter has left the queue).
    pub detail: Option<(u64, Result<Option<Detail>, String>)>,
    /// How far the detail pane is scrolled, in lines.
    pub detail_scroll: u16,
    /// The id last looked up, and what the ledger said.
    pub lookup_id: String,
    pub lookup: Option<Result<Vec<(Channel, Entry)>, String>>,
    /// The running or last bulk replay.
    pub bulk: Option<Progress>,
    /// A bulk replay is running (so `x` cancels and a second one is refused).
    pub bulk_running: bool,
    /// The last outcome to tell the operator, and whether it was good news.
    pub message: Option<(String, bool)>,
    /// Requests sent and not yet answered, so a slow NATS does not get a pile of repeats.
    pub waiting_overview: bool,
    pub waiting_letters: bool,
    pub waiting_detail: bool,
    /// Masks what differs between runs (times, rates, sizes, versions) so a drawn screen can be
    /// compared with a stored one.
    pub redact: bool,
}

/// How often the dead-letter list is read again while it is on screen (actions and filter
/// changes read it at once).
pub const LETTERS_EVERY: chrono::TimeDelta = chrono::TimeDelta::seconds(3);

/// Letters per second a bulk replay offers by default.
pub const DEFAULT_RATE: f64 = 10.0;

impl App {
    pub fn new(target: impl Into<String>, now: DateTime<Utc>) -> App {
        App {
            tab: Tab::Overview,
            help: false,
            prompt: None,
            input: String::new(),
            confirm: None,
            quit: false,
            now,
            target: target.into(),
            connected: false,
            connection_error: None,
            overview: None,
            history: History::default(),
            letters: Vec::new(),
            letters_more: false,
            letters_error: None,
            letters_loaded: false,
            letters_read_at: None,
            selected: 0,
            retry_selected: 0,
            filter: Filter::default(),
            filter_text: String::new(),
            detail_open: None,
            detail: None,
            detail_scroll: 0,
            lookup_id: String::new(),
            lookup: None,
            bulk: None,
            bulk_running: false,
            message: None,
            waiting_overview: false,
            waiting_letters: false,
            waiting_detail: false,
            redact: false,
        }
    }

    /// The letter under the cursor.
    pub fn current_letter(&self) -> Option<&Letter> {
        self.letters.get(self.selected)
    }

    /// The clock moved: refresh what is on screen, unless the previous request is still out.
    pub fn tick(&mut self, now: DateTime<Utc>) -> Vec<Action> {
        self.now = now;
        if !self.connected {
            return Vec::new();
        }
        let mut actions = Vec::new();
        if !self.waiting_overview {
            self.waiting_overview = true;
            actions.push(Action::LoadOverview);
        }
        if self.tab == Tab::DeadLetters {
            // A listing reads every letter up to a page of matches: not every second.
            let due = self.letters_read_at.is_none_or(|at| now - at >= LETTERS_EVERY);
            if !self.waiting_letters && due {
                self.waiting_letters = true;
                actions.push(Action::LoadLetters(self.filter.clone()));
            }
            if let Some(seq) = self.detail_open
                && !self.waiting_detail
            {
                self.waiting_detail = true;
                actions.push(Action::LoadDetail(seq));
            }
        }
        actions
    }

    /// Takes in an answer from the background task.
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Connecting(why) => {
                self.connected = false;
                self.connection_error = Some(why);
            }
            Update::Connected => {
                self.connected = true;
                self.connection_error = None;
            }
            Update::Overview(mut o) => {
                self.waiting_overview = false;
                // A failed read keeps the last numbers on screen, marked stale by its error.
                if let Some(old) = self.overview.take()
                    && o.error.is_some()
                {
                    if o.channels.iter().all(|(_, s)| s.is_none()) {
                        o.channels = old.channels;
                    }
                    if o.streams.is_empty() {
                        o.streams = old.streams;
                    }
                }
                self.overview = Some(o);
            }
            Update::Letters(filter, page) => {
                self.waiting_letters = false;
                self.letters_read_at = Some(self.now);
                // An answer for a filter since replaced would show the wrong letters.
                if filter != self.filter {
                    return;
                }
                match page {
                    Ok(page) => {
                        self.letters = page.letters;
                        self.letters_more = page.next.is_some();
                        self.letters_error = None;
                        self.letters_loaded = true;
                        self.selected = self.selected.min(self.letters.len().saturating_sub(1));
                    }
                    Err(e) => self.letters_error = Some(e),
                }
            }
            Update::Detail(seq, detail) => {
                self.waiting_detail = false;
                if self.detail_open == Some(seq) {
                    self.detail = Some((seq, *detail));
                }
            }
            Update::Events(events) => {
                for e in events {
                    self.history.record(e);
                }
            }
            Update::Lookup(id, found) => {
                if id == self.lookup_id {
                    self.lookup = Some(found);
                }
            }
            Update::Done { message, ok } => {
                self.message = Some((message, ok));
                // The queue just changed: show it at the next tick.
                self.letters_read_at = None;
            }
            Update::Bulk(p) => {
                self.letters_read_at = None;
                self.bulk_running = !p.finished && p.error.is_none();
                self.bulk = Some(p);
            }
        }
    }

    /// Reacts to a key: changes the state, and returns what NATS must do, if anything.
    pub fn on_key(&mut self, key: KeyEvent) -> Option<Action> {
        if key.kind != KeyEventKind::Press {
            return None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.quit = true;
            return None;
        }
        if self.help {
            self.help = false;
            return None;
        }
        if self.confirm.is_some() {
            return self.on_confirm_key(key);
        }
        if self.prompt.is_some() {
            return self.on_prompt_key(key);
        }
        match key.code {
            KeyCode::Char('q') => {
                self.quit = true;
                return None;
            }
            KeyCode::Char('?') => {
                self.help = true;
                return None;
            }
            KeyCode::Char(c @ '1'..='4') => {
                return self.switch(Tab::ALL[c as usize - '1' as usize]);
            }
            KeyCode::Tab => return self.switch(Tab::ALL[(self.tab.index() + 1) % Tab::ALL.len()]),
            KeyCode::BackTab => {
                return self.switch(Tab::ALL[(self.tab.index() + Tab::ALL.len() - 1) % Tab::ALL.len()]);
            }
            _ => {}
        }
        match self.tab {
            Tab::Overview => None,
            Tab::Retries => {
                let n = self.history.retrying.len();
                self.retry_selected = moved(self.retry_selected, n, key.code);
                None
            }
            Tab::DeadLetters => self.on_letters_key(key),
            Tab::Lookup => match key.code {
                KeyCode::Char('/' | 'i') | KeyCode::Enter => {
                    self.open_prompt(Prompt::Lookup, self.lookup_id.clone());
                    None
                }
                _ => None,
            },
        }
    }

    fn switch(&mut self, tab: Tab) -> Option<Action> {
        self.tab = tab;
        // Show fresh letters at once rather than at the next tick.
        if tab == Tab::DeadLetters && self.connected && !self.waiting_letters {
            self.waiting_letters = true;
            return Some(Action::LoadLetters(self.filter.clone()));
        }
        None
    }

    fn open_prompt(&mut self, prompt: Prompt, input: String) {
        self.prompt = Some(prompt);
        self.input = input;
    }

    fn on_letters_key(&mut self, key: KeyEvent) -> Option<Action> {
        if self.detail_open.is_some() {
            match key.code {
                KeyCode::Esc | KeyCode::Backspace | KeyCode::Char('h') | KeyCode::Left => {
                    self.detail_open = None;
                    self.detail = None;
                    return None;
                }
                KeyCode::Down | KeyCode::Char('j') => {
                    self.detail_scroll = self.detail_scroll.saturating_add(1);
                    return None;
                }
                KeyCode::Up | KeyCode::Char('k') => {
                    self.detail_scroll = self.detail_scroll.saturating_sub(1);
                    return None;
                }
                KeyCode::PageDown => {
                    self.detail_scroll = self.detail_scroll.saturating_add(10);
                    return None;
                }
                KeyCode::PageUp => {
                    self.detail_scroll = self.detail_scroll.saturating_sub(10);
                    return None;
                }
                _ => {}
            }
        }
        match key.code {
            KeyCode::Enter | KeyCode::Char('l') | KeyCode::Right => {
                let seq = self.current_letter()?.sequence;
                self.detail_open = Some(seq);
                self.detail = None;
                self.detail_scroll = 0;
                self.waiting_detail = true;
                Some(Action::LoadDetail(seq))
            }
            KeyCode::Char('/' | 'f') => {
                self.open_prompt(Prompt::Filter, self.filter_text.clone());
                None
            }
            KeyCode::Char('c') => self.set_filter(String::new()),
            KeyCode::Char('r') => {
                let sequence = self.target_sequence()?;
                self.confirm = Some(Confirm::Replay { sequence });
                None
            }
            KeyCode::Char('d') => {
                let sequence = self.target_sequence()?;
                self.open_prompt(Prompt::DiscardReason { sequence }, String::new());
                None
            }
            KeyCode::Char('B') => {
                if self.bulk_running {
                    self.message = Some(("a bulk replay is already running (x stops it)".into(), false));
                } else if self.letters.is_empty() {
                    self.message = Some(("no dead letters match the filter".into(), false));
                } else {
                    self.open_prompt(Prompt::BulkRate, format!("{DEFAULT_RATE}"));
                }
                None
            }
            KeyCode::Char('x') if self.bulk_running => Some(Action::CancelBulk),
            code => {
                self.selected = moved(self.selected, self.letters.len(), code);
                None
            }
        }
    }

    /// The letter an action on the dead-letter screen means: the open one, else the cursor's.
    fn target_sequence(&self) -> Option<u64> {
        self.detail_open.or_else(|| self.current_letter().map(|l| l.sequence))
    }

    fn set_filter(&mut self, text: String) -> Option<Action> {
        match parse_filter(&text) {
            Ok(filter) => {
                self.filter = filter;
                self.filter_text = text;
                self.selected = 0;
                self.letters_loaded = false;
                self.detail_open = None;
                self.detail = None;
                self.waiting_letters = true;
                Some(Action::LoadLetters(self.filter.clone()))
            }
            Err(e) => {
                self.message = Some((e, false));
                None
            }
        }
    }

    fn on_prompt_key(&mut self, key: KeyEvent) -> Option<Action> {
        match key.code {
            KeyCode::Esc => {
                self.prompt = None;
                self.input.clear();
                None
            }
            KeyCode::Backspace => {
                self.input.pop();
                None
            }
            KeyCode::Char(c) => {
                self.input.push(c);
                None
            }
            KeyCode::Enter => {
                let prompt = self.prompt.take()?;
                let input = std::mem::take(&mut self.input);
                match prompt {
                    Prompt::Filter => self.set_filter(input.trim().to_owned()),
                    Prompt::DiscardReason { sequence } => {
                        if input.trim().is_empty() {
                            self.message = Some(("a discard needs a reason".into(), false));
                        } else {
                            self.confirm =
                                Some(Confirm::Discard { sequence, reason: input.trim().to_owned() });
                        }
                        None
                    }
                    Prompt::BulkRate => {
                        match input.trim().parse::<f64>() {
                            Ok(rate)
                                if (herald_shared::dlq::MIN_RATE..=herald_shared::dlq::MAX_RATE)
                                    .contains(&rate) =>
                            {
                                self.confirm = Some(Confirm::BulkReplay {
                                    filter: self.filter.clone(),
                                    rate,
                                    count: self.letters.len(),
                                });
                            }
                            _ => {
                                self.message = Some((
                                    format!(
                                        "the rate is letters per second, from {} to {}",
                                        herald_shared::dlq::MIN_RATE,
                                        herald_shared::dlq::MAX_RATE
                                    ),
                                    false,
                                ));
                            }
                        }
                        None
                    }
                    Prompt::Lookup => {
                        let id = input.trim().to_owned();
                        if id.is_empty() {
                            return None;
                        }
                        self.lookup_id = id.clone();
                        self.lookup = None;
                        Some(Action::Lookup(id))
                    }
                }
            }
            _ => None,
        }
    }

    fn on_confirm_key(&mut self, key: KeyEvent) -> Option<Action> {
        match key.code {
            KeyCode::Char('y' | 'Y') | KeyCode::Enter => {
                let confirm = self.confirm.take()?;
                Some(match confirm {
                    Confirm::Replay { sequence } => {
                        self.message = Some((format!("replaying dead letter {sequence}…"), true));
                        Action::Replay(sequence)
                    }
                    Confirm::Discard { sequence, reason } => {
                        self.message = Some((format!("discarding dead letter {sequence}…"), true));
                        Action::Discard { sequence, reason }
                    }
                    Confirm::BulkReplay { filter, rate, .. } => {
                        self.bulk_running = true;
                        self.bulk = Some(Progress::default());
                        Action::BulkReplay { filter, rate }
                    }
                })
            }
            KeyCode::Char('n' | 'N' | 'q') | KeyCode::Esc => {
                self.confirm = None;
                None
            }
            _ => None,
        }
    }
}

/// Moves a cursor over `len` rows.
fn moved(at: usize, len: usize, code: KeyCode) -> usize {
    let last = len.saturating_sub(1);
    match code {
        KeyCode::Down | KeyCode::Char('j') => (at + 1).min(last),
        KeyCode::Up | KeyCode::Char('k') => at.saturating_sub(1),
        KeyCode::PageDown => (at + 10).min(last),
        KeyCode::PageUp => at.saturating_sub(10),
        KeyCode::Home | KeyCode::Char('g') => 0,
        KeyCode::End | KeyCode::Char('G') => last,
        _ => at.min(last),
    }
}

/// Reads the filter prompt: `key:value` words narrow by that field (`channel`, `reason`,
/// `class`, `tenant`, `id`, `older`, `newer`), every other word is text the last error contains.
pub fn parse_filter(text: &str) -> Result<Filter, String> {
    let mut filter = Filter::default();
    let mut words = Vec::new();
    for word in text.split_whitespace() {
        let Some((key, value)) = word.split_once(':') else {
            words.push(word);
            continue;
        };
        match key {
            "channel" | "ch" => {
                filter.channel =
                    Some(value.parse::<Channel>().map_err(|_| format!("unknown channel {value:?}"))?);
            }
            "reason" => {
                filter.reason = Some(Reason::parse(value).ok_or(format!("unknown reason {value:?}"))?)
            }
            "class" => {
                filter.error_class = Some(match value {
                    "transient" => ErrorClass::Transient,
                    "permanent" => ErrorClass::Permanent,
                    _ => return Err(format!("unknown error class {value:?} (transient or permanent)")),
                })
            }
            "tenant" => filter.tenant = Some(value.to_owned()),
            "id" => filter.notification_id = Some(value.to_owned()),
            "older" => filter.older_than = Some(parse_duration(value).map_err(|e| format!("older: {e}"))?),
            "newer" => filter.newer_than = Some(parse_duration(value).map_err(|e| format!("newer: {e}"))?),
            // Error texts contain colons ("HTTP 503: …"): an unknown key is text.
            _ => words.push(word),
        }
    }
    if !words.is_empty() {
        filter.text = Some(words.join(" "));
    }
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn typed(app: &mut App, text: &str) -> Option<Action> {
        let mut last = None;
        for c in text.chars() {
            last = app.on_key(key(KeyCode::Char(c)));
        }
        last
    }

    fn letter(sequence: u64) -> Letter {
        Letter {
            sequence,
            channel: Some(Channel::Webhook),
            dead_at: Utc::now(),
            parked: None,
            notification_id: Some(format!("n{sequence}")),
            tenant: None,
            correlation_id: None,
            original_msg_id: None,
            truncated_from: None,
            headers: vec![],
            payload: Default::default(),
            decode_error: None,
        }
    }

    fn with_letters() -> App {
        let mut app = App::new("nats://x", Utc::now());
        app.apply(Update::Connected);
        assert_eq!(app.on_key(key(KeyCode::Char('3'))), Some(Action::LoadLetters(Filter::default())));
        app.apply(Update::Letters(
            Filter::default(),
            Ok(Page { letters: vec![letter(4), letter(7)], next: None }),
        ));
        app
    }

    #[test]
    fn tabs_switch_by_number_and_tab_and_q_quits() {
        let mut app = App::new("nats://x", Utc::now());
        app.on_key(key(KeyCode::Char('2')));
        assert_eq!(app.tab, Tab::Retries);
        app.on_key(key(KeyCode::Tab));
        assert_eq!(app.tab, Tab::DeadLetters);
        app.on_key(key(KeyCode::BackTab));
        app.on_key(key(KeyCode::BackTab));
        assert_eq!(app.tab, Tab::Overview);
        app.on_key(key(KeyCode::Char('?')));
        assert!(app.help);
        // The overlay swallows the next key, even `q`.
        app.on_key(key(KeyCode::Char('q')));
        assert!(!app.help && !app.quit);
        app.on_key(key(KeyCode::Char('q')));
        assert!(app.quit);
    }

    #[test]
    fn replay_needs_a_confirmation() {
        let mut app = with_letters();
        app.on_key(key(KeyCode::Down));
        assert_eq!(app.on_key(key(KeyCode::Char('r'))), None);
        assert_eq!(app.confirm, Some(Confirm::Replay { sequence: 7 }));
        assert_eq!(app.on_key(key(KeyCode::Char('n'))), None);
        assert_eq!(app.confirm, None);
        app.on_key(key(KeyCode::Char('r')));
        assert_eq!(app.on_key(key(KeyCode::Char('y'))), Some(Action::Replay(7)));
    }

    #[test]
    fn discard_asks_for_a_reason_then_a_confirmation() {
        let mut app = with_letters();
        app.on_key(key(KeyCode::Char('d')));
        assert_eq!(app.prompt, Some(Prompt::DiscardReason { sequence: 4 }));
        // An empty reason is refused.
        app.on_key(key(KeyCode::Enter));
        assert!(app.confirm.is_none() && app.message.as_ref().is_some_and(|(_, ok)| !ok));
        app.on_key(key(KeyCode::Char('d')));
        typed(&mut app, "test data");
        app.on_key(key(KeyCode::Enter));
        assert_eq!(app.confirm, Some(Confirm::Discard { sequence: 4, reason: "test data".into() }));
        assert_eq!(
            app.on_key(key(KeyCode::Enter)),
            Some(Action::Discard { sequence: 4, reason: "test data".into() })
        );
    }

    #[test]
    fn the_filter_prompt_reloads_with_the_parsed_filter() {
        let mut app = with_letters();
        app.waiting_letters = false;
        app.on_key(key(KeyCode::Char('/')));
        typed(&mut app, "reason:rejected HTTP 410");
        let action = app.on_key(key(KeyCode::Enter));
        let want =
            Filter { reason: Some(Reason::Rejected), text: Some("HTTP 410".into()), ..Default::default() };
        assert_eq!(action, Some(Action::LoadLetters(want.clone())));
        assert_eq!(app.filter, want);
        // A late answer for the old filter is ignored.
        app.apply(Update::Letters(Filter::default(), Ok(Page { letters: vec![letter(1)], next: None })));
        assert_eq!(app.letters.len(), 2);
        assert!(parse_filter("channel:pigeon").is_err());
        assert_eq!(parse_filter("older:10m").unwrap().older_than, Some(std::time::Duration::from_secs(600)));
    }

    #[test]
    fn bulk_replay_asks_a_rate_and_can_be_cancelled() {
        let mut app = with_letters();
        app.on_key(key(KeyCode::Char('B')));
        assert_eq!(app.prompt, Some(Prompt::BulkRate));
        app.input.clear();
        typed(&mut app, "5");
        app.on_key(key(KeyCode::Enter));
        assert_eq!(app.confirm, Some(Confirm::BulkReplay { filter: Filter::default(), rate: 5.0, count: 2 }));
        assert_eq!(
            app.on_key(key(KeyCode::Char('y'))),
            Some(Action::BulkReplay { filter: Filter::default(), rate: 5.0 })
        );
        assert_eq!(app.on_key(key(KeyCode::Char('x'))), Some(Action::CancelBulk));
        app.apply(Update::Bulk(Progress { matched: 2, done: 2, finished: true, ..Default::default() }));
        assert!(!app.bulk_running);
    }

    #[test]
    fn the_detail_pane_opens_scrolls_and_closes() {
        let mut app = with_letters();
        assert_eq!(app.on_key(key(KeyCode::Enter)), Some(Action::LoadDetail(4)));
        app.on_key(key(KeyCode::Char('j')));
        assert_eq!(app.detail_scroll, 1);
        // Actions there mean the open letter.
        app.on_key(key(KeyCode::Char('r')));
        assert_eq!(app.confirm, Some(Confirm::Replay { sequence: 4 }));
        app.on_key(key(KeyCode::Esc));
        app.on_key(key(KeyCode::Esc));
        assert_eq!(app.detail_open, None);
    }

    #[test]
    fn lookup_takes_an_id() {
        let mut app = App::new("nats://x", Utc::now());
        app.on_key(key(KeyCode::Char('4')));
        app.on_key(key(KeyCode::Enter));
        typed(&mut app, "abc-1");
        assert_eq!(app.on_key(key(KeyCode::Enter)), Some(Action::Lookup("abc-1".into())));
        // Number keys type into the prompt instead of switching tabs.
        app.on_key(key(KeyCode::Enter));
        app.input.clear();
        typed(&mut app, "12");
        assert_eq!(app.tab, Tab::Lookup);
    }
}

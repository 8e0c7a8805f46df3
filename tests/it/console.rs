//! `herald console`: every screen drawn from a real stack into ratatui's `TestBackend` and
//! compared with a stored snapshot, and the real binary driven through a pseudo-terminal.

use std::{
    io::{Read, Write},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use herald_console::{
    App, Source, Tab, Update, draw, load_detail, load_history, load_letters, load_overview, lookup,
};
use herald_shared::config;
use ratatui::{Terminal, backend::TestBackend};

use crate::support::{Reply, Sink, Stack, eventually, webhook_body};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");
const WAIT: Duration = Duration::from_secs(30);

/// The drawn screen as text, one line per row, with what differs between runs masked: the
/// known notification ids become their names (padded to an id's width so columns stay put), any
/// other UUID and every RFC 3339 timestamp become placeholders, and sink URLs lose their port.
fn screen(app: &App, width: u16, height: u16, names: &[(String, &str)], sinks: &[(&str, &str)]) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|frame| draw(frame, app)).unwrap();
    let buffer = terminal.backend().buffer();
    let mut text = String::new();
    for y in 0..height {
        for x in 0..width {
            text.push_str(buffer[(x, y)].symbol());
        }
        text.push('\n');
    }
    for (id, name) in names {
        text = text.replace(id.as_str(), &format!("{:<36}", format!("<{name}>")));
    }
    for (url, name) in sinks {
        text = text.replace(url, name);
    }
    mask_timestamps(&mask_uuids(&text))
}

fn mask_uuids(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if i + 36 <= chars.len() && is_uuid(&chars[i..i + 36]) {
            out.push_str(&format!("{:<36}", "<uuid>"));
            i += 36;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn is_uuid(c: &[char]) -> bool {
    c.iter()
        .enumerate()
        .all(|(i, ch)| if [8, 13, 18, 23].contains(&i) { *ch == '-' } else { ch.is_ascii_hexdigit() })
}

fn mask_timestamps(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let digits =
        |from: usize, n: usize| (from..from + n).all(|j| chars.get(j).is_some_and(char::is_ascii_digit));
    while i < chars.len() {
        let starts = digits(i, 4)
            && chars.get(i + 4) == Some(&'-')
            && digits(i + 5, 2)
            && chars.get(i + 7) == Some(&'-')
            && digits(i + 8, 2)
            && chars.get(i + 10) == Some(&'T');
        if starts {
            let mut j = i + 11;
            while chars.get(j).is_some_and(|c| c.is_ascii_digit() || ":.+-Z".contains(*c)) {
                j += 1;
            }
            // Padded to the length it hides, so whatever follows on the line stays put.
            out.push_str(&format!("{:<w$}", "<timestamp>", w = j - i));
            i = j;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// A stack with a little of everything: three delivered, one being retried (an hour's backoff
/// keeps it there), two dead letters. Each step waits for the last, so sequences are stable.
struct Scene {
    stack: Stack,
    names: Vec<(String, &'static str)>,
    sinks: Vec<(String, &'static str)>,
    retrying: String,
    dead: [String; 2],
    _sinks: [Sink; 3],
}

async fn scene() -> Scene {
    let stack = Stack::start_with(&[(config::RETRY_BACKOFF, "1h")]).await;
    let ok = Sink::ok().await;
    let unavailable = Sink::start(vec![], Reply::Status(503)).await;
    let gone = Sink::start(vec![], Reply::Status(410)).await;
    let mut names = Vec::new();
    for name in ["delivered-1", "delivered-2", "delivered-3"] {
        let id = stack.send(webhook_body(&ok.url), None).await;
        stack.wait_status(&id, "delivered").await;
        names.push((id, name));
    }
    let retrying = stack.send(webhook_body(&unavailable.url), None).await;
    stack.wait_status(&retrying, "retrying").await;
    names.push((retrying.clone(), "retrying"));
    let mut dead = Vec::new();
    for (n, name) in ["dead-1", "dead-2"].into_iter().enumerate() {
        let id = stack.send(webhook_body(&gone.url), None).await;
        stack.wait_status(&id, "dead_lettered").await;
        stack.wait_dead_letters(n + 1).await;
        names.push((id.clone(), name));
        dead.push(id);
    }
    let sinks = vec![
        (ok.url.clone(), "http://<ok-sink>/hook"),
        (unavailable.url.clone(), "http://<503-sink>/hook"),
        (gone.url.clone(), "http://<410-sink>/hook"),
    ];
    Scene { stack, names, sinks, retrying, dead: dead.try_into().unwrap(), _sinks: [ok, unavailable, gone] }
}

#[tokio::test]
async fn every_screen_matches_its_snapshot_at_two_sizes() {
    let scene = scene().await;
    let source = Source::connect(&scene.stack.config, Duration::from_secs(10)).await.unwrap();
    let mut app = App::new("nats", Utc::now());
    app.redact = true;
    app.apply(Update::Connected);

    // Wait until the server's numbers have settled on what the scene did.
    let overview = eventually(WAIT, "the overview to settle", || async {
        let o = load_overview(&source).await;
        let webhook = o.channels.first()?.1.clone()?;
        let stream = |name: &str| o.streams.iter().find(|s| s.name == name).map(|s| s.messages);
        let settled = o.error.is_none()
            && webhook.pending == 0
            // The retry an hour away waits outside the consumer, as a scheduled copy.
            && webhook.in_flight == 0
            && stream("HERALD_DLQ") == Some(2)
            // The server reports each terminated message on its own time.
            && stream("HERALD_ADVISORIES") == Some(2)
            && stream("HERALD_STATUS") == Some(6);
        settled.then_some(o)
    })
    .await;
    app.apply(Update::Overview(overview));
    let events = eventually(WAIT, "six status events", || async {
        let events = load_history(&source, herald_console::HISTORY).await.ok()?;
        (events.len() == 6).then_some(events)
    })
    .await;
    app.apply(Update::Events(events));
    let page = load_letters(&source, &Default::default()).await.unwrap();
    let first = page.letters[0].sequence;
    app.apply(Update::Letters(Default::default(), Ok(page)));
    let found = lookup(&source, &scene.dead[0]).await.unwrap();
    app.lookup_id = scene.dead[0].clone();
    app.apply(Update::Lookup(scene.dead[0].clone(), Ok(found)));
    let detail = load_detail(&source, first).await.unwrap();
    assert!(detail.is_some());
    assert_eq!(app.history.retrying.keys().next().map(|(id, _)| id.as_str()), Some(scene.retrying.as_str()));

    let sinks: Vec<(&str, &str)> = scene.sinks.iter().map(|(u, n)| (u.as_str(), *n)).collect();
    let check = |app: &App, name: &str| {
        for (w, h) in [(80, 24), (160, 48)] {
            let text = screen(app, w, h, &scene.names, &sinks);
            insta::assert_snapshot!(format!("{name}_{w}x{h}"), text);
        }
    };
    app.now = Utc::now();
    app.tab = Tab::Overview;
    check(&app, "overview");
    app.tab = Tab::Retries;
    check(&app, "retries");
    app.tab = Tab::DeadLetters;
    check(&app, "dead_letters");
    app.detail_open = Some(first);
    app.apply(Update::Detail(first, Box::new(Ok(detail))));
    check(&app, "dead_letter_detail");
    // Over the list, not the detail: a dialog over an id or a time would leave a piece of it
    // that no mask recognises.
    app.detail_open = None;
    app.confirm = Some(herald_console::Confirm::Replay { sequence: first });
    check(&app, "replay_confirmation");
    app.confirm = None;
    app.tab = Tab::Lookup;
    check(&app, "lookup");
    app.tab = Tab::Overview;
    app.help = true;
    check(&app, "help");
}

/// The screen of a program running in a pseudo-terminal, parsed as a terminal would.
struct Pty {
    parser: Arc<Mutex<vt100::Parser>>,
    writer: Box<dyn Write + Send>,
    child: Box<dyn portable_pty::Child + Send + Sync>,
}

impl Pty {
    fn spawn(args: &[&str], env: &[(&str, String)], rows: u16, cols: u16) -> Pty {
        use portable_pty::{CommandBuilder, PtySize, native_pty_system};
        let pair =
            native_pty_system().openpty(PtySize { rows, cols, pixel_width: 0, pixel_height: 0 }).unwrap();
        let mut cmd = CommandBuilder::new(HERALD);
        cmd.args(args);
        cmd.env("TERM", "xterm-256color");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = pair.slave.spawn_command(cmd).unwrap();
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().unwrap();
        let writer = pair.master.take_writer().unwrap();
        let parser =
            Arc::new(Mutex::new(vt100::Parser::new(rows.try_into().unwrap(), cols.try_into().unwrap(), 0)));
        let sink = parser.clone();
        std::thread::spawn(move || {
            // The master must outlive the reads; it is kept by this thread.
            let _master = pair.master;
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().process(&buf[..n]);
            }
        });
        Pty { parser, writer, child }
    }

    fn contents(&self) -> String {
        self.parser.lock().unwrap().screen().contents()
    }

    fn keys(&mut self, keys: &str) {
        self.writer.write_all(keys.as_bytes()).unwrap();
        self.writer.flush().unwrap();
    }

    async fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if check(&self.contents()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(found.is_ok(), "timed out waiting for {what}; the screen:\n{}", self.contents());
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[tokio::test]
async fn an_operator_replays_a_dead_letter_from_the_console() {
    let stack = Stack::start().await;
    // Refuses each of three for good (dead letters at once), then accepts the replays.
    let sink = Sink::start(vec![Reply::Status(410); 3], Reply::Status(200)).await;
    let mut ids = Vec::new();
    for n in 1..=3 {
        let id = stack.send(webhook_body(&sink.url), None).await;
        stack.wait_status(&id, "dead_lettered").await;
        stack.wait_dead_letters(n).await;
        ids.push(id);
    }
    let id = ids[0].clone();

    let env = [
        (config::NATS_URL, stack.config.nats_urls.join(",")),
        (config::NATS_TIMEOUT, "1s".to_owned()),
        ("USER", "pty-test".to_owned()),
    ];
    let mut pty = Pty::spawn(&["console"], &env, 24, 100);
    pty.wait_for("the console to connect", |s| s.contains("NATS connected")).await;
    pty.keys("3");
    pty.wait_for("the dead letter on the list", |s| s.contains(&id)).await;
    pty.keys("r");
    pty.wait_for("the confirmation", |s| s.contains("Replay dead letter")).await;
    pty.keys("y");
    pty.wait_for("the replay to be reported", |s| s.contains("requeued")).await;

    let got = sink.wait_for(4).await;
    assert_eq!(got[3].body["id"], id.as_str());
    stack.wait_status(&id, "delivered").await;
    pty.wait_for("the list to lose the replayed letter", |s| !s.contains(&id) && s.contains(&ids[1])).await;

    // The other two in one go, at the offered rate, with a progress display.
    pty.keys("B");
    pty.wait_for("the rate prompt", |s| s.contains("how many per second")).await;
    pty.keys("\r");
    pty.wait_for("the bulk confirmation", |s| s.contains("Replay every dead letter")).await;
    pty.keys("y");
    pty.wait_for("the bulk replay to finish", |s| s.contains("Bulk replay: finished") && s.contains("2/2"))
        .await;
    for id in &ids[1..] {
        stack.wait_status(id, "delivered").await;
    }
    assert_eq!(sink.wait_for(6).await.len(), 6);
    pty.wait_for("the list to empty", |s| s.contains("No dead letters match")).await;

    // The audit trail names the operator.
    let audit = eventually(WAIT, "the audit event", || async {
        let mut stream = stack.js.get_stream(herald_shared::topology::AUDIT_STREAM).await.ok()?;
        let last = stream.info().await.ok()?.state.last_sequence;
        let m = stream.get_raw_message(1).await.ok()?;
        (last >= 1).then(|| serde_json::from_slice::<serde_json::Value>(&m.payload).ok()).flatten()
    })
    .await;
    assert_eq!(audit["action"], "replay");
    assert!(audit["actor"].as_str().unwrap().starts_with("pty-test"), "{audit}");

    pty.keys("q");
    let status = eventually(WAIT, "the console to exit", || {
        let exited = pty.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "{status:?}");
    // The terminal is given back: the alternate screen is left (the last bytes the console
    // wrote may still be on their way through the reader thread when it has exited).
    let parser = pty.parser.clone();
    eventually(WAIT, "the alternate screen to be left", || {
        let left = !parser.lock().unwrap().screen().alternate_screen();
        async move { left.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn without_nats_the_console_says_so_and_still_answers_keys() {
    // A port nothing listens on.
    let url = format!("nats://127.0.0.1:{}", herald_shared::nats_server::free_port());
    let env = [(config::NATS_URL, url.clone()), (config::NATS_TIMEOUT, "1s".to_owned())];
    let mut pty = Pty::spawn(&["console"], &env, 24, 80);
    pty.wait_for("the connecting screen", |s| s.contains(&format!("Connecting to {url}"))).await;
    pty.keys("?");
    pty.wait_for("the help overlay", |s| s.contains("this help; any key closes it")).await;
    pty.keys("x");
    pty.wait_for("the overlay to close", |s| !s.contains("this help")).await;
    pty.keys("q");
    let status = eventually(WAIT, "the console to exit", || {
        let exited = pty.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "{status:?}");
}

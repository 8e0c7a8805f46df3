//! The email channel end to end, against a real SMTP server nobody here wrote: aiosmtpd
//! (PyPI), run by `tests/smtp/server.py`, which keeps every accepted message with Python's own
//! parse of it and answers some recipients with the failures real servers give.
//!
//! Without aiosmtpd installed these tests say SKIPPED and pass, except under `CI=true`, where
//! they fail: CI installs it (`python3 -m pip install aiosmtpd`).

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use herald_shared::{config, deadletter::headers as dlq};
use poem::http::StatusCode;
use serde_json::{Value, json};

use crate::reference::call;
use crate::support::{Stack, TENANT, eventually, header};

/// One aiosmtpd server, killed on drop.
struct Smtp {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

/// One message the server accepted, as Python's email package reads it.
#[derive(Debug)]
struct Saved {
    rcpt_tos: Vec<String>,
    mail_from: String,
    raw: String,
    content_type: String,
    headers: Vec<(String, String)>,
    /// Leaf parts: (content type, decoded content).
    parts: Vec<(String, String)>,
}

impl Saved {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl Smtp {
    /// Starts `tests/smtp/server.py` with `args`; `None` when aiosmtpd is not installed and
    /// this is not CI (the test then returns, having said so).
    fn start(args: &[&str]) -> Option<Smtp> {
        let installed = Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("aiosmtpd is not installed, and CI must run the email tests (pip install aiosmtpd)");
            }
            eprintln!("\n*** SKIPPED: aiosmtpd not installed (pip install aiosmtpd) ***\n");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smtp/server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(dir.path())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("server.py printed {line:?}, not a port"));
        Some(Smtp { port, dir, child })
    }

    /// A plain-text URL to it (the test server offers no TLS unless asked).
    fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}?tls=none", self.port)
    }

    fn messages(&self) -> Vec<Saved> {
        let mut found: Vec<(u32, Saved)> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| {
                let path = e.ok()?.path();
                let n: u32 = path.file_name()?.to_str()?.strip_suffix(".json")?.parse().ok()?;
                let v: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
                let raw = std::fs::read_to_string(path.with_extension("eml")).ok()?;
                let pairs = |v: &Value| -> Vec<(String, String)> {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|p| match p {
                            Value::Array(kv) => {
                                (kv[0].as_str().unwrap().into(), kv[1].as_str().unwrap().into())
                            }
                            o => (
                                o["content_type"].as_str().unwrap().into(),
                                o["content"].as_str().unwrap().into(),
                            ),
                        })
                        .collect()
                };
                Some((
                    n,
                    Saved {
                        rcpt_tos: serde_json::from_value(v["rcpt_tos"].clone()).unwrap(),
                        mail_from: v["mail_from"].as_str().unwrap().into(),
                        raw,
                        content_type: v["content_type"].as_str().unwrap().into(),
                        headers: pairs(&v["headers"]),
                        parts: pairs(&v["parts"]),
                    },
                ))
            })
            .collect();
        found.sort_by_key(|(n, _)| *n);
        found.into_iter().map(|(_, s)| s).collect()
    }

    async fn wait_for(&self, n: usize) -> Vec<Saved> {
        eventually(Duration::from_secs(15), &format!("{n} emails"), || async {
            let got = self.messages();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server or returns from the test.
macro_rules! smtp {
    ($($arg:expr),*) => {
        match Smtp::start(&[$($arg),*]) {
            Some(s) => s,
            None => return,
        }
    };
}

const FROM: &str = "Acme <noreply@acme.test>";

/// A stack whose email channel sends to `urls`, with the given extra settings.
async fn stack(urls: &str, extra: &[(&str, &str)]) -> Stack {
    let mut pairs = vec![
        (config::SMTP_URLS, urls),
        (config::EMAIL_FROM, FROM),
        // A Python server on a busy 2-core machine can take more than the tests' 300 ms.
        (config::SEND_TIMEOUT, "10s"),
    ];
    pairs.extend_from_slice(extra);
    Stack::start_with(&pairs).await
}

/// A token of the tests' tenant for notifications, users and templates.
fn token(stack: &Stack) -> String {
    crate::reference::token(stack, TENANT)
}

/// An inline email to `to`.
fn inline(to: &str) -> Value {
    json!({
        "recipient": {"email": to},
        "channels": ["email"],
        "content": {"subject": "Order 42 shipped", "body": "It is on its way."}
    })
}

/// The email channel's provider calls in the ledger record.
async fn calls(stack: &Stack, id: &str) -> Vec<Value> {
    let record = stack.record(id).await.expect("a record");
    let email = &record.channels[&herald_shared::Channel::Email];
    email.calls.iter().map(|c| serde_json::to_value(c).unwrap()).collect()
}

#[tokio::test]
async fn an_email_by_user_and_template_arrives_with_both_parts_and_stable_ids() {
    let smtp = smtp!();
    let stack = stack(&smtp.url(), &[(config::EMAIL_REPLY_TO, "support@acme.test")]).await;
    let t = token(&stack);
    let (status, body) =
        call(&stack, "PUT", "/v1/users/42", &t, json!({"name": "Zoé", "email": "zoe@example.test"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = call(
        &stack,
        "PUT",
        "/v1/templates/order_shipped/en",
        &t,
        json!({
            "email_subject": "Order {{order}} shipped",
            "email_text": "Hi {{user.name}}, order {{order}} is on its way.",
            "email_html": "<p>Hi {{user.name}}, order <b>{{order}}</b> is on its way. {{note}}</p>",
            "email_from": "{{team}} at Acme <shipping@acme.test>",
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, answer) = call(
        &stack,
        "POST",
        "/v1/notifications",
        &t,
        json!({
            "recipient": {"user_id": "42"},
            "channels": ["email"],
            "template": "order_shipped",
            "data": {"order": 1234, "team": "Shipping", "note": "<script>x</script>"}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let correlation = answer["correlation_id"].as_str().unwrap().to_owned();

    let got = smtp.wait_for(1).await;
    let m = &got[0];
    let message_id = format!("<{id}@acme.test>");
    assert_eq!(m.rcpt_tos, ["zoe@example.test"]);
    assert_eq!(m.mail_from, "shipping@acme.test");
    assert_eq!(m.header("From"), Some("Shipping at Acme <shipping@acme.test>"), "the template's sender");
    assert_eq!(m.header("To"), Some("zoe@example.test"));
    assert_eq!(m.header("Subject"), Some("Order 1234 shipped"));
    assert_eq!(m.header("Reply-To"), Some("support@acme.test"), "the configured Reply-To");
    assert_eq!(m.header("Message-ID"), Some(message_id.as_str()));
    assert_eq!(m.header("Herald-Notification-Id"), Some(id.as_str()));
    assert_eq!(m.header("Herald-Correlation-Id"), Some(correlation.as_str()));
    assert_eq!(m.content_type, "multipart/alternative", "{}", m.raw);
    assert_eq!(m.parts.len(), 2, "{:?}", m.parts);
    assert_eq!(m.parts[0].0, "text/plain");
    assert_eq!(m.parts[0].1.trim_end(), "Hi Zoé, order 1234 is on its way.");
    assert_eq!(m.parts[1].0, "text/html");
    assert_eq!(
        m.parts[1].1.trim_end(),
        "<p>Hi Zoé, order <b>1234</b> is on its way. &lt;script&gt;x&lt;/script&gt;</p>",
        "data is escaped in HTML"
    );

    let record = stack.wait_status(&id, "delivered").await;
    assert_eq!(record["channels"][0]["channel"], "email", "{record}");
    let calls = calls(&stack, &id).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["provider"], "smtp");
    assert_eq!(calls[0]["provider_message_id"], message_id.as_str());
    assert!(calls[0]["detail"].as_str().unwrap().starts_with("250 2.0.0 Ok: queued as"), "{calls:?}");

    // Inline content: text only, the configured sender.
    let id = stack.send(inline("ada@example.test"), None).await;
    let got = smtp.wait_for(2).await;
    let m = &got[1];
    assert_eq!(m.header("From"), Some(FROM));
    assert_eq!(m.header("Subject"), Some("Order 42 shipped"));
    assert_eq!(m.header("Message-ID"), Some(format!("<{id}@acme.test>").as_str()));
    assert_eq!(m.content_type, "text/plain");
    assert_eq!(m.parts[0].1.trim_end(), "It is on its way.");
    stack.wait_status(&id, "delivered").await;
}

#[tokio::test]
async fn a_template_sender_that_is_no_mailbox_is_refused_when_rendered() {
    let smtp = smtp!();
    let stack = stack(&smtp.url(), &[]).await;
    let t = token(&stack);
    call(&stack, "PUT", "/v1/users/7", &t, json!({"email": "bo@example.test"})).await;
    let (status, body) = call(
        &stack,
        "PUT",
        "/v1/templates/hostile/en",
        &t,
        json!({"email_subject": "Hi", "email_text": "Hello", "email_from": "{{from}}"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, answer) = call(
        &stack,
        "POST",
        "/v1/notifications",
        &t,
        json!({
            "recipient": {"user_id": "7"},
            "channels": ["email"],
            "template": "hostile",
            "data": {"from": "x@acme.test\r\nBcc: everyone@example.test"}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let id = answer["id"].as_str().unwrap();
    let record = stack.wait_status(id, "dead_lettered").await;
    assert!(record["channels"][0]["last_error"].as_str().unwrap().contains("email_from"), "{record}");
    assert!(smtp.messages().is_empty());
}

#[tokio::test]
async fn a_550_is_dead_lettered_at_once_with_the_servers_reply() {
    let smtp = smtp!();
    let stack = stack(&smtp.url(), &[]).await;
    let id = stack.send(inline("bounce@example.test"), None).await;
    let record = stack.wait_status(&id, "dead_lettered").await;
    let channel = &record["channels"][0];
    assert_eq!(channel["attempts"], 1, "no retry: {record}");
    let last_error = channel["last_error"].as_str().unwrap();
    assert!(last_error.contains("550 5.1.1 mailbox unavailable"), "{last_error}");
    let dl = stack.wait_dead_letters(1).await;
    assert_eq!(header(&dl[0], dlq::ERROR_CLASS), "permanent");
    assert_eq!(header(&dl[0], dlq::ATTEMPTS), "1");
    assert_eq!(header(&dl[0], dlq::ORIGINAL_SUBJECT), "herald.intent.email");
    assert!(header(&dl[0], dlq::LAST_ERROR).contains("550 5.1.1 mailbox unavailable"), "{dl:?}");
    let calls = calls(&stack, &id).await;
    assert_eq!(calls.len(), 1, "a permanent failure does not fail over: {calls:?}");
    assert_eq!(calls[0]["failure"], "invalid_recipient");
    assert!(smtp.messages().is_empty());
}

#[tokio::test]
async fn a_451_is_retried_and_then_delivered() {
    let smtp = smtp!("--later", "2");
    let stack = stack(&smtp.url(), &[(config::RETRY_BACKOFF, "200ms")]).await;
    let id = stack.send(inline("later@example.test"), None).await;
    let record = stack.wait_status(&id, "delivered").await;
    assert_eq!(record["channels"][0]["attempts"], 3, "{record}");
    assert!(
        record["channels"][0]["last_error"].as_str().unwrap().contains("451 4.3.0 try again later"),
        "{record}"
    );
    let got = smtp.wait_for(1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].header("Message-ID"),
        Some(format!("<{id}@acme.test>").as_str()),
        "the same on every try"
    );
    let events = stack.status_events().await;
    let outcomes: Vec<&str> = events.iter().map(|(s, _)| s.rsplit('.').next().unwrap()).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "retrying").count(), 2, "{events:?}");
    assert_eq!(outcomes.last(), Some(&"delivered"), "{events:?}");
}

#[tokio::test]
async fn a_failing_server_fails_over_to_the_next() {
    let down = smtp!("--down");
    let up = smtp!();
    // A closed port, a server answering 421, then one that works.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let urls = format!("smtp://127.0.0.1:{closed}?tls=none,{},{}", down.url(), up.url());
    let stack = stack(&urls, &[]).await;
    let id = stack.send(inline("ada@example.test"), None).await;
    let record = stack.wait_status(&id, "delivered").await;
    assert_eq!(record["channels"][0]["attempts"], 1, "one attempt, three calls: {record}");
    let calls = calls(&stack, &id).await;
    let providers: Vec<&str> = calls.iter().map(|c| c["provider"].as_str().unwrap()).collect();
    assert_eq!(providers, ["smtp", "smtp-2", "smtp-3"], "{calls:?}");
    assert_eq!(calls[0]["failure"], "connection", "{calls:?}");
    assert_eq!(calls[1]["failure"], "unavailable", "{calls:?}");
    assert!(calls[1]["error"].as_str().unwrap().contains("421 4.3.2"), "{calls:?}");
    assert_eq!(calls[2]["provider_message_id"], format!("<{id}@acme.test>").as_str());
    assert_eq!(up.wait_for(1).await.len(), 1);
    assert!(down.messages().is_empty());
}

#[tokio::test]
async fn hostile_addresses_are_refused_at_the_gateway() {
    let smtp = smtp!();
    let stack = stack(&smtp.url(), &[]).await;
    for to in [
        "ada@example.test\r\nBcc: everyone@example.test",
        "ada@example.test\nBcc: everyone@example.test",
        "no-at-sign.example.test",
        "ada@",
        "@example.test",
        "Ada <ada@example.test>",
        "ada@example.test, bob@example.test",
        "\"quoted\"@example.test",
        &format!("{}@example.test", "a".repeat(65)),
        &format!("ada@{}.test", "d".repeat(250)),
    ] {
        let (status, answer) = stack.post(inline(to), None).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{to:?}: {answer}");
        assert_eq!(answer["field"], "recipient.email", "{to:?}: {answer}");
    }
    let mut intents = stack.js.get_stream("HERALD_INTENTS").await.unwrap();
    assert_eq!(intents.info().await.unwrap().state.messages, 0);
    // A subject cannot carry headers either (the message is refused, never sent).
    let mut body = inline("ada@example.test");
    body["content"]["subject"] = json!("Hi\r\nBcc: everyone@example.test");
    let (status, answer) = stack.post(body, None).await;
    if status == StatusCode::ACCEPTED {
        let id = answer["id"].as_str().unwrap();
        let record = stack.wait_status(id, "dead_lettered").await;
        assert!(record["channels"][0]["last_error"].as_str().unwrap().contains("line break"), "{record}");
    } else {
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    }
    assert!(smtp.messages().is_empty());
}

/// Collects every log line written while it is the thread's default subscriber (the tests'
/// runtime runs every task on the test's thread).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_smtp_password_appears_in_no_record_letter_or_log() {
    const PASSWORD: &str = "Wr0ng-S3cret-hunter2";
    let smtp = smtp!("--password", "the-right-one");
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // A login to a port nobody listens on, then to a server that refuses the password.
    let urls = format!(
        "smtp://mailer%40acme.test@127.0.0.1:{closed}?tls=none,smtp://mailer%40acme.test@127.0.0.1:{}?tls=none",
        smtp.port
    );
    let stack = stack(&urls, &[(config::SMTP_PASSWORD, PASSWORD)]).await;
    let id = stack.send(inline("ada@example.test"), None).await;
    let record = stack.wait_status(&id, "dead_lettered").await;
    let last_error = record["channels"][0]["last_error"].as_str().unwrap();
    assert!(last_error.contains("535"), "{last_error}");
    let calls = calls(&stack, &id).await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["failure"], "connection", "{calls:?}");
    assert_eq!(calls[1]["failure"], "unauthorized", "{calls:?}");

    let dl = stack.wait_dead_letters(1).await;
    let ledger = serde_json::to_string(&stack.record(&id).await).unwrap();
    let events = format!("{:?}", stack.status_events().await);
    let letters: String =
        dl.iter().map(|m| format!("{:?} {}", m.headers, String::from_utf8_lossy(&m.payload))).collect();
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(logged.contains(&id), "the logs were captured: {logged}");
    // PLAIN and LOGIN send the password base64-encoded; neither form may leak.
    let plain = base64(format!("\0mailer@acme.test\0{PASSWORD}").as_bytes());
    let login = base64(PASSWORD.as_bytes());
    for (what, text) in [
        ("record", record.to_string()),
        ("ledger", ledger),
        ("events", events),
        ("letters", letters),
        ("logs", logged),
    ] {
        for secret in [PASSWORD, plain.as_str(), login.as_str()] {
            assert!(!text.contains(secret), "the password is in the {what}: {text}");
        }
    }
    assert!(smtp.messages().is_empty());
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A private CA and a certificate it signed for 127.0.0.1, made with the openssl CLI: (CA PEM
/// path, certificate path, key path).
fn certificates(dir: &Path) -> (String, String, String) {
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let (ca, ca_key, cert, key, csr, ext) = (
        path("ca.pem"),
        path("ca.key"),
        path("cert.pem"),
        path("cert.key"),
        path("cert.csr"),
        path("ext.cnf"),
    );
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n").unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=Herald test CA",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &key,
        "-out",
        &csr,
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &ext,
        "-out",
        &cert,
    ]);
    (ca, cert, key)
}

#[tokio::test]
async fn starttls_is_required_and_checked_against_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let plain = smtp!();
    let tls = smtp!("--cert", &cert, "--key", &key);
    // The first server offers no STARTTLS, so a `smtp://` URL must refuse it rather than send
    // in the clear; the second offers it with a certificate of the test's CA.
    let urls = format!("smtp://127.0.0.1:{},smtp://127.0.0.1:{}", plain.port, tls.port);
    let stack = stack(&urls, &[(config::SMTP_CA_FILE, &ca)]).await;
    let id = stack.send(inline("ada@example.test"), None).await;
    stack.wait_status(&id, "delivered").await;
    let calls = calls(&stack, &id).await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["failure"], "connection", "{calls:?}");
    assert_eq!(calls[1]["provider"], "smtp-2", "{calls:?}");
    let got = tls.wait_for(1).await;
    let saved: Value =
        serde_json::from_slice(&std::fs::read(tls.dir.path().join("1.json")).unwrap()).unwrap();
    assert_eq!(saved["tls"], true, "the message went over TLS");
    assert_eq!(got[0].header("Message-ID"), Some(format!("<{id}@acme.test>").as_str()));
    assert!(plain.messages().is_empty(), "nothing in the clear");
}

//! SMS through a stand-in Twilio: a real HTTP server in the test process that checks each
//! request as Twilio documents the Messages resource (path with the account SID, basic auth,
//! a form body with `To`, `Body` and `From`) and answers with Twilio's documented bodies: the
//! message resource on `201`, `{code, message, more_info, status}` on errors. It answers by the
//! `To` number, so one stack shows every error class side by side.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine;
use herald_shared::{config, deadletter::headers as dlq};
use poem::{
    EndpointExt, Request, Response, Route, handler, http::StatusCode, listener::TcpAcceptor, web::Data,
};
use serde_json::{Value, json};

use crate::support::{Stack, header};

pub const ACCOUNT_SID: &str = "AC00000000000000000000000000000001";
/// Looks like a real token so a leak would be easy to spot in any text.
pub const AUTH_TOKEN: &str = "twilio-test-token-5f0c1d7e9a";
const FROM: &str = "+15005550006";

/// How the stand-in answers one request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// `201` with the message resource.
    Created,
    /// Twilio's error document with `code` and HTTP `status`, and `Retry-After` if given.
    Error { status: u16, code: u32, retry_after: Option<u64> },
    /// A bare HTTP status with a non-JSON body (an outage in front of the API).
    Bare(u16),
}

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct Sent {
    pub form: HashMap<String, String>,
    /// What was wrong with the request, measured against Twilio's documentation.
    pub problems: Vec<String>,
    pub sid: Option<String>,
    pub at: Instant,
}

#[derive(Default)]
struct State {
    /// Answers by `To` number, in order; `Created` when none is left.
    script: Mutex<HashMap<String, VecDeque<Answer>>>,
    sent: Mutex<Vec<Sent>>,
}

pub struct Twilio {
    pub url: String,
    state: Arc<State>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Twilio {
    pub async fn start(script: &[(&str, Vec<Answer>)]) -> Twilio {
        let state = Arc::new(State::default());
        state
            .script
            .lock()
            .unwrap()
            .extend(script.iter().map(|(to, answers)| (to.to_string(), answers.iter().cloned().collect())));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Route::new().at("/*path", messages).data(state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let acceptor = TcpAcceptor::from_tokio(listener).unwrap();
        tokio::spawn(async move {
            let _ = poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    app.map_to_response(),
                    async {
                        let _ = rx.await;
                    },
                    None,
                )
                .await;
        });
        Twilio { url, state, _stop: tx }
    }

    /// The requests for `to`, in order.
    pub fn sent_to(&self, to: &str) -> Vec<Sent> {
        self.state
            .sent
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.form.get("To").is_some_and(|t| t == to))
            .cloned()
            .collect()
    }

    /// The stack's settings for this stand-in.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            (config::TWILIO_ACCOUNT_SID, ACCOUNT_SID.to_owned()),
            (config::TWILIO_AUTH_TOKEN, AUTH_TOKEN.to_owned()),
            (config::TWILIO_FROM, FROM.to_owned()),
            (config::TWILIO_BASE_URL, self.url.clone()),
        ]
    }
}

/// Checks a request as Twilio documents `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`.
fn check(req: &Request, form: &HashMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    if req.method() != "POST" {
        problems.push(format!("method {}", req.method()));
    }
    let path = format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json");
    if req.uri().path() != path {
        problems.push(format!("path {} is not {path}", req.uri().path()));
    }
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"));
    if h("authorization") != format!("Basic {basic}") {
        problems
            .push(format!("authorization {:?} is not basic auth with the SID and token", h("authorization")));
    }
    if !h("content-type").starts_with("application/x-www-form-urlencoded") {
        problems.push(format!("content type {:?} is not a form", h("content-type")));
    }
    let to = form.get("To").map(String::as_str).unwrap_or_default();
    let e164 = to
        .strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()));
    if !e164 {
        problems.push(format!("To {to:?} is not E.164"));
    }
    if form.get("Body").is_none_or(|b| b.is_empty()) {
        problems.push("no Body".into());
    }
    if form.get("From").map(String::as_str) != Some(FROM) || form.contains_key("MessagingServiceSid") {
        problems.push(format!("From {:?} is not the configured number", form.get("From")));
    }
    let mut keys: Vec<&str> = form.keys().map(String::as_str).collect();
    keys.sort();
    if keys != ["Body", "From", "To"] {
        problems.push(format!("fields {keys:?}"));
    }
    problems
}

#[handler]
async fn messages(req: &Request, body: Vec<u8>, state: Data<&Arc<State>>) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let problems = check(req, &form);
    let to = form.get("To").cloned().unwrap_or_default();
    let answer =
        state.script.lock().unwrap().get_mut(&to).and_then(VecDeque::pop_front).unwrap_or(Answer::Created);
    let n = state.sent.lock().unwrap().len();
    let sid = matches!(answer, Answer::Created).then(|| format!("SM{n:032x}"));
    state.sent.lock().unwrap().push(Sent {
        form: form.clone(),
        problems,
        sid: sid.clone(),
        at: Instant::now(),
    });
    let json_response = |status: u16, body: Value| {
        Response::builder()
            .status(StatusCode::from_u16(status).unwrap())
            .content_type("application/json")
            .body(body.to_string())
    };
    match answer {
        Answer::Created => json_response(
            201,
            json!({
                "account_sid": ACCOUNT_SID,
                "api_version": "2010-04-01",
                "body": form.get("Body"),
                "date_created": "Thu, 24 Aug 2023 05:01:45 +0000",
                "date_sent": null,
                "date_updated": "Thu, 24 Aug 2023 05:01:45 +0000",
                "direction": "outbound-api",
                "error_code": null,
                "error_message": null,
                "from": FROM,
                "messaging_service_sid": null,
                "num_media": "0",
                "num_segments": "1",
                "price": null,
                "price_unit": "USD",
                "sid": sid,
                "status": "queued",
                "subresource_uris": {"media": format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{}/Media.json", sid.as_deref().unwrap_or_default())},
                "to": to,
                "uri": format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{}.json", sid.as_deref().unwrap_or_default()),
            }),
        ),
        Answer::Error { status, code, retry_after } => {
            let message = match code {
                21211 => format!("The 'To' number {to} is not a valid phone number."),
                21614 => format!("'To' number {to} is not a valid mobile number"),
                20429 => "Too Many Requests".to_owned(),
                20003 => "Authenticate".to_owned(),
                _ => "The message could not be sent".to_owned(),
            };
            let mut response = json_response(
                status,
                json!({"code": code, "message": message, "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status}),
            );
            if let Some(secs) = retry_after {
                response.headers_mut().insert("Retry-After", secs.to_string().parse().unwrap());
            }
            response
        }
        Answer::Bare(status) => Response::builder()
            .status(StatusCode::from_u16(status).unwrap())
            .body("<html>Service Unavailable</html>"),
    }
}

async fn stack(twilio: &Twilio) -> Stack {
    let settings = twilio.settings();
    let mut pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    pairs.extend([
        (config::RETRY_BACKOFF, "200ms"),
        (config::MAX_ATTEMPTS, "4"),
        (config::SEND_TIMEOUT, "2s"),
        // The outage cases fail several times in a row; the breaker is not what is tested here.
        (config::BREAKER, "100,30s"),
    ]);
    Stack::start_with(&pairs).await
}

fn sms(to: &str, body: &str) -> Value {
    json!({"recipient": {"phone": to}, "channels": ["sms"], "content": {"body": body}})
}

/// The calls the notification's SMS channel recorded.
async fn calls(stack: &Stack, id: &str) -> Vec<herald_shared::state::ProviderCall> {
    let record = stack.record(id).await.expect("a record");
    record.channels[&herald_shared::Channel::Sms].calls.clone()
}

#[tokio::test]
async fn an_sms_is_posted_as_twilio_documents_and_its_sid_and_segments_recorded() {
    let twilio = Twilio::start(&[]).await;
    let stack = stack(&twilio).await;
    let short = stack.send(sms("+15551230001", "Your code is 123456"), None).await;
    let long = stack.send(sms("+15551230002", &"ж".repeat(71)), None).await;
    for (id, to, segments) in
        [(&short, "+15551230001", "1 segment, GSM-7"), (&long, "+15551230002", "2 segments, UCS-2")]
    {
        stack.wait_status(id, "delivered").await;
        let sent = twilio.sent_to(to);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert!(sent[0].problems.is_empty(), "{:?}", sent[0].problems);
        let calls = calls(&stack, id).await;
        let call = calls.last().unwrap();
        assert_eq!(call.provider, "twilio");
        assert_eq!(call.provider_message_id, sent[0].sid, "the message resource's sid is the provider id");
        assert_eq!(call.detail.as_deref(), Some(segments));
    }
    assert_eq!(twilio.sent_to("+15551230002")[0].form["Body"], "ж".repeat(71));
}

#[tokio::test]
async fn twilio_errors_retry_or_dead_letter_by_class_and_never_show_the_token() {
    use Answer::*;
    let error = |status, code| Error { status, code, retry_after: None };
    // (To, answers, dead-lettered?, requests Twilio should see)
    let cases: Vec<(&str, Vec<Answer>, bool, usize)> = vec![
        ("+15551110001", vec![error(400, 21211)], true, 1),
        ("+15551110002", vec![error(400, 21614)], true, 1),
        ("+15551110003", vec![error(401, 20003)], true, 1),
        ("+15551110004", vec![error(400, 21602)], true, 1),
        ("+15551110005", vec![Error { status: 429, code: 20429, retry_after: Some(1) }], false, 2),
        ("+15551110006", vec![Bare(503), error(500, 20500)], false, 3),
        ("+15551110007", vec![Bare(503); 4], true, 4),
    ];
    let script: Vec<(&str, Vec<Answer>)> = cases.iter().map(|(to, a, ..)| (*to, a.clone())).collect();
    let twilio = Twilio::start(&script).await;
    let stack = stack(&twilio).await;
    let mut ids = Vec::new();
    for (to, ..) in &cases {
        ids.push(stack.send(sms(to, "Your order shipped"), None).await);
    }
    for ((to, _, dead, requests), id) in cases.iter().zip(&ids) {
        let status = stack.wait_status(id, if *dead { "dead_lettered" } else { "delivered" }).await;
        let sent = twilio.sent_to(to);
        assert_eq!(sent.len(), *requests, "{to}: {sent:?} {status}");
        assert!(sent.iter().all(|s| s.problems.is_empty()), "{sent:?}");
        if !dead {
            let calls = calls(&stack, id).await;
            assert_eq!(calls.last().unwrap().provider_message_id, sent.last().unwrap().sid, "{to}");
        }
    }
    // Twilio said wait a second: the retry waited at least that, not the 200 ms backoff.
    let limited = twilio.sent_to("+15551110005");
    assert!(
        limited[1].at - limited[0].at >= Duration::from_millis(950),
        "{:?}",
        limited[1].at - limited[0].at
    );
    let letters = stack.wait_dead_letters(5).await;
    assert_eq!(letters.len(), 5);
    let last_errors: Vec<String> = letters.iter().map(|m| header(m, dlq::LAST_ERROR)).collect();
    assert!(
        last_errors
            .iter()
            .any(|e| e.contains("twilio error 21211") && e.contains("not a valid phone number")),
        "{last_errors:?}"
    );
    let (_, invalid) = stack.get(&ids[0]).await;
    assert!(invalid["channels"][0]["last_error"].as_str().unwrap().contains("21211"), "{invalid}");

    // The auth token is nowhere: not in dead letters, status events or records.
    let mut everything = String::new();
    for m in &letters {
        everything.push_str(&format!("{:?}{}", m.headers, String::from_utf8_lossy(&m.payload)));
    }
    for (_, event) in stack.status_events().await {
        everything.push_str(&event.to_string());
    }
    for id in &ids {
        everything.push_str(&stack.get(id).await.1.to_string());
    }
    assert!(everything.contains("21614"), "the errors are there");
    assert!(!everything.contains(AUTH_TOKEN), "the Twilio token leaked");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"));
    assert!(!everything.contains(&basic), "the Twilio credentials leaked");
}

#[tokio::test]
async fn the_gateway_refuses_a_phone_number_that_is_not_e164() {
    let twilio = Twilio::start(&[]).await;
    let stack = stack(&twilio).await;
    for phone in ["5551230001", "+1 555 123 0001", "+0123", "+1555123000123456789", "tel:+15551230001"] {
        let (status, body) = stack.post(sms(phone, "hi"), None).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{phone}: {body}");
    }
    assert!(twilio.state.sent.lock().unwrap().is_empty());
}

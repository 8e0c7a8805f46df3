//! Push through stand-in FCM and APNs servers in the test process, each checking requests as
//! the provider documents them and answering with the provider's documented bodies:
//! - FCM: the OAuth2 token exchange (a `jwt-bearer` grant whose RS256 assertion is verified
//!   with the public half of the test service-account key: issuer, scope, audience, expiry),
//!   then `messages:send` with that access token and FCM's JSON shape; errors are
//!   `google.rpc.Status` with an `FcmError` detail.
//! - APNs: an HTTP/2-only server (hyper, h2c with prior knowledge; HTTP/1.1 gets no answer)
//!   checking the ES256 provider token (signature, `kid`, `iss`), `apns-topic`,
//!   `apns-push-type` and the device token in the path; errors are `{"reason": …}`.
//!
//! Each device token is scripted: the stand-ins answer by token.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use herald_shared::{Channel, auth, config, deadletter::headers as dlq, state::ProviderCall};
use http_body_util::{BodyExt, Full};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use poem::{
    EndpointExt, Request, Response, Route, handler, http::StatusCode, listener::TcpAcceptor, web::Data,
};
use serde_json::{Value, json};

use crate::support::{Stack, TENANT, eventually, header};

const FCM_PRIVATE: &str = include_str!("../fixtures/test-only-fcm-rsa-private.pem");
const FCM_PUBLIC: &str = include_str!("../fixtures/test-only-fcm-rsa-public.pem");
const APNS_PRIVATE: &str = include_str!("../fixtures/test-only-apns-ec-private.p8");
const APNS_PUBLIC: &str = include_str!("../fixtures/test-only-apns-ec-public.pem");
const PROJECT: &str = "herald-test";
const CLIENT_EMAIL: &str = "herald@herald-test.iam.gserviceaccount.com";
const KEY_ID: &str = "ABC123DEFG";
const TEAM_ID: &str = "DEF123GHIJ";
const TOPIC: &str = "com.example.herald";

/// How a stand-in answers one send.
#[derive(Clone, Debug)]
enum Answer {
    Ok,
    /// An HTTP status and the provider's error code (FCM `errorCode`, APNs `reason`), and
    /// `Retry-After` seconds.
    Error(u16, &'static str, Option<u64>),
}

/// One send a stand-in received.
#[derive(Debug, Clone)]
struct Sent {
    token: String,
    body: Value,
    headers: HashMap<String, String>,
    /// What was wrong with the request, against the provider's documentation.
    problems: Vec<String>,
    id: Option<String>,
    at: Instant,
}

#[derive(Default)]
struct Script {
    answers: Mutex<HashMap<String, VecDeque<Answer>>>,
    sent: Mutex<Vec<Sent>>,
}

impl Script {
    fn new(script: &[(&str, Vec<Answer>)]) -> Arc<Script> {
        let s = Arc::new(Script::default());
        s.answers
            .lock()
            .unwrap()
            .extend(script.iter().map(|(t, a)| (t.to_string(), a.iter().cloned().collect())));
        s
    }

    fn next(&self, token: &str) -> Answer {
        self.answers.lock().unwrap().get_mut(token).and_then(VecDeque::pop_front).unwrap_or(Answer::Ok)
    }

    fn sent_to(&self, token: &str) -> Vec<Sent> {
        self.sent.lock().unwrap().iter().filter(|s| s.token == token).cloned().collect()
    }

    fn all(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------------
// FCM

struct FcmState {
    script: Arc<Script>,
    token_url: String,
    /// Access tokens issued, in order.
    issued: Mutex<Vec<String>>,
    /// Problems with token requests.
    token_problems: Mutex<Vec<String>>,
    /// Access tokens FCM no longer takes (revoked): any send with one gets `401`.
    revoked: Mutex<Vec<String>>,
}

struct Fcm {
    url: String,
    state: Arc<FcmState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Fcm {
    async fn start(script: Arc<Script>) -> Fcm {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(FcmState {
            script,
            token_url: format!("{url}/token"),
            issued: Mutex::default(),
            token_problems: Mutex::default(),
            revoked: Mutex::default(),
        });
        let app = Route::new().at("/*path", fcm_api).data(state.clone());
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
        Fcm { url, state, _stop: tx }
    }

    /// A service-account key as the Firebase console downloads it, with the test key.
    fn credentials(&self) -> String {
        json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "0123456789abcdef0123456789abcdef01234567",
            "private_key": FCM_PRIVATE,
            "client_email": CLIENT_EMAIL,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.state.token_url,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        })
        .to_string()
    }

    fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }
}

#[derive(serde::Deserialize)]
struct GoogleClaims {
    scope: String,
    iat: u64,
    exp: u64,
}

/// Checks the token request as Google documents the JWT-bearer grant for service accounts.
fn check_token_request(req: &Request, body: &[u8], token_url: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let ct = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !ct.starts_with("application/x-www-form-urlencoded") {
        problems.push(format!("token request content type {ct:?}"));
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        problems.push(format!("grant_type {:?}", form.get("grant_type")));
    }
    let assertion = form.get("assertion").cloned().unwrap_or_default();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[CLIENT_EMAIL]);
    validation.set_audience(&[token_url]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    match jsonwebtoken::decode::<GoogleClaims>(
        &assertion,
        &DecodingKey::from_rsa_pem(FCM_PUBLIC.as_bytes()).unwrap(),
        &validation,
    ) {
        Ok(t) => {
            if t.claims.scope != "https://www.googleapis.com/auth/firebase.messaging" {
                problems.push(format!("scope {:?}", t.claims.scope));
            }
            if t.claims.exp.saturating_sub(t.claims.iat) > 3600 {
                problems.push("assertion valid for more than an hour".into());
            }
            let now = chrono::Utc::now().timestamp() as u64;
            if t.claims.iat.abs_diff(now) > 300 {
                problems.push("iat is not now".into());
            }
        }
        Err(e) => problems.push(format!("assertion does not verify: {e}")),
    }
    problems
}

/// Checks a send as FCM HTTP v1 documents `projects.messages.send`.
fn check_send(req: &Request, body: &Value, issued: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let path = format!("/v1/projects/{PROJECT}/messages:send");
    if req.method() != "POST" || req.uri().path() != path {
        problems.push(format!("{} {} is not POST {path}", req.method(), req.uri().path()));
    }
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !auth.strip_prefix("Bearer ").is_some_and(|t| issued.iter().any(|i| i == t)) {
        problems.push(format!("authorization {auth:?} is not an issued access token"));
    }
    let ct = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !ct.starts_with("application/json") {
        problems.push(format!("content type {ct:?}"));
    }
    let Some(message) = body.get("message").and_then(Value::as_object) else {
        problems.push(format!("no message object in {body}"));
        return problems;
    };
    if body.as_object().unwrap().len() != 1 {
        problems.push(format!("members beside message: {body}"));
    }
    if !message.get("token").is_some_and(Value::is_string) {
        problems.push("message.token is not a string".into());
    }
    for key in message.keys() {
        if !["token", "notification", "data"].contains(&key.as_str()) {
            problems.push(format!("unexpected message.{key}"));
        }
    }
    if let Some(n) = message.get("notification")
        && !n.as_object().is_some_and(|n| {
            n.keys().all(|k| k == "title" || k == "body") && n.values().all(Value::is_string)
        })
    {
        problems.push(format!("notification {n}"));
    }
    if let Some(d) = message.get("data")
        && !d.as_object().is_some_and(|d| d.values().all(Value::is_string))
    {
        problems.push(format!("data is not a map of strings: {d}"));
    }
    problems
}

#[handler]
async fn fcm_api(req: &Request, body: Vec<u8>, state: Data<&Arc<FcmState>>) -> Response {
    let json_response = |status: u16, body: Value| {
        Response::builder()
            .status(StatusCode::from_u16(status).unwrap())
            .content_type("application/json; charset=UTF-8")
            .body(body.to_string())
    };
    if req.uri().path() == "/token" {
        let problems = check_token_request(req, &body, &state.token_url);
        if !problems.is_empty() {
            state.token_problems.lock().unwrap().extend(problems);
            return json_response(
                400,
                json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
            );
        }
        let token = {
            let mut issued = state.issued.lock().unwrap();
            let token = format!("ya29.test-access-{}", issued.len() + 1);
            issued.push(token.clone());
            token
        };
        return json_response(
            200,
            json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}),
        );
    }
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let bearer = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if state.revoked.lock().unwrap().iter().any(|r| bearer == format!("Bearer {r}")) {
        let error = json!({"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"});
        let token = json["message"]["token"].as_str().unwrap_or_default().to_owned();
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        state.script.sent.lock().unwrap().push(Sent {
            token,
            body: json,
            headers,
            problems: Vec::new(),
            id: None,
            at: Instant::now(),
        });
        return json_response(401, json!({"error": error}));
    }
    let issued = state.issued.lock().unwrap().clone();
    let problems = check_send(req, &json, &issued);
    let token = json["message"]["token"].as_str().unwrap_or_default().to_owned();
    let answer = state.script.next(&token);
    let id = matches!(answer, Answer::Ok).then(|| {
        format!(
            "projects/{PROJECT}/messages/0:{}%{:016x}",
            state.script.sent.lock().unwrap().len(),
            0xfeed_u64
        )
    });
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    state.script.sent.lock().unwrap().push(Sent {
        token,
        body: json,
        headers,
        problems,
        id: id.clone(),
        at: Instant::now(),
    });
    match answer {
        Answer::Ok => json_response(200, json!({"name": id})),
        Answer::Error(status, code, retry_after) => {
            let (canonical, message) = match code {
                "UNREGISTERED" => ("NOT_FOUND", "Requested entity was not found."),
                "INVALID_ARGUMENT" => {
                    ("INVALID_ARGUMENT", "The registration token is not a valid FCM registration token")
                }
                "SENDER_ID_MISMATCH" => ("PERMISSION_DENIED", "SenderId mismatch"),
                "QUOTA_EXCEEDED" => ("RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send requests'"),
                "UNAVAILABLE" => ("UNAVAILABLE", "The service is currently unavailable."),
                "INTERNAL" => ("INTERNAL", "Internal error encountered."),
                "THIRD_PARTY_AUTH_ERROR" => ("UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
                _ => ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
            };
            let mut error = json!({"code": status, "message": message, "status": canonical});
            if code != "UNAUTHENTICATED" {
                error["details"] = json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]);
            }
            let mut response = json_response(status, json!({"error": error}));
            if let Some(secs) = retry_after {
                response.headers_mut().insert("Retry-After", secs.to_string().parse().unwrap());
            }
            response
        }
    }
}

// ---------------------------------------------------------------------------------------------
// APNs

struct ApnsState {
    script: Arc<Script>,
    /// Distinct provider tokens seen, in order.
    jwts: Mutex<Vec<String>>,
}

struct Apns {
    url: String,
    state: Arc<ApnsState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Apns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Apns {
    /// An HTTP/2-only server: every connection is served as h2 with prior knowledge, so an
    /// HTTP/1.1 request fails its connection preface and gets no answer.
    async fn start(script: Arc<Script>) -> Apns {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(ApnsState { script, jwts: Mutex::default() });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(apns_api(req, &state).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Apns { url, state, task }
    }

    fn jwts(&self) -> Vec<String> {
        self.state.jwts.lock().unwrap().clone()
    }
}

#[derive(serde::Deserialize)]
struct AppleClaims {
    iss: String,
    iat: i64,
}

/// Checks a request as Apple documents "Sending notification requests to APNs".
fn check_apns(req: &hyper::Request<()>, body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    if req.version() != hyper::Version::HTTP_2 {
        problems.push(format!("version {:?}", req.version()));
    }
    let token = req.uri().path().strip_prefix("/3/device/").unwrap_or_default();
    if req.method() != hyper::Method::POST
        || token.len() != 64
        || !token.bytes().all(|b| b.is_ascii_hexdigit())
    {
        problems.push(format!("{} {} is not POST /3/device/<64 hex>", req.method(), req.uri().path()));
    }
    let auth = h("authorization");
    match auth.strip_prefix("bearer ") {
        Some(jwt) => {
            let mut validation = Validation::new(Algorithm::ES256);
            validation.set_required_spec_claims::<&str>(&[]);
            validation.validate_exp = false;
            validation.set_issuer(&[TEAM_ID]);
            let key = DecodingKey::from_ec_pem(APNS_PUBLIC.as_bytes()).unwrap();
            match jsonwebtoken::decode::<AppleClaims>(jwt, &key, &validation) {
                Ok(t) => {
                    if t.header.kid.as_deref() != Some(KEY_ID) {
                        problems.push(format!("kid {:?}", t.header.kid));
                    }
                    if t.claims.iss != TEAM_ID || (chrono::Utc::now().timestamp() - t.claims.iat).abs() > 3600
                    {
                        problems.push("iss or iat wrong".into());
                    }
                }
                Err(e) => problems.push(format!("provider token does not verify: {e}")),
            }
        }
        None => problems.push(format!("authorization {auth:?} is not `bearer <jwt>`")),
    }
    if h("apns-topic") != TOPIC {
        problems.push(format!("apns-topic {:?}", h("apns-topic")));
    }
    if h("apns-push-type") != "alert" {
        problems.push(format!("apns-push-type {:?}", h("apns-push-type")));
    }
    if !["5", "10"].contains(&h("apns-priority").as_str()) {
        problems.push(format!("apns-priority {:?}", h("apns-priority")));
    }
    if h("apns-expiration").parse::<u64>().is_err() {
        problems.push(format!("apns-expiration {:?}", h("apns-expiration")));
    }
    let id = h("apns-id");
    if !id.is_empty() && uuid::Uuid::parse_str(&id).is_err() {
        problems.push(format!("apns-id {id:?} is not a UUID"));
    }
    if !body["aps"]["alert"].is_object() {
        problems.push(format!("no aps.alert in {body}"));
    }
    problems
}

async fn apns_api(
    req: hyper::Request<hyper::body::Incoming>,
    state: &ApnsState,
) -> hyper::Response<Full<Bytes>> {
    let (parts, incoming) = req.into_parts();
    let bytes = incoming.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let req = hyper::Request::from_parts(parts, ());
    let token = req.uri().path().trim_start_matches("/3/device/").to_owned();
    let headers: HashMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let problems = check_apns(&req, &body);
    if let Some(jwt) = headers.get("authorization").and_then(|a| a.strip_prefix("bearer ")) {
        let mut jwts = state.jwts.lock().unwrap();
        if !jwts.iter().any(|j| j == jwt) {
            jwts.push(jwt.to_owned());
        }
    }
    let answer = state.script.next(&token);
    let id =
        headers.get("apns-id").cloned().unwrap_or_else(|| uuid::Uuid::now_v7().to_string().to_uppercase());
    state.script.sent.lock().unwrap().push(Sent {
        token,
        body,
        headers,
        problems,
        id: matches!(answer, Answer::Ok).then(|| id.clone()),
        at: Instant::now(),
    });
    let mut response = hyper::Response::builder().header("apns-id", &id);
    match answer {
        Answer::Ok => response.status(200).body(Full::new(Bytes::new())).unwrap(),
        Answer::Error(status, reason, retry_after) => {
            let mut doc = json!({"reason": reason});
            if status == 410 {
                doc["timestamp"] = json!(chrono::Utc::now().timestamp_millis());
            }
            if let Some(secs) = retry_after {
                response = response.header("retry-after", secs.to_string());
            }
            response
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(doc.to_string())))
                .unwrap()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The stack

/// A stack with FCM and/or APNs pointed at the stand-ins.
async fn stack(fcm: Option<&Fcm>, apns: Option<&Apns>) -> Stack {
    let mut pairs: Vec<(&str, String)> = vec![
        (config::RETRY_BACKOFF, "200ms".into()),
        (config::MAX_ATTEMPTS, "4".into()),
        // Room for the token exchange (an RSA signature in a debug build) on a busy machine.
        (config::SEND_TIMEOUT, "5s".into()),
        (config::BREAKER, "100,30s".into()),
    ];
    if let Some(f) = fcm {
        pairs.extend([
            (config::FCM_PROJECT_ID, PROJECT.into()),
            (config::FCM_CREDENTIALS, f.credentials()),
            (config::FCM_BASE_URL, f.url.clone()),
        ]);
    }
    if let Some(a) = apns {
        pairs.extend([
            (config::APNS_KEY, APNS_PRIVATE.into()),
            (config::APNS_KEY_ID, KEY_ID.into()),
            (config::APNS_TEAM_ID, TEAM_ID.into()),
            (config::APNS_TOPIC, TOPIC.into()),
            (config::APNS_BASE_URL, a.url.clone()),
        ]);
    }
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Stack::start_with(&pairs).await
}

fn users_token(stack: &Stack) -> String {
    auth::mint(
        &stack.config.jwt_secret,
        "tests",
        Some(TENANT),
        &["users:read", "users:write", "notifications:send", "notifications:read"],
        Duration::from_secs(600),
    )
}

/// Creates user `id` with `devices` (token, platform).
async fn put_user(stack: &Stack, id: &str, devices: &[(&str, &str)]) {
    let devices: Vec<Value> = devices.iter().map(|(t, p)| json!({"token": t, "platform": p})).collect();
    let resp = stack
        .http
        .put(format!("{}/v1/users/{id}", stack.base))
        .bearer_auth(users_token(stack))
        .json(&json!({"name": id, "devices": devices}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
}

/// The device tokens `GET /v1/users/{id}` lists.
async fn user_devices(stack: &Stack, id: &str) -> Vec<String> {
    let user: Value = stack
        .http
        .get(format!("{}/v1/users/{id}", stack.base))
        .bearer_auth(users_token(stack))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    user["devices"].as_array().unwrap().iter().map(|d| d["token"].as_str().unwrap().to_owned()).collect()
}

/// Sends inline content with data to user `user`'s devices.
async fn send_to_user(stack: &Stack, user: &str) -> String {
    stack
        .send(
            json!({
                "recipient": {"user_id": user},
                "channels": ["push"],
                "content": {"title": "Shipped", "body": "Order 42 is on its way"},
                "data": {"order": "42"}
            }),
            None,
        )
        .await
}

async fn push_calls(stack: &Stack, id: &str) -> Vec<ProviderCall> {
    stack.record(id).await.expect("a record").channels[&Channel::Push].calls.clone()
}

fn label(token: &str) -> String {
    herald_workers::provider::device_label(token)
}

fn apns_token(n: u8) -> String {
    format!("{:02x}", n).repeat(32)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn every_device_of_a_user_gets_it_through_its_platform_with_the_providers_ids_recorded() {
    let script = Script::new(&[]);
    let (fcm, apns) = (Fcm::start(script.clone()).await, Apns::start(script.clone()).await);
    let stack = stack(Some(&fcm), Some(&apns)).await;
    let android = "dX1:APA91bF-android-token_1";
    let iphone = apns_token(0xa1);
    put_user(&stack, "ada", &[(android, "fcm"), (&iphone, "apns")]).await;
    let id = send_to_user(&stack, "ada").await;
    stack.wait_status(&id, "delivered").await;

    let sent = script.all();
    assert_eq!(sent.len(), 2, "{sent:?}");
    for s in &sent {
        assert!(s.problems.is_empty(), "{}: {:?}", s.token, s.problems);
    }
    assert!(fcm.state.token_problems.lock().unwrap().is_empty());
    let to_android = &script.sent_to(android)[0];
    assert_eq!(
        to_android.body,
        json!({"message": {"token": android, "notification": {"title": "Shipped", "body": "Order 42 is on its way"}, "data": {"order": "42"}}})
    );
    let to_iphone = &script.sent_to(&iphone)[0];
    assert_eq!(
        to_iphone.body,
        json!({"aps": {"alert": {"title": "Shipped", "body": "Order 42 is on its way"}}, "order": "42"})
    );
    assert_eq!(to_iphone.headers["apns-id"], id, "the notification id is the apns-id, so retries share it");
    assert_eq!(to_iphone.headers["apns-priority"], "10");
    assert_eq!(to_iphone.headers["apns-expiration"], "0");

    let calls = push_calls(&stack, &id).await;
    for (token, provider, sent) in [(android, "fcm", to_android), (iphone.as_str(), "apns", to_iphone)] {
        let call = calls
            .iter()
            .find(|c| c.device.as_deref() == Some(label(token).as_str()))
            .expect("a call per device");
        assert_eq!(call.provider, provider);
        assert_eq!(call.provider_message_id, sent.id, "{provider}");
        assert!(call.provider_message_id.is_some());
    }

    // Direct tokens: `apns:` names an Apple device, a bare 64-hex token is one too, anything
    // else is FCM. One access token served every FCM send.
    let bare = apns_token(0xb2);
    let named = "c3".repeat(32);
    let id = stack
        .send(
            json!({"recipient": {"push_tokens": [bare, format!("apns:{named}"), "web-token-1"]}, "channels": ["push"],
                   "content": {"title": "Hi", "body": "there"}, "priority": "low"}),
            None,
        )
        .await;
    stack.wait_status(&id, "delivered").await;
    assert_eq!(script.sent_to(&bare)[0].headers["apns-priority"], "5", "low priority");
    assert!(script.sent_to(&bare)[0].headers.contains_key("authorization"));
    assert_eq!(script.sent_to(&named).len(), 1);
    assert_eq!(script.sent_to("web-token-1").len(), 1);
    assert_eq!(fcm.issued().len(), 1, "the access token is cached");
    assert_eq!(apns.jwts().len(), 1, "the provider token is reused");
}

#[tokio::test]
async fn an_unregistered_fcm_device_is_removed_from_the_user_while_the_other_device_gets_it() {
    let gone = "fcm-token-gone";
    let kept = "fcm-token-kept";
    let script = Script::new(&[(gone, vec![Answer::Error(404, "UNREGISTERED", None)])]);
    let fcm = Fcm::start(script.clone()).await;
    let stack = stack(Some(&fcm), None).await;
    put_user(&stack, "bob", &[(gone, "fcm"), (kept, "fcm")]).await;
    let id = send_to_user(&stack, "bob").await;
    stack.wait_status(&id, "delivered").await;
    assert_eq!(script.sent_to(kept).len(), 1);
    assert_eq!(script.sent_to(gone).len(), 1);
    let calls = push_calls(&stack, &id).await;
    let removed = calls.iter().find(|c| c.device.as_deref() == Some(label(gone).as_str())).unwrap();
    assert_eq!(removed.failure, Some(herald_shared::state::FailureKind::InvalidRecipient));
    assert_eq!(removed.detail.as_deref(), Some("device removed"));
    assert!(removed.error.as_deref().unwrap().contains("UNREGISTERED"), "{removed:?}");
    assert_eq!(user_devices(&stack, "bob").await, vec![kept.to_owned()]);

    // A sender id mismatch refuses the address but the device stays; with no device left
    // that took it, the notification is dead-lettered at once.
    script
        .answers
        .lock()
        .unwrap()
        .insert(kept.into(), vec![Answer::Error(403, "SENDER_ID_MISMATCH", None)].into());
    let id = send_to_user(&stack, "bob").await;
    stack.wait_status(&id, "dead_lettered").await;
    assert_eq!(user_devices(&stack, "bob").await, vec![kept.to_owned()]);
    let letters = stack.wait_dead_letters(1).await;
    assert!(header(&letters[0], dlq::LAST_ERROR).contains("SENDER_ID_MISMATCH"), "{:?}", letters[0].headers);
}

#[tokio::test]
async fn fcm_outages_and_refused_access_tokens_are_retried() {
    let script = Script::new(&[
        ("fcm-unavailable", vec![Answer::Error(503, "UNAVAILABLE", Some(1))]),
        ("fcm-internal", vec![Answer::Error(500, "INTERNAL", None)]),
        ("fcm-quota", vec![Answer::Error(429, "QUOTA_EXCEEDED", Some(1))]),
        ("fcm-invalid", vec![Answer::Error(400, "INVALID_ARGUMENT", None)]),
        ("fcm-third-party", vec![Answer::Error(401, "THIRD_PARTY_AUTH_ERROR", None)]),
    ]);
    let fcm = Fcm::start(script.clone()).await;
    let stack = stack(Some(&fcm), None).await;
    let send = |token: &'static str| {
        let stack = &stack;
        async move {
            stack
                .send(json!({"recipient": {"push_tokens": [token]}, "channels": ["push"], "content": {"body": "b"}}), None)
                .await
        }
    };
    for (token, status, attempts) in [
        ("fcm-unavailable", "delivered", 2),
        ("fcm-internal", "delivered", 2),
        ("fcm-quota", "delivered", 2),
        ("fcm-invalid", "dead_lettered", 1),
        ("fcm-third-party", "dead_lettered", 1),
    ] {
        let id = send(token).await;
        stack.wait_status(&id, status).await;
        let sent = script.sent_to(token);
        assert_eq!(sent.len(), attempts, "{token}: {sent:?}");
        if attempts == 2 && token != "fcm-internal" {
            assert!(sent[1].at - sent[0].at >= Duration::from_millis(950), "{token}: Retry-After honoured");
        }
        if status == "delivered" {
            let calls = push_calls(&stack, &id).await;
            assert_eq!(calls.last().unwrap().provider_message_id, sent.last().unwrap().id);
        }
    }
    assert_eq!(fcm.issued().len(), 1);

    // FCM refuses the access token once: it is dropped, the retry fetches a new one.
    script
        .answers
        .lock()
        .unwrap()
        .insert("fcm-refused".into(), vec![Answer::Error(401, "UNAUTHENTICATED", None)].into());
    let id = send("fcm-refused").await;
    stack.wait_status(&id, "delivered").await;
    assert_eq!(fcm.issued().len(), 2, "a new access token after the 401");
    let sent = script.sent_to("fcm-refused");
    assert_eq!(sent[1].headers["authorization"], format!("Bearer {}", fcm.issued()[1]));
    // Twice in a row: the service account cannot send; dead-lettered as unauthorized.
    script.answers.lock().unwrap().insert(
        "fcm-refused-twice".into(),
        vec![Answer::Error(401, "UNAUTHENTICATED", None), Answer::Error(401, "UNAUTHENTICATED", None)].into(),
    );
    let id = send("fcm-refused-twice").await;
    let status = stack.wait_status(&id, "dead_lettered").await;
    assert_eq!(script.sent_to("fcm-refused-twice").len(), 2, "{status}");
}

#[tokio::test]
async fn apns_unregistered_and_bad_tokens_are_removed_and_outages_retried() {
    let (unregistered, bad, ok, flaky) = (apns_token(1), apns_token(2), apns_token(3), apns_token(4));
    let script = Script::new(&[
        (&unregistered, vec![Answer::Error(410, "Unregistered", None)]),
        (&bad, vec![Answer::Error(400, "BadDeviceToken", None)]),
        (
            &flaky,
            vec![
                Answer::Error(503, "ServiceUnavailable", None),
                Answer::Error(500, "InternalServerError", None),
            ],
        ),
    ]);
    let apns = Apns::start(script.clone()).await;
    let stack = stack(None, Some(&apns)).await;
    put_user(&stack, "cy", &[(&unregistered, "apns"), (&bad, "apns"), (&ok, "apns")]).await;
    let id = send_to_user(&stack, "cy").await;
    stack.wait_status(&id, "delivered").await;
    assert_eq!(user_devices(&stack, "cy").await, vec![ok.clone()]);
    let calls = push_calls(&stack, &id).await;
    for token in [&unregistered, &bad] {
        let call = calls.iter().find(|c| c.device.as_deref() == Some(label(token).as_str())).unwrap();
        assert_eq!(call.detail.as_deref(), Some("device removed"), "{call:?}");
    }
    let delivered = calls.iter().find(|c| c.device.as_deref() == Some(label(&ok).as_str())).unwrap();
    assert_eq!(delivered.provider_message_id.as_deref(), Some(id.as_str()));

    // A user whose only device is gone: removed, and nothing is left to retry.
    let only = apns_token(5);
    script
        .answers
        .lock()
        .unwrap()
        .insert(only.clone(), vec![Answer::Error(400, "BadDeviceToken", None)].into());
    put_user(&stack, "di", &[(&only, "apns")]).await;
    let id = send_to_user(&stack, "di").await;
    stack.wait_status(&id, "dead_lettered").await;
    assert!(user_devices(&stack, "di").await.is_empty());

    // 503, then 500: retried with the same apns-id, then delivered.
    let id = stack
        .send(json!({"recipient": {"push_tokens": [format!("apns:{flaky}")]}, "channels": ["push"], "content": {"body": "b"}}), None)
        .await;
    stack.wait_status(&id, "delivered").await;
    let sent = script.sent_to(&flaky);
    assert_eq!(sent.len(), 3);
    assert!(sent.iter().all(|s| s.headers["apns-id"] == id && s.problems.is_empty()), "{sent:?}");

    // Every request carried one provider token, and HTTP/1.1 gets nothing from this server.
    assert_eq!(apns.jwts().len(), 1);
    let http1 =
        reqwest::Client::builder().http1_only().no_proxy().timeout(Duration::from_secs(2)).build().unwrap();
    assert!(
        http1.post(format!("{}/3/device/{ok}", apns.url)).body("{}").send().await.is_err(),
        "the stand-in is HTTP/2 only"
    );
}

#[tokio::test]
async fn a_refused_apns_provider_token_is_replaced_but_not_again_within_20_minutes() {
    let (expired, invalid) = (apns_token(6), apns_token(7));
    let script = Script::new(&[
        (&expired, vec![Answer::Error(403, "ExpiredProviderToken", None)]),
        (&invalid, vec![Answer::Error(403, "InvalidProviderToken", None); 3]),
    ]);
    let apns = Apns::start(script.clone()).await;
    let stack = stack(None, Some(&apns)).await;
    let send = |token: String| {
        let stack = &stack;
        async move {
            stack.send(json!({"recipient": {"push_tokens": [token]}, "channels": ["push"], "content": {"body": "b"}}), None).await
        }
    };
    let id = send(expired.clone()).await;
    stack.wait_status(&id, "delivered").await;
    assert_eq!(apns.jwts().len(), 2, "a new provider token after ExpiredProviderToken");
    let id = send(invalid.clone()).await;
    stack.wait_status(&id, "dead_lettered").await;
    // Refused again a moment after a replacement: the credentials are wrong, and Apple allows
    // no new token yet; unauthorized at once.
    assert_eq!(script.sent_to(&invalid).len(), 1);
    assert_eq!(apns.jwts().len(), 2, "no third token");
    let (_, record) = stack.get(&id).await;
    assert!(
        record["channels"][0]["last_error"].as_str().unwrap().contains("InvalidProviderToken"),
        "{record}"
    );
}

#[tokio::test]
async fn bad_tokens_are_refused_unconfigured_platforms_rejected_and_keys_never_shown() {
    let script = Script::new(&[("fcm-gone", vec![Answer::Error(404, "UNREGISTERED", None)])]);
    let fcm = Fcm::start(script.clone()).await;
    let stack = stack(Some(&fcm), None).await;
    for hostile in ["", "a/../../b", "tok en", "tok\nen", &"x".repeat(5000)] {
        let (status, body) = stack
            .post(json!({"recipient": {"push_tokens": [hostile]}, "channels": ["push"], "content": {"body": "b"}}), None)
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{hostile:?}: {body}");
    }
    assert!(script.all().is_empty());

    // An Apple device with no APNs configured: a rejected call saying so, dead-lettered.
    let iphone = apns_token(9);
    let id = stack
        .send(json!({"recipient": {"push_tokens": [iphone, "fcm-gone"]}, "channels": ["push"], "content": {"body": "b"}}), None)
        .await;
    stack.wait_status(&id, "dead_lettered").await;
    let calls = push_calls(&stack, &id).await;
    let apple = calls.iter().find(|c| c.device.as_deref() == Some(label(&iphone).as_str())).unwrap();
    assert_eq!(apple.failure, Some(herald_shared::state::FailureKind::Rejected));
    assert!(apple.error.as_deref().unwrap().contains("APNs is not configured"), "{apple:?}");

    // Neither key appears in dead letters, status events or records.
    let letters = stack.wait_dead_letters(1).await;
    let mut everything = String::new();
    for m in &letters {
        everything.push_str(&format!("{:?}{}", m.headers, String::from_utf8_lossy(&m.payload)));
    }
    for (_, event) in eventually(Duration::from_secs(5), "status events", || async {
        let events = stack.status_events().await;
        (!events.is_empty()).then_some(events)
    })
    .await
    {
        everything.push_str(&event.to_string());
    }
    everything.push_str(&stack.get(&id).await.1.to_string());
    assert!(everything.contains("UNREGISTERED"));
    for key in [FCM_PRIVATE, APNS_PRIVATE] {
        let body_line = key.lines().nth(1).unwrap();
        assert!(!everything.contains(body_line), "a private key leaked");
    }
    assert!(!everything.contains("PRIVATE KEY"));
}

#[tokio::test]
async fn a_template_renders_the_push_title_body_and_data() {
    let script = Script::new(&[]);
    let fcm = Fcm::start(script.clone()).await;
    let stack = stack(Some(&fcm), None).await;
    let token = auth::mint(
        &stack.config.jwt_secret,
        "tests",
        Some(TENANT),
        &[auth::SCOPE_TEMPLATES_READ, auth::SCOPE_TEMPLATES_WRITE],
        Duration::from_secs(600),
    );
    let parts = json!({
        "push_title": "Order {{order}} shipped",
        "push_body": "Hi {{user.name}}, it is on its way",
        "push_data": {"url": "/orders/{{order}}", "kind": "shipment"}
    });
    let resp = stack
        .http
        .put(format!("{}/v1/templates/order_shipped/en", stack.base))
        .bearer_auth(token)
        .json(&parts)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    put_user(&stack, "eve", &[("eve-android", "fcm")]).await;
    let id = stack
        .send(
            json!({"recipient": {"user_id": "eve"}, "template": "order_shipped", "channels": ["push"],
                   "data": {"order": 42, "internal": "not for the device"}}),
            None,
        )
        .await;
    stack.wait_status(&id, "delivered").await;
    let sent = script.sent_to("eve-android");
    assert!(sent[0].problems.is_empty(), "{:?}", sent[0].problems);
    assert_eq!(
        sent[0].body["message"],
        json!({
            "token": "eve-android",
            "notification": {"title": "Order 42 shipped", "body": "Hi eve, it is on its way"},
            "data": {"url": "/orders/42", "kind": "shipment"}
        }),
        "the rendered push_data is the message's data, not the template's variables"
    );
}

#[tokio::test]
async fn sends_in_flight_when_fcm_revokes_the_access_token_are_all_retried_not_dead_lettered() {
    let script = Script::new(&[]);
    let fcm = Fcm::start(script.clone()).await;
    // The first access token Herald gets is revoked by the time it is used.
    fcm.state.revoked.lock().unwrap().push("ya29.test-access-1".into());
    let stack = stack(Some(&fcm), None).await;
    let tokens: Vec<String> = (1..=6).map(|n| format!("in-flight-{n}")).collect();
    // Published together, so the worker sends them at once with the same access token.
    let ids = futures::future::join_all(tokens.iter().map(|t| {
        let body = json!({"recipient": {"push_tokens": [t]}, "channels": ["push"], "content": {"body": "b"}});
        stack.send(body, None)
    }))
    .await;
    for id in &ids {
        stack.wait_status(id, "delivered").await;
    }
    let refused =
        script.all().iter().filter(|s| s.headers["authorization"] == "Bearer ya29.test-access-1").count();
    // Usually several sends were refused together; every one of them was retried.
    assert!(refused >= 1, "the revoked token was used");
    assert_eq!(fcm.issued().len(), 2, "one replacement for every send that was refused");
}

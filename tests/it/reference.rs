//! Notifications sent by reference (`recipient.user_id` + `template` + `data`): addresses,
//! preferences and templates resolved by the worker at send time from its local copies.

use std::time::Duration;

use chrono::{Timelike, Utc};
use herald_shared::auth;
use poem::http::StatusCode;
use serde_json::{Value, json};

use crate::support::{Sink, Stack, TENANT, eventually};

/// A token of the tests' tenant for users, templates and notifications.
/// A token of `tenant` for sending and reading notifications, users and templates.
pub fn token(stack: &Stack, tenant: &str) -> String {
    auth::mint(
        &stack.config.jwt_secret,
        "tests",
        Some(tenant),
        &[
            auth::SCOPE_SEND,
            auth::SCOPE_READ,
            auth::SCOPE_USERS_WRITE,
            auth::SCOPE_USERS_READ,
            auth::SCOPE_TEMPLATES_WRITE,
            auth::SCOPE_TEMPLATES_READ,
        ],
        Duration::from_secs(600),
    )
}

/// One JSON request to the stack's gateway; the answer's status and JSON body.
pub async fn call(stack: &Stack, method: &str, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    let url = format!("{}{path}", stack.base);
    let req = match method {
        "PUT" => stack.http.put(url),
        "POST" => stack.http.post(url),
        _ => stack.http.get(url),
    };
    let resp = req
        .bearer_auth(token)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A user and the `order_shipped` template in English and French.
async fn setup(stack: &Stack, t: &str, user: Value) {
    let (status, body) = call(stack, "PUT", "/v1/users/42", t, user).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    for (locale, title, body) in [
        (
            "en",
            "Shipped",
            "Hi {{user.name}}, order {{order}} ({{number total 2}}) ships {{date at \"long\"}}",
        ),
        (
            "fr",
            "Expédiée",
            "Bonjour {{user.name}}, commande {{order}} ({{number total 2}}) expédiée le {{date at \"long\"}}",
        ),
    ] {
        let (status, out) = call(
            stack,
            "PUT",
            &format!("/v1/templates/order_shipped/{locale}"),
            t,
            json!({"webhook_title": title, "webhook_body": body}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{out}");
    }
    // The worker renders from its local copies: send once they hold both locales, or a French
    // reader could get the English template the copy already had.
    stack.wait_copies(herald_shared::topology::TEMPLATES_BUCKET).await;
    stack.wait_copies(herald_shared::topology::USERS_BUCKET).await;
}

fn data() -> Value {
    json!({"order": 1234, "total": 1234.5, "at": "2026-11-22T23:30:00Z"})
}

async fn send(stack: &Stack, t: &str, extra: Value) -> String {
    let mut body = json!({"recipient": {"user_id": "42"}, "template": "order_shipped", "data": data()});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (status, answer) = call(stack, "POST", "/v1/notifications", t, body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    answer["id"].as_str().unwrap().to_owned()
}

async fn record(stack: &Stack, t: &str, id: &str, status: &str) -> Value {
    eventually(Duration::from_secs(150), &format!("{id} to be {status}"), || async {
        let (code, body) = call(stack, "GET", &format!("/v1/notifications/{id}"), t, Value::Null).await;
        (code == StatusCode::OK && body["status"] == status).then_some(body)
    })
    .await
}

#[tokio::test]
async fn a_notification_by_user_and_template_arrives_rendered_in_the_users_language() {
    let sink = Sink::ok().await;
    let stack = Stack::start().await;
    let t = token(&stack, TENANT);
    setup(
        &stack,
        &t,
        json!({"name": "Zoé", "webhook_url": sink.url, "locale": "fr-CA", "time_zone": "America/Montreal"}),
    )
    .await;
    let id = send(&stack, &t, json!({})).await;
    let got = sink.wait_for(1).await;
    assert_eq!(got[0].body["id"], id.as_str());
    assert_eq!(got[0].body["title"], "Expédiée");
    assert_eq!(
        got[0].body["body"], "Bonjour Zoé, commande 1234 (1\u{a0}234,50) expédiée le 22 novembre 2026",
        "French (fr-CA falls back to fr), Canadian number format, the date in Montreal"
    );
    record(&stack, &t, &id, "delivered").await;

    // The request's locale wins over the user's.
    send(&stack, &t, json!({"locale": "en"})).await;
    let got = sink.wait_for(2).await;
    assert_eq!(got[1].body["body"], "Hi Zoé, order 1234 (1,234.50) ships November 22, 2026");

    // An unknown user, or another tenant's, is refused at once.
    let other = token(&stack, "globex");
    let (status, answer) = call(
        &stack,
        "POST",
        "/v1/notifications",
        &other,
        json!({"recipient": {"user_id": "42"}, "template": "order_shipped", "data": data()}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["field"], "recipient.user_id");
    let (status, answer) = call(
        &stack,
        "POST",
        "/v1/notifications",
        &t,
        json!({"recipient": {"webhook_url": sink.url}, "content": {"body": "x"}, "locale": "fr"}),
    )
    .await;
    assert_eq!(
        (status, answer["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("locale")),
        "{answer}"
    );
}

#[tokio::test]
async fn an_opted_out_category_is_suppressed_and_a_required_one_is_not() {
    let sink = Sink::ok().await;
    let stack = Stack::start_with(&[("HERALD_REQUIRED_CATEGORIES", "security")]).await;
    let t = token(&stack, TENANT);
    setup(
        &stack,
        &t,
        json!({
            "name": "Ada", "webhook_url": sink.url,
            "preferences": {"categories": {"marketing": {"webhook": false}}}
        }),
    )
    .await;
    let muted = send(&stack, &t, json!({"category": "marketing"})).await;
    let body = record(&stack, &t, &muted, "suppressed").await;
    assert_eq!(body["channels"][0]["status"], "suppressed");
    assert_eq!(body["channels"][0]["note"], "the user muted marketing on webhook");
    // A security notice goes through whatever the user said.
    let required = send(&stack, &t, json!({"category": "security"})).await;
    record(&stack, &t, &required, "delivered").await;
    stack.wait_settled().await;
    let got = sink.received();
    assert_eq!(got.len(), 1, "only the required one was sent");
    assert_eq!(got[0].body["id"], required.as_str());
    let events = stack.status_events().await;
    assert!(
        events.iter().any(|(subject, e)| subject == "herald.status.webhook.suppressed"
            && e["notification_id"] == muted.as_str()),
        "{events:?}"
    );
}

#[tokio::test]
async fn quiet_hours_defer_until_the_window_ends_and_critical_goes_through() {
    let sink = Sink::ok().await;
    let stack = Stack::start().await;
    let t = token(&stack, TENANT);
    // Quiet from this minute to the next, in UTC, so the deferral ends within a minute; late in
    // a minute, to the one after, so the window cannot close before the test has sent.
    let now = Utc::now();
    let start = format!("{:02}:{:02}", now.hour(), now.minute());
    let next = now + chrono::Duration::minutes(if now.second() < 45 { 1 } else { 2 });
    let end = format!("{:02}:{:02}", next.hour(), next.minute());
    setup(
        &stack,
        &t,
        json!({
            "name": "Ada", "webhook_url": sink.url, "time_zone": "UTC",
            "preferences": {"quiet_hours": {"start": start, "end": end}}
        }),
    )
    .await;
    let critical = send(&stack, &t, json!({"priority": "critical"})).await;
    let got = sink.wait_for(1).await;
    assert_eq!(got[0].body["id"], critical.as_str(), "critical passes through quiet hours");

    let normal = send(&stack, &t, json!({})).await;
    let deferred = record(&stack, &t, &normal, "deferred").await;
    let until = deferred["channels"][0]["deferred_until"].as_str().unwrap().to_owned();
    assert!(deferred["channels"][0]["note"].as_str().unwrap().contains("quiet hours"), "{deferred}");
    assert_eq!(sink.received().len(), 1, "nothing sent during the quiet hours");
    // Sent when the window ends, by a scheduled message (no worker waits for it).
    let delivered = record(&stack, &t, &normal, "delivered").await;
    let got = sink.wait_for(2).await;
    assert_eq!(got[1].body["id"], normal.as_str());
    let until = chrono::DateTime::parse_from_rfc3339(&until).unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(delivered["channels"][0]["delivered_at"].as_str().unwrap())
        .unwrap();
    assert!(at >= until, "delivered at {at}, before the quiet hours ended at {until}");
}

#[tokio::test]
async fn a_channel_the_user_lacks_falls_back_to_the_next_in_their_order() {
    let sink = Sink::ok().await;
    let stack = Stack::start().await;
    let t = token(&stack, TENANT);
    setup(
        &stack,
        &t,
        json!({"name": "Ada", "webhook_url": sink.url, "preferences": {"fallback": ["push", "webhook"]}}),
    )
    .await;
    let id = send(&stack, &t, json!({})).await;
    let body = record(&stack, &t, &id, "delivered").await;
    let channels: Vec<(&str, &str)> = body["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["channel"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    assert_eq!(channels, [("push", "skipped"), ("webhook", "delivered")], "{body}");
    let push = &body["channels"][0];
    assert!(push["note"].as_str().unwrap().contains("push"), "{push}");
    assert_eq!(sink.wait_for(1).await[0].body["id"], id.as_str());
}

#[tokio::test]
async fn a_user_without_the_channels_address_is_skipped_with_the_reason() {
    let sink = Sink::ok().await;
    // Webhook alone: with the in-app channel every user has an address (their inbox).
    let stack = Stack::start_with(&[("HERALD_CHANNELS", "webhook")]).await;
    let t = token(&stack, TENANT);
    setup(&stack, &t, json!({"name": "Ada", "email": "ada@example.com"})).await;
    // The channel is named, so the gateway takes it; the worker finds no webhook_url.
    let id = send(&stack, &t, json!({"channels": ["webhook"]})).await;
    let body = record(&stack, &t, &id, "skipped").await;
    assert_eq!(body["channels"][0]["note"], "user 42 has no webhook_url");
    // Named nothing, and nothing usable: refused with the reason.
    let (status, answer) = call(
        &stack,
        "POST",
        "/v1/notifications",
        &t,
        json!({"recipient": {"user_id": "42"}, "template": "order_shipped", "data": data()}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    stack.wait_settled().await;
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn data_that_lacks_a_template_variable_is_dead_lettered_with_the_variable_named() {
    let sink = Sink::ok().await;
    let stack = Stack::start().await;
    let t = token(&stack, TENANT);
    setup(&stack, &t, json!({"name": "Ada", "webhook_url": sink.url})).await;
    let (status, answer) = call(
        &stack,
        "POST",
        "/v1/notifications",
        &t,
        json!({"recipient": {"user_id": "42"}, "template": "order_shipped", "data": {"order": 1}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let letters = stack.wait_dead_letters(1).await;
    let error = crate::support::header(&letters[0], "Herald-Dlq-Last-Error");
    assert!(error.contains("no `total`"), "{error}");
    assert_eq!(crate::support::header(&letters[0], "Herald-Dlq-Reason"), "rejected");
}

#[tokio::test]
async fn seeded_examples_make_a_first_notification_by_reference_work() {
    let sink = Sink::ok().await;
    let stack = Stack::start().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["seed", "--tenant", TENANT])
        .env("HERALD_NATS_URL", stack.nats.url())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(said.contains("users 42, 43") && said.contains("order_shipped/fr"), "{said}");
    let t = token(&stack, TENANT);
    let (status, user) = call(&stack, "GET", "/v1/users/43", &t, Value::Null).await;
    assert_eq!((status, user["locale"].as_str()), (StatusCode::OK, Some("fr-CA")), "{user}");
    // Zoé's seeded webhook is example.com's; a direct address in the request wins over it.
    let (status, answer) = call(
        &stack,
        "POST",
        "/v1/notifications",
        &t,
        json!({
            "recipient": {"user_id": "43", "webhook_url": sink.url},
            "template": "order_shipped",
            "priority": "critical",
            "data": {"order": 7, "total": 59.9, "shipped_at": "2026-11-22T10:00:00Z"}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let got = sink.wait_for(1).await;
    assert_eq!(got[0].body["title"], "Commande 7 expédiée");
    assert_eq!(got[0].body["body"], "Commande 7 (59,90) expédiée le 22 novembre 2026.");
    // Seeding again changes nothing that is already there.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["seed", "--tenant", TENANT])
        .env("HERALD_NATS_URL", stack.nats.url())
        .output()
        .unwrap();
    assert!(again.status.success());
    let (_, versions) = call(&stack, "GET", "/v1/templates/order_shipped/fr/versions", &t, Value::Null).await;
    assert_eq!(versions["versions"].as_array().unwrap().len(), 1, "{versions}");
}

#[tokio::test]
async fn a_worker_restarted_while_nats_is_down_renders_from_its_local_copies() {
    use std::sync::Arc;

    use herald_shared::{
        Channel, Intent,
        intent::{Recipient, TemplateRef},
        mirror::Mirror,
        topology::{TEMPLATES_BUCKET, USERS_BUCKET},
    };
    use herald_workers::resolve::{Resolved, Resolver};

    let mut stack = Stack::start().await;
    let t = token(&stack, TENANT);
    setup(
        &stack,
        &t,
        json!({"name": "Zoé", "webhook_url": "https://example.com/hook", "locale": "fr", "time_zone": "Europe/Paris"}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let user_key = herald_shared::users::user_key(TENANT, "42");
    let template_key = herald_shared::template_store::TemplateStore::key(TENANT, "order_shipped", "fr");
    {
        // The worker's copies follow the buckets while NATS is there...
        let users = Arc::new(Mirror::open(dir.path(), "users").unwrap());
        let templates = Arc::new(Mirror::open(dir.path(), "templates").unwrap());
        let tasks = [
            tokio::spawn(users.clone().follow(stack.js.clone(), USERS_BUCKET.to_owned())),
            tokio::spawn(templates.clone().follow(stack.js.clone(), TEMPLATES_BUCKET.to_owned())),
        ];
        eventually(Duration::from_secs(5), "the copies to catch up", || {
            let ready =
                users.get(&user_key).unwrap().is_some() && templates.get(&template_key).unwrap().is_some();
            async move { ready.then_some(()) }
        })
        .await;
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }
    // ...then NATS goes away, and the worker starts again from its files alone.
    stack.shutdown().await;
    stack.nats.stop();
    let users = Arc::new(Mirror::open(dir.path(), "users").unwrap());
    let templates = Arc::new(Mirror::open(dir.path(), "templates").unwrap());
    let resolver = Resolver::new(users, templates, "en".into(), vec![]);
    let mut intent =
        Intent::new(Channel::Webhook, Recipient { user_id: Some("42".into()), ..Recipient::default() });
    intent.tenant = Some(TENANT.into());
    intent.template = Some(TemplateRef { code: "order_shipped".into(), locale: None });
    intent.data = data().as_object().unwrap().clone();
    let Resolved::Send(concrete) = resolver.resolve(&intent, Utc::now()).unwrap() else { panic!("not sent") };
    assert_eq!(concrete.recipient.webhook_url.as_deref(), Some("https://example.com/hook"));
    assert_eq!(concrete.content.title.as_deref(), Some("Expédiée"));
    assert_eq!(
        concrete.content.body.as_deref(),
        Some("Bonjour Zoé, commande 1234 (1\u{202f}234,50) expédiée le 23 novembre 2026")
    );
}

/// Per-recipient limits: a user gets at most two `promo` notifications an hour on webhook; the
/// third is recorded `throttled` with the limit and sent nowhere; a `critical` one, another
/// category and a notification sent to an address rather than a user are not counted against it.
#[tokio::test]
async fn a_recipient_over_the_limit_is_throttled_and_critical_is_not() {
    let sink = Sink::ok().await;
    let stack = Stack::start_with(&[("HERALD_RECIPIENT_LIMIT", "5/1h,promo=2/1h")]).await;
    let t = token(&stack, TENANT);
    setup(&stack, &t, json!({"name": "Ada", "webhook_url": sink.url})).await;
    let mut promos = Vec::new();
    for _ in 0..3 {
        let id = send(&stack, &t, json!({"category": "promo"})).await;
        // One at a time, so which one is over the limit is known.
        let body = eventually(Duration::from_secs(30), "the promo to be decided", || async {
            let (code, body) = call(&stack, "GET", &format!("/v1/notifications/{id}"), &t, Value::Null).await;
            (code == StatusCode::OK
                && ["delivered", "throttled"].contains(&body["status"].as_str().unwrap_or("")))
            .then_some(body)
        })
        .await;
        promos.push((id, body));
    }
    assert_eq!(promos[0].1["status"], "delivered", "{}", promos[0].1);
    assert_eq!(promos[1].1["status"], "delivered", "{}", promos[1].1);
    let third = &promos[2].1;
    assert_eq!(third["status"], "throttled", "{third}");
    let note = third["channels"][0]["note"].as_str().unwrap();
    assert!(note.contains("2 \"promo\" notifications on webhook within 3600s"), "{note}");
    let critical = send(&stack, &t, json!({"category": "promo", "priority": "critical"})).await;
    record(&stack, &t, &critical, "delivered").await;
    let other = send(&stack, &t, json!({"category": "news"})).await;
    record(&stack, &t, &other, "delivered").await;
    let direct =
        json!({"recipient": {"webhook_url": sink.url}, "content": {"body": "x"}, "category": "promo"});
    let (status, answer) = call(&stack, "POST", "/v1/notifications", &t, direct).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    record(&stack, &t, answer["id"].as_str().unwrap(), "delivered").await;
    stack.wait_settled().await;
    let sent: Vec<String> =
        sink.received().iter().map(|r| r.body["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(sent.len(), 5, "{sent:?}");
    assert!(!sent.contains(&promos[2].0), "the throttled one was sent");
    let events = stack.status_events().await;
    assert!(
        events.iter().any(|(subject, e)| subject == "herald.status.webhook.throttled"
            && e["notification_id"] == promos[2].0.as_str()),
        "{events:?}"
    );
}

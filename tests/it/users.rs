//! Users, devices and preferences over HTTP against a real nats-server, and the redb copy of
//! `herald_users` following the bucket.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use herald_shared::{
    auth, config,
    mirror::Mirror,
    topology::USERS_BUCKET,
    users::{self, user_key},
};
use serde_json::{Value, json};

use crate::support::{Stack, eventually};

/// What one request answered.
#[derive(Debug)]
struct Answer {
    status: u16,
    etag: Option<String>,
    body: Value,
}

fn token(stack: &Stack, tenant: &str, scopes: &[&str]) -> String {
    auth::mint(&stack.config.jwt_secret, "tests", Some(tenant), scopes, Duration::from_secs(600))
}

fn rw(stack: &Stack, tenant: &str) -> String {
    token(stack, tenant, &[auth::SCOPE_USERS_READ, auth::SCOPE_USERS_WRITE])
}

async fn call(
    stack: &Stack,
    token: &str,
    method: &str,
    path: &str,
    body: Option<String>,
    if_match: Option<&str>,
) -> Answer {
    let mut req =
        stack.http.request(method.parse().unwrap(), format!("{}{path}", stack.base)).bearer_auth(token);
    if let Some(b) = body {
        let ct = if method == "PATCH" { "application/merge-patch+json" } else { "application/json" };
        req = req.header("Content-Type", ct).body(b);
    }
    if let Some(m) = if_match {
        req = req.header("If-Match", m);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let etag = resp.headers().get("etag").map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    Answer { status, etag, body: serde_json::from_str(&text).unwrap_or(Value::String(text)) }
}

async fn send(
    stack: &Stack,
    token: &str,
    method: &str,
    path: &str,
    body: Value,
    if_match: Option<&str>,
) -> Answer {
    call(stack, token, method, path, Some(body.to_string()), if_match).await
}

async fn get(stack: &Stack, token: &str, path: &str) -> Answer {
    call(stack, token, "GET", path, None, None).await
}

#[tokio::test]
async fn users_devices_and_preferences_round_trip_with_etags() {
    let stack = Stack::start().await;
    let t = rw(&stack, "acme");
    let ada = json!({
        "name": "Ada", "email": "ada@example.com", "phone": "+4915112345678",
        "devices": [{"token": "tok-1", "platform": "fcm"}],
        "webhook_url": "https://example.com/hook", "locale": "en-GB", "time_zone": "Europe/London",
        "preferences": {"channels": {"sms": false}, "categories": {"marketing": {"email": false}},
                        "quiet_hours": {"start": "22:00", "end": "07:00", "days": ["mon", "fri"]},
                        "fallback": ["push", "email"]},
        "attributes": {"plan": {"tier": "gold"}, "tags": ["a"]}
    });
    let created = send(&stack, &t, "PUT", "/v1/users/ada", ada.clone(), None).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let etag = created.etag.clone().unwrap();
    assert_eq!(etag, format!("\"{}\"", created.body["revision"]));
    for field in ["name", "email", "phone", "webhook_url", "locale", "time_zone", "preferences", "attributes"]
    {
        assert_eq!(created.body[field], ada[field], "{field}");
    }
    assert_eq!(created.body["devices"][0]["token"], "tok-1");
    let added_at = created.body["devices"][0]["added_at"].clone();

    let read = get(&stack, &t, "/v1/users/ada").await;
    assert_eq!((read.status, read.etag.as_deref()), (200, Some(etag.as_str())));
    assert_eq!(read.body, created.body);

    // Replace: unset fields go, created_at and a kept device's added_at stay.
    let replaced =
        send(&stack, &t, "PUT", "/v1/users/ada", json!({"name": "Ada L.", "devices": ada["devices"]}), None)
            .await;
    assert_eq!(replaced.status, 200, "{:?}", replaced.body);
    assert_ne!(replaced.etag.as_deref(), Some(etag.as_str()));
    assert_eq!(replaced.body["email"], Value::Null);
    assert_eq!(replaced.body["created_at"], created.body["created_at"]);
    assert_eq!(replaced.body["devices"][0]["added_at"], added_at);

    // Merge patch: null removes, objects merge, arrays replace.
    let patched = send(
        &stack,
        &t,
        "PATCH",
        "/v1/users/ada",
        json!({"name": null, "email": "a@b.example", "attributes": {"plan": {"seats": 3}, "tags": ["b", "c"]},
               "preferences": {"channels": {"push": false}}}),
        None,
    )
    .await;
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    assert_eq!(patched.body["name"], Value::Null);
    assert_eq!(patched.body["email"], "a@b.example");
    assert_eq!(patched.body["attributes"], json!({"plan": {"seats": 3}, "tags": ["b", "c"]}));
    assert_eq!(patched.body["preferences"]["channels"], json!({"push": false}));
    assert_eq!(patched.body["devices"][0]["added_at"], added_at, "a patch keeps devices as they were");
    let patched_again =
        send(&stack, &t, "PATCH", "/v1/users/ada", json!({"attributes": {"plan": null}}), None).await;
    assert_eq!(patched_again.body["attributes"], json!({"tags": ["b", "c"]}));

    // Devices.
    let dev = send(
        &stack,
        &t,
        "POST",
        "/v1/users/ada/devices",
        json!({"token": "tok-2", "platform": "apns"}),
        None,
    )
    .await;
    assert_eq!(dev.status, 201, "{:?}", dev.body);
    assert_eq!(dev.body["devices"].as_array().unwrap().len(), 2);
    let again =
        send(&stack, &t, "POST", "/v1/users/ada/devices", json!({"token": "tok-2", "platform": "fcm"}), None)
            .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body["devices"][1]["platform"], "fcm");
    assert_eq!(again.body["devices"][1]["added_at"], dev.body["devices"][1]["added_at"]);
    assert_eq!(call(&stack, &t, "DELETE", "/v1/users/ada/devices/tok-1", None, None).await.status, 204);
    let gone = call(&stack, &t, "DELETE", "/v1/users/ada/devices/tok-1", None, None).await;
    assert_eq!((gone.status, gone.body["code"].as_str()), (404, Some("not_found")));
    let now = get(&stack, &t, "/v1/users/ada").await;
    assert_eq!(now.body["devices"].as_array().unwrap().len(), 1);
    assert_eq!(now.body["devices"][0]["token"], "tok-2");

    // Preferences.
    let prefs = json!({"channels": {"email": true, "sms": false},
                       "categories": {"orders": {"push": true, "email": false}},
                       "quiet_hours": {"start": "23:30", "end": "06:15", "days": []},
                       "fallback": ["sms"]});
    let put = send(&stack, &t, "PUT", "/v1/users/ada/preferences", prefs.clone(), None).await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let read = get(&stack, &t, "/v1/users/ada/preferences").await;
    assert_eq!(read.status, 200);
    assert_eq!(read.etag, put.etag);
    assert_eq!(read.body["categories"], prefs["categories"]);
    assert_eq!(read.body["quiet_hours"]["start"], "23:30");
    assert_eq!(read.body["fallback"], json!(["sms"]));
    assert_eq!(
        get(&stack, &t, "/v1/users/ada").await.body["devices"][0]["token"],
        "tok-2",
        "other fields stay"
    );

    // Scopes.
    let reader = token(&stack, "acme", &[auth::SCOPE_USERS_READ]);
    assert_eq!(get(&stack, &reader, "/v1/users/ada").await.status, 200);
    assert_eq!(send(&stack, &reader, "PUT", "/v1/users/ada", json!({}), None).await.status, 403);
    assert_eq!(get(&stack, &stack.token, "/v1/users/ada").await.status, 403);

    // Delete.
    assert_eq!(call(&stack, &t, "DELETE", "/v1/users/ada", None, None).await.status, 204);
    assert_eq!(get(&stack, &t, "/v1/users/ada").await.status, 404);
    assert_eq!(call(&stack, &t, "DELETE", "/v1/users/ada", None, None).await.status, 404);
    assert_eq!(get(&stack, &t, "/v1/users/ada/preferences").await.status, 404);
    // A deleted user can be created again.
    assert_eq!(send(&stack, &t, "PUT", "/v1/users/ada", json!({}), None).await.status, 201);
}

#[tokio::test]
async fn a_stale_if_match_is_refused_and_changes_nothing() {
    let stack = Stack::start().await;
    let t = rw(&stack, "acme");
    let first = send(&stack, &t, "PUT", "/v1/users/u1", json!({"name": "one"}), None).await;
    let old = first.etag.unwrap();
    let second = send(&stack, &t, "PUT", "/v1/users/u1", json!({"name": "two"}), Some(&old)).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    let current = second.etag.unwrap();
    for (method, path, body) in [
        ("PUT", "/v1/users/u1", Some(json!({"name": "three"}))),
        ("PATCH", "/v1/users/u1", Some(json!({"name": "three"}))),
        ("POST", "/v1/users/u1/devices", Some(json!({"token": "t", "platform": "fcm"}))),
        ("PUT", "/v1/users/u1/preferences", Some(json!({"channels": {"sms": false}}))),
        ("DELETE", "/v1/users/u1", None),
    ] {
        let a = call(&stack, &t, method, path, body.map(|b| b.to_string()), Some(&old)).await;
        assert_eq!(a.status, 412, "{method} {path}: {:?}", a.body);
        assert_eq!(a.body["code"], "precondition_failed");
    }
    let now = get(&stack, &t, "/v1/users/u1").await;
    assert_eq!((now.body["name"].as_str(), now.etag.as_deref()), (Some("two"), Some(current.as_str())));
    assert!(now.body["devices"].as_array().unwrap().is_empty());
    // `*` needs the user to exist; a malformed If-Match is a 400 naming the header.
    assert_eq!(send(&stack, &t, "PUT", "/v1/users/u1", json!({}), Some("*")).await.status, 200);
    assert_eq!(send(&stack, &t, "PUT", "/v1/users/nobody", json!({}), Some("*")).await.status, 412);
    let bad = send(&stack, &t, "PUT", "/v1/users/u1", json!({}), Some("W/\"3\"")).await;
    assert_eq!((bad.status, bad.body["field"].as_str()), (400, Some("If-Match")));
}

#[tokio::test]
async fn of_concurrent_writers_with_one_revision_exactly_one_wins() {
    let stack = Arc::new(Stack::start().await);
    let t = rw(&stack, "acme");
    let etag = send(&stack, &t, "PUT", "/v1/users/race", json!({"name": "start"}), None).await.etag.unwrap();
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let (stack, t, etag) = (stack.clone(), t.clone(), etag.clone());
            tokio::spawn(async move {
                let path = "/v1/users/race";
                if i % 2 == 0 {
                    send(&stack, &t, "PUT", path, json!({"name": format!("w{i}")}), Some(&etag)).await
                } else {
                    send(&stack, &t, "PATCH", path, json!({"name": format!("w{i}")}), Some(&etag)).await
                }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for w in writers {
        answers.push(w.await.unwrap());
    }
    let winners: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    assert!(answers.iter().all(|a| a.status == 200 || a.status == 412), "{answers:?}");
    let now = get(&stack, &t, "/v1/users/race").await;
    assert_eq!(now.body["name"], winners[0].body["name"]);
}

#[tokio::test]
async fn pages_neither_skip_nor_repeat_under_concurrent_inserts() {
    let stack = Arc::new(Stack::start().await);
    let t = rw(&stack, "acme");
    let existing: BTreeSet<String> = (0..40).map(|i| format!("u{:03}", i * 10)).collect();
    for id in &existing {
        assert_eq!(send(&stack, &t, "PUT", &format!("/v1/users/{id}"), json!({}), None).await.status, 201);
    }
    // Another tenant's users never show up.
    let other = rw(&stack, "globex");
    send(&stack, &other, "PUT", "/v1/users/u005", json!({}), None).await;
    let writer = {
        let (stack, t) = (stack.clone(), t.clone());
        tokio::spawn(async move {
            for i in 0..40 {
                let id = format!("u{:03}", i * 10 + 5);
                send(&stack, &t, "PUT", &format!("/v1/users/{id}"), json!({}), None).await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/users?limit=7&cursor={c}"),
            None => "/v1/users?limit=7".to_owned(),
        };
        let page = get(&stack, &t, &path).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        for u in page.body["users"].as_array().unwrap() {
            seen.push(u["id"].as_str().unwrap().to_owned());
            assert!(u["revision"].as_u64().unwrap() > 0);
        }
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    writer.await.unwrap();
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a user was listed twice: {seen:?}");
    for id in &existing {
        assert!(seen.contains(id), "{id} was skipped: {seen:?}");
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "not in id order: {seen:?}");
    // A list reflects writes answered before it.
    send(&stack, &t, "PUT", "/v1/users/zzz", json!({}), None).await;
    let all = get(&stack, &t, "/v1/users?limit=500").await;
    assert_eq!(all.body["users"].as_array().unwrap().len(), 81);
    let bad = get(&stack, &t, "/v1/users?limit=0").await;
    assert_eq!(bad.status, 400);
    assert_eq!(get(&stack, &t, "/v1/users?cursor=a.b").await.status, 400);
}

#[tokio::test]
async fn tenants_never_see_each_others_users() {
    let stack = Stack::start().await;
    let (a, b) = (rw(&stack, "acme"), rw(&stack, "globex"));
    send(&stack, &a, "PUT", "/v1/users/same", json!({"name": "acme's"}), None).await;
    send(&stack, &b, "PUT", "/v1/users/same", json!({"name": "globex's"}), None).await;
    send(&stack, &a, "PUT", "/v1/users/only-a", json!({"name": "secret"}), None).await;
    assert_eq!(get(&stack, &a, "/v1/users/same").await.body["name"], "acme's");
    assert_eq!(get(&stack, &b, "/v1/users/same").await.body["name"], "globex's");
    for (method, path, body) in [
        ("GET", "/v1/users/only-a", None),
        ("GET", "/v1/users/only-a/preferences", None),
        ("PATCH", "/v1/users/only-a", Some(json!({"name": "mine"}))),
        ("POST", "/v1/users/only-a/devices", Some(json!({"token": "t", "platform": "fcm"}))),
        ("PUT", "/v1/users/only-a/preferences", Some(json!({}))),
        ("DELETE", "/v1/users/only-a", None),
    ] {
        let answer = call(&stack, &b, method, path, body.map(|b| b.to_string()), None).await;
        assert_eq!(answer.status, 404, "{method} {path}: {:?}", answer.body);
    }
    let listed = get(&stack, &b, "/v1/users").await;
    let ids: Vec<&str> =
        listed.body["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["same"]);
    assert_eq!(get(&stack, &a, "/v1/users/only-a").await.body["name"], "secret", "untouched");
    // A token without a tenant claim acts for its subject: a tenant of its own.
    let sub_only = auth::mint(
        &stack.config.jwt_secret,
        "acme",
        None,
        &[auth::SCOPE_USERS_READ],
        Duration::from_secs(60),
    );
    assert_eq!(get(&stack, &sub_only, "/v1/users/same").await.status, 200);
}

#[tokio::test]
async fn hostile_input_gets_a_clear_4xx() {
    let stack = Stack::start_with(&[(config::REQUIRED_CATEGORIES, "security")]).await;
    let t = rw(&stack, "acme");
    send(&stack, &t, "PUT", "/v1/users/h", json!({}), None).await;
    let devices = |n: usize| json!({"devices": (0..n).map(|i| json!({"token": format!("t{i}"), "platform": "fcm"})).collect::<Vec<_>>()});
    let mut deep = json!("x");
    for _ in 0..20 {
        deep = json!({"d": deep});
    }
    let mut very_deep = String::from("1");
    for _ in 0..200 {
        very_deep = format!("[{very_deep}]");
    }
    let long_id = format!("/v1/users/{}", "x".repeat(129));
    let cases: Vec<(&str, &str, String, u16, Option<&str>)> = vec![
        ("PUT", "/v1/users/h", json!({"phone": "0151 123"}).to_string(), 422, Some("phone")),
        ("PUT", "/v1/users/h", json!({"phone": "+12345678901234567"}).to_string(), 422, Some("phone")),
        ("PUT", "/v1/users/h", json!({"locale": "en_US"}).to_string(), 422, Some("locale")),
        ("PUT", "/v1/users/h", json!({"time_zone": "Mars/Olympus"}).to_string(), 422, Some("time_zone")),
        ("PUT", "/v1/users/h", json!({"email": "nope"}).to_string(), 422, Some("email")),
        (
            "PUT",
            "/v1/users/h",
            json!({"webhook_url": "file:///etc/passwd"}).to_string(),
            422,
            Some("webhook_url"),
        ),
        ("PUT", "/v1/users/h", json!({"name": 5}).to_string(), 400, Some("name")),
        ("PUT", "/v1/users/h", json!({"devices": "many"}).to_string(), 400, Some("devices")),
        (
            "PUT",
            "/v1/users/h",
            json!({"devices": [{"token": "t", "platform": "nokia"}]}).to_string(),
            400,
            Some("devices[0].platform"),
        ),
        ("PUT", "/v1/users/h", json!({"surprise": 1}).to_string(), 400, Some("surprise")),
        ("PUT", "/v1/users/h", json!({"attributes": [1]}).to_string(), 400, Some("attributes")),
        ("PUT", "/v1/users/h", devices(101).to_string(), 422, Some("devices")),
        ("PUT", "/v1/users/h", devices(10_000).to_string(), 413, None),
        ("PUT", "/v1/users/h", json!({"attributes": {"x": deep}}).to_string(), 422, Some("attributes.x")),
        ("PUT", "/v1/users/h", format!("{{\"attributes\":{{\"x\":{very_deep}}}}}"), 400, None),
        (
            "PUT",
            "/v1/users/h",
            json!({"attributes": {"blob": "b".repeat(9000)}}).to_string(),
            422,
            Some("attributes"),
        ),
        ("PUT", "/v1/users/h", "{\"name\": ".to_owned(), 400, None),
        ("PUT", "/v1/users/has.dot", "{}".to_owned(), 422, Some("id")),
        ("PUT", &long_id, "{}".to_owned(), 422, Some("id")),
        (
            "PUT",
            "/v1/users/h",
            json!({"preferences": {"channels": {"pigeon": true}}}).to_string(),
            422,
            Some("preferences.channels.pigeon"),
        ),
        (
            "PUT",
            "/v1/users/h",
            json!({"preferences": {"categories": {"security": {"email": false}}}}).to_string(),
            422,
            Some("preferences.categories.security.email"),
        ),
        (
            "PUT",
            "/v1/users/h/preferences",
            json!({"categories": {"security": {"sms": false}}}).to_string(),
            422,
            Some("categories.security.sms"),
        ),
        (
            "PUT",
            "/v1/users/h/preferences",
            json!({"quiet_hours": {"start": "25:00", "end": "07:00"}}).to_string(),
            422,
            Some("quiet_hours.start"),
        ),
        (
            "PUT",
            "/v1/users/h/preferences",
            json!({"quiet_hours": {"start": "22:00", "end": "07:00", "days": ["someday"]}}).to_string(),
            400,
            Some("quiet_hours.days[0]"),
        ),
        (
            "PUT",
            "/v1/users/h/preferences",
            json!({"fallback": ["push", "push"]}).to_string(),
            422,
            Some("fallback[1]"),
        ),
        ("PATCH", "/v1/users/h", json!({"id": "other"}).to_string(), 400, Some("id")),
        (
            "PATCH",
            "/v1/users/h",
            json!({"devices": [{"token": "t", "platform": "fcm", "added_at": "2020-01-01T00:00:00Z"}]})
                .to_string(),
            400,
            Some("devices[0].added_at"),
        ),
        ("PATCH", "/v1/users/h", json!({"phone": "12"}).to_string(), 422, Some("phone")),
        ("PATCH", "/v1/users/h", "[1]".to_owned(), 400, None),
        (
            "POST",
            "/v1/users/h/devices",
            json!({"token": "a/b", "platform": "fcm"}).to_string(),
            422,
            Some("devices[0].token"),
        ),
        (
            "POST",
            "/v1/users/h/devices",
            json!({"token": "x".repeat(600), "platform": "fcm"}).to_string(),
            422,
            Some("devices[0].token"),
        ),
        ("POST", "/v1/users/nobody/devices", json!({"token": "t", "platform": "fcm"}).to_string(), 404, None),
    ];
    for (method, path, body, status, field) in cases {
        let a = call(&stack, &t, method, path, Some(body.clone()), None).await;
        let shown = &body[..body.len().min(120)];
        assert_eq!(a.status, status, "{method} {path} {shown}: {:?}", a.body);
        assert_eq!(a.body["field"].as_str(), field, "{method} {path} {shown}: {:?}", a.body);
        assert!(a.body["message"].as_str().is_some_and(|m| !m.is_empty()), "{:?}", a.body);
    }
    // The cap also holds one device at a time.
    send(&stack, &t, "PUT", "/v1/users/h", devices(100), None).await;
    let over = send(
        &stack,
        &t,
        "POST",
        "/v1/users/h/devices",
        json!({"token": "one-more", "platform": "apns"}),
        None,
    )
    .await;
    assert_eq!((over.status, over.body["field"].as_str()), (422, Some("devices")), "{:?}", over.body);
    assert!(over.body["message"].as_str().unwrap().contains("100"), "{:?}", over.body);
    // Nothing of that changed the user beyond the accepted 100 devices.
    let h = get(&stack, &t, "/v1/users/h").await;
    assert_eq!(h.body["devices"].as_array().unwrap().len(), 100);
    assert_eq!(h.body["preferences"]["categories"], json!({}));
    assert_eq!(h.body["phone"], Value::Null);
}

/// A copy of `herald_users` in `dir`, following the stack's bucket.
fn follow(stack: &Stack, dir: &std::path::Path) -> (Arc<Mirror>, tokio::task::JoinHandle<()>) {
    let mirror = Arc::new(Mirror::open(dir, "users").unwrap());
    let task = tokio::spawn(mirror.clone().follow(stack.js.clone(), USERS_BUCKET.to_owned()));
    (mirror, task)
}

async fn copied_name(mirror: &Mirror, key: &str) -> Option<String> {
    let (_, bytes) = mirror.get(key).unwrap()?;
    let user = users::decode(key, &bytes).unwrap();
    Some(user.fields.name.unwrap_or_default())
}

#[tokio::test]
async fn a_user_update_reaches_the_copy_within_a_second() {
    let stack = Stack::start().await;
    let t = rw(&stack, "acme");
    let dir = tempfile::tempdir().unwrap();
    let (mirror, _task) = follow(&stack, dir.path());
    let key = user_key("acme", "fast");
    for name in ["first", "second"] {
        send(&stack, &t, "PUT", "/v1/users/fast", json!({"name": name}), None).await;
        eventually(Duration::from_secs(1), &format!("{name} in the copy"), || async {
            (copied_name(&mirror, &key).await.as_deref() == Some(name)).then_some(())
        })
        .await;
    }
    call(&stack, &t, "DELETE", "/v1/users/fast", None, None).await;
    eventually(Duration::from_secs(1), "the delete in the copy", || async {
        mirror.get(&key).unwrap().is_none().then_some(())
    })
    .await;
    let status = eventually(Duration::from_secs(2), "no lag", || async {
        let s = mirror.status();
        (s.lag == 0 && s.bucket_last > 0).then_some(s)
    })
    .await;
    assert_eq!(status.applied, status.bucket_last);

    // The gateway's own copy reports its lag on /ready and /metrics.
    let ready: Value =
        stack.http.get(format!("{}/ready", stack.base)).send().await.unwrap().json().await.unwrap();
    assert!(ready["users_copy_lag"].is_u64(), "{ready}");
    let metrics =
        stack.http.get(format!("{}/metrics", stack.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("herald_gateway_users_copy_lag"), "{metrics}");
}

#[tokio::test]
async fn a_reopened_copy_resumes_from_its_stored_revision() {
    let stack = Stack::start().await;
    let t = rw(&stack, "acme");
    let dir = tempfile::tempdir().unwrap();
    let (mirror, task) = follow(&stack, dir.path());
    for i in 0..20 {
        send(&stack, &t, "PUT", &format!("/v1/users/r{i}"), json!({"name": "before"}), None).await;
    }
    let before = eventually(Duration::from_secs(5), "20 users copied", || async {
        let s = mirror.status();
        (s.lag == 0 && s.applied_since_open >= 20 && mirror.get(&user_key("acme", "r19")).unwrap().is_some())
            .then_some(s)
    })
    .await;
    // The process "stops": the watch ends and the file is closed.
    task.abort();
    let _ = task.await;
    drop(mirror);
    // What happens while it is down.
    send(&stack, &t, "PUT", "/v1/users/r3", json!({"name": "after"}), None).await;
    call(&stack, &t, "DELETE", "/v1/users/r4", None, None).await;
    send(&stack, &t, "PUT", "/v1/users/new", json!({"name": "after"}), None).await;

    let reopened = Arc::new(Mirror::open(dir.path(), "users").unwrap());
    assert!(reopened.path().ends_with("users-0.redb"), "got its old file back");
    assert_eq!(reopened.status().applied, before.applied, "the revision was stored with the values");
    // Before NATS is asked anything, the copy serves from disk.
    assert_eq!(copied_name(&reopened, &user_key("acme", "r3")).await.as_deref(), Some("before"));
    let _task = tokio::spawn(reopened.clone().follow(stack.js.clone(), USERS_BUCKET.to_owned()));
    eventually(Duration::from_secs(2), "the missed changes", || async {
        let s = reopened.status();
        (s.lag == 0 && reopened.get(&user_key("acme", "new")).unwrap().is_some()).then_some(())
    })
    .await;
    assert_eq!(reopened.status().applied_since_open, 3, "only the three missed changes were applied");
    assert_eq!(copied_name(&reopened, &user_key("acme", "r3")).await.as_deref(), Some("after"));
    assert!(reopened.get(&user_key("acme", "r4")).unwrap().is_none());
    assert_eq!(reopened.list(&users::tenant_prefix("acme"), None, 100).unwrap().len(), 20);
}

#[tokio::test]
async fn the_copy_serves_reads_while_nats_is_down() {
    let mut stack = Stack::start().await;
    let t = rw(&stack, "acme");
    let dir = tempfile::tempdir().unwrap();
    let (mirror, task) = follow(&stack, dir.path());
    send(&stack, &t, "PUT", "/v1/users/steady", json!({"name": "kept"}), None).await;
    let key = user_key("acme", "steady");
    eventually(Duration::from_secs(1), "the user in the copy", || async {
        copied_name(&mirror, &key).await.map(|_| ())
    })
    .await;
    // Wait for the gateway's copy too, which the list reads.
    eventually(Duration::from_secs(2), "the gateway's list", || async {
        let page = get(&stack, &t, "/v1/users").await;
        (page.body["users"].as_array().is_some_and(|u| u.len() == 1)).then_some(())
    })
    .await;

    stack.nats.stop();
    assert_eq!(copied_name(&mirror, &key).await.as_deref(), Some("kept"));
    // A process restarted while NATS is down reads its copy from disk.
    task.abort();
    let _ = task.await;
    drop(mirror);
    let restarted = Arc::new(Mirror::open(dir.path(), "users").unwrap());
    let _task = tokio::spawn(restarted.clone().follow(stack.js.clone(), USERS_BUCKET.to_owned()));
    assert_eq!(copied_name(&restarted, &key).await.as_deref(), Some("kept"));
    // The gateway still lists from its copy; single reads need the bucket and say so.
    let page = get(&stack, &t, "/v1/users").await;
    assert_eq!(page.status, 200, "{:?}", page.body);
    assert_eq!(page.body["users"][0]["name"], "kept");
    let single = get(&stack, &t, "/v1/users/steady").await;
    assert_eq!(single.status, 503, "{:?}", single.body);
}

#[tokio::test]
async fn copies_of_two_processes_share_a_data_dir() {
    let stack = Stack::start().await;
    let t = rw(&stack, "acme");
    let dir = tempfile::tempdir().unwrap();
    let (a, _ta) = follow(&stack, dir.path());
    let (b, _tb) = follow(&stack, dir.path());
    assert_ne!(a.path(), b.path());
    send(&stack, &t, "PUT", "/v1/users/shared", json!({"name": "both"}), None).await;
    let key = user_key("acme", "shared");
    for m in [&a, &b] {
        eventually(Duration::from_secs(1), "the user in both copies", || async {
            (copied_name(m, &key).await.as_deref() == Some("both")).then_some(())
        })
        .await;
    }
}

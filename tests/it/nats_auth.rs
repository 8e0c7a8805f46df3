//! Secured NATS: the gateway and workers authenticate with a user and password, a token, an NKey
//! or a credentials file (operator mode), and speak TLS to a server that verifies their client
//! certificate — each against a real nats-server configured that way, with a notification
//! delivered end to end.

use std::{path::Path, process::Command, time::Duration};

use herald_shared::{
    config,
    nats_server::{Locator, free_port, locate},
};

use crate::{
    cli::KillOnDrop,
    support::{Sink, Stack, webhook_body},
};

/// A nats-server run from `conf` (JetStream's store in `dir`), and the URL to reach it.
fn server(dir: &Path, conf: &str, scheme: &str) -> (KillOnDrop, String) {
    let port = free_port();
    let file = dir.join("server.conf");
    let store = dir.join("store");
    std::fs::write(
        &file,
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n{conf}\n",
            store.display().to_string()
        ),
    )
    .unwrap();
    let binary = locate(&Locator::from_env()).unwrap();
    let child = Command::new(binary)
        .arg("-c")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "nats-server did not start with {conf}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (KillOnDrop(child), format!("{scheme}://127.0.0.1:{port}"))
}

/// Gateway and workers with `pairs` against the server: a webhook is accepted and delivered.
async fn delivers(server: KillOnDrop, url: &str, pairs: &[(&str, &str)]) {
    let sink = Sink::ok().await;
    let stack = Stack::on(server, url, pairs).await;
    let id = stack.send(webhook_body(&sink.url), None).await;
    assert_eq!(sink.wait_for(1).await[0].body["id"], id.as_str());
    stack.wait_status(&id, "delivered").await;
}

#[tokio::test]
async fn user_and_password() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url) =
        server(dir.path(), r#"authorization { users: [ { user: herald, password: "pa55-w0rd" } ] }"#, "nats");
    // Without credentials the server refuses the connection.
    assert!(async_nats::connect(&url).await.is_err());
    let password = dir.path().join("password");
    std::fs::write(&password, "pa55-w0rd\n").unwrap();
    let password = password.to_str().unwrap().to_owned();
    delivers(server, &url, &[(config::NATS_USER, "herald"), (config::NATS_PASSWORD_FILE, &password)]).await;
}

#[tokio::test]
async fn token() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url) = server(dir.path(), r#"authorization { token: "s3cret-t0ken" }"#, "nats");
    assert!(async_nats::connect(&url).await.is_err());
    delivers(server, &url, &[(config::NATS_TOKEN, "s3cret-t0ken")]).await;
}

#[tokio::test]
async fn nkey() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let conf = format!(r#"authorization {{ users: [ {{ nkey: "{}" }} ] }}"#, user.public_key());
    let (server, url) = server(dir.path(), &conf, "nats");
    assert!(async_nats::connect(&url).await.is_err());
    let seed = user.seed().unwrap();
    delivers(server, &url, &[(config::NATS_NKEY, &seed)]).await;
}

/// A NATS JWT (v2) with `claims` for `subject`, issued and signed by `issuer`, as `nsc` writes
/// them: a JWT whose algorithm is `ed25519-nkey`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({
        "jti": uuid::Uuid::now_v7().simple().to_string().to_uppercase(),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&signature))
}

/// Operator mode, as `nsc` sets it up: an operator, a system account and Herald's account with
/// JetStream, preloaded into the server's memory resolver; Herald connects with a `.creds` file
/// holding a user JWT the account issued and the user's seed.
#[tokio::test]
async fn credentials_file_in_operator_mode() {
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    // The system account may not have JetStream; Herald's account needs it.
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1,
    });
    let mut with_jetstream = unlimited.clone();
    for limit in ["mem_storage", "disk_storage", "streams", "consumer"] {
        with_jetstream[limit] = serde_json::json!(-1);
    }
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "herald-test",
        serde_json::json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    );
    let account_jwt = |key: &nkeys::KeyPair, name: &str, limits: &serde_json::Value| {
        nats_jwt(
            &operator,
            &key.public_key(),
            name,
            serde_json::json!({"type": "account", "version": 2, "limits": limits, "default_permissions": {"pub": {}, "sub": {}}}),
        )
    };
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "herald",
        serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    let conf = format!(
        "operator: {operator_jwt:?}\nsystem_account: {:?}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {:?}\n  {}: {:?}\n}}",
        system.public_key(),
        system.public_key(),
        account_jwt(&system, "SYS", &unlimited),
        account.public_key(),
        account_jwt(&account, "HERALD", &with_jetstream),
    );
    let creds = dir.path().join("herald.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let (server, url) = server(dir.path(), &conf, "nats");
    // Without the credentials the server refuses the connection.
    assert!(async_nats::connect(&url).await.is_err());
    delivers(server, &url, &[(config::NATS_CREDS, creds.to_str().unwrap())]).await;
}

/// `openssl` in `dir`: a CA, a server certificate for 127.0.0.1 and a client certificate.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Herald test CA",
    ]);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            ext,
        ]);
    }
}

#[tokio::test]
async fn tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let path = |f: &str| dir.path().join(f).to_str().unwrap().to_owned();
    let conf = format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}",
        path("server.pem"),
        path("server.key"),
        path("ca.pem")
    );
    let (server, url) = server(dir.path(), &conf, "tls");
    // A client that trusts the CA but shows no certificate is refused.
    let anonymous = async_nats::ConnectOptions::new()
        .add_root_certificates(dir.path().join("ca.pem"))
        .require_tls(true)
        .connect(&url)
        .await;
    assert!(anonymous.is_err(), "the server verifies clients");
    delivers(
        server,
        &url,
        &[
            (config::NATS_TLS_CA, &path("ca.pem")),
            (config::NATS_TLS_CERT, &path("client.pem")),
            (config::NATS_TLS_KEY, &path("client.key")),
        ],
    )
    .await;
}

#[test]
fn conflicting_or_incomplete_settings_are_refused_by_name() {
    for (pairs, names) in [
        (vec![(config::NATS_USER, "herald")], config::NATS_PASSWORD),
        (
            vec![(config::NATS_TOKEN, "t"), (config::NATS_USER, "u"), (config::NATS_PASSWORD, "p")],
            config::NATS_CREDS,
        ),
        (vec![(config::NATS_TLS_CA, "/no/such/ca.pem")], config::NATS_TLS_CA),
        (vec![(config::NATS_TLS_CERT, "/etc/hostname")], config::NATS_TLS_KEY),
    ] {
        let err = config::Config::from_pairs(&pairs).unwrap_err();
        assert_eq!(err.name, names, "{pairs:?}: {err}");
    }
    // A secret never shows in the configuration's debug form.
    let c = config::Config::from_pairs(&[(config::NATS_TOKEN, "v3ry-secret")]).unwrap();
    assert!(!format!("{c:?}").contains("v3ry-secret"));
}

/// The shipped `nats/accounts.conf`: after the admin applies the topology, a gateway and a
/// worker each running as their own least-privileged user deliver a notification; the worker
/// user cannot publish intents and the gateway user cannot delete a stream.
#[tokio::test]
async fn least_privilege_users_run_herald() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let passwords = [
        ("HERALD_ADMIN_PASSWORD", "admin-pw"),
        ("HERALD_GATEWAY_PASSWORD", "gateway-pw"),
        ("HERALD_WORKER_PASSWORD", "worker-pw"),
        ("HERALD_CONSOLE_PASSWORD", "console-pw"),
    ];
    let server = KillOnDrop(
        Command::new(locate(&Locator::from_env()).unwrap())
            .args([
                "-c",
                concat!(env!("CARGO_MANIFEST_DIR"), "/nats/accounts.conf"),
                "-p",
                &port.to_string(),
                "-sd",
            ])
            .arg(dir.path().join("store"))
            .envs(passwords)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("nats://127.0.0.1:{port}");
    crate::support::eventually(Duration::from_secs(10), "nats-server to listen", || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    })
    .await;
    let as_user = |user: &str, password: &str, args: &[&str]| {
        let data = dir.path().join(format!("data-{user}-{}", args[0]));
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .args(args)
            .env("HERALD_NATS_URL", &url)
            .env("HERALD_NATS_USER", user)
            .env("HERALD_NATS_PASSWORD", password)
            .env("HERALD_DATA_DIR", data)
            .env("HERALD_JWT_SECRET", "least-privilege")
            .env("HERALD_WEBHOOK_ALLOW_PRIVATE", "true")
            .env("HERALD_WEBHOOK_SECRET", crate::support::WEBHOOK_SECRET)
            .env("HERALD_RETRY_BACKOFF", "50ms")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    };
    let applied = as_user("admin", "admin-pw", &["topology", "apply"]).output().unwrap();
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));

    let http_port = free_port();
    let _gateway = KillOnDrop(
        as_user("gateway", "gateway-pw", &["gateway"])
            .env("HERALD_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _worker = KillOnDrop(
        as_user("worker", "worker-pw", &["worker"]).stderr(std::process::Stdio::null()).spawn().unwrap(),
    );
    let base = format!("http://127.0.0.1:{http_port}");
    let http = crate::support::http_client();
    crate::support::wait_ready(&base).await;
    let sink = Sink::ok().await;
    let token = herald_shared::auth::mint(
        "least-privilege",
        "tests",
        Some("acme"),
        herald_shared::auth::DEFAULT_SCOPES,
        Duration::from_secs(300),
    );
    let sent: serde_json::Value = http
        .post(format!("{base}/v1/notifications"))
        .bearer_auth(&token)
        .json(&webhook_body(&sink.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sent["id"].as_str().unwrap_or_else(|| panic!("not accepted: {sent}")).to_owned();
    assert_eq!(sink.wait_for(1).await[0].body["id"], id.as_str());
    crate::support::eventually(Duration::from_secs(15), "the delivery recorded", || {
        let (http, url, token) = (http.clone(), format!("{base}/v1/notifications/{id}"), token.clone());
        async move {
            let body: serde_json::Value =
                http.get(url).bearer_auth(token).send().await.ok()?.json().await.ok()?;
            (body["status"] == "delivered").then_some(())
        }
    })
    .await;

    let connect = |user: &'static str, password: &'static str| {
        let url = url.clone();
        async move {
            let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .connect(&url)
                .await
                .unwrap();
            async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(client)
        }
    };
    let worker = connect("worker", "worker-pw").await;
    let published = async {
        worker.publish("herald.intent.webhook", "{}".into()).await?.await?;
        Ok::<_, async_nats::Error>(())
    }
    .await;
    assert!(published.is_err(), "the worker user published an intent");
    let gateway = connect("gateway", "gateway-pw").await;
    assert!(gateway.delete_stream("HERALD_INTENTS").await.is_err(), "the gateway user deleted a stream");
    let admin = connect("admin", "admin-pw").await;
    assert!(admin.get_stream("HERALD_INTENTS").await.is_ok(), "the stream is still there");
    drop(server);
}

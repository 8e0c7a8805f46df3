//! Secured NATS: the gateway and workers authenticate with a user and password, a token or an
//! NKey, and speak TLS to a server that verifies their client certificate — each against a real
//! nats-server configured that way, with a notification delivered end to end.

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

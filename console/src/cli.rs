//! `herald dlq`: the dead-letter core at a shell prompt, talking to NATS directly (no gateway
//! needed, so it works on an edge box). Tables for people, `--json` (one JSON document per
//! command, or one line per letter for `list`) for scripts.

use std::{fmt::Write as _, io::Write as _, time::Duration};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use herald_shared::{
    Channel, Config,
    config::parse_duration,
    deadletter::{ErrorClass, Reason},
    dlq::{Actor, Bulk, DeadLetters, Filter, Letter, Progress, Replayed},
    topology,
};

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Start after this DLQ sequence (the `next` of the previous page).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Most letters to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per letter.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter: headers, the intent decoded, the notification's ledger entry.
    Show {
        /// Its DLQ sequence.
        sequence: u64,
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to their channel with a fresh attempt budget. Never sends what the
    /// ledger says was delivered; a second replay of a letter is harmless.
    Replay {
        /// DLQ sequences; or `--all` with filters.
        sequences: Vec<u64>,
        #[command(flatten)]
        bulk: BulkArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters, keeping the reason in the audit trail.
    Discard {
        /// DLQ sequences; or `--all` with filters.
        sequences: Vec<u64>,
        /// Why (kept in the audit trail, HERALD_AUDIT).
        #[arg(long)]
        why: String,
        #[command(flatten)]
        bulk: BulkArgs,
        #[arg(long)]
        json: bool,
    },
}

/// Which letters: every flag narrows.
#[derive(Debug, Args, Default, Clone)]
pub struct FilterArgs {
    #[arg(long)]
    pub channel: Option<Channel>,
    /// undecodable, invalid, expired, rejected, attempts_exhausted, max_deliveries, uncertain.
    #[arg(long, value_parser = parse_reason)]
    pub reason: Option<Reason>,
    /// transient or permanent.
    #[arg(long, value_parser = parse_class)]
    pub error_class: Option<ErrorClass>,
    #[arg(long)]
    pub tenant: Option<String>,
    /// A notification id.
    #[arg(long = "id")]
    pub notification_id: Option<String>,
    /// Parked at least this long ago (e.g. 10m, 2h).
    #[arg(long, value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Parked at most this long ago.
    #[arg(long, value_parser = parse_duration)]
    pub newer_than: Option<Duration>,
    /// Text the last error contains (case-insensitive).
    #[arg(long)]
    pub text: Option<String>,
}

impl FilterArgs {
    pub fn filter(&self) -> Filter {
        Filter {
            channel: self.channel,
            reason: self.reason,
            error_class: self.error_class,
            tenant: self.tenant.clone(),
            notification_id: self.notification_id.clone(),
            older_than: self.older_than,
            newer_than: self.newer_than,
            text: self.text.clone(),
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct BulkArgs {
    /// Act on every letter the filters match (instead of named sequences).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Letters per second for `--all`.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Who is acting, for the audit trail [default: $USER@hostname].
    #[arg(long)]
    pub actor: Option<String>,
}

fn parse_reason(s: &str) -> Result<Reason, String> {
    Reason::parse(s).ok_or_else(|| format!("unknown reason {s:?}"))
}

fn parse_class(s: &str) -> Result<ErrorClass, String> {
    match s {
        "transient" => Ok(ErrorClass::Transient),
        "permanent" => Ok(ErrorClass::Permanent),
        _ => Err(format!("unknown error class {s:?} (transient or permanent)")),
    }
}

/// The person at this terminal, for the audit trail: `$USER@<hostname>`.
pub fn operator() -> Actor {
    let user =
        std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    Actor(if host.is_empty() { user } else { format!("{user}@{host}") })
}

/// Connects and opens the DLQ (creating missing topology, changing nothing that exists).
pub async fn open(config: &Config) -> anyhow::Result<DeadLetters> {
    let (_client, js) = topology::connect(config, "herald-dlq").await?;
    let topology = tokio::time::timeout(config.nats_timeout * 4, topology::ensure(&js, config))
        .await
        .context("NATS did not answer in time")??;
    Ok(DeadLetters::new(&topology))
}

/// Runs one `herald dlq` command, writing to standard output.
pub async fn run(config: Config, command: DlqCommand) -> anyhow::Result<()> {
    let dlq = open(&config).await?;
    let mut out = std::io::stdout().lock();
    match command {
        DlqCommand::List { filter, after, limit, json } => {
            let page = dlq.list(&filter.filter(), after, limit).await?;
            if json {
                for letter in &page.letters {
                    writeln!(out, "{}", serde_json::to_string(letter)?)?;
                }
            } else {
                write!(out, "{}", table(&page.letters))?;
                match page.next {
                    Some(next) => writeln!(out, "more: --after {next}")?,
                    None => writeln!(out, "{} shown; end of the dead-letter queue", page.letters.len())?,
                }
            }
        }
        DlqCommand::Show { sequence, json } => {
            let detail = dlq.detail(sequence).await?.with_context(|| format!("no dead letter {sequence}"))?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&detail)?)?;
            } else {
                write!(out, "{}", describe(&detail))?;
            }
        }
        DlqCommand::Replay { sequences, bulk, json } => {
            act(&dlq, sequences, bulk, Bulk::Replay, json, &mut out).await?;
        }
        DlqCommand::Discard { sequences, why, bulk, json } => {
            act(&dlq, sequences, bulk, Bulk::Discard { reason: why }, json, &mut out).await?;
        }
    }
    Ok(())
}

async fn act(
    dlq: &DeadLetters,
    sequences: Vec<u64>,
    bulk: BulkArgs,
    action: Bulk,
    json: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let actor = bulk.actor.clone().map(Actor).unwrap_or_else(operator);
    if bulk.all != sequences.is_empty() {
        anyhow::bail!("name dead letters by sequence, or pass --all (with filters), not both");
    }
    if !bulk.all {
        let mut failed = 0;
        for seq in sequences {
            let result = match &action {
                Bulk::Replay => dlq.replay(seq, &actor).await.map(|r| match r {
                    Replayed::Requeued { intent_sequence } => format!("requeued as intent {intent_sequence}"),
                    Replayed::AlreadyDelivered => "already delivered; nothing sent, letter removed".into(),
                }),
                Bulk::Discard { reason } => {
                    dlq.discard(seq, &actor, reason).await.map(|()| "discarded".into())
                }
            };
            match result {
                Ok(what) if json => {
                    writeln!(out, "{}", serde_json::json!({"sequence": seq, "ok": true, "outcome": what}))?
                }
                Ok(what) => writeln!(out, "{seq}: {what}")?,
                Err(e) => {
                    failed += 1;
                    if json {
                        writeln!(
                            out,
                            "{}",
                            serde_json::json!({"sequence": seq, "ok": false, "error": e.to_string()})
                        )?;
                    } else {
                        writeln!(out, "{seq}: {e}")?;
                    }
                }
            }
        }
        if failed > 0 {
            anyhow::bail!("{failed} of the named dead letters were not acted on");
        }
        return Ok(());
    }
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut last_line = std::time::Instant::now();
    let progress = dlq
        .bulk(
            &bulk.filter.filter(),
            &action,
            bulk.rate,
            &actor,
            |p: &Progress| {
                // A line a second for people; scripts get the summary.
                if !json && (p.finished || last_line.elapsed() >= Duration::from_secs(1)) {
                    last_line = std::time::Instant::now();
                    eprintln!("{} of {} done (last sequence {})", p.done, p.matched, p.last_sequence);
                }
            },
            stop,
        )
        .await?;
    if json {
        writeln!(out, "{}", serde_json::to_string(&progress)?)?;
    } else {
        writeln!(out, "{}", summary(&progress))?;
    }
    if let Some(error) = progress.error {
        anyhow::bail!("stopped early: {error}; run the same command again to resume");
    }
    Ok(())
}

/// One line saying what a bulk action did.
pub fn summary(p: &Progress) -> String {
    format!(
        "matched {}, requeued {}, already delivered {}, discarded {}, skipped {}{}",
        p.matched,
        p.requeued,
        p.already_delivered,
        p.discarded,
        p.skipped,
        if p.finished { "" } else { " (interrupted)" }
    )
}

/// Letters as a table for a terminal.
pub fn table(letters: &[Letter]) -> String {
    let mut s = format!(
        "{:>8}  {:<8}  {:<18}  {:<9}  {:>3}  {:<20}  {:<28}  {}\n",
        "SEQ", "CHANNEL", "REASON", "CLASS", "ATT", "DEAD AT", "NOTIFICATION", "LAST ERROR"
    );
    for l in letters {
        let (reason, class, attempts, error) = match &l.parked {
            Some(p) => {
                (p.reason.as_str(), p.error_class.as_str(), p.attempts.to_string(), p.last_error.as_str())
            }
            None => ("?", "?", "?".into(), "not in Herald's dead-letter format"),
        };
        let _ = writeln!(
            s,
            "{:>8}  {:<8}  {:<18}  {:<9}  {:>3}  {:<20}  {:<28}  {}",
            l.sequence,
            l.channel.map_or("?".into(), |c| c.to_string()),
            reason,
            class,
            attempts,
            l.dead_at.format("%Y-%m-%d %H:%M:%S"),
            l.notification_id.as_deref().unwrap_or("?"),
            error.chars().take(60).collect::<String>(),
        );
    }
    s
}

/// One letter in full, for a terminal.
pub fn describe(d: &herald_shared::dlq::Detail) -> String {
    let l = &d.letter;
    let mut s = String::new();
    let _ = writeln!(s, "dead letter {} on {}", l.sequence, l.channel.map_or("?".into(), |c| c.to_string()));
    let _ = writeln!(s, "  notification  {}", l.notification_id.as_deref().unwrap_or("?"));
    let _ = writeln!(s, "  tenant        {}", l.tenant.as_deref().unwrap_or("-"));
    let _ = writeln!(s, "  dead at       {}", l.dead_at.to_rfc3339());
    if let Some(p) = &l.parked {
        let _ = writeln!(s, "  reason        {} ({})", p.reason.as_str(), p.error_class.as_str());
        let _ = writeln!(s, "  attempts      {}", p.attempts);
        let _ = writeln!(s, "  last error    {}", p.last_error);
        let _ = writeln!(s, "  came from     {} #{}", p.original_subject, p.original_sequence);
    }
    if let Some(n) = l.truncated_from {
        let _ = writeln!(s, "  truncated     only the first {} of {n} bytes were parked", l.payload.len());
    }
    if let Some(e) = &l.decode_error {
        let _ = writeln!(s, "  cannot decode {e}");
    }
    if let Some(e) = &d.entry {
        let _ = writeln!(
            s,
            "  ledger        {:?}, {} attempts over its life ({} in the last round), {} resends, updated {}",
            e.status,
            e.attempts,
            e.round_attempts,
            e.resends,
            e.updated_at.to_rfc3339()
        );
    }
    let _ = writeln!(s, "headers");
    for (name, value) in &l.headers {
        let _ = writeln!(s, "  {name}: {value}");
    }
    let _ = writeln!(s, "intent");
    match &d.intent {
        Some(i) => {
            for line in serde_json::to_string_pretty(i).unwrap_or_default().lines() {
                let _ = writeln!(s, "  {line}");
            }
        }
        None => {
            let _ = writeln!(s, "  ({} bytes that do not decode)", l.payload.len());
        }
    }
    s
}

//! Logging set-up: human-readable by default, JSON with `HERALD_LOG_FORMAT=json`.
//!
//! The level comes from `RUST_LOG` (default `info`, with async-nats's own chatter at `warn`).

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

/// Installs the global subscriber; calling it again is harmless.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn,poem=warn"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}

/// Prometheus text expositions of several parts of one process (the gateway's, the workers')
/// joined into one, ending in a single `# EOF`.
pub fn join_metrics(parts: impl IntoIterator<Item = String>) -> String {
    let mut out = String::new();
    for part in parts {
        let body = part.trim_end();
        let body = body.strip_suffix("# EOF").unwrap_or(body).trim_end();
        if !body.is_empty() {
            out.push_str(body);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

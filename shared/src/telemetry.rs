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

type Render = Box<dyn Fn() -> String + Send + Sync>;

/// Renderers of the Prometheus metrics parts of this process keep besides the gateway (the
/// workers' provider metrics). The gateway's `/metrics` and `herald worker`'s metrics address
/// both serve [`render_metrics`], so `herald up` shows everything on one page.
static METRIC_SOURCES: std::sync::Mutex<Vec<Render>> = std::sync::Mutex::new(Vec::new());

/// Adds a part's metrics (a Prometheus text exposition) to this process's.
pub fn add_metrics(render: impl Fn() -> String + Send + Sync + 'static) {
    METRIC_SOURCES.lock().expect("never poisoned").push(Box::new(render));
}

/// `own` followed by every added part, as one exposition ending in a single `# EOF`.
pub fn render_metrics(own: &str) -> String {
    let sources = METRIC_SOURCES.lock().expect("never poisoned");
    let mut out = String::with_capacity(own.len() + 4096);
    for part in std::iter::once(own.to_owned()).chain(sources.iter().map(|render| render())) {
        out.push_str(part.trim_end().strip_suffix("# EOF").unwrap_or(&part).trim_end());
        if !out.is_empty() {
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

//! Logging and tracing set-up: human-readable logs by default, JSON with
//! `HERALD_LOG_FORMAT=json`; with `HERALD_OTLP_ENDPOINT`, every span is also exported as
//! OpenTelemetry traces over OTLP/HTTP (JSON), and W3C `traceparent` carries a trace from the
//! HTTP request through the intent's NATS headers to the worker and on to webhook receivers.
//!
//! The level comes from `RUST_LOG` (default `info`, with async-nats's own chatter at `warn`).

use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::LogFormat;

/// The W3C trace-context header.
pub const TRACEPARENT: &str = "traceparent";

/// Whether spans are exported: without it there is no trace to carry, and the accept and
/// delivery paths skip the propagation work ([`inject`], [`continue_trace`]).
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Keeps the trace exporter alive; dropping it flushes what is left.
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber (logs, and traces to `otlp` when given, as `service`);
/// calling it again is harmless.
pub fn init(format: LogFormat, otlp: Option<&url::Url>, service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn,poem=warn"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).boxed(),
    };
    let provider = otlp.map(|endpoint| tracer_provider(endpoint, service));
    let traces = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(p.tracer("herald"))
    });
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let installed = tracing_subscriber::registry().with(filter).with(logs).with(traces).try_init().is_ok();
    if installed && provider.is_some() {
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Telemetry { provider }
}

fn tracer_provider(endpoint: &url::Url, service: &str) -> opentelemetry_sdk::trace::SdkTracerProvider {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let traces = format!("{}/v1/traces", endpoint.as_str().trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .with_endpoint(traces)
        .with_http_client(Exporter(reqwest::blocking::Client::new()))
        .build()
        .expect("the OTLP exporter builds from a valid URL");
    opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder_empty().with_service_name(service.to_owned()).build(),
        )
        .build()
}

/// The exporter's HTTP client: the batch processor exports from its own thread, outside any
/// async runtime, so a blocking client it is.
#[derive(Debug)]
struct Exporter(reqwest::blocking::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Exporter {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let mut call =
            self.0.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body.to_vec());
        call = call.timeout(std::time::Duration::from_secs(10));
        let response = call.send()?;
        let mut answer = http::Response::builder().status(response.status());
        for (name, value) in response.headers() {
            answer = answer.header(name, value);
        }
        Ok(answer.body(bytes::Bytes::from(response.bytes()?.to_vec()))?)
    }
}

/// Writes the current span's trace context into `headers` (a NATS message or an HTTP request):
/// `set(name, value)` for each field.
pub fn inject(mut set: impl FnMut(&str, String)) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !exporting() {
        return;
    }
    let context = tracing::Span::current().context();
    struct Set<'a>(&'a mut dyn FnMut(&str, String));
    impl opentelemetry::propagation::Injector for Set<'_> {
        fn set(&mut self, key: &str, value: String) {
            (self.0)(key, value)
        }
    }
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut Set(&mut set)));
}

/// Makes `span` continue the trace whose context `get(name)` reads (a `traceparent` that came
/// with a request or an intent). Without one, the span starts a trace of its own.
pub fn continue_trace(span: &tracing::Span, get: impl Fn(&str) -> Option<String>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !exporting() {
        return;
    }
    let fields: std::collections::HashMap<String, String> =
        [TRACEPARENT, "tracestate"].iter().filter_map(|k| Some(((*k).to_owned(), get(k)?))).collect();
    if fields.is_empty() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&fields));
    let _ = span.set_parent(parent);
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

//! Logs to stderr, and traces to an OpenTelemetry collector (OTLP over HTTP, protobuf) when
//! `otlp_endpoint` is set.
//!
//! Only command spans are exported (`admin.*`, `command.*`): a span per connection would live
//! as long as the connection and cost every idle device memory.

use anyhow::Context;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes exported spans when dropped at exit.
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Blocking is fine here: the runtime is gone, this is the last thing main does.
            if let Err(error) = provider.shutdown() {
                eprintln!("flushing traces failed: {error}");
            }
        }
    }
}

/// The collector URL for traces: `endpoint` is the OTLP/HTTP base (`http://host:4318`),
/// as in `OTEL_EXPORTER_OTLP_ENDPOINT`.
fn traces_url(endpoint: &str) -> String {
    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
}

/// Installs the global subscriber: `format` (`text` or `json`) logs filtered by `RUST_LOG`
/// (default `info`), plus trace export when `otlp_endpoint` is set.
pub(crate) fn init(
    format: &str,
    otlp_endpoint: Option<&str>,
    node_id: &str,
) -> anyhow::Result<Telemetry> {
    // `RUST_LOG` filters the logs only: exported spans have their own filter below, so a
    // quiet log level does not silence traces.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = if format == "json" {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let provider = otlp_endpoint.map(|e| provider(e, node_id)).transpose()?;
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("fleetgate"))
            .with_filter(filter_fn(|meta| {
                let name = meta.name();
                name.starts_with("admin.") || name.starts_with("command.")
            }))
    });
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    }
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .init();
    Ok(Telemetry { provider })
}

fn provider(endpoint: &str, node_id: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .build()
        .with_context(|| format!("OTLP exporter for {endpoint}"))?;
    let resource = Resource::builder()
        .with_service_name("fleetgate")
        .with_attribute(KeyValue::new("service.instance.id", node_id.to_owned()))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn traces_go_to_the_signal_path_of_the_base_endpoint() {
        assert_eq!(
            traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
    }
}

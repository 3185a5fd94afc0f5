//! Trace context carried inside bus messages ([`crate::Command::traceparent`]), so that one
//! command's trace spans the admin API, the node that owns the device and the device's answer.
//!
//! Both ends go through OpenTelemetry's global propagator: the binary installs the W3C one
//! when it exports traces; without it nothing is carried and nothing is parented.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C `traceparent` of the current span, if traces are exported.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// Makes `span` a child of the span `traceparent` names (a no-op when it is `None`, malformed,
/// or traces are not exported).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent: Context = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    if parent.span().span_context().is_valid() {
        // Fails only without an OpenTelemetry layer, when there is nothing to parent.
        let _ = span.set_parent(parent);
    }
}

//! OpenTelemetry: a command's trace crosses processes. The test is the collector: a small
//! OTLP/HTTP receiver that decodes what two nodes export.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use fleetgate_test_support::RedisServer;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::json;

use crate::support::{API_KEY, DEADLINE, Node, Raw, eventually};

/// One exported span, as the collector saw it.
#[derive(Debug, Clone)]
struct SeenSpan {
    /// `service.instance.id` of the exporting process (the node ID).
    node: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

type Collected = Arc<Mutex<Vec<SeenSpan>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn receive(State(seen): State<Collected>, body: Bytes) -> axum::http::StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    let mut spans = Vec::new();
    for rs in request.resource_spans {
        let node = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.instance.id")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            spans.push(SeenSpan {
                node: node.clone(),
                name: span.name,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
            });
        }
    }
    seen.lock().unwrap().extend(spans);
    axum::http::StatusCode::OK
}

/// Starts the collector; returns its base URL and what it has received so far.
async fn collector() -> (String, Collected) {
    let seen = Collected::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn a_commands_trace_spans_the_admin_call_the_owning_node_and_the_device_ack() {
    let (endpoint, seen) = collector().await;
    let redis = RedisServer::start();
    let url = redis.url();
    let mut nodes = Vec::new();
    for id in ["trace-admin", "trace-owner"] {
        nodes.push(
            Node::start(&[
                ("FLEETGATE_REDIS_URLS", url.as_str()),
                ("FLEETGATE_NODE_ID", id),
                ("FLEETGATE_OTLP_ENDPOINT", endpoint.as_str()),
                // Export every 100 ms rather than every 5 s.
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ])
            .await,
        );
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    let secret = a.provision("traced").await;
    let mut device = Raw::authed(&b.device_url(), "traced", &secret).await;

    // The caller's own trace continues through us.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let request = reqwest::Client::new()
        .post(format!("http://{}/v1/devices/traced/commands", a.admin))
        .bearer_auth(API_KEY)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({"payload": {"reboot": true}, "qos": 1, "waitMs": 5000}))
        .send();
    let call = tokio::spawn(async move {
        let resp = tokio::time::timeout(DEADLINE, request)
            .await
            .unwrap()
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json::<serde_json::Value>().await.unwrap(),
        )
    });
    let cmd = device.recv().await;
    device
        .send(json!({"type": "ack", "msgid": cmd["msgid"], "payload": {"result": "ok"}}))
        .await;
    assert_eq!(
        call.await.unwrap(),
        (200, json!({"msgid": cmd["msgid"], "result": "ok"}))
    );

    let find = |spans: &[SeenSpan], node: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.node == node && s.name == name && s.trace_id == trace_id)
            .cloned()
    };
    let (admin, deliver, ack) = eventually("the three spans of the command exported", || {
        let spans = seen.lock().unwrap().clone();
        async move {
            Some((
                find(&spans, "trace-admin", "admin.send_command")?,
                find(&spans, "trace-owner", "command.deliver")?,
                find(&spans, "trace-owner", "command.ack")?,
            ))
        }
    })
    .await;
    assert_eq!(
        admin.parent_span_id, caller_span,
        "the admin span continues the caller's"
    );
    assert_eq!(
        deliver.parent_span_id, admin.span_id,
        "delivery on the owning node"
    );
    assert_eq!(
        ack.parent_span_id, admin.span_id,
        "the device's ack on the owning node"
    );
    // Connection spans are not exported: they would live as long as the connection.
    assert!(
        seen.lock().unwrap().iter().all(|s| s.name != "conn"),
        "no per-connection spans"
    );
}

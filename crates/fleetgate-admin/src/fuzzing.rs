//! The request bodies as the fuzz targets (`fuzz/`) reach them. The body types and their
//! checks are private to their handlers' modules; the harness needs exactly the decoding
//! and checks a request runs, without a bus or a listener, so this module is their one
//! public door. Not an API: hidden from the docs, and free to change with the handlers.

use crate::rbac::{Principal, Role, Scope};
use crate::{AdminConfig, AppError, body_from_value};

/// Routes with a JSON body, as `"<METHOD> <path>"` (path parameters as the handler names
/// them): what [`body`] accepts.
pub const ROUTES: [&str; 11] = [
    "POST /v1/devices",
    "PATCH /v1/devices/{id}",
    "PATCH /v1/devices/{id}/shadow/desired",
    "POST /v1/devices/{id}/commands",
    "POST /v1/users",
    "PATCH /v1/users/{name}",
    "POST /v1/auth/login",
    "POST /v1/api-keys",
    "POST /v1/jobs",
    "PUT /v1/scenes/{name}",
    "PUT /v1/alert-rules/{id}",
];

/// Path parameter handed to the routes that take one (a valid name, so that the body's own
/// checks are reached).
const PATH_ID: &str = "fuzz-1";

/// The clock the checks compare expiries with.
const NOW_MS: i64 = 1_700_000_000_000;

/// Decodes `bytes` as `route`'s body and runs the checks its handler applies before touching
/// the bus, for a principal of every scope and of one group. `None` for a route not in
/// [`ROUTES`].
pub fn body(route: &str, bytes: &[u8]) -> Option<Result<(), AppError>> {
    let cfg = AdminConfig::default();
    let all = principal(Scope::All);
    let scoped = principal(Scope::from_groups(&["farm-a".into()]));
    // The answer is the unscoped caller's; the scoped one takes the scope checks' branches.
    let each = |check: &dyn Fn(&Principal) -> Result<(), AppError>| {
        let _ = check(&scoped);
        check(&all)
    };
    Some(match route {
        "POST /v1/devices" => {
            decode::<crate::devices::CreateDevice>(bytes).and_then(|req| each(&|p| req.check(p)))
        }
        "PATCH /v1/devices/{id}" => {
            decode::<crate::devices::UpdateDevice>(bytes).and_then(|req| req.check())
        }
        "PATCH /v1/devices/{id}/shadow/desired" => {
            decode::<crate::devices::SetDesired>(bytes).map(|req| desired(&req.state))
        }
        "POST /v1/devices/{id}/commands" => {
            decode::<crate::commands::SendCommand>(bytes).and_then(|req| req.check(&cfg).map(drop))
        }
        "POST /v1/users" => {
            decode::<crate::principals::CreateUser>(bytes).and_then(|req| each(&|p| req.check(p)))
        }
        "PATCH /v1/users/{name}" => {
            decode::<crate::principals::UpdateUser>(bytes).and_then(|req| each(&|p| req.check(p)))
        }
        "POST /v1/auth/login" => decode::<crate::principals::Login>(bytes).map(drop),
        "POST /v1/api-keys" => decode::<crate::principals::CreateKey>(bytes)
            .and_then(|req| each(&|p| req.check(p, NOW_MS))),
        "POST /v1/jobs" => each(&|p| {
            // The check takes the body apart into the job's step: one decoding per caller.
            decode::<crate::jobs::CreateJob>(bytes)?
                .check(&cfg, p)
                .map(drop)
        }),
        "PUT /v1/scenes/{name}" => decode::<crate::scenes::PutScene>(bytes)
            .and_then(|req| each(&|p| req.check(PATH_ID, &cfg, p))),
        "PUT /v1/alert-rules/{id}" => decode::<serde_json::Value>(bytes)
            .and_then(|body| crate::alerts::parse_rule(body, PATH_ID).map(drop)),
        _ => return None,
    })
}

/// The body's bytes as [`crate::Body`] reads them.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    let value = serde_json::from_slice(bytes)
        .map_err(|e| AppError::bad_request(format!("not JSON: {e}")))?;
    body_from_value(value)
}

/// The desired-state merge the bus applies to a shadow (`null` deletes a key), with the
/// delta and the size the shadow limit bounds.
fn desired(patch: &serde_json::Map<String, serde_json::Value>) {
    let mut shadow = fleetgate_bus::Shadow::default();
    shadow.reported.insert("mode".into(), "eco".into());
    shadow.desired.insert("mode".into(), "boost".into());
    if fleetgate_bus::merge_patch(&mut shadow.desired, patch) {
        shadow.recompute_delta();
    }
    let _ = shadow.document_bytes();
    // A patch applied twice changes nothing the second time.
    assert!(!fleetgate_bus::merge_patch(&mut shadow.desired, patch));
}

fn principal(scope: Scope) -> Principal {
    Principal {
        actor: "user:fuzz".into(),
        role: Role::Admin,
        scope,
        username: Some("fuzz".into()),
        expires_at_ms: None,
    }
}

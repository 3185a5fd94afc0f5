//! The OpenAPI document: generated from the handlers' own annotations and types (utoipa),
//! then completed here with what is the same for every route, so it is written once: the
//! shared error responses (400/401/403/413/415/503 with the error body), the ID patterns of
//! path parameters and ID lists, and the rule that a job step names a group or devices.

use serde_json::{Value, json};

/// Device IDs and group names.
pub(crate) const DEVICE_ID: &str = "^[A-Za-z0-9._:-]{1,128}$";
/// Usernames.
pub(crate) const USERNAME: &str = "^[a-z0-9._-]{1,64}$";
/// Scene names.
pub(crate) const SCENE: &str = "^[A-Za-z0-9._-]{1,64}$";
/// API key and job IDs.
pub(crate) const HEX_ID: &str = "^[0-9a-f]{16}$";

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

/// Completes the generated document (see the module docs) with `config`'s limits.
pub(crate) fn complete(mut doc: Value, config: &crate::AdminConfig) -> Value {
    let ms = |d: std::time::Duration| json!(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    for (schema, field, max) in [
        ("SendCommand", "waitMs", ms(config.max_wait)),
        ("SendCommand", "ttlMs", ms(config.max_ttl)),
        ("CreateJob", "ttlMs", ms(config.max_ttl)),
        ("Step", "ttlMs", ms(config.max_ttl)),
    ] {
        if let Some(prop) =
            doc.pointer_mut(&format!("/components/schemas/{schema}/properties/{field}"))
        {
            prop["maximum"] = max;
        }
    }
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (_, op) in item.iter_mut() {
                complete_operation(path, op);
            }
        }
    }
    // ID lists: every item has the ID pattern; grants may also say `*`.
    let grant = "^(\\*|[A-Za-z0-9._:-]{1,128})$";
    for (schema, field, pattern) in [
        ("CreateDevice", "groups", DEVICE_ID),
        ("UpdateDevice", "groups", DEVICE_ID),
        ("CreateJob", "devices", DEVICE_ID),
        ("Step", "devices", DEVICE_ID),
        ("CreateUser", "groups", grant),
        ("UpdateUser", "groups", grant),
        ("CreateKey", "groups", grant),
    ] {
        if let Some(items) = doc.pointer_mut(&format!(
            "/components/schemas/{schema}/properties/{field}/items"
        )) {
            items["pattern"] = json!(pattern);
        }
    }
    for (schema, field, pattern) in [
        ("CreateDevice", "id", DEVICE_ID),
        ("CreateJob", "group", DEVICE_ID),
        ("Step", "group", DEVICE_ID),
        ("CreateUser", "username", USERNAME),
    ] {
        if let Some(prop) =
            doc.pointer_mut(&format!("/components/schemas/{schema}/properties/{field}"))
        {
            prop["pattern"] = json!(pattern);
        }
    }
    // A job step (and a scene action) names a group, devices, or both.
    for name in ["CreateJob", "Step"] {
        if let Some(schema) = doc.pointer_mut(&format!("/components/schemas/{name}")) {
            schema["anyOf"] = json!([
                {"required": ["group"], "properties": {"group": {"type": "string"}}},
                {"required": ["devices"], "properties": {"devices": {"minItems": 1}}}
            ]);
        }
    }
    doc
}

fn complete_operation(path: &str, op: &mut Value) {
    let public = op
        .get("security")
        .and_then(Value::as_array)
        .is_some_and(|s| {
            s.iter()
                .all(|r| r.as_object().is_some_and(|o| o.is_empty()))
        });
    let has_body = op.get("requestBody").is_some();
    let has_params = op
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|p| !p.is_empty());
    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        for p in params.iter_mut() {
            // An absent parameter is `required: false`; a parameter cannot be JSON null.
            if let Some(types) = p["schema"]["type"].as_array() {
                let kept: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                if kept.len() == 1 {
                    p["schema"]["type"] = kept[0].clone();
                }
            }
            if p["in"] == "header" && p["name"] == "If-Match" {
                p["schema"]["pattern"] = json!("^(W/)?\"?[0-9]{1,18}\"?$");
            }
            if p["in"] == "path" {
                let pattern = match (p["name"].as_str(), path) {
                    (Some("id"), p) if p.starts_with("/v1/devices") => DEVICE_ID,
                    (Some("id"), _) => HEX_ID,
                    (Some("name"), p) if p.starts_with("/v1/users") => USERNAME,
                    (Some("name"), _) => SCENE,
                    _ => continue,
                };
                p["schema"]["pattern"] = json!(pattern);
            }
        }
    }
    let responses = op
        .as_object_mut()
        .map(|o| o.entry("responses").or_insert_with(|| json!({})));
    let Some(responses) = responses.and_then(Value::as_object_mut) else {
        return;
    };
    let mut add = |code: &str, description: &str| {
        responses.entry(code).or_insert_with(|| error(description));
    };
    if has_body || has_params {
        add("400", "Malformed request");
    }
    if has_body {
        add("413", "Body larger than the limit");
        add("415", "Body is not application/json");
    }
    if !public {
        add("401", "No or bad credentials");
        add("403", "The caller's role may not do this");
        add(
            "503",
            "The bus or the audit log is unavailable; nothing was changed",
        );
    } else if path != "/v1/openapi.json" {
        add("503", "The bus is unavailable");
    }
}

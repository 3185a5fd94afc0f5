//! The authorization matrix: every endpoint called as every role (scoped to `farm-a`) and
//! with every kind of bad credential, against an in-scope and an out-of-scope device; each
//! cell asserts the exact status and exactly the audit entries the call leaves. The rows are
//! one table, checked against the OpenAPI document: an endpoint without a row fails.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::support::{API_KEY, Node, eventually, now_ms};

const TOKEN_SECRET: &str = "rbac-test-token-secret-0123456789-abcdef";
const PASSWORD: &str = "correct horse battery staple";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Admin,
    Operator,
    Viewer,
    Auditor,
}

impl Role {
    const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Viewer, Role::Auditor];

    fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Auditor => "auditor",
        }
    }
}

/// What a row needs (the documented policy, written out here independently of the code).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Needs {
    Public,
    Authenticated,
    DeviceRead,
    DeviceWrite,
    CommandSend,
    ShadowWrite,
    JobRead,
    JobWrite,
    NodeRead,
    AlertWrite,
    AuditRead,
    PrincipalAdmin,
}

fn allows(role: Role, needs: Needs) -> bool {
    use Needs as N;
    match role {
        Role::Admin => true,
        Role::Operator => matches!(
            needs,
            N::Public
                | N::Authenticated
                | N::DeviceRead
                | N::DeviceWrite
                | N::CommandSend
                | N::ShadowWrite
                | N::JobRead
                | N::JobWrite
                | N::AlertWrite
                | N::NodeRead
        ),
        Role::Viewer => matches!(
            needs,
            N::Public | N::Authenticated | N::DeviceRead | N::NodeRead
        ),
        Role::Auditor => matches!(needs, N::Public | N::Authenticated | N::AuditRead),
    }
}

/// What the row's path or body names, set up fresh for every cell.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Subject {
    Nothing,
    /// `{id}` is a provisioned device, in or out of the caller's scope.
    Device,
    /// The body creates a device in the caller's groups, or in another group.
    NewDevice,
    /// `{name}` is a fresh user.
    User,
    /// `{id}` is a fresh API key.
    Key,
    /// `{id}` is a job of the caller's scope, or of scope `*`.
    Job,
    /// `{name}` is a scene of the caller's scope, or of scope `*`.
    Scene,
    /// The body names a group in the caller's scope, or another one.
    NewTarget,
    /// `{id}` is an alert rule on a group of the caller's scope, or on another group.
    Rule,
}

struct Row {
    method: &'static str,
    path: &'static str,
    action: &'static str,
    needs: Needs,
    subject: Subject,
    ok: u16,
    body: fn(&Cell) -> Option<Value>,
}

fn none(_: &Cell) -> Option<Value> {
    None
}

fn rows() -> Vec<Row> {
    use Needs as N;
    use Subject as S;
    let row = |method, path, action, needs, subject, ok, body| Row {
        method,
        path,
        action,
        needs,
        subject,
        ok,
        body,
    };
    vec![
        row(
            "POST",
            "/v1/auth/login",
            "auth.login",
            N::Public,
            S::Nothing,
            200,
            |_| Some(json!({"username": "viewer-a", "password": PASSWORD})),
        ),
        row(
            "POST",
            "/v1/auth/refresh",
            "auth.refresh",
            N::Authenticated,
            S::Nothing,
            200,
            none,
        ),
        row(
            "GET",
            "/v1/auth/me",
            "auth.me",
            N::Authenticated,
            S::Nothing,
            200,
            none,
        ),
        row(
            "POST",
            "/v1/users",
            "user.create",
            N::PrincipalAdmin,
            S::Nothing,
            201,
            |c| {
                Some(
                    json!({"username": format!("new-{}", c.n), "password": PASSWORD, "role": "viewer", "groups": ["farm-a"]}),
                )
            },
        ),
        row(
            "GET",
            "/v1/users",
            "user.list",
            N::PrincipalAdmin,
            S::Nothing,
            200,
            none,
        ),
        row(
            "PATCH",
            "/v1/users/{name}",
            "user.update",
            N::PrincipalAdmin,
            S::User,
            200,
            |_| Some(json!({"role": "viewer"})),
        ),
        row(
            "DELETE",
            "/v1/users/{name}",
            "user.delete",
            N::PrincipalAdmin,
            S::User,
            204,
            none,
        ),
        row(
            "POST",
            "/v1/api-keys",
            "key.create",
            N::PrincipalAdmin,
            S::Nothing,
            201,
            |_| Some(json!({"name": "ci", "role": "viewer", "groups": ["farm-a"]})),
        ),
        row(
            "GET",
            "/v1/api-keys",
            "key.list",
            N::PrincipalAdmin,
            S::Nothing,
            200,
            none,
        ),
        row(
            "DELETE",
            "/v1/api-keys/{id}",
            "key.revoke",
            N::PrincipalAdmin,
            S::Key,
            204,
            none,
        ),
        row(
            "POST",
            "/v1/devices",
            "device.create",
            N::DeviceWrite,
            S::NewDevice,
            201,
            |c| Some(json!({"id": format!("new-{}", c.n), "groups": [c.group()]})),
        ),
        row(
            "GET",
            "/v1/devices",
            "device.list",
            N::DeviceRead,
            S::Nothing,
            200,
            none,
        ),
        row(
            "GET",
            "/v1/devices/{id}",
            "device.get",
            N::DeviceRead,
            S::Device,
            200,
            none,
        ),
        row(
            "PATCH",
            "/v1/devices/{id}",
            "device.update",
            N::DeviceWrite,
            S::Device,
            200,
            |_| Some(json!({"groups": ["farm-a"]})),
        ),
        row(
            "DELETE",
            "/v1/devices/{id}",
            "device.delete",
            N::DeviceWrite,
            S::Device,
            204,
            none,
        ),
        row(
            "POST",
            "/v1/devices/{id}/rotate",
            "device.rotate",
            N::DeviceWrite,
            S::Device,
            200,
            none,
        ),
        row(
            "POST",
            "/v1/devices/{id}/revoke",
            "device.revoke",
            N::DeviceWrite,
            S::Device,
            204,
            none,
        ),
        row(
            "POST",
            "/v1/devices/{id}/mac-key",
            "device.mac_key_issue",
            N::DeviceWrite,
            S::Device,
            200,
            none,
        ),
        row(
            "DELETE",
            "/v1/devices/{id}/mac-key",
            "device.mac_key_drop",
            N::DeviceWrite,
            S::Device,
            204,
            none,
        ),
        row(
            "POST",
            "/v1/devices/{id}/certificates/revoke",
            "device.certificate_revoke",
            N::DeviceWrite,
            S::Device,
            204,
            |_| Some(json!({"sha256": "ab".repeat(32)})),
        ),
        row(
            "POST",
            "/v1/devices/{id}/disconnect",
            "device.disconnect",
            N::DeviceWrite,
            S::Device,
            204,
            none,
        ),
        row(
            "POST",
            "/v1/devices/{id}/commands",
            "command.send",
            N::CommandSend,
            S::Device,
            202,
            |_| Some(json!({"payload": {"action": "on"}, "qos": 1})),
        ),
        row(
            "GET",
            "/v1/devices/{id}/shadow",
            "shadow.get",
            N::DeviceRead,
            S::Device,
            200,
            none,
        ),
        row(
            "PATCH",
            "/v1/devices/{id}/shadow/desired",
            "shadow.desire",
            N::ShadowWrite,
            S::Device,
            200,
            |_| Some(json!({"state": {"mode": "eco"}})),
        ),
        row(
            "POST",
            "/v1/jobs",
            "job.create",
            N::JobWrite,
            S::NewTarget,
            202,
            |c| Some(json!({"group": c.group(), "payload": {}, "rate": 1})),
        ),
        row(
            "GET",
            "/v1/jobs",
            "job.list",
            N::JobRead,
            S::Nothing,
            200,
            none,
        ),
        row(
            "GET",
            "/v1/jobs/{id}",
            "job.get",
            N::JobRead,
            S::Job,
            200,
            none,
        ),
        row(
            "POST",
            "/v1/jobs/{id}/cancel",
            "job.cancel",
            N::JobWrite,
            S::Job,
            202,
            none,
        ),
        row(
            "GET",
            "/v1/scenes",
            "scene.list",
            N::JobRead,
            S::Nothing,
            200,
            none,
        ),
        row(
            "PUT",
            "/v1/scenes/{name}",
            "scene.put",
            N::JobWrite,
            S::NewTarget,
            201,
            |c| Some(json!({"actions": [{"group": c.group(), "payload": {}}]})),
        ),
        row(
            "GET",
            "/v1/scenes/{name}",
            "scene.get",
            N::JobRead,
            S::Scene,
            200,
            none,
        ),
        row(
            "DELETE",
            "/v1/scenes/{name}",
            "scene.delete",
            N::JobWrite,
            S::Scene,
            204,
            none,
        ),
        row(
            "POST",
            "/v1/scenes/{name}/activate",
            "scene.activate",
            N::JobWrite,
            S::Scene,
            202,
            none,
        ),
        row(
            "GET",
            "/v1/alert-rules",
            "alert_rule.list",
            N::DeviceRead,
            S::Nothing,
            200,
            none,
        ),
        row(
            "PUT",
            "/v1/alert-rules/{id}",
            "alert_rule.put",
            N::AlertWrite,
            S::NewTarget,
            201,
            |c| {
                Some(json!({"name": "hot", "target": {"group": c.group()},
                    "condition": {"threshold": {"tag": "t", "op": ">", "value": 1}}}))
            },
        ),
        row(
            "GET",
            "/v1/alert-rules/{id}",
            "alert_rule.get",
            N::DeviceRead,
            S::Rule,
            200,
            none,
        ),
        row(
            "DELETE",
            "/v1/alert-rules/{id}",
            "alert_rule.delete",
            N::AlertWrite,
            S::Rule,
            204,
            none,
        ),
        row(
            "GET",
            "/v1/alerts",
            "alert.list",
            N::DeviceRead,
            S::Nothing,
            200,
            none,
        ),
        row(
            "GET",
            "/v1/nodes",
            "node.list",
            N::NodeRead,
            S::Nothing,
            200,
            none,
        ),
        row(
            "GET",
            "/v1/audit",
            "audit.list",
            N::AuditRead,
            S::Nothing,
            200,
            none,
        ),
        row(
            "GET",
            "/v1/audit/verify",
            "audit.verify",
            N::AuditRead,
            S::Nothing,
            200,
            none,
        ),
        row(
            "GET",
            "/v1/audit/public-key",
            "audit.public_key",
            N::AuditRead,
            S::Nothing,
            200,
            none,
        ),
        row(
            "GET",
            "/v1/audit/export",
            "audit.export",
            N::AuditRead,
            S::Nothing,
            200,
            none,
        ),
        row(
            "GET",
            "/v1/openapi.json",
            "GET /v1/openapi.json",
            N::Public,
            S::Nothing,
            200,
            none,
        ),
    ]
}

/// Who calls.
#[derive(Clone, Debug)]
enum Caller {
    Role(Role),
    Nobody,
    ExpiredToken,
    RevokedKey,
    ExpiredKey,
    Garbage,
}

/// One cell's fixtures.
struct Cell {
    n: usize,
    in_scope: bool,
}

impl Cell {
    fn group(&self) -> &'static str {
        if self.in_scope { "farm-a" } else { "farm-b" }
    }
}

struct Matrix {
    node: Node,
    tokens: Vec<(Role, String)>,
    expired_token: String,
    revoked_key: String,
    expired_key: String,
    cursor: Option<String>,
}

impl Matrix {
    fn credential(&self, caller: &Caller) -> Option<String> {
        match caller {
            Caller::Role(r) => self
                .tokens
                .iter()
                .find(|(t, _)| t == r)
                .map(|(_, k)| k.clone()),
            Caller::Nobody => None,
            Caller::ExpiredToken => Some(self.expired_token.clone()),
            Caller::RevokedKey => Some(self.revoked_key.clone()),
            Caller::ExpiredKey => Some(self.expired_key.clone()),
            Caller::Garbage => Some("not-a-credential".to_owned()),
        }
    }

    async fn boot(&self, method: &str, path: &str, body: Value) -> Value {
        let (status, answer) = self.node.admin(method, path, Some(body)).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {answer}"
        );
        answer
    }

    /// Every audit entry after the cursor, moving the cursor to the end.
    async fn new_entries(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let path = match &self.cursor {
                Some(c) => format!("/v1/audit?limit=1000&cursor={c}"),
                None => "/v1/audit?limit=1000".to_owned(),
            };
            let (status, page) = self.node.admin("GET", &path, None).await;
            assert_eq!(status, 200, "{page}");
            out.extend(page["entries"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(next) => self.cursor = Some(next.to_owned()),
                None => return out,
            }
        }
    }
}

async fn setup() -> Matrix {
    let dir = std::env::temp_dir().join(format!(
        "fleetgate-rbac-{}-{}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("token-keys.toml");
    crate::support::write_secret(
        &keys,
        format!("[[keys]]\nkid = \"t1\"\nsecret = \"{TOKEN_SECRET}\"\n"),
    );
    let node = Node::start(&[
        ("FLEETGATE_ADMIN_TOKEN_KEYS", keys.to_str().unwrap()),
        ("FLEETGATE_AUDIT_CHECKPOINT_INTERVAL_MS", "3600000"),
    ])
    .await;
    let mut tokens = Vec::new();
    for role in Role::ALL {
        let name = format!("{}-a", role.name());
        let (s, b) = node
            .admin("POST", "/v1/users", Some(json!({"username": name, "password": PASSWORD, "role": role.name(), "groups": ["farm-a"]})))
            .await;
        assert_eq!(s, 201, "{b}");
        let (s, b) = node
            .admin_with_key(
                "POST",
                "/v1/auth/login",
                Some(json!({"username": name, "password": PASSWORD})),
                None,
            )
            .await;
        assert_eq!(s, 200, "{b}");
        tokens.push((role, b["token"].as_str().unwrap().to_owned()));
    }
    let header = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("t1".into());
        h
    };
    let now = now_ms() / 1000;
    let expired_token = jsonwebtoken::encode(
        &header,
        &json!({"sub": "viewer-a", "aud": "fleetgate-admin", "iat": now - 100, "exp": now - 10}),
        &jsonwebtoken::EncodingKey::from_secret(TOKEN_SECRET.as_bytes()),
    )
    .unwrap();
    let key = |expires: Option<i64>| {
        let mut body = json!({"name": "k", "role": "admin", "groups": ["*"]});
        if let Some(e) = expires {
            body["expiresAt"] = json!(e);
        }
        body
    };
    let (_, revoked) = node.admin("POST", "/v1/api-keys", Some(key(None))).await;
    let (s, _) = node
        .admin(
            "DELETE",
            &format!("/v1/api-keys/{}", revoked["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (_, expiring) = node
        .admin("POST", "/v1/api-keys", Some(key(Some(now_ms() + 1000))))
        .await;
    let expired_key = expiring["key"].as_str().unwrap().to_owned();
    // The key works until it expires, then never again.
    let (s, _) = node
        .admin_with_key("GET", "/v1/auth/me", None, Some(&expired_key))
        .await;
    assert_eq!(s, 200);
    eventually("the key to expire", || async {
        let (s, _) = node
            .admin_with_key("GET", "/v1/auth/me", None, Some(&expired_key))
            .await;
        (s == 401).then_some(())
    })
    .await;
    let mut m = Matrix {
        node,
        tokens,
        expired_token,
        revoked_key: revoked["key"].as_str().unwrap().to_owned(),
        expired_key,
        cursor: None,
    };
    m.new_entries().await;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_as_every_role_and_credential_answers_exactly_and_is_audited_exactly() {
    let mut m = setup().await;
    let rows = rows();

    // Every operation of the OpenAPI document has a row, and every row an operation.
    let (s, doc) = m
        .node
        .admin_with_key("GET", "/v1/openapi.json", None, None)
        .await;
    assert_eq!(s, 200);
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let tabled: BTreeSet<(String, String)> = rows
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    assert_eq!(
        documented, tabled,
        "the matrix must have a row per documented operation"
    );

    let callers: Vec<Caller> = Role::ALL
        .into_iter()
        .map(Caller::Role)
        .chain([
            Caller::Nobody,
            Caller::ExpiredToken,
            Caller::RevokedKey,
            Caller::ExpiredKey,
            Caller::Garbage,
        ])
        .collect();
    let mut n = 0;
    let mut cells = 0;
    for row in &rows {
        let variants: &[bool] = match row.subject {
            Subject::Device
            | Subject::NewDevice
            | Subject::Job
            | Subject::Scene
            | Subject::Rule
            | Subject::NewTarget => &[true, false],
            _ => &[true],
        };
        for &in_scope in variants {
            for caller in &callers {
                n += 1;
                let cell = Cell { n, in_scope };
                // Jobs and scenes in scope are made by the farm-a admin, others by the
                // bootstrap key (scope `*`).
                let maker = if in_scope {
                    m.credential(&Caller::Role(Role::Admin))
                } else {
                    Some(API_KEY.to_owned())
                };
                let path = match row.subject {
                    Subject::Device => {
                        let id = format!("m{n}");
                        m.boot(
                            "POST",
                            "/v1/devices",
                            json!({"id": id, "groups": [cell.group()]}),
                        )
                        .await;
                        row.path.replace("{id}", &id)
                    }
                    Subject::User => {
                        let name = format!("victim-{n}");
                        m.boot("POST", "/v1/users", json!({"username": name, "password": PASSWORD, "role": "viewer", "groups": ["farm-a"]})).await;
                        row.path.replace("{name}", &name)
                    }
                    Subject::Key => {
                        let k = m
                            .boot(
                                "POST",
                                "/v1/api-keys",
                                json!({"name": "victim", "role": "viewer", "groups": ["farm-a"]}),
                            )
                            .await;
                        row.path.replace("{id}", k["id"].as_str().unwrap())
                    }
                    Subject::Job => {
                        let (s, j) = m
                            .node
                            .admin_with_key(
                                "POST",
                                "/v1/jobs",
                                Some(json!({"group": "farm-a", "payload": {}, "rate": 1})),
                                maker.as_deref(),
                            )
                            .await;
                        assert_eq!(s, 202, "{j}");
                        row.path.replace("{id}", j["id"].as_str().unwrap())
                    }
                    Subject::Scene | Subject::NewTarget if row.path.contains("{name}") => {
                        let name = format!("scene-{n}");
                        if row.subject == Subject::Scene {
                            let (s, b) = m
                                .node
                                .admin_with_key(
                                    "PUT",
                                    &format!("/v1/scenes/{name}"),
                                    Some(json!({"actions": [{"devices": ["x"], "payload": {}}]})),
                                    maker.as_deref(),
                                )
                                .await;
                            assert_eq!(s, 201, "{b}");
                        }
                        row.path.replace("{name}", &name)
                    }
                    Subject::NewTarget => row.path.replace("{id}", &format!("rule-{n}")),
                    Subject::Rule => {
                        let id = format!("rule-{n}");
                        let (s, b) = m
                            .node
                            .admin_with_key(
                                "PUT",
                                &format!("/v1/alert-rules/{id}"),
                                Some(json!({"name": "hot", "target": {"group": cell.group()},
                                    "condition": {"offline": {"seconds": 60}}})),
                                maker.as_deref(),
                            )
                            .await;
                        assert_eq!(s, 201, "{b}");
                        row.path.replace("{id}", &id)
                    }
                    _ => row.path.to_owned(),
                };
                m.new_entries().await;
                let credential = m.credential(caller);
                let rid = format!("rbac-{n}");
                let (status, answer) = m
                    .node
                    .admin_request(
                        row.method,
                        &path,
                        (row.body)(&cell),
                        credential.as_deref(),
                        &[("x-request-id", &rid)],
                    )
                    .await;
                let bad_credentials = !matches!(caller, Caller::Role(_));
                let want = match caller {
                    _ if row.needs == Needs::Public => row.ok,
                    _ if bad_credentials => 401,
                    Caller::Role(r) if !allows(*r, row.needs) => 403,
                    _ if !in_scope
                        && matches!(
                            row.subject,
                            Subject::Device | Subject::Job | Subject::Scene | Subject::Rule
                        ) =>
                    {
                        404
                    }
                    _ if !in_scope
                        && matches!(row.subject, Subject::NewDevice | Subject::NewTarget) =>
                    {
                        403
                    }
                    _ => row.ok,
                };
                let what = format!("{} {path} as {caller:?} (in scope: {in_scope})", row.method);
                assert_eq!(status, want, "{what}: {answer}");
                if status >= 400 {
                    assert!(answer["error"]["code"].is_string(), "{what}: {answer}");
                }

                // The audit entries of this call, by its request ID.
                let entries: Vec<Value> = m
                    .new_entries()
                    .await
                    .into_iter()
                    .filter(|e| e["requestId"] == rid.as_str())
                    .collect();
                let changes = row.method != "GET";
                let refused_read = matches!(status, 401 | 403) || (status == 404 && !in_scope);
                let stages: Vec<&str> = entries
                    .iter()
                    .map(|e| e["stage"].as_str().unwrap())
                    .collect();
                let want_stages: &[&str] =
                    match (changes, bad_credentials && row.needs != Needs::Public) {
                        (_, true) => &["response"],
                        (true, false) => &["request", "response"],
                        (false, false) if refused_read => &["response"],
                        (false, false) => &[],
                    };
                assert_eq!(stages, want_stages, "{what}: {entries:?}");
                let actor = match caller {
                    Caller::Role(r) => format!("user:{}-a", r.name()),
                    _ => "anonymous".to_owned(),
                };
                for e in &entries {
                    assert_eq!(e["action"], row.action, "{what}: {e}");
                    if row.action != "auth.login" {
                        assert_eq!(e["actor"], actor.as_str(), "{what}: {e}");
                    }
                }
                if let Some(last) = entries.last() {
                    assert_eq!(last["outcome"], status, "{what}: {last}");
                    if row.subject == Subject::Device {
                        assert_eq!(
                            last["target"],
                            path.split('/')
                                .nth(3)
                                .map(|id| format!("device:{id}"))
                                .unwrap()
                                .as_str(),
                            "{what}"
                        );
                    }
                    if row.action == "command.send" && status == 202 {
                        assert_eq!(last["msgid"], answer["msgid"], "{what}");
                    }
                    if status == 404 && !in_scope {
                        assert_eq!(last["reason"], "out_of_scope", "{what}");
                    }
                }
                cells += 1;
            }
        }
    }
    assert_eq!(cells, n);
    assert!(cells > 300, "{cells} cells");

    // After all of it the chain verifies.
    let (s, v) = m.node.admin("GET", "/v1/audit/verify", None).await;
    assert_eq!((s, v["ok"].as_bool()), (200, Some(true)), "{v}");
}

#[tokio::test]
async fn scoped_listings_never_show_other_groups() {
    let m = setup().await;
    for (id, group) in [
        ("a-1", "farm-a"),
        ("b-1", "farm-b"),
        ("a-2", "farm-a"),
        ("none-1", ""),
    ] {
        let groups: Vec<&str> = if group.is_empty() {
            vec![]
        } else {
            vec![group]
        };
        m.boot("POST", "/v1/devices", json!({"id": id, "groups": groups}))
            .await;
    }
    let viewer = m.credential(&Caller::Role(Role::Viewer)).unwrap();
    let list = |q: &'static str| {
        let node = &m.node;
        let viewer = viewer.clone();
        async move {
            let (s, page) = node
                .admin_with_key("GET", &format!("/v1/devices{q}"), None, Some(&viewer))
                .await;
            assert_eq!(s, 200, "{page}");
            page["devices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list("").await, ["a-1", "a-2"]);
    assert_eq!(list("?group=farm-b").await, Vec::<String>::new());
    assert_eq!(list("?prefix=b").await, Vec::<String>::new());
    let (_, all) = m.node.admin("GET", "/v1/devices", None).await;
    assert_eq!(
        all["devices"].as_array().unwrap().len(),
        4,
        "the bootstrap key sees everything"
    );
    // A scoped admin neither sees nor changes principals of a wider scope.
    let (s, _) = m
        .node
        .admin(
            "POST",
            "/v1/users",
            Some(
                json!({"username": "root", "password": PASSWORD, "role": "admin", "groups": ["*"]}),
            ),
        )
        .await;
    assert_eq!(s, 201);
    let admin_a = m.credential(&Caller::Role(Role::Admin)).unwrap();
    for (method, body) in [
        ("PATCH", Some(json!({"password": "taken over, 0123456789"}))),
        ("DELETE", None),
    ] {
        let (s, _) = m
            .node
            .admin_with_key(method, "/v1/users/root", body, Some(&admin_a))
            .await;
        assert_eq!(s, 404, "{method} of a wider-scoped admin");
    }
    let (_, users) = m
        .node
        .admin_with_key("GET", "/v1/users", None, Some(&admin_a))
        .await;
    let names: Vec<&str> = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert!(
        !names.contains(&"root") && names.contains(&"viewer-a"),
        "{names:?}"
    );
    let (s, root) = m
        .node
        .admin_with_key(
            "POST",
            "/v1/auth/login",
            Some(json!({"username": "root", "password": PASSWORD})),
            None,
        )
        .await;
    assert_eq!(s, 200, "root's password is unchanged: {root}");
    // Bad credentials of the bootstrap kind are refused too.
    let (s, _) = m
        .node
        .admin_with_key("GET", "/v1/devices", None, Some(&format!("{API_KEY}x")))
        .await;
    assert_eq!(s, 401);
}

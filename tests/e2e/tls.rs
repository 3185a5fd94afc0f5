//! TLS on the listeners: versions and suites (Python's ssl), certificate rotation on disk under
//! live sessions, and device identity by client certificate (mTLS): wrong CN, expired, revoked
//! by CRL, revoked in the registry (the device, or one certificate by fingerprint), signed
//! by another CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber, date_time_ymd,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::support::{API_KEY, DEADLINE, Node, Raw, eventually, now_ms, status, write_secret};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fleetgate-tls-{}-{}-{name}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A throwaway certificate authority.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

/// A certificate and its key, as PEM.
struct Issued {
    cert: String,
    key: String,
}

/// Validity of the certificates these tests issue: current, or long expired.
const VALID: (i32, i32) = (2024, 2036);
const EXPIRED: (i32, i32) = (2020, 2021);

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    fn issue(&self, cn: &str, client: bool, serial: u64, years: (i32, i32)) -> Issued {
        let sans = if client {
            vec![]
        } else {
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
        };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.not_before = date_time_ymd(years.0, 1, 1);
        params.not_after = date_time_ymd(years.1, 1, 1);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn crl(&self, revoked: &[u64]) -> String {
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2025, 1, 1),
            next_update: date_time_ymd(2040, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: date_time_ymd(2025, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_params(&self.params, &self.key);
        params.signed_by(&issuer).unwrap().pem().unwrap()
    }
}

/// Writes `issued` as `<name>.pem` / `<name>.key` in `dir` (the key 0600), atomically.
fn install(dir: &Path, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let tmp_key = dir.join(format!("{name}.key.tmp"));
    write_secret(&tmp_key, &issued.key);
    std::fs::write(dir.join(format!("{name}.pem.tmp")), &issued.cert).unwrap();
    std::fs::rename(&tmp_key, &key).unwrap();
    std::fs::rename(dir.join(format!("{name}.pem.tmp")), &cert).unwrap();
    (cert, key)
}

fn client_config(ca_pem: &str, client: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(issued) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(issued.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr`; `Err` when the handshake fails.
async fn tls(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let handshake = TlsConnector::from(config).connect(name, tcp);
    tokio::time::timeout(DEADLINE, handshake)
        .await
        .expect("handshake in time")
}

/// The served certificate's PEM-less DER, from a fresh handshake.
async fn served_certificate(addr: &str, ca_pem: &str) -> Vec<u8> {
    let stream = tls(addr, client_config(ca_pem, None))
        .await
        .expect("handshake");
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Opens a device WebSocket over TLS.
async fn wss(
    node: &Node,
    config: Arc<rustls::ClientConfig>,
    headers: &[(&str, &str)],
) -> Result<Raw, String> {
    let stream = tls(&node.gateway, config)
        .await
        .map_err(|e| e.to_string())?;
    let url = format!("wss://{}/v1/device", node.gateway);
    // TLS 1.3 reports a refused client certificate only with the server's first records, so
    // such a refusal shows as an upgrade that fails without an HTTP answer (status 0).
    Raw::try_connect_over(Box::new(stream), &url, headers)
        .await
        .map_err(|status| format!("upgrade failed with status {status}"))
}

#[tokio::test]
async fn a_certificate_rotated_on_disk_is_served_to_new_handshakes_and_drops_no_session() {
    let dir = scratch("rotate");
    let ca = Ca::new("rotation CA");
    let first = ca.issue("localhost", false, 1, (2024, 2035));
    let second = ca.issue("localhost", false, 2, (2024, 2036));
    let (cert, key) = install(&dir, "server", &first);
    let node = Node::start(&[
        ("FLEETGATE_TLS_CERT", cert.to_str().unwrap()),
        ("FLEETGATE_TLS_KEY", key.to_str().unwrap()),
        ("FLEETGATE_TLS_RELOAD_INTERVAL_MS", "100"),
    ])
    .await;
    assert_eq!(
        served_certificate(&node.gateway, &ca.pem).await,
        der(&first.cert)
    );

    let config = client_config(&ca.pem, None);
    let mut sessions = Vec::new();
    for i in 0..100 {
        let id = format!("rot-{i}");
        let secret = node.provision(&id).await;
        let mut raw = wss(&node, config.clone(), &[]).await.expect("wss");
        raw.send(json!({"type":"auth","deviceId":id,"token":secret}))
            .await;
        assert_eq!(raw.recv().await["status"], "success");
        sessions.push((id, raw));
    }

    install(&dir, "server", &second);
    eventually("new handshakes get the new certificate", || async {
        (served_certificate(&node.gateway, &ca.pem).await == der(&second.cert)).then_some(())
    })
    .await;
    let (_, metrics) = node.internal_get("/metrics").await;
    let expiry = date_time_ymd(2036, 1, 1).unix_timestamp();
    assert!(
        metrics.contains(&format!(
            "fleetgate_tls_certificate_expiry_timestamp_seconds{{listener=\"public\"}} {expiry}"
        )),
        "expiry gauge follows the reload:\n{metrics}"
    );

    // Every session opened before the rotation still works: 100 sent, 100 acked.
    let mut acked = 0;
    for (id, raw) in &mut sessions {
        raw.send(status(id, "after-rotation", 1, json!({"t": 1})))
            .await;
        if raw.recv().await == json!({"type":"ack","msgid":"after-rotation"}) {
            acked += 1;
        }
    }
    assert_eq!(acked, 100);

    // A broken file is not loaded: the current certificate stays and handshakes go on.
    std::fs::write(&cert, "not a certificate").unwrap();
    eventually("the failed reload is counted", || async {
        let (_, m) = node.internal_get("/metrics").await;
        m.contains("fleetgate_tls_reload_errors_total{listener=\"public\"}")
            .then_some(())
    })
    .await;
    assert_eq!(
        served_certificate(&node.gateway, &ca.pem).await,
        der(&second.cert)
    );
}

/// A node that takes device certificates signed by `ca` (with a CRL revoking serial 66).
async fn mtls_node(dir: &Path, ca: &Ca, client_auth: &str) -> Node {
    let (cert, key) = install(dir, "server", &ca.issue("localhost", false, 1, VALID));
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let crl = dir.join("crl.pem");
    std::fs::write(&crl, ca.crl(&[66])).unwrap();
    Node::start(&[
        ("FLEETGATE_TLS_CERT", cert.to_str().unwrap()),
        ("FLEETGATE_TLS_KEY", key.to_str().unwrap()),
        ("FLEETGATE_TLS_CLIENT_CA", ca_path.to_str().unwrap()),
        ("FLEETGATE_TLS_CRL", crl.to_str().unwrap()),
        ("FLEETGATE_TLS_CLIENT_AUTH", client_auth),
    ])
    .await
}

#[tokio::test]
async fn client_certificates_identify_devices_and_bad_ones_are_refused() {
    let dir = scratch("mtls");
    let ca = Ca::new("device CA");
    let node = mtls_node(&dir, &ca, "required").await;
    let with = |issued: &Issued| client_config(&ca.pem, Some(issued));

    // The certificate alone authenticates; the routed ID must match it.
    let good = ca.issue("cert-dev-1", true, 10, VALID);
    let mut raw = wss(&node, with(&good), &[("Device-ID", "cert-dev-1")])
        .await
        .expect("good certificate");
    assert_eq!(raw.recv().await["status"], "success");
    raw.send(status("cert-dev-1", "m1", 1, json!({"t": 1})))
        .await;
    assert_eq!(raw.recv().await, json!({"type":"ack","msgid":"m1"}));
    drop(raw);

    let mut wrong_cn = wss(&node, with(&good), &[("Device-ID", "cert-dev-2")])
        .await
        .expect("TLS accepts the certificate");
    let resp = wrong_cn.recv().await;
    assert_eq!(resp["status"], "error", "{resp}");
    let closed = wrong_cn.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (4403, "device ID does not match the credentials")
    );

    // Refused in the handshake: expired, revoked by the CRL, another CA, none at all.
    let other_ca = Ca::new("someone else's CA");
    let cases = [
        ("expired", with(&ca.issue("cert-dev-3", true, 11, EXPIRED))),
        (
            "revoked by CRL",
            with(&ca.issue("cert-dev-4", true, 66, VALID)),
        ),
        (
            "other CA",
            client_config(
                &ca.pem,
                Some(&other_ca.issue("cert-dev-5", true, 12, VALID)),
            ),
        ),
        ("no certificate", client_config(&ca.pem, None)),
    ];
    for (what, config) in cases {
        let refused = wss(&node, config, &[]).await;
        assert!(refused.is_err(), "{what} was accepted");
    }
    let (_, metrics) = node.internal_get("/metrics").await;
    assert!(
        metrics.contains(
            "fleetgate_tls_handshake_failures_total{listener=\"public\",reason=\"refused\"} 4"
        ),
        "{metrics}"
    );

    // Revoked in the registry: a provisioned device's revoke refuses its certificate too.
    node.provision("cert-dev-6").await;
    let (code, _) = node
        .admin("POST", "/v1/devices/cert-dev-6/revoke", None)
        .await;
    assert_eq!(code, 204);
    let revoked = ca.issue("cert-dev-6", true, 13, VALID);
    let mut raw = wss(&node, with(&revoked), &[])
        .await
        .expect("TLS accepts it");
    assert_eq!(raw.recv().await["reason"], "credentials revoked");
    assert_eq!(raw.closed().await.code, 4403);
}

#[tokio::test]
async fn one_revoked_certificate_is_refused_and_its_session_closed_while_others_work() {
    use sha2::Digest;
    let dir = scratch("fingerprint");
    let ca = Ca::new("device CA");
    let node = mtls_node(&dir, &ca, "required").await;
    let with = |issued: &Issued| client_config(&ca.pem, Some(issued));
    node.provision("cert-dev-7").await;
    let (old, new) = (
        ca.issue("cert-dev-7", true, 20, VALID),
        ca.issue("cert-dev-7", true, 21, VALID),
    );
    let mut live = wss(&node, with(&old), &[]).await.expect("old certificate");
    assert_eq!(live.recv().await["status"], "success");

    // As `openssl x509 -fingerprint -sha256` prints it: upper case, colons.
    let print = sha2::Sha256::digest(der(&old.cert));
    let openssl_style: Vec<String> = print.iter().map(|b| format!("{b:02X}")).collect();
    let path = "/v1/devices/cert-dev-7/certificates/revoke";
    let (code, body) = node
        .admin(
            "POST",
            path,
            Some(json!({"sha256": openssl_style.join(":")})),
        )
        .await;
    assert_eq!(code, 204, "{body}");
    let closed = live.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (4410, "certificate revoked")
    );

    let mut again = wss(&node, with(&old), &[]).await.expect("TLS accepts it");
    assert_eq!(again.recv().await["reason"], "credentials revoked");
    assert_eq!(again.closed().await.code, 4403);
    let mut other = wss(&node, with(&new), &[]).await.expect("new certificate");
    assert_eq!(other.recv().await["status"], "success");

    let (_, device) = node.admin("GET", "/v1/devices/cert-dev-7", None).await;
    assert_eq!(
        device["revokedCertificates"],
        json!([hex::encode(print)]),
        "{device}"
    );
    let (code, body) = node
        .admin("POST", path, Some(json!({"sha256": "not-hex"})))
        .await;
    assert_eq!(
        (code, body["error"]["message"].as_str()),
        (400, Some("sha256 must be 64 hex digits"))
    );
    let (code, _) = node
        .admin(
            "POST",
            "/v1/devices/nobody/certificates/revoke",
            Some(json!({"sha256": hex::encode(print)})),
        )
        .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn with_optional_client_certificates_devices_without_one_use_tokens() {
    let dir = scratch("optional");
    let ca = Ca::new("device CA");
    let node = mtls_node(&dir, &ca, "optional").await;
    let secret = node.provision("tok-dev").await;
    let mut raw = wss(&node, client_config(&ca.pem, None), &[])
        .await
        .expect("no certificate is fine");
    raw.send(json!({"type":"auth","deviceId":"tok-dev","token":secret}))
        .await;
    assert_eq!(raw.recv().await["status"], "success");
    let cert = ca.issue("cert-opt", true, 20, VALID);
    let mut raw = wss(&node, client_config(&ca.pem, Some(&cert)), &[])
        .await
        .expect("certificate");
    assert_eq!(raw.recv().await["status"], "success");
}

#[tokio::test]
async fn dev_certs_script_and_python_clients_over_tls_and_mtls() {
    let dir = scratch("devcerts");
    let script = format!("{}/../scripts/dev-certs", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(&script)
        .args(["-o", dir.to_str().unwrap(), "py-cert-1"])
        .output()
        .expect("run scripts/dev-certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let node = Node::start(&[
        ("FLEETGATE_TLS_CERT", &p("server.pem")),
        ("FLEETGATE_TLS_KEY", &p("server.key")),
        ("FLEETGATE_TLS_CLIENT_CA", &p("ca.pem")),
        ("FLEETGATE_ADMIN_TLS_CERT", &p("server.pem")),
        ("FLEETGATE_ADMIN_TLS_KEY", &p("server.key")),
    ])
    .await;
    let script = format!("{}/interop/tls.py", env!("CARGO_MANIFEST_DIR"));
    let run = tokio::process::Command::new("python3")
        .args([
            &script,
            &node.gateway,
            &node.admin,
            &p("ca.pem"),
            API_KEY,
            "py-cert-1",
            &p("devices/py-cert-1.pem"),
            &p("devices/py-cert-1.key"),
        ])
        .output();
    let out = tokio::time::timeout(DEADLINE * 3, run)
        .await
        .expect("script finished in time")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("interop: all steps passed"),
        "tls.py failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_world_readable_key_file_is_refused_at_start() {
    let dir = scratch("perms");
    let ca = Ca::new("perm CA");
    let (cert, key) = install(&dir, "server", &ca.issue("localhost", false, 1, VALID));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let env = [
        ("FLEETGATE_API_KEY", API_KEY),
        ("FLEETGATE_LISTEN", "127.0.0.1:0"),
        ("FLEETGATE_ADMIN_LISTEN", "127.0.0.1:0"),
        ("FLEETGATE_INTERNAL_LISTEN", "127.0.0.1:0"),
        ("FLEETGATE_TLS_CERT", cert.to_str().unwrap()),
        ("FLEETGATE_TLS_KEY", key.to_str().unwrap()),
    ];
    let run = tokio::process::Command::new(fleetgate_e2e::fleetgate_binary().unwrap())
        .arg("all")
        .envs(env)
        .output();
    let out = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("exits in time")
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a world-readable key");
    assert!(stderr.contains("world-readable"), "{stderr}");
}

#[tokio::test]
async fn the_sdk_connects_over_wss_from_a_chosen_address_trusting_a_given_ca() {
    use fleetgate_device::{Device, DeviceOptions, Qos, tls_client_config};
    let dir = scratch("sdk");
    let ca = Ca::new("sdk CA");
    let (cert, key) = install(&dir, "server", &ca.issue("localhost", false, 1, VALID));
    let node = Node::start(&[
        ("FLEETGATE_TLS_CERT", cert.to_str().unwrap()),
        ("FLEETGATE_TLS_KEY", key.to_str().unwrap()),
    ])
    .await;
    let secret = node.provision("sdk-tls").await;
    let url = format!("wss://{}/v1/device", node.gateway);
    let mut opts = DeviceOptions::new(url, "sdk-tls", secret);
    opts.bind_addr = Some("127.0.0.2".parse().unwrap());
    opts.tls = Some(tls_client_config(ca.pem.as_bytes(), None).unwrap());
    let (client, mut events) = Device::connect(opts).unwrap();
    assert_eq!(crate::sdk::connected(&mut events).await, 0);
    client
        .send_status(json!({"t": 1}), Qos::AtLeastOnce)
        .await
        .expect("acked over wss");
}

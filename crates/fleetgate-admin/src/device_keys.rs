//! A device's key material beyond its secret: the message-signing (MAC) key, and the client
//! certificates revoked for it.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use fleetgate_bus::DeviceRecord;
use fleetgate_protocol::CloseCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{ScopedDevice, need};
use crate::devices::close_session;
use crate::{AdminState, AppError, Body, ErrorBody, Res};

/// Most certificates revoked per device: the list rides in the record every authentication
/// reads, so a CRL is the tool for mass revocation.
const MAX_REVOKED_CERTS: usize = 32;

/// A device's new MAC key (shown once).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MacKeyIssued {
    id: String,
    /// 64 hex digits: the HMAC-SHA256 key for the `sig` of its messages.
    mac_key: String,
}

/// `POST /v1/devices/{id}/certificates/revoke` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeCertificate {
    /// SHA-256 of the certificate's DER, 64 hex digits (`openssl x509 -noout -fingerprint
    /// -sha256`, colons allowed).
    #[schema(pattern = "^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$")]
    sha256: String,
}

fn provisioned(device: ScopedDevice<need::DeviceWrite>) -> Result<DeviceRecord, AppError> {
    device
        .record
        .ok_or_else(|| AppError::not_found(format!("no device {}", device.id)))
}

async fn store(state: &AdminState, record: &DeviceRecord) -> Result<(), AppError> {
    if state.bus.device_update(record).await? {
        Ok(())
    } else {
        Err(AppError::not_found(format!("no device {}", record.id)))
    }
}

/// Gives the device a new MAC key, shown once: from its next connection every message it
/// sends must carry a valid `sig` (docs/PROTOCOL.md). A live session keeps the old rule until
/// it reconnects; disconnect it to apply the key at once.
#[utoipa::path(post, path = "/v1/devices/{id}/mac-key", tag = "devices",
    params(("id" = String, Path, description = "device ID")),
    responses((status = 200, body = MacKeyIssued), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn issue_mac_key(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::DeviceWrite>,
) -> Res {
    let mut record = provisioned(device)?;
    let key: [u8; 32] = rand::random();
    record.mac_key = Some(key);
    store(&state, &record).await?;
    Ok(Json(MacKeyIssued {
        id: record.id,
        mac_key: hex::encode(key),
    })
    .into_response())
}

/// Drops the device's MAC key, if it has one: its messages need no signature from its next
/// connection.
#[utoipa::path(delete, path = "/v1/devices/{id}/mac-key", tag = "devices",
    params(("id" = String, Path, description = "device ID")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn drop_mac_key(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::DeviceWrite>,
) -> Res {
    let mut record = provisioned(device)?;
    if record.mac_key.take().is_some() {
        store(&state, &record).await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Parses a SHA-256 fingerprint: 32 pairs of hex digits, each but the last optionally
/// followed by a colon (the schema's pattern, exactly).
fn fingerprint(text: &str) -> Result<[u8; 32], AppError> {
    let bad = || AppError::bad_request("sha256 must be 64 hex digits");
    let mut out = [0u8; 32];
    let mut rest = text.as_bytes();
    for (i, byte) in out.iter_mut().enumerate() {
        let (pair, tail) = rest.split_at_checked(2).ok_or_else(bad)?;
        let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
        if !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        rest = match tail {
            [b':', after @ ..] if i < 31 => after,
            _ => tail,
        };
    }
    if rest.is_empty() { Ok(out) } else { Err(bad()) }
}

/// Refuses one client certificate of the device from now on, by its SHA-256 fingerprint,
/// and closes the live session with 4410 (it may be the one using that certificate; the
/// device's other certificates still authenticate).
#[utoipa::path(post, path = "/v1/devices/{id}/certificates/revoke", tag = "devices",
    params(("id" = String, Path, description = "device ID")),
    request_body = RevokeCertificate,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn revoke_certificate(
    State(state): State<Arc<AdminState>>,
    device: ScopedDevice<need::DeviceWrite>,
    Body(req): Body<RevokeCertificate>,
) -> Res {
    let print = fingerprint(&req.sha256)?;
    let mut record = provisioned(device)?;
    if !record.revoked_certs.contains(&print) {
        if record.revoked_certs.len() >= MAX_REVOKED_CERTS {
            return Err(AppError::exists(format!(
                "device {} already has {MAX_REVOKED_CERTS} revoked certificates; \
                 use a CRL (FLEETGATE_TLS_CRL)",
                record.id
            )));
        }
        record.revoked_certs.push(print);
        store(&state, &record).await?;
    }
    close_session(
        &state,
        &record.id,
        CloseCode::Revoked,
        "certificate revoked",
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::fingerprint;

    #[test]
    fn fingerprints_read_with_or_without_colons() {
        let plain = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(fingerprint(&plain).unwrap(), [0xab; 32]);
        assert_eq!(fingerprint(&colons).unwrap(), [0xab; 32]);
        assert!(fingerprint("abc").is_err());
        assert!(fingerprint(&format!(":{plain}")).is_err());
        assert!(fingerprint(&format!("{plain}:")).is_err());
        assert!(fingerprint(&format!("{plain}ab")).is_err());
        assert!(fingerprint(&format!("+b{}", &plain[2..])).is_err());
        assert!(fingerprint(&"zz".repeat(32)).is_err());
    }
}

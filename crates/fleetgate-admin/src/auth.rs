//! Authentication (bootstrap key, service API keys, user JWTs) and the extractors through
//! which every handler declares the permission it needs.
//!
//! The request pipeline ([`crate::pipeline`]) authenticates each request once and leaves the
//! [`Principal`] in the request's extensions; [`Auth`] and [`ScopedDevice`] then ask the
//! policy (`fleetgate-authz`, shared with the gateway) and answer 403 / 404 before the
//! handler runs.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Path};
use axum::http::StatusCode;
use axum::http::request::Parts;
use fleetgate_bus::DeviceRecord;

use crate::rbac::{Principal, Scope};
use crate::{AdminState, AppError};

pub(crate) use fleetgate_authz::{Authenticator, AuthnError, KEY_PREFIX, key_digest};

impl From<AuthnError> for AppError {
    fn from(e: AuthnError) -> Self {
        match e {
            AuthnError::Refused(reason) => AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <API key or user token>",
            )
            .with_reason(reason),
            AuthnError::Bus(e) => e.into(),
        }
    }
}

pub(crate) use fleetgate_authz::{Needs, need};

/// The caller, allowed to do `N`: the extractor every handler declares its permission with.
pub(crate) struct Auth<N: Needs> {
    pub(crate) principal: Principal,
    _needs: PhantomData<N>,
}

impl<N: Needs> FromRequestParts<Arc<AdminState>> for Auth<N> {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &Arc<AdminState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(principal) = parts.extensions.get::<Principal>().cloned() else {
            return Err(AuthnError::Refused("missing_credentials").into());
        };
        if !principal.role.allows(N::PERMISSION) {
            return Err(AppError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("role {} may not do this", principal.role.as_str()),
            ));
        }
        Ok(Self {
            principal,
            _needs: PhantomData,
        })
    }
}

/// The device named by the path's `{id}`, visible to a caller allowed to do `N`. A device
/// outside the caller's scope answers 404 exactly like a missing one.
pub(crate) struct ScopedDevice<N: Needs> {
    pub(crate) principal: Principal,
    pub(crate) id: String,
    /// The registry entry. `None` only for callers of scope `*` reaching an unprovisioned
    /// device (one that authenticated with a JWT): handlers decide whether that exists.
    pub(crate) record: Option<DeviceRecord>,
    _needs: PhantomData<N>,
}

impl<N: Needs> FromRequestParts<Arc<AdminState>> for ScopedDevice<N> {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AdminState>,
    ) -> Result<Self, Self::Rejection> {
        let Auth { principal, .. } = Auth::<N>::from_request_parts(parts, state).await?;
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|r| AppError::bad_request(r.body_text()))?;
        crate::devices::check_device_id(&id)?;
        let record = state.bus.device_get(&id).await?;
        let visible = match (&record, &principal.scope) {
            (_, Scope::All) => true,
            (Some(r), scope) => scope.covers(r),
            (None, _) => false,
        };
        if !visible {
            let missing = AppError::not_found(format!("no device {id}"));
            // Audited as what it is: a refusal, though the caller cannot tell.
            return Err(if record.is_some() {
                missing.with_reason("out_of_scope")
            } else {
                missing
            });
        }
        Ok(Self {
            principal,
            id,
            record,
            _needs: PhantomData,
        })
    }
}

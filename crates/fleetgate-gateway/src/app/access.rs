//! What an app principal may subscribe to: the admin API's role table and scopes, decided
//! here once for every channel kind.

use fleetgate_authz::{Permission, Principal, Scope};
use fleetgate_bus::{Bus, BusError, Channel};
use fleetgate_protocol::app::AppErrorCode;

/// Why a subscription is refused.
pub(crate) enum Refusal {
    /// Not allowed (the code and a short message).
    Denied(AppErrorCode, &'static str),
    /// The bus could not be asked.
    Bus(BusError),
}

/// Decides whether `principal` may subscribe to `channel`. A device outside the scope is
/// `not_found`, as over REST; groups and presence need the group in scope; `alerts` spans
/// every group, so it needs an unscoped principal.
pub(crate) async fn may_subscribe(
    bus: &dyn Bus,
    principal: &Principal,
    channel: &Channel,
) -> Result<(), Refusal> {
    if !principal.role.allows(Permission::DeviceRead) {
        return Err(Refusal::Denied(
            AppErrorCode::Forbidden,
            "the role may not read devices",
        ));
    }
    match channel {
        Channel::Device(id) => match bus.device_get(id).await.map_err(Refusal::Bus)? {
            Some(record) if principal.scope.covers(&record) => Ok(()),
            _ => Err(Refusal::Denied(AppErrorCode::NotFound, "no such device")),
        },
        Channel::Group(group) | Channel::Presence(group) => {
            if principal.scope.covers_groups(std::slice::from_ref(group)) {
                Ok(())
            } else {
                Err(Refusal::Denied(
                    AppErrorCode::Forbidden,
                    "the group is outside the principal's scope",
                ))
            }
        }
        Channel::Alerts => {
            if principal.scope == Scope::All {
                Ok(())
            } else {
                Err(Refusal::Denied(
                    AppErrorCode::Forbidden,
                    "alerts span every group; subscribe to group channels instead",
                ))
            }
        }
    }
}

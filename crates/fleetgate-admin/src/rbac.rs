//! The policy (roles, permissions, scopes) lives in `fleetgate-authz`, shared with the
//! gateway's app endpoints; this module names it for the admin API's handlers.

pub(crate) use fleetgate_authz::{Principal, Role, Scope};

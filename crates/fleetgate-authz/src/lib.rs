//! fleetgate's principals and policy, apart from any HTTP: who a caller is (bootstrap key, API
//! key or user token, checked against the principals in the bus) and what its role and scope
//! allow. The admin API and the gateway's app endpoints both decide through this crate, so one
//! policy table holds for REST calls and live subscriptions alike.

mod authn;
mod policy;
pub mod throttle;

pub use authn::{
    AUDIENCE, ApiKeyDoc, Authenticator, AuthnError, KEY_PREFIX, TokenKey, UserDoc, key_digest,
};
pub use policy::{Needs, Permission, Principal, Role, Scope, need};

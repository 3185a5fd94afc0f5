//! Who may do what: roles, their permissions, and scopes of device groups.
//!
//! This module is the whole policy, shared by the admin API and the gateway's app endpoints.
//! Handlers never check roles themselves: each declares the permission it needs (a marker type
//! of [`need`], through the admin API's extractors or the gateway's app session), which asks
//! [`Role::allows`] once per request, and device lookups go through [`Scope`] so an
//! out-of-scope device looks exactly like a missing one.

use std::collections::BTreeSet;

use fleetgate_bus::DeviceRecord;
use serde::{Deserialize, Serialize};

/// A principal's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including users and API keys.
    Admin,
    /// Devices, commands, shadows, jobs and scenes within scope.
    Operator,
    /// Reads devices, shadows, presence and nodes within scope.
    Viewer,
    /// Reads and verifies the audit log, nothing else.
    Auditor,
}

/// A permission, as a type (the markers of [`need`]).
pub trait Needs: Send + Sync + 'static {
    /// The permission the type names.
    const PERMISSION: Permission;
}

/// Declares the permissions once: the enum the policy table matches on, and for each a marker
/// type in [`need`] that a handler names in its extractor (`Auth<need::DeviceRead>`).
macro_rules! permissions {
    ($($(#[doc = $doc:literal])+ $name:ident,)*) => {
        /// What a request needs to be allowed to do.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Permission {
            $($(#[doc = $doc])+ $name,)*
        }

        /// Marker types naming permissions, for extractors such as `Auth<need::X>`.
        pub mod need {
            $(
                /// Requires the permission of the same name.
                pub struct $name;
                impl super::Needs for $name {
                    const PERMISSION: super::Permission = super::Permission::$name;
                }
            )*
        }
    };
}

permissions! {
    /// Read devices, their presence and shadows.
    DeviceRead,
    /// Provision, regroup, rotate, revoke, disconnect and delete devices.
    DeviceWrite,
    /// Send commands to devices.
    CommandSend,
    /// Set desired state.
    ShadowWrite,
    /// Read jobs and scenes.
    JobRead,
    /// Create and cancel jobs; manage and activate scenes.
    JobWrite,
    /// Create, change and delete alert rules.
    AlertWrite,
    /// List gateway nodes.
    NodeRead,
    /// Read and verify the audit log.
    AuditRead,
    /// Manage users and API keys.
    PrincipalAdmin,
    /// Any authenticated principal (its own identity, token refresh).
    Authenticated,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Viewer, Role::Auditor];

    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Viewer => "viewer",
            Self::Auditor => "auditor",
        }
    }

    /// The policy table.
    pub fn allows(self, permission: Permission) -> bool {
        use Permission as P;
        match self {
            Self::Admin => true,
            Self::Operator => matches!(
                permission,
                P::DeviceRead
                    | P::DeviceWrite
                    | P::CommandSend
                    | P::ShadowWrite
                    | P::JobRead
                    | P::JobWrite
                    | P::AlertWrite
                    | P::NodeRead
                    | P::Authenticated
            ),
            Self::Viewer => matches!(permission, P::DeviceRead | P::NodeRead | P::Authenticated),
            Self::Auditor => matches!(permission, P::AuditRead | P::Authenticated),
        }
    }
}

/// The device groups a grant covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every device (`["*"]`).
    All,
    /// Devices in at least one of these groups.
    Groups(BTreeSet<String>),
}

impl Scope {
    /// From a grant's `groups` list: `["*"]` is everything.
    pub fn from_groups(groups: &[String]) -> Self {
        if groups.iter().any(|g| g == "*") {
            Self::All
        } else {
            Self::Groups(groups.iter().cloned().collect())
        }
    }

    /// Back to a `groups` list.
    pub fn to_groups(&self) -> Vec<String> {
        match self {
            Self::All => vec!["*".to_owned()],
            Self::Groups(g) => g.iter().cloned().collect(),
        }
    }

    /// Whether the device is in scope. A device in no group is only in the `*` scope.
    pub fn covers(&self, device: &DeviceRecord) -> bool {
        match self {
            Self::All => true,
            Self::Groups(mine) => device.groups.iter().any(|g| mine.contains(g)),
        }
    }

    /// Whether every group of `groups` is in scope (creating a device or a job for them).
    pub fn covers_groups(&self, groups: &[String]) -> bool {
        match self {
            Self::All => true,
            Self::Groups(mine) => !groups.is_empty() && groups.iter().all(|g| mine.contains(g)),
        }
    }

    /// Whether this scope contains all of `other` (a principal may grant only what it has).
    pub fn contains(&self, other: &Scope) -> bool {
        match (self, other) {
            (Self::All, _) => true,
            (Self::Groups(_), Self::All) => false,
            (Self::Groups(mine), Self::Groups(theirs)) => theirs.is_subset(mine),
        }
    }

    /// The groups to restrict a registry query to (`None` = no restriction).
    pub fn query_groups(&self) -> Option<Vec<String>> {
        match self {
            Self::All => None,
            Self::Groups(g) => Some(g.iter().cloned().collect()),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// As the audit log names it: `user:<name>`, `key:<id>` or `bootstrap`.
    pub actor: String,
    /// Its role.
    pub role: Role,
    /// Its device groups.
    pub scope: Scope,
    /// The username, for users.
    pub username: Option<String>,
    /// When its credential stops being valid (a user token's `exp`, an API key's
    /// `expiresAt`), ms since the epoch: long-lived sessions end then.
    pub expires_at_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(groups: &[&str]) -> DeviceRecord {
        DeviceRecord {
            id: "d".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            secret_sha256: [0; 32],
            created_ms: 0,
            revoked: false,
            transport: Default::default(),
            mac_key: None,
            revoked_certs: Vec::new(),
        }
    }

    #[test]
    fn scopes_cover_by_group() {
        let farm_a = Scope::from_groups(&["farm-a".into()]);
        assert!(farm_a.covers(&device(&["farm-a", "x"])));
        assert!(!farm_a.covers(&device(&["farm-b"])));
        assert!(!farm_a.covers(&device(&[])));
        assert!(Scope::All.covers(&device(&[])));
        assert!(farm_a.covers_groups(&["farm-a".into()]));
        assert!(!farm_a.covers_groups(&[]));
        assert!(!farm_a.covers_groups(&["farm-a".into(), "farm-b".into()]));
        assert!(Scope::All.contains(&farm_a) && !farm_a.contains(&Scope::All));
        assert_eq!(Scope::from_groups(&["*".into(), "a".into()]), Scope::All);
    }

    #[test]
    fn only_admins_manage_principals_and_only_auditors_and_admins_read_the_audit() {
        for role in Role::ALL {
            assert_eq!(role.allows(Permission::PrincipalAdmin), role == Role::Admin);
            assert_eq!(
                role.allows(Permission::AuditRead),
                matches!(role, Role::Admin | Role::Auditor)
            );
            assert!(role.allows(Permission::Authenticated));
        }
        assert!(!Role::Viewer.allows(Permission::CommandSend));
        assert!(!Role::Auditor.allows(Permission::DeviceRead));
    }
}

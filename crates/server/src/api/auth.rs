//! Who is calling. Until keys are configured every caller is the `default`
//! tenant with every role; the keys file (role, tenant, queues) plugs in here
//! without touching the handlers, which only ask a [`Caller`].

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::problem::ApiError;

/// The tenant used when no keys are configured.
pub const DEFAULT_TENANT: &str = "default";

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The caller's tenant.
    pub tenant: String,
    /// Whether the caller may act across tenants (admin).
    pub admin: bool,
}

impl Caller {
    /// The tenant scope of the caller's reads and writes of requests:
    /// `None` (every tenant) for admins.
    pub fn scope(&self) -> Option<String> {
        if self.admin {
            None
        } else {
            Some(self.tenant.clone())
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Ok(Caller {
            tenant: DEFAULT_TENANT.to_string(),
            admin: true,
        })
    }
}

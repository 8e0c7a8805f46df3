//! Bearer authentication for the API (HS256 JWT; see `herald_shared::auth`).

use std::sync::Arc;

use herald_shared::auth::{self, AuthError, Claims};
use poem::Request;
use poem_openapi::{SecurityScheme, auth::Bearer};

use crate::{AppState, errors::ApiError};

/// `Authorization: Bearer <JWT>`, HS256, `exp` required. Scopes: `notifications:write`,
/// `notifications:read`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_token")]
pub struct BearerAuth(pub Claims);

async fn check_token(req: &Request, bearer: Bearer) -> poem::Result<Claims> {
    verify_token(req, &bearer.token)
}

/// Checks a token wherever it came from (the header, or the live stream's query).
pub fn verify_token(req: &Request, token: &str) -> poem::Result<Claims> {
    let state = req.data::<Arc<AppState>>().expect("the router installs the state");
    auth::verify(&state.config.jwt_secret, token).map_err(|e| {
        ApiError::Unauthorized(match e {
            AuthError::Expired => "the bearer token has expired".to_owned(),
            AuthError::Invalid(_) => "the bearer token is not valid".to_owned(),
        })
        .into()
    })
}

impl BearerAuth {
    /// Fails with 403 unless the token carries `scope` (an end user's token carries only
    /// `inbox`, whatever it says).
    pub fn require(&self, scope: &'static str) -> Result<&Claims, ApiError> {
        if self.0.allows(scope) { Ok(&self.0) } else { Err(ApiError::MissingScope(scope)) }
    }
}

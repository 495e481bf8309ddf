//! Tokens over HTTP (contract §2): `POST /v1/token` and `DELETE /v1/tokens/{jti}`.
//!
//! Owns issuing a fresh federation token for the caller, and revoking a `jti`: durably, within
//! `FEDMCP_MAX_REVOCATIONS`, closing the sessions that rest on it with 4001. Never logs a
//! token or a `jti`.

use super::{Resp, no_record};
use crate::audit::Event;
use crate::clock::secs_to_ms;
use crate::federation::Federation;
use crate::federation::action::SessionId;
use crate::federation::pending::Record;
use crate::proto::http::parse;
use crate::proto::jwt::{self, TokenType};
use std::net::SocketAddr;

impl Federation {
    pub fn issue_token(&mut self, server_id: &str, peer: SocketAddr) -> Resp {
        let (token, claims) = self.mint(server_id, TokenType::Federation);
        let exp = claims.exp;
        self.audit(
            Event::TokenIssued,
            Some(server_id),
            Some(peer),
            Some("http"),
        );
        Resp::json(
            200,
            format!(
                "{{\"token\":\"{token}\",\"expiresAt\":{}}}",
                secs_to_ms(exp)
            ),
        )
    }

    /// `DELETE /v1/tokens/{jti}` (§2): every token with that `jti` is refused from now on,
    /// durably; sessions resting on it are closed 4001. Remembered until the latest `exp`
    /// seen with it (the sessions' tokens), else for `FEDMCP_TOKEN_TTL_SECS`.
    pub fn revoke_token(&mut self, raw: &str, peer: SocketAddr) -> (Resp, Record) {
        let Some(jti) = parse::percent_decode(raw).filter(|j| jwt::valid_jti(j)) else {
            return no_record(Resp::error(
                400,
                "invalid_request",
                "a token id (jti) is 1 to 64 printable ASCII characters",
            ));
        };
        let now = self.now.secs();
        let skew = self.cfg.clock_skew_secs as i64;
        let sessions: Vec<(SessionId, i64)> = self
            .sessions()
            .filter(|s| s.uses_jti(&jti))
            .map(|s| (s.id, s.expires_at_secs))
            .collect();
        let until = sessions
            .iter()
            .map(|(_, exp)| *exp)
            .max()
            .unwrap_or(now.saturating_add(self.cfg.token_ttl_secs as i64));
        let until = match self.revocations.revoke(&jti, until, now, skew) {
            Ok(u) => u,
            Err(crate::federation::revocations::RevokeError::Full) => {
                return no_record(Resp::error(
                    507,
                    "revocations_full",
                    "FEDMCP_MAX_REVOCATIONS revocations are held; try again once some expire",
                ));
            }
        };
        let record = self.persist(crate::store::state::Op::Revoke {
            jti: jti.clone(),
            until,
        });
        for (conn, _) in sessions {
            self.close_session(conn, 4001, "token revoked");
        }
        self.audit(Event::TokenRevoked, None, Some(peer), None);
        (Resp::no_content(), record)
    }
}

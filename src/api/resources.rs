//! The resource index's side of the data channel (contract §3): the listing, and the removal
//! of a removed server's resources.
//!
//! Owns `GET /v1/resources` (only what the caller may read) and deleting every resource of
//! an owner (files first, then the index). The streaming of bodies is the reactor's
//! (`io::data`); the index and quotas are `federation::resources`'.

use crate::federation::Federation;
use crate::federation::resources::resource_json;

impl Federation {
    /// `GET /v1/resources`: only what the caller may read.
    pub fn list_resources(
        &self,
        claims: &crate::proto::jwt::Claims,
    ) -> crate::proto::http::response::Resp {
        let admin = claims.token_type == crate::proto::jwt::TokenType::Admin;
        let items: Vec<String> = self
            .resources
            .list()
            .filter(|(o, _, m)| m.readable_by(o, &claims.server_id, admin))
            .map(|(o, n, m)| resource_json(o, n, m))
            .collect();
        crate::proto::http::response::Resp::json(
            200,
            format!("{{\"resources\":[{}]}}", items.join(",")),
        )
    }

    /// Deletes every resource of a removed server (files first, then the index).
    pub fn remove_owned_resources(&mut self, owner: &str) -> std::io::Result<()> {
        let names = self.resources.names_of(owner);
        let r = match self.blobs.as_mut() {
            Some(b) => b.remove_owner(owner, &names),
            None => Ok(()),
        };
        for n in &names {
            self.resources.remove(owner, n);
        }
        r
    }
}

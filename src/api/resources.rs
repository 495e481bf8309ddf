//! The resource index's side of the data channel (contract §3): the listing, and the removal
//! of a removed server's resources.
//!
//! Owns `GET /v1/resources` (only what the caller may read) and forgetting every resource of
//! an owner (the index here; the files are the reactor's to delete). The streaming of bodies is the reactor's
//! (`io::data`); the index and quotas are `federation::resources`'.

use crate::federation::Federation;
use crate::federation::action::Action;
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
            .map(|(o, n, m)| {
                let j = resource_json(o, n, m);
                match self.cluster.as_ref() {
                    // In a cluster, each listed resource says where it is (§10).
                    Some(c) => {
                        let mut j = j.trim_end_matches('}').to_string();
                        j.push_str(",\"node\":");
                        crate::audit::push_json_str(&mut j, &c.node);
                        j.push('}');
                        j
                    }
                    None => j,
                }
            })
            .collect();
        crate::proto::http::response::Resp::json(
            200,
            format!("{{\"resources\":[{}]}}", items.join(",")),
        )
    }

    /// Forgets every resource of a removed server and asks the reactor to delete their
    /// files ([`Action::RemoveResources`], carried out in the same turn, before the removal's
    /// answer is written).
    pub fn remove_owned_resources(&mut self, owner: &str) {
        let names = self.resources.names_of(owner);
        for n in &names {
            self.resources.remove(owner, n);
            self.cluster_resource(owner, n, None);
        }
        if !names.is_empty() {
            self.act(Action::RemoveResources {
                owner: owner.to_string(),
                names,
            });
        }
    }
}

//! The data channel's resources (contract §3): `PUT`, `GET`/`HEAD`, `DELETE`, listing.
//!
//! Owns streaming: an upload is taken from the connection's input buffer as it arrives and
//! written to its temporary file (so the proxy reads a body only as fast as it writes it to
//! disk, and memory does not grow with a resource's size); a download is read from its file
//! in bounded chunks only when the socket has drained the previous one. Names are percent-
//! decoded once and validated before any path is built; sizes and the quotas (in all and per
//! owner) are checked before and while bytes arrive (`413`, `507 quota_exceeded`); a cut-off
//! or refused upload leaves nothing behind. The token is checked on the head, before any
//! byte of a body is read (`io::http`), and `Expect: 100-continue` is answered only once the
//! upload is accepted. Who may read a resource (`?readers=`) is decided here: a listing
//! shows, and a `GET`/`HEAD` serves, only what the caller may read; others get `404`.
//! Files are the `store::blobs` module's (opened by the reactor's side); the index and
//! quotas are the core's (`federation::resources`).

use crate::api::Resp;
use crate::federation::resources::{
    Limits, QuotaError, RangeAnswer, apply_range, parse_readers, resource_json, valid_name,
};
use crate::io::conn::{ConnId, ConnState, HttpPhase, Sending, Uploading};
use crate::io::disk::Finishing;
use crate::io::proxy::Proxy;
use crate::proto::http::chunked::{ChunkedDecoder, Progress};
use crate::proto::http::parse::{self, BodyKind, Method, RequestHead};
use crate::proto::http::response;
use crate::proto::jwt::{Claims, TokenType};
use crate::store::blobs::{Blobs, READ_CHUNK};

/// Bytes of a download put in the output per refill.
const REFILL_BYTES: usize = 4 * READ_CHUNK;

fn quota_resp(e: QuotaError) -> Resp {
    match e {
        QuotaError::TooLarge => Resp::error(
            413,
            "payload_too_large",
            "the resource is over FEDMCP_RESOURCE_MAX_BYTES",
        ),
        QuotaError::QuotaExceeded => Resp::error(
            507,
            "quota_exceeded",
            "the resources would be over FEDMCP_RESOURCE_QUOTA_BYTES",
        ),
        QuotaError::OwnerQuotaExceeded => Resp::error(
            507,
            "quota_exceeded",
            "this server's resources would be over FEDMCP_RESOURCE_QUOTA_PER_SERVER_BYTES",
        ),
    }
}

fn not_found() -> Resp {
    Resp::error(404, "not_found", "no such resource")
}

impl Proxy {
    /// Takes an unfinished upload off a connection that is going away or timed out: its
    /// quota reservation ends and (dropping it) its temporary file is removed.
    pub fn abandon_upload(&mut self, id: ConnId) {
        let Some(ConnState::Http(h)) = self.conn_mut(id).map(|c| &mut c.state) else {
            return;
        };
        if !matches!(h.phase, HttpPhase::Upload(_)) {
            return;
        }
        if let HttpPhase::Upload(u) = std::mem::replace(&mut h.phase, HttpPhase::LastAnswer) {
            self.fed.resources.release(&u.owner, u.reserved);
        }
    }

    fn resource_limits(&self) -> Limits {
        Limits {
            max: self.fed.cfg.resource_max_bytes,
            quota: self.fed.cfg.resource_quota_bytes,
            per_owner: self.fed.cfg.resource_quota_per_server_bytes,
        }
    }

    /// A complete `PUT` head whose token was checked: check the name, the readers and the
    /// size, then stream the body. On refusal the body is not read: the answer closes the
    /// connection.
    pub fn start_upload(&mut self, id: ConnId, head: RequestHead, claims: Claims) {
        let now_t = self.fed.now;
        let refuse = |p: &mut Proxy, r: Resp| {
            let has_body = !matches!(head.body, BodyKind::None | BodyKind::Length(0));
            p.answer_upload(id, r, head.keep_alive && !has_body);
        };
        let raw = &head.path["/v1/resources/".len()..];
        let Some(name) = parse::percent_decode(raw).filter(|n| valid_name(n)) else {
            return refuse(
                self,
                Resp::error(
                    400,
                    "invalid_name",
                    "a resource name is 1 to 128 of A-Z a-z 0-9 . _ - and does not start with .",
                ),
            );
        };
        let readers = match parse_readers(head.query_param("readers").as_deref()) {
            Ok(r) => r,
            Err(e) => {
                return refuse(self, Resp::error(400, "invalid_readers", &e.to_string()));
            }
        };
        let owner = claims.server_id;
        let limits = self.resource_limits();
        let (chunked, left, reserve) = match head.body {
            BodyKind::Chunked => (Some(ChunkedDecoder::new(limits.max)), 0, 0),
            BodyKind::Length(n) => (None, n, n),
            BodyKind::None => (None, 0, 0),
        };
        if let Err(e) = self.fed.resources.reserve(&owner, &name, reserve, limits) {
            return refuse(self, quota_resp(e));
        }
        let up = match self.blobs.as_mut().map(|b| b.begin()) {
            Some(Ok(up)) => up,
            Some(Err(e)) => {
                log::error!("resource upload cannot start: {e}");
                self.fed.resources.release(&owner, reserve);
                return refuse(
                    self,
                    Resp::error(503, "storage_failed", "the resource cannot be stored"),
                );
            }
            None => {
                self.fed.resources.release(&owner, reserve);
                return refuse(
                    self,
                    Resp::error(503, "storage_failed", "no resource storage"),
                );
            }
        };
        let idle = self.fed.cfg.idle_timeout;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        if head.expect_continue {
            conn.out.extend_from_slice(response::CONTINUE);
        }
        let ConnState::Http(h) = &mut conn.state else {
            return;
        };
        h.deadline = now_t.at + idle;
        h.phase = HttpPhase::Upload(Box::new(Uploading {
            owner,
            name,
            readers,
            up,
            chunked,
            left,
            reserved: reserve,
            keep_alive: head.keep_alive,
        }));
        self.dirty.push(id);
        self.rearm(id);
    }

    fn answer_upload(&mut self, id: ConnId, r: Resp, keep_alive: bool) {
        if let Some(ConnState::Http(h)) = self.conn_mut(id).map(|c| &mut c.state) {
            if !keep_alive {
                h.inbuf.clear();
            }
            h.phase = HttpPhase::Waiting { keep_alive };
        }
        self.http_finish(id, r);
    }

    /// Moves buffered body bytes into the upload. True when the request is done (answered).
    pub fn upload_progress(&mut self, id: ConnId) -> bool {
        let now_t = self.fed.now;
        let limits = self.resource_limits();
        let idle = self.fed.cfg.idle_timeout;
        let Some(conn) = self.conn_mut(id) else {
            return true;
        };
        let ConnState::Http(h) = &mut conn.state else {
            return true;
        };
        let HttpPhase::Upload(u) = &mut h.phase else {
            return true;
        };
        if h.inbuf.is_empty() && (u.chunked.is_some() || u.left > 0) {
            return false;
        }
        h.deadline = now_t.at + idle;
        let mut failure: Option<Resp> = None;
        let done = match u.chunked.as_mut() {
            None => {
                let take = (u.left).min(h.inbuf.len() as u64) as usize;
                if let Err(e) = u.up.write(&h.inbuf[..take]) {
                    log::error!("resource write failed: {e}");
                    failure = Some(Resp::error(
                        503,
                        "storage_failed",
                        "the resource could not be written",
                    ));
                }
                h.inbuf.drain(..take);
                u.left -= take as u64;
                u.left == 0
            }
            Some(dec) => {
                let mut decoded = Vec::with_capacity(h.inbuf.len().min(READ_CHUNK));
                match dec.decode(&h.inbuf, &mut decoded, usize::MAX) {
                    Ok((used, p)) => {
                        h.inbuf.drain(..used);
                        if let Err(e) = u.up.write(&decoded) {
                            log::error!("resource write failed: {e}");
                            failure = Some(Resp::error(
                                503,
                                "storage_failed",
                                "the resource could not be written",
                            ));
                        }
                        matches!(p, Progress::Done)
                    }
                    Err(crate::proto::http::chunked::ChunkError::TooLarge) => {
                        failure = Some(quota_resp(QuotaError::TooLarge));
                        true
                    }
                    Err(e) => {
                        failure = Some(Resp::error(400, "bad_request", &e.to_string()));
                        true
                    }
                }
            }
        };
        // A chunked upload reserves quota as it grows: exactly what it has written.
        if failure.is_none() && u.up.written > u.reserved {
            let (owner, name) = (u.owner.clone(), u.name.clone());
            let (reserved, written) = (u.reserved, u.up.written);
            self.fed.resources.release(&owner, reserved);
            let r = self.fed.resources.reserve(&owner, &name, written, limits);
            let now_reserved = if r.is_ok() { written } else { 0 };
            if let Some(ConnState::Http(h)) = self.conn_mut(id).map(|c| &mut c.state)
                && let HttpPhase::Upload(u) = &mut h.phase
            {
                u.reserved = now_reserved;
            }
            if let Err(e) = r {
                failure = Some(quota_resp(e));
            }
        }
        if !done && failure.is_none() {
            return false;
        }
        // Finished (or failed): take the upload out of the connection.
        let Some(conn) = self.conn_mut(id) else {
            return true;
        };
        let ConnState::Http(h) = &mut conn.state else {
            return true;
        };
        let phase = std::mem::replace(&mut h.phase, HttpPhase::Waiting { keep_alive: false });
        let HttpPhase::Upload(u) = phase else {
            return true;
        };
        let u = *u;
        self.fed.resources.release(&u.owner, u.reserved);
        if let Some(r) = failure {
            drop(u.up); // removes the temporary file
            self.answer_upload(id, r, false);
            return true;
        }
        let size = u.up.written;
        if let Err(e) = self.fed.resources.reserve(&u.owner, &u.name, size, limits) {
            drop(u.up);
            self.answer_upload(id, quota_resp(e), u.keep_alive);
            return true;
        }
        let Some(blobs) = self.blobs.as_mut() else {
            return true;
        };
        let mut up = u.up;
        let (meta, sealed) = match blobs.seal(&mut up, u.readers) {
            Ok(sealed) => sealed,
            Err(e) => {
                drop(up);
                self.upload_failed(id, &u.owner, size, u.keep_alive, &e.to_string());
                return true;
            }
        };
        let f = Finishing {
            conn: id,
            up,
            owner: u.owner,
            name: u.name,
            meta,
            size,
            keep_alive: u.keep_alive,
            side_tmp: sealed.side_tmp.clone(),
            cancelled: false,
        };
        if self.disk.is_none() {
            // Memory only: nothing survives a restart, so nothing is synced.
            if let Err(e) = crate::store::blobs::write_sealed_unsynced(sealed) {
                let (owner, keep_alive) = (f.owner.clone(), f.keep_alive);
                drop(f);
                self.upload_failed(id, &owner, size, keep_alive, &e.to_string());
                return true;
            }
            let _ = self.publish_upload(f);
            return true;
        }
        // The file's fsync (seconds for a large upload) is the disk thread's; the connection
        // waits for its answer, the loop does not.
        self.next_finishing += 1;
        let token = self.next_finishing;
        let job = crate::io::disk::Job::SyncUpload { token, sealed };
        match self.disk.as_mut().map(|d| d.send(job)) {
            Some(Ok(())) => {
                self.finishing.insert(token, f);
            }
            _ => {
                let _ = std::fs::remove_file(&f.side_tmp);
                self.upload_failed(id, &f.owner, size, f.keep_alive, "the disk thread is busy");
            }
        }
        true
    }

    /// `503 storage_failed` for an upload that could not be stored (its reservation freed).
    fn upload_failed(&mut self, id: ConnId, owner: &str, size: u64, keep_alive: bool, why: &str) {
        log::error!("resource could not be stored: {why}");
        self.fed.resources.release(owner, size);
        self.answer_upload(
            id,
            Resp::error(503, "storage_failed", "the resource could not be stored"),
            keep_alive,
        );
    }

    /// Puts a synced upload in place and into the index in one step (readers see the file
    /// and its metadata change together). Returns the directory to sync, when it was; a
    /// memory-only proxy answers at once.
    fn publish_upload(&mut self, mut f: Finishing) -> Option<(std::path::PathBuf, Finishing)> {
        let up = std::mem::replace(&mut f.up, crate::store::blobs::Upload::published());
        let published = match self.blobs.as_mut() {
            Some(blobs) => blobs.publish(up, &f.owner, &f.name, &f.side_tmp),
            None => Err(std::io::Error::other("no resource store")),
        };
        let dir = match published {
            Ok(dir) => dir,
            Err(e) => {
                self.upload_failed(f.conn, &f.owner, f.size, f.keep_alive, &e.to_string());
                return None;
            }
        };
        self.fed
            .cluster_resource(&f.owner, &f.name, Some(&f.meta.readers));
        let body = resource_json(&f.owner, &f.name, &f.meta);
        self.fed
            .resources
            .commit(&f.owner, &f.name, f.meta.clone(), f.size);
        if self.disk.is_none() {
            self.answer_created(f.conn, &f.owner, &f.name, body, f.keep_alive);
            return None;
        }
        Some((dir, f))
    }

    fn answer_created(
        &mut self,
        id: ConnId,
        owner: &str,
        name: &str,
        body: String,
        keep_alive: bool,
    ) {
        let mut r = Resp::json(201, body);
        r.headers
            .push(("Location", format!("/v1/resources/{owner}/{name}")));
        self.answer_upload(id, r, keep_alive);
    }

    /// The disk thread synced an upload's file and sidecar: it is put in place, and its
    /// directory is synced next.
    pub fn upload_synced(&mut self, token: u64, result: Result<(), String>) {
        let Some(f) = self.finishing.remove(&token) else {
            return;
        };
        if let Err(e) = result {
            let _ = std::fs::remove_file(&f.side_tmp);
            let (conn, owner, size, keep_alive) = (f.conn, f.owner.clone(), f.size, f.keep_alive);
            drop(f); // removes the temporary file
            return self.upload_failed(conn, &owner, size, keep_alive, &e);
        }
        if f.cancelled {
            // Its owner was removed while it was synced: its resources are gone with it.
            let (conn, owner, size, keep_alive) = (f.conn, f.owner.clone(), f.size, f.keep_alive);
            let _ = std::fs::remove_file(&f.side_tmp);
            drop(f);
            return self.upload_failed(conn, &owner, size, keep_alive, "its owner was removed");
        }
        let Some((dir, f)) = self.publish_upload(f) else {
            return;
        };
        let job = crate::io::disk::Job::SyncDir { token, dir };
        match self.disk.as_mut().map(|d| d.send(job)) {
            Some(Ok(())) => {
                self.finishing.insert(token, f);
            }
            _ => self.upload_dir_synced_with(f, Err("the disk thread is busy".into())),
        }
    }

    /// The directory of a put-in-place upload is synced: it is answered.
    pub fn upload_dir_synced(&mut self, token: u64, result: Result<(), String>) {
        if let Some(f) = self.finishing.remove(&token) {
            self.upload_dir_synced_with(f, result);
        }
    }

    fn upload_dir_synced_with(&mut self, f: Finishing, result: Result<(), String>) {
        match result {
            Ok(()) => {
                let body = resource_json(&f.owner, &f.name, &f.meta);
                self.answer_created(f.conn, &f.owner, &f.name, body, f.keep_alive);
            }
            Err(e) => {
                // In place but perhaps not durable: the client is told it failed, as before.
                log::error!("resource could not be stored: {e}");
                self.answer_upload(
                    f.conn,
                    Resp::error(503, "storage_failed", "the resource could not be stored"),
                    f.keep_alive,
                );
            }
        }
    }

    /// `GET`/`HEAD`/`DELETE /v1/resources/{owner}/{name}` (the token was checked on the
    /// head). A resource the caller may not read is `404`, exactly as one that does not exist.
    pub fn resource_route(
        &mut self,
        id: ConnId,
        head: &RequestHead,
        rest: &str,
        claims: &Claims,
    ) -> Option<Resp> {
        let (owner_raw, name_raw) = rest.split_once('/').unwrap_or((rest, ""));
        let owner =
            parse::percent_decode(owner_raw).filter(|o| crate::proto::jwt::valid_server_id(o));
        let name = parse::percent_decode(name_raw).filter(|n| valid_name(n));
        let (Some(owner), Some(name)) = (owner, name) else {
            return Some(not_found());
        };
        let admin = claims.token_type == TokenType::Admin;
        let readable = self
            .fed
            .resources
            .get(&owner, &name)
            .is_some_and(|m| m.readable_by(&owner, &claims.server_id, admin));
        if !readable {
            let elsewhere = self
                .fed
                .resource_elsewhere(&owner, &name, &claims.server_id, admin)
                .map(str::to_string);
            return Some(match elsewhere {
                // Stored by another proxy of the cluster (§10).
                Some(node) => Resp::error(
                    404,
                    "on_other_node",
                    &format!("the resource is stored on node {node}"),
                ),
                None => not_found(),
            });
        }
        match head.method {
            Method::Get | Method::Head => self.download(id, head, &owner, &name),
            Method::Delete => {
                if !admin && claims.server_id != owner {
                    return Some(Resp::error(
                        403,
                        "forbidden",
                        "only the owner or an admin may delete a resource",
                    ));
                }
                let removed = self.blobs.as_mut().map(|b| b.remove(&owner, &name));
                match removed {
                    Some(Ok(())) => {
                        self.fed.resources.remove(&owner, &name);
                        self.fed.cluster_resource(&owner, &name, None);
                        Some(Resp::no_content())
                    }
                    _ => Some(Resp::error(
                        503,
                        "storage_failed",
                        "the resource could not be deleted",
                    )),
                }
            }
            _ => Some(Resp::method_not_allowed("GET, HEAD, DELETE")),
        }
    }

    /// Writes the head of a download and starts sending its bytes (`None`: answered here).
    fn download(
        &mut self,
        id: ConnId,
        head: &RequestHead,
        owner: &str,
        name: &str,
    ) -> Option<Resp> {
        let now_t = self.fed.now;
        let Some(meta) = self.fed.resources.get(owner, name).cloned() else {
            return Some(not_found());
        };
        let etag = format!("\"{}\"", meta.sha256);
        if head
            .header("if-none-match")
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
        {
            // No Content-Length: a 304 has no body, and the header would have to be the
            // resource's own length (RFC 9110 §8.6).
            let mut r = Resp {
                status: 304,
                headers: vec![("ETag", etag)],
                body: Vec::new(),
            };
            r.headers.push(("Accept-Ranges", "bytes".into()));
            return Some(r);
        }
        let (status, start, len) = match apply_range(head.header("range"), meta.size) {
            RangeAnswer::Full => (200, 0, meta.size),
            RangeAnswer::Partial { start, end } => (206, start, end - start + 1),
            RangeAnswer::Unsatisfiable => {
                let mut r = Resp::error(
                    416,
                    "range_not_satisfiable",
                    "the range is outside the resource",
                );
                r.headers
                    .push(("Content-Range", format!("bytes */{}", meta.size)));
                return Some(r);
            }
        };
        let file = match self
            .blobs
            .as_ref()
            .map(|b| std::fs::File::open(b.path(owner, name)))
        {
            Some(Ok(f)) => f,
            _ => {
                return Some(Resp::error(
                    503,
                    "storage_failed",
                    "the resource could not be read",
                ));
            }
        };
        let mut extra = vec![
            ("Content-Type", "application/octet-stream".to_string()),
            ("ETag", etag),
            ("Accept-Ranges", "bytes".to_string()),
        ];
        if status == 206 {
            extra.push((
                "Content-Range",
                format!("bytes {}-{}/{}", start, start + len - 1, meta.size),
            ));
        }
        let head_only = head.method == Method::Head;
        let draining = self.fed.draining.is_some();
        let idle = self.fed.cfg.idle_timeout;
        let conn = self.conn_mut(id)?;
        if !matches!(conn.state, ConnState::Http(_)) {
            return None;
        }
        let keep_alive = head.keep_alive && !draining;
        let headers: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
        response::write_head(
            &mut conn.out,
            status,
            &headers,
            Some(len),
            keep_alive,
            now_t.secs() as u64,
        );
        if head_only || len == 0 {
            self.finish_sending(id, keep_alive);
            return None;
        }
        if let Some(ConnState::Http(h)) = self.conn_mut(id).map(|c| &mut c.state) {
            h.deadline = now_t.at + idle;
            h.phase = HttpPhase::Sending(Box::new(Sending {
                file,
                offset: start,
                left: len,
                keep_alive,
            }));
        }
        self.refill(id);
        None
    }

    /// The socket drained: put the next chunk of a download in the output.
    pub fn refill(&mut self, id: ConnId) {
        let now_t = self.fed.now;
        let idle = self.fed.cfg.idle_timeout;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let ConnState::Http(h) = &mut conn.state else {
            return;
        };
        let HttpPhase::Sending(s) = &mut h.phase else {
            return;
        };
        let want = (s.left.min(REFILL_BYTES as u64)) as usize;
        match Blobs::read_at(&mut s.file, s.offset, want, &mut conn.out) {
            Ok(n) if n > 0 => {
                s.offset += n as u64;
                s.left -= n as u64;
                h.deadline = now_t.at + idle;
                let (left, keep) = (s.left, s.keep_alive);
                self.dirty.push(id);
                if left == 0 {
                    self.finish_sending(id, keep);
                }
            }
            _ => {
                // The file shrank or failed under us: the length promised cannot be kept.
                self.drop_conn(id, "resource read failed mid-download");
            }
        }
    }

    fn finish_sending(&mut self, id: ConnId, keep_alive: bool) {
        let now = self.fed.now.at;
        let (idle, handshake) = (self.fed.cfg.idle_timeout, self.fed.cfg.handshake_timeout);
        if let Some(ConnState::Http(h)) = self.conn_mut(id).map(|c| &mut c.state) {
            crate::io::http::next_request(h, keep_alive, now, idle, handshake);
        }
        self.dirty.push(id);
        self.resume.push(id);
    }
}

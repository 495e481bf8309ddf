//! Resource files under `<state dir>/resources/<owner>/<name>` (contract §3, §7).
//!
//! Owns the disk side of the data channel: an upload is written to a temporary file under
//! `resources/.tmp/`, hashed on the way, and on completion fsynced, renamed into place and
//! its directory fsynced — so a cut-off, oversize or failed upload leaves nothing behind
//! (the temporary file is removed) and a `201` is sent only for a resource that is on disk.
//! Each resource has a sidecar `<owner>/.<name>.meta` (`size sha256 readers`) so the index
//! is rebuilt at start without reading every byte; a resource without a valid sidecar is
//! hashed once (and readable by everyone, as before `readers` existed).
//!
//! Paths: `owner` and `name` are validated by the caller before any path is built
//! (`jwt::valid_server_id`, `resources::valid_name`): both start with a letter or digit (an
//! owner) or are not `.`-led (a name), contain no separator, and so are always one plain
//! entry under `resources/` or `resources/<owner>/` — never `.`, `..`, `.tmp`, or a sidecar.
//! Every file is created 0600 and exclusively (temporary file, then rename), every
//! directory 0700.
//! Reads are bounded chunks at an offset; nothing here ever holds a whole resource in memory.

use crate::federation::resources::{Index, Limits, Meta, Readers, parse_readers, valid_name};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes read from a resource file per refill of a connection's output.
pub const READ_CHUNK: usize = 64 * 1024;

pub struct Blobs {
    root: PathBuf,
    next_tmp: u64,
}

/// An upload in progress. Dropped unfinished (cut off, refused, the connection gone), it
/// removes its temporary file: nothing is left behind.
pub struct Upload {
    file: Option<File>,
    tmp: PathBuf,
    hasher: Sha256,
    pub written: u64,
    finished: bool,
}

impl Upload {
    /// A stand-in for an upload already renamed into place (dropping it removes nothing).
    pub fn published() -> Upload {
        Upload {
            file: None,
            tmp: PathBuf::new(),
            hasher: Sha256::new(),
            written: 0,
            finished: true,
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.finished {
            self.file.take();
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    crate::random::hex(bytes)
}

/// Makes a directory's entries (a rename into it) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A sealed upload: what [`sync_sealed`] makes durable (on the disk thread) before it is
/// published.
#[derive(Debug)]
pub struct Sealed {
    file: File,
    /// Where its sidecar is written before it is renamed into place.
    pub side_tmp: PathBuf,
    side: Vec<u8>,
}

/// A sealed upload's sidecar written without any fsync (a memory-only proxy: nothing it
/// stores survives a restart, so nothing is synced).
pub fn write_sealed_unsynced(s: Sealed) -> io::Result<()> {
    drop(s.file);
    let r = super::create_new_private(&s.side_tmp).and_then(|mut f| f.write_all(&s.side));
    if r.is_err() {
        let _ = fs::remove_file(&s.side_tmp);
    }
    r
}

/// An upload's bytes and its sidecar reach the disk (the long fsync of a large upload:
/// never on the loop). A sidecar left by a failure is removed.
pub fn sync_sealed(s: Sealed) -> io::Result<()> {
    s.file.sync_all()?;
    drop(s.file);
    if let Err(e) = super::write_new_private(&s.side_tmp, &s.side) {
        let _ = fs::remove_file(&s.side_tmp);
        return Err(e);
    }
    Ok(())
}

impl Blobs {
    /// Opens (creating) `root`, removes leftover temporary files, and rebuilds the index.
    pub fn open(root: &Path) -> io::Result<(Blobs, Index)> {
        super::create_dir_private(root)?;
        let tmp = root.join(".tmp");
        let _ = fs::remove_dir_all(&tmp);
        super::create_dir_private(&tmp)?;
        let mut index = Index::default();
        for owner in fs::read_dir(root)? {
            let owner = owner?;
            let Some(owner_name) = owner.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !crate::proto::jwt::valid_server_id(&owner_name) || !owner.file_type()?.is_dir() {
                continue;
            }
            for item in fs::read_dir(owner.path())? {
                let item = item?;
                let Some(name) = item.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !valid_name(&name) || !item.file_type()?.is_file() {
                    continue;
                }
                let meta = match read_sidecar(&owner.path(), &name) {
                    Some(m) if Some(m.size) == item.metadata().ok().map(|x| x.len()) => m,
                    _ => hash_file(&item.path())?,
                };
                let size = meta.size;
                let _ = index.reserve(&owner_name, &name, size, Limits::NONE);
                index.commit(&owner_name, &name, meta, size);
            }
        }
        Ok((
            Blobs {
                root: root.to_path_buf(),
                next_tmp: 0,
            },
            index,
        ))
    }

    pub fn path(&self, owner: &str, name: &str) -> PathBuf {
        self.root.join(owner).join(name)
    }

    /// A fresh temporary path under `.tmp/`.
    fn tmp_path(&mut self) -> PathBuf {
        self.next_tmp += 1;
        self.root
            .join(".tmp")
            .join(format!("{}-{}", std::process::id(), self.next_tmp))
    }

    /// Starts an upload into a fresh temporary file.
    pub fn begin(&mut self) -> io::Result<Upload> {
        let tmp = self.tmp_path();
        let file = super::create_new_private(&tmp)?;
        Ok(Upload {
            file: Some(file),
            tmp,
            hasher: Sha256::new(),
            written: 0,
            finished: false,
        })
    }

    /// Completes an upload in one go: [`Blobs::seal`], [`sync_sealed`], [`Blobs::publish`],
    /// [`sync_dir`]. The proxy runs the two syncs on its disk thread instead.
    pub fn finish(
        &mut self,
        mut up: Upload,
        owner: &str,
        name: &str,
        readers: Readers,
    ) -> io::Result<Meta> {
        let (meta, sealed) = self.seal(&mut up, readers)?;
        let side_tmp = sealed.side_tmp.clone();
        sync_sealed(sealed)?;
        let dir = self.publish(up, owner, name, &side_tmp)?;
        sync_dir(&dir)?;
        Ok(meta)
    }

    /// All of an upload's bytes are in: its metadata, and what must reach the disk before
    /// it is published ([`sync_sealed`]: the file, and its sidecar under a temporary name).
    /// Nothing is visible yet; the upload stays with the caller.
    pub fn seal(&mut self, up: &mut Upload, readers: Readers) -> io::Result<(Meta, Sealed)> {
        let file = up
            .file
            .take()
            .ok_or_else(|| io::Error::other("upload already closed"))?;
        let meta = Meta {
            size: up.written,
            sha256: hex(&up.hasher.clone().finalize()),
            readers,
        };
        let side = format!(
            "{} {} {}\n",
            meta.size,
            meta.sha256,
            sidecar_readers(&meta.readers)
        );
        let sealed = Sealed {
            file,
            side_tmp: self.tmp_path(),
            side: side.into_bytes(),
        };
        Ok((meta, sealed))
    }

    /// Puts a synced upload in place: its sidecar, then its file, renamed under the owner's
    /// directory (atomic; the caller updates the index in the same loop step, so readers see
    /// the file and its metadata change together). Returns the directory whose fsync makes
    /// the renames durable ([`sync_dir`]).
    pub fn publish(
        &mut self,
        mut up: Upload,
        owner: &str,
        name: &str,
        side_tmp: &Path,
    ) -> io::Result<PathBuf> {
        let dir = self.root.join(owner);
        super::create_dir_private(&dir)?;
        if let Err(e) = fs::rename(side_tmp, dir.join(format!(".{name}.meta"))) {
            let _ = fs::remove_file(side_tmp);
            return Err(e);
        }
        fs::rename(&up.tmp, dir.join(name))?;
        up.finished = true;
        Ok(dir)
    }

    /// Abandons an upload: nothing is left behind.
    pub fn abort(&mut self, up: Upload) {
        drop(up);
    }

    /// Deletes a resource and its sidecar.
    pub fn remove(&mut self, owner: &str, name: &str) -> io::Result<()> {
        let dir = self.root.join(owner);
        fs::remove_file(dir.join(name))?;
        let _ = fs::remove_file(dir.join(format!(".{name}.meta")));
        sync_dir(&dir)
    }

    /// Deletes every resource of `owner` and its directory, whatever else it holds (the
    /// owner was removed, §3). `owner` is a valid serverId (checked by the caller), so the
    /// directory is always one entry of the resources root.
    pub fn remove_owner(&mut self, owner: &str, names: &[String]) -> io::Result<()> {
        let dir = self.root.join(owner);
        for name in names {
            match fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let _ = fs::remove_file(dir.join(format!(".{name}.meta")));
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => sync_dir(&self.root),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads at most `max` bytes at `offset` of a resource file into `out`.
    pub fn read_at(
        file: &mut File,
        offset: u64,
        max: usize,
        out: &mut Vec<u8>,
    ) -> io::Result<usize> {
        file.seek(SeekFrom::Start(offset))?;
        let start = out.len();
        out.resize(start + max, 0);
        let mut n = 0;
        while n < max {
            match file.read(&mut out[start + n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            }
        }
        out.truncate(start + n);
        Ok(n)
    }
}

impl Upload {
    /// Appends body bytes (hashing them on the way).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("upload already closed"))?;
        file.write_all(data)?;
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(())
    }
}

/// The readers field of a sidecar: `*` everyone, `-` the owner only, else the ids.
fn sidecar_readers(readers: &Readers) -> String {
    match readers {
        None => "*".to_string(),
        Some(ids) if ids.is_empty() => "-".to_string(),
        Some(ids) => ids.join(","),
    }
}

fn read_sidecar(dir: &Path, name: &str) -> Option<Meta> {
    let text = fs::read_to_string(dir.join(format!(".{name}.meta"))).ok()?;
    let mut parts = text.split_whitespace();
    let size = parts.next()?.parse().ok()?;
    let sha256 = parts.next()?.to_string();
    let readers = match parts.next() {
        None | Some("*") => None,
        Some("-") => Some(Vec::new()),
        // A damaged list is read as the owner only: never wider than what was stored.
        Some(ids) => parse_readers(Some(ids)).unwrap_or(Some(Vec::new())),
    };
    (sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())).then_some(Meta {
        size,
        sha256,
        readers,
    })
}

fn hash_file(path: &Path) -> io::Result<Meta> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Meta {
        size,
        sha256: hex(&h.finalize()),
        readers: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_finish_reopen_and_abort() {
        let root = std::env::temp_dir().join(format!("fedmcp-blobs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (mut b, ix) = Blobs::open(&root).unwrap();
        assert_eq!(ix.list().count(), 0);
        let mut up = b.begin().unwrap();
        up.write(b"hello ").unwrap();
        up.write(b"world").unwrap();
        let m = b
            .finish(up, "alice", "greeting.txt", Some(vec!["bob".into()]))
            .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in ["greeting.txt", ".greeting.txt.meta"] {
                let mode = fs::metadata(root.join("alice").join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
        assert_eq!(m.size, 11);
        assert_eq!(
            m.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        let mut up = b.begin().unwrap();
        up.write(b"partial").unwrap();
        b.abort(up);
        assert_eq!(
            fs::read_dir(root.join(".tmp")).unwrap().count(),
            0,
            "an aborted upload leaves nothing"
        );
        let (mut b, ix) = Blobs::open(&root).unwrap();
        assert_eq!(ix.get("alice", "greeting.txt"), Some(&m));
        let mut f = File::open(root.join("alice").join("greeting.txt")).unwrap();
        let mut out = Vec::new();
        assert_eq!(Blobs::read_at(&mut f, 6, 100, &mut out).unwrap(), 5);
        assert_eq!(out, b"world");
        assert_eq!(
            ix.get("alice", "greeting.txt").unwrap().readers,
            Some(vec!["bob".into()])
        );
        b.remove_owner("alice", &["greeting.txt".to_string()])
            .unwrap();
        assert!(!root.join("alice").exists());
        let _ = fs::remove_dir_all(&root);
    }
}

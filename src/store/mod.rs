//! Durable state in the state dir: the generated JWT secret, and (`log`) the framing of the
//! append-only state log.
//!
//! Owns the files under `FEDMCP_STATE_DIR`. The generated secret is 32 random bytes from the
//! OS, kept hex-encoded in `<state dir>/jwt-secret` with mode 0600 (the directory 0700), and
//! used as the key exactly as the file's text, the same way `FEDMCP_JWT_SECRET_FILE` is read.
//! It is written to a temporary file, fsynced and renamed, so a crash never leaves a torn
//! secret. It never logs a secret.
//!
//! File modes (contract §7): every directory here is made or made again `0700` (also when it
//! already existed), every file is created `0600`, and a temporary file is created
//! exclusively (`O_EXCL`): a stale one is removed first, and a file planted in its place (a
//! link to elsewhere) is never written through.

pub mod blobs;
pub mod log;
pub mod state;

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

pub const SECRET_FILE: &str = "jwt-secret";

/// Reads the generated secret, creating it (and the directory) on first use.
/// This proxy's name in a cluster (§10, `FEDMCP_NODE_ID` unset): read from
/// `<dir>/node-id`, or made (`n` and 8 random hex digits) and kept there (0600).
pub fn load_or_create_node_id(dir: &Path) -> io::Result<String> {
    let path = dir.join(NODE_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim_end_matches(['\n', '\r']).to_string();
            let ok = (1..=32).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not 1 to 32 of A-Z a-z 0-9 - _", path.display()),
                ));
            }
            keep_private(&path)?;
            return Ok(id);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    create_dir_private(dir)?;
    let id = format!(
        "n{}",
        crate::random::hex(&crate::random::random_bytes::<4>())
    );
    let tmp = dir.join(format!("{NODE_ID_FILE}.tmp"));
    let _ = fs::remove_file(&tmp);
    write_new_private(&tmp, id.as_bytes())?;
    fs::rename(&tmp, &path)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(id)
}

/// The file that keeps a generated node id.
pub const NODE_ID_FILE: &str = "node-id";

pub fn load_or_create_secret(dir: &Path) -> io::Result<Vec<u8>> {
    let path = dir.join(SECRET_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            create_dir_private(dir)?;
            keep_private(&path)?;
            let text = String::from_utf8_lossy(&bytes)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            if text.len() < 32 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} holds fewer than 32 bytes", path.display()),
                ));
            }
            return Ok(text.into_bytes());
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    create_dir_private(dir)?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| io::Error::other(format!("no OS randomness: {e}")))?;
    let text = crate::random::hex(&raw);
    let tmp = dir.join(format!("{SECRET_FILE}.tmp"));
    write_new_private(&tmp, text.as_bytes())?;
    fs::rename(&tmp, &path)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(text.into_bytes())
}

/// Makes `dir` (and missing parents) with mode 0700; an existing `dir` is set to 0700 too.
pub(crate) fn create_dir_private(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
    }
    #[cfg(not(unix))]
    {
        fs::create_dir_all(dir)
    }
}

/// Creates `path` exclusively (`O_EXCL`, mode 0600) for writing, removing a stale file of
/// that name first (a leftover temporary file; a symlink is removed, never followed).
pub(crate) fn create_new_private(path: &Path) -> io::Result<fs::File> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut o = OpenOptions::new();
    o.write(true).read(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
}

/// Sets an existing file to mode 0600 (a file from an older version, or restored from a
/// backup with a loose mode); a missing file is not an error.
pub(crate) fn keep_private(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let _ = path;
    Ok(())
}

/// Writes `bytes` to a new private file at `path` (see [`create_new_private`]) and fsyncs it.
pub(crate) fn write_new_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = create_new_private(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_created_once_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("fedmcp-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = load_or_create_secret(&dir).unwrap();
        let b = load_or_create_secret(&dir).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        #[cfg(unix)]
        {
            // An existing directory with a loose mode is made private again, and a planted
            // temporary file is replaced, never written through.
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
            let victim = dir.join("victim");
            fs::write(&victim, "keep").unwrap();
            std::os::unix::fs::symlink(&victim, dir.join("x.tmp")).unwrap();
            write_new_private(&dir.join("x.tmp"), b"new").unwrap();
            assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
            create_dir_private(&dir).unwrap();
            let mode = fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join(SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

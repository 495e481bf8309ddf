//! Durable state in the state dir: the generated JWT secret, and (`log`) the framing of the
//! append-only state log.
//!
//! Owns the files under `FEDMCP_STATE_DIR`. The generated secret is 32 random bytes from the
//! OS, kept hex-encoded in `<state dir>/jwt-secret` with mode 0600 (the directory 0700), and
//! used as the key exactly as the file's text, the same way `FEDMCP_JWT_SECRET_FILE` is read.
//! It is written to a temporary file, fsynced and renamed, so a crash never leaves a torn
//! secret. It never logs a secret.

pub mod blobs;
pub mod log;
pub mod state;

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

pub const SECRET_FILE: &str = "jwt-secret";

/// Reads the generated secret, creating it (and the directory) on first use.
pub fn load_or_create_secret(dir: &Path) -> io::Result<Vec<u8>> {
    let path = dir.join(SECRET_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
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
    let text = crate::proxy::hex(&raw);
    let tmp = dir.join(format!("{SECRET_FILE}.tmp"));
    {
        let mut o = OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let mut f = o.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(text.into_bytes())
}

pub(crate) fn create_dir_private(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }
    #[cfg(not(unix))]
    {
        fs::create_dir_all(dir)
    }
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

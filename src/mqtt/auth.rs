//! Who may connect: password files of `username:hash` lines, the hashes in
//! PHC form from argon2 (`$argon2id$v=19$...`, as `flowgate passwd` writes
//! them). Checking a password costs tens of milliseconds by design, so callers
//! run [`PasswordFile::check`] on a blocking thread. Reloaded on SIGHUP.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// What a CONNECT's credentials are worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// No username (or a username without password).
    NoCredentials,
    UnknownUser,
    BadPassword,
}

impl Verdict {
    /// The label of `flowgate_mqtt_auth_total{result}`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "ok",
            Self::NoCredentials => "no_credentials",
            Self::UnknownUser => "unknown_user",
            Self::BadPassword => "bad_password",
        }
    }
}

/// A loaded password file.
pub struct PasswordFile {
    pub path: PathBuf,
    users: RwLock<HashMap<String, String>>,
}

fn parse(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let where_ = || format!("{} line {}", path.display(), n + 1);
        let Some((user, hash)) = line.split_once(':') else {
            return Err(format!("{}: not \"username:hash\"", where_()));
        };
        let parsed =
            PasswordHash::new(hash).map_err(|e| format!("{}: not a PHC hash: {e}", where_()))?;
        if !parsed.algorithm.as_str().starts_with("argon2") {
            return Err(format!(
                "{}: {} hashes are not supported (argon2id, argon2i or argon2d)",
                where_(),
                parsed.algorithm
            ));
        }
        if users.insert(user.to_owned(), hash.to_owned()).is_some() {
            return Err(format!("{}: user {user:?} appears twice", where_()));
        }
    }
    Ok(users)
}

/// A hash checked when the user is unknown, so both failures take as long.
fn decoy() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| hash(b"flowgate decoy password").unwrap_or_default())
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<Self, String> {
        Ok(Self {
            path: path.to_owned(),
            users: RwLock::new(parse(path)?),
        })
    }

    /// Reads the file again; on a problem the users in use stay. Returns how
    /// many users it holds.
    pub fn reload(&self) -> Result<usize, String> {
        let users = parse(&self.path)?;
        let n = users.len();
        *self
            .users
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = users;
        Ok(n)
    }

    /// Checks a CONNECT's credentials (slow on purpose: run it off the
    /// async threads).
    pub fn check(&self, username: Option<&str>, password: Option<&[u8]>) -> Verdict {
        let (Some(user), Some(password)) = (username, password) else {
            return Verdict::NoCredentials;
        };
        let stored = self
            .users
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(user)
            .cloned();
        let (hash, known) = match &stored {
            Some(h) => (h.as_str(), true),
            None => (decoy(), false),
        };
        let ok = PasswordHash::new(hash)
            .is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok());
        match (known, ok) {
            (true, true) => Verdict::Accepted,
            (true, false) => Verdict::BadPassword,
            (false, _) => Verdict::UnknownUser,
        }
    }
}

/// An argon2id hash of `password` with a fresh random salt, in PHC form.
pub fn hash(password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Adds `user` to the file at `path` (created if missing) or replaces its
/// hash; other lines stay as they are.
pub fn set_user(path: &Path, user: &str, password: &[u8]) -> Result<(), String> {
    if user.is_empty() || user.contains(':') || user.contains('\n') {
        return Err(format!("{user:?}: a username is not empty and has no ':'"));
    }
    let line = format!("{user}:{}", hash(password)?);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut lines: Vec<String> = Vec::new();
    let mut replaced = false;
    for l in text.lines() {
        if l.split_once(':').is_some_and(|(u, _)| u.trim() == user) {
            lines.push(line.clone());
            replaced = true;
        } else {
            lines.push(l.to_owned());
        }
    }
    if !replaced {
        lines.push(line);
    }
    let mut out = lines.join("\n");
    out.push('\n');
    std::fs::write(path, out).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_checked_against_their_hash() {
        let dir = std::env::temp_dir().join(format!("flowgate-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("passwords");
        set_user(&path, "alice", b"s3cret").expect("add alice");
        set_user(&path, "bob", b"first").expect("add bob");
        set_user(&path, "bob", b"second").expect("change bob");
        let file = PasswordFile::load(&path).expect("load");
        assert_eq!(
            file.check(Some("alice"), Some(b"s3cret")),
            Verdict::Accepted
        );
        assert_eq!(
            file.check(Some("alice"), Some(b"wrong")),
            Verdict::BadPassword
        );
        assert_eq!(
            file.check(Some("bob"), Some(b"first")),
            Verdict::BadPassword
        );
        assert_eq!(file.check(Some("bob"), Some(b"second")), Verdict::Accepted);
        assert_eq!(file.check(Some("carol"), Some(b"x")), Verdict::UnknownUser);
        assert_eq!(file.check(None, None), Verdict::NoCredentials);
        assert_eq!(file.check(Some("alice"), None), Verdict::NoCredentials);
        std::fs::write(&path, "alice:plaintext\n").expect("write");
        assert!(file.reload().is_err());
        assert_eq!(
            file.check(Some("alice"), Some(b"s3cret")),
            Verdict::Accepted
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

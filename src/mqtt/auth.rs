//! Who may connect: password files of `username:hash` lines, the hashes in
//! PHC form from argon2 (`$argon2id$v=19$...`, as `flowgate passwd` writes
//! them) or as Mosquitto's `mosquitto_passwd` writes them (`$7$`: PBKDF2 with
//! HMAC-SHA512; `$6$`: salted SHA-512), so a Mosquitto password file works
//! as it is. Checking an argon2 password costs tens of milliseconds by design,
//! so callers run [`PasswordFile::check`] on a blocking thread. Reloaded on
//! SIGHUP.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use thiserror::Error;

/// A password file that cannot be read, written or understood.
#[derive(Debug, Error)]
pub enum AuthError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} line {line}: {problem}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        problem: LineProblem,
    },
    #[error("{0:?}: a username is not empty and has no ':'")]
    BadUsername(String),
    #[error("cannot read /dev/urandom: {0}")]
    Random(std::io::Error),
    #[error("{0}")]
    Hashing(argon2::password_hash::Error),
}

/// What is wrong with one line of a password file.
#[derive(Debug, Error)]
pub enum LineProblem {
    #[error("not \"username:hash\"")]
    NotUserHash,
    #[error("user {0:?} appears twice")]
    Twice(String),
    #[error("a {0} hash is {1}")]
    Shape(&'static str, &'static str),
    #[error("{0:?} is not an iteration count")]
    Iterations(String),
    #[error("{what} is not base64: {source}")]
    Base64 {
        what: &'static str,
        source: base64ct::Error,
    },
    #[error("a {0} hash has 64 bytes, not {1}")]
    Length(&'static str, usize),
    #[error("not a PHC hash ({0}) nor a mosquitto_passwd one ($7$ or $6$)")]
    NotPhc(argon2::password_hash::Error),
    #[error("{0} hashes are not supported (argon2id, argon2i, argon2d, or mosquitto_passwd's $7$ and $6$)")]
    Algorithm(String),
}

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
    users: RwLock<Users>,
}

/// The users of a file, and the hash an unknown user is checked against:
/// one of the file's own kind, so an unknown user and a wrong password take
/// as long.
struct Users {
    by_name: HashMap<String, Stored>,
    decoy: Stored,
}

/// One user's stored hash.
#[derive(Clone)]
enum Stored {
    /// PHC string (argon2id, argon2i, argon2d).
    Argon2(String),
    /// Mosquitto `$7$iterations$salt$hash`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        iterations: std::num::NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// Mosquitto `$6$salt$hash`: SHA-512 of the password then the salt.
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

fn b64(field: &str, what: &'static str) -> Result<Vec<u8>, LineProblem> {
    use base64ct::Encoding;
    base64ct::Base64::decode_vec(field).map_err(|source| LineProblem::Base64 { what, source })
}

impl Stored {
    fn parse(hash: &str) -> Result<Self, LineProblem> {
        if let Some(rest) = hash.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(iterations), Some(salt), Some(digest), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(LineProblem::Shape("$7$", "$7$iterations$salt$hash"));
            };
            let iterations = iterations
                .parse()
                .map_err(|_| LineProblem::Iterations(iterations.to_owned()))?;
            let hash = b64(digest, "the hash")?;
            if hash.len() != 64 {
                return Err(LineProblem::Length("$7$", hash.len()));
            }
            return Ok(Self::Pbkdf2Sha512 {
                iterations,
                salt: b64(salt, "the salt")?,
                hash,
            });
        }
        if let Some(rest) = hash.strip_prefix("$6$") {
            let Some((salt, digest)) = rest.split_once('$') else {
                return Err(LineProblem::Shape("$6$", "$6$salt$hash"));
            };
            let hash = b64(digest, "the hash")?;
            if hash.len() != 64 {
                return Err(LineProblem::Length("$6$", hash.len()));
            }
            return Ok(Self::Sha512 {
                salt: b64(salt, "the salt")?,
                hash,
            });
        }
        let parsed = PasswordHash::new(hash).map_err(LineProblem::NotPhc)?;
        if !parsed.algorithm.as_str().starts_with("argon2") {
            return Err(LineProblem::Algorithm(parsed.algorithm.to_string()));
        }
        Ok(Self::Argon2(hash.to_owned()))
    }

    /// A hash of the same kind and cost that no password matches.
    fn decoy(&self) -> Self {
        match self {
            Self::Argon2(_) => argon2_decoy().clone(),
            Self::Pbkdf2Sha512 {
                iterations, salt, ..
            } => Self::Pbkdf2Sha512 {
                iterations: *iterations,
                salt: salt.clone(),
                hash: vec![0; 64],
            },
            Self::Sha512 { salt, .. } => Self::Sha512 {
                salt: salt.clone(),
                hash: vec![0; 64],
            },
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Self::Argon2(phc) => PasswordHash::new(phc)
                .is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok()),
            Self::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => ring::pbkdf2::verify(
                ring::pbkdf2::PBKDF2_HMAC_SHA512,
                *iterations,
                salt,
                password,
                hash,
            )
            .is_ok(),
            Self::Sha512 { salt, hash } => {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
                ctx.update(password);
                ctx.update(salt);
                let digest = ctx.finish();
                // every byte compared, whatever the first difference
                digest.as_ref().len() == hash.len()
                    && digest
                        .as_ref()
                        .iter()
                        .zip(hash)
                        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                        == 0
            }
        }
    }
}

fn parse(path: &Path) -> Result<Users, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut users = HashMap::new();
    let mut decoy = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |problem| AuthError::Line {
            path: path.to_owned(),
            line: n + 1,
            problem,
        };
        let Some((user, hash)) = line.split_once(':') else {
            return Err(at(LineProblem::NotUserHash));
        };
        let stored = Stored::parse(hash).map_err(at)?;
        decoy.get_or_insert_with(|| stored.decoy());
        if users.insert(user.to_owned(), stored).is_some() {
            return Err(at(LineProblem::Twice(user.to_owned())));
        }
    }
    Ok(Users {
        by_name: users,
        decoy: decoy.unwrap_or_else(|| argon2_decoy().clone()),
    })
}

/// The argon2 hash an unknown user is checked against.
fn argon2_decoy() -> &'static Stored {
    static DECOY: OnceLock<Stored> = OnceLock::new();
    DECOY.get_or_init(|| Stored::Argon2(hash(b"flowgate decoy password").unwrap_or_default()))
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        Ok(Self {
            path: path.to_owned(),
            users: RwLock::new(parse(path)?),
        })
    }

    /// Reads the file again; on a problem the users in use stay. Returns how
    /// many users it holds.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let users = parse(&self.path)?;
        let n = users.by_name.len();
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
        let (hash, known) = {
            let users = self
                .users
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match users.by_name.get(user) {
                Some(h) => (h.clone(), true),
                None => (users.decoy.clone(), false),
            }
        };
        let ok = hash.verify(password);
        match (known, ok) {
            (true, true) => Verdict::Accepted,
            (true, false) => Verdict::BadPassword,
            (false, _) => Verdict::UnknownUser,
        }
    }
}

/// An argon2id hash of `password` with a fresh random salt, in PHC form.
pub fn hash(password: &[u8]) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .map_err(AuthError::Random)?;
    let salt = SaltString::encode_b64(&salt).map_err(AuthError::Hashing)?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(AuthError::Hashing)
}

/// Adds `user` to the file at `path` (created if missing) or replaces its
/// hash; other lines stay as they are.
pub fn set_user(path: &Path, user: &str, password: &[u8]) -> Result<(), AuthError> {
    if user.is_empty() || user.contains(':') || user.contains('\n') {
        return Err(AuthError::BadUsername(user.to_owned()));
    }
    let line = format!("{user}:{}", hash(password)?);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(AuthError::Read {
                path: path.to_owned(),
                source,
            })
        }
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
    std::fs::write(path, out).map_err(|source| AuthError::Write {
        path: path.to_owned(),
        source,
    })
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
        // lines written by mosquitto_passwd (Mosquitto 2: $7$; 1.x: $6$),
        // here made with Python's hashlib for the password "n0de-red"
        std::fs::write(
            &path,
            "m2:$7$101$AAECAwQFBgcICQoL$w2vvLpQfuHATtJcXx2ZAa+j2eTZkamR43Vh1iIIeEjSR3wfQfywfy1uVRTlZ4HzeXQKemrrmQ2Vffaxor46Fsw==\n\
             m1:$6$AAECAwQFBgcICQoL$6SE1M/+ka6vRm36TrfCYnuUGmzfgqtzPLq61czT3PFMgK7MZctl9rZr6AL91zPhOYj10fiPw2GBpI2pBUrhyuA==\n",
        )
        .expect("write");
        let mosq = PasswordFile::load(&path).expect("mosquitto_passwd lines load");
        for user in ["m1", "m2"] {
            assert_eq!(
                mosq.check(Some(user), Some(b"n0de-red")),
                Verdict::Accepted,
                "{user}"
            );
            assert_eq!(
                mosq.check(Some(user), Some(b"n0de-rex")),
                Verdict::BadPassword,
                "{user}"
            );
        }
        for bad in [
            "x:$7$0$AAECAwQFBgcICQoL$w2vv\n",
            "x:$7$101$AAECAwQFBgcICQoL$AAAA\n",
            "x:$6$!!$AAAA\n",
            "x:$5$abc$def\n",
        ] {
            std::fs::write(&path, bad).expect("write");
            assert!(PasswordFile::load(&path).is_err(), "{bad}");
        }
        std::fs::write(&path, "alice:plaintext\n").expect("write");
        assert!(file.reload().is_err());
        assert_eq!(
            file.check(Some("alice"), Some(b"s3cret")),
            Verdict::Accepted
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The cluster key: a secret shared by every daemon and client of one cluster.
//!
//! Every RPC carries a token in the `x-kerfs-auth` header: a timestamp, a random nonce and a
//! blake3 keyed hash (a MAC) of both under the cluster key. Servers refuse a request whose
//! token is missing, malformed, made with another key, or older than [`MAX_TOKEN_AGE`].
//! This proves the caller holds the key; it does not encrypt the traffic (use a private
//! network, as for any HPC storage fabric).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// Header carrying the token.
pub const AUTH_HEADER: &str = "x-kerfs-auth";
/// Environment variable naming the key file.
pub const KEY_FILE_ENV: &str = "KERFS_KEY_FILE";
/// Tokens older (or newer) than this are refused: bounds replay and clock skew.
pub const MAX_TOKEN_AGE: Duration = Duration::from_secs(300);

const KEY_LEN: usize = 32;
const MAC_CONTEXT: &[u8] = b"kerfs-v1 rpc token";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the cluster key file {path}: {source}; copy the cluster's key there, or point --key-file / $KERFS_KEY_FILE at it")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the cluster key file {path} is malformed ({why}); it must hold 64 hex digits; copy it again from a node of the cluster")]
    Malformed { path: PathBuf, why: String },
    #[error("cannot create the cluster key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the cluster key file {path} can be read by other users (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "no cluster key given: pass --key-file, set $KERFS_KEY_FILE, or put the key at {default}"
    )]
    NotFound { default: PathBuf },
}

/// The secret every RPC proves knowledge of.
#[derive(Clone)]
pub struct ClusterKey {
    key: [u8; KEY_LEN],
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    pub fn generate() -> ClusterKey {
        let mut key = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut key);
        ClusterKey { key }
    }

    pub fn from_hex(text: &str, path: &Path) -> Result<ClusterKey, KeyError> {
        let bytes = hex::decode(text.trim()).map_err(|e| KeyError::Malformed {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        let key: [u8; KEY_LEN] = bytes.try_into().map_err(|b: Vec<u8>| KeyError::Malformed {
            path: path.to_owned(),
            why: format!("{} bytes instead of {KEY_LEN}", b.len()),
        })?;
        Ok(ClusterKey { key })
    }

    /// Reads a key file; refuses one that other users can read.
    pub fn load(path: &Path) -> Result<ClusterKey, KeyError> {
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        ClusterKey::from_hex(&text, path)
    }

    /// Reads the key file, or creates it (mode 0600, parent 0700) with a fresh key.
    pub fn load_or_create(path: &Path) -> Result<ClusterKey, KeyError> {
        if path.exists() {
            return ClusterKey::load(path);
        }
        let create_err = |source| KeyError::Create {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(create_err)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(create_err)?;
            }
        }
        let key = ClusterKey::generate();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match &mut file {
            Ok(f) => {
                writeln!(f, "{}", hex::encode(key.key)).map_err(create_err)?;
                f.sync_all().map_err(create_err)?;
                Ok(key)
            }
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => ClusterKey::load(path),
            Err(_) => Err(create_err(
                file.err()
                    .unwrap_or_else(|| std::io::Error::other("open failed")),
            )),
        }
    }

    /// The cluster's id: a fingerprint of the key (16 hex digits), recorded by chunk servers
    /// in their data directories so a disk of another cluster is never mixed in.
    pub fn cluster_id(&self) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(b"kerfs-v1 cluster id");
        h.finalize().to_hex()[..16].to_string()
    }

    /// A fresh token for one request.
    pub fn token(&self) -> String {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let nonce = hex::encode(nonce);
        let mac = self.mac(ts, &nonce);
        format!("{ts}.{nonce}.{mac}")
    }

    fn mac(&self, ts: u64, nonce: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(MAC_CONTEXT);
        h.update(&ts.to_le_bytes());
        h.update(nonce.as_bytes());
        h.finalize().to_hex().to_string()
    }

    /// Checks a token; the error says why it was refused.
    pub fn verify(&self, token: &str) -> Result<(), String> {
        let mut parts = token.splitn(3, '.');
        let (Some(ts), Some(nonce), Some(mac)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("malformed token".into());
        };
        let ts: u64 = ts.parse().map_err(|_| "malformed token timestamp")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if now.abs_diff(ts) > MAX_TOKEN_AGE.as_secs() {
            return Err("token too old or clock skew over 5 minutes; check the clocks".into());
        }
        let expected = self.mac(ts, nonce);
        // Constant-time comparison of the hex MACs.
        let ok = expected.len() == mac.len()
            && expected
                .bytes()
                .zip(mac.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if ok {
            Ok(())
        } else {
            Err("token made with another cluster key".into())
        }
    }

    /// The interceptor a client puts on its channels.
    pub fn client_auth(&self) -> ClientAuth {
        ClientAuth { key: self.clone() }
    }

    /// The interceptor a server puts in front of its services.
    pub fn server_auth(&self) -> ServerAuth {
        ServerAuth { key: self.clone() }
    }
}

/// Adds a fresh token to every outgoing request.
#[derive(Clone, Debug)]
pub struct ClientAuth {
    key: ClusterKey,
}

impl tonic::service::Interceptor for ClientAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let value = MetadataValue::try_from(self.key.token())
            .map_err(|_| Status::internal("cannot encode auth token"))?;
        req.metadata_mut().insert(AUTH_HEADER, value);
        Ok(req)
    }
}

/// Refuses requests without a valid token, saying why.
#[derive(Clone, Debug)]
pub struct ServerAuth {
    key: ClusterKey,
}

impl tonic::service::Interceptor for ServerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(value) = req.metadata().get(AUTH_HEADER) else {
            return Err(Status::unauthenticated(
                "no cluster key token: this KerFS cluster requires its key; pass --key-file or set $KERFS_KEY_FILE",
            ));
        };
        let token = value
            .to_str()
            .map_err(|_| Status::unauthenticated("malformed cluster key token"))?;
        self.key.verify(token).map_err(|why| {
            Status::unauthenticated(format!(
                "cluster key refused ({why}): use the key file of this cluster"
            ))
        })?;
        Ok(req)
    }
}

/// Where a program looks for the key when neither --key-file nor $KERFS_KEY_FILE is given:
/// /etc/kerfs/cluster.key for root, else $XDG_CONFIG_HOME/kerfs/cluster.key
/// (default ~/.config/kerfs/cluster.key).
pub fn default_key_path() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/etc/kerfs/cluster.key");
    }
    user_config_dir()
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("kerfs")
        .join("cluster.key")
}

/// The user's configuration directory: $XDG_CONFIG_HOME when it is an absolute path (the XDG
/// rule), else ~/.config; `None` without either.
pub fn user_config_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
}

/// The key file a program should use: the flag, then $KERFS_KEY_FILE, then [`default_key_path`].
pub fn key_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_owned();
    }
    match std::env::var_os(KEY_FILE_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => default_key_path(),
    }
}

/// Loads the key a client program should use, with an error saying where to put one.
pub fn load_client_key(flag: Option<&Path>) -> Result<ClusterKey, KeyError> {
    let path = key_path(flag);
    if !path.exists() {
        return Err(KeyError::NotFound { default: path });
    }
    ClusterKey::load(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_foreign_key_refused() {
        let a = ClusterKey::generate();
        let b = ClusterKey::generate();
        let t = a.token();
        assert!(a.verify(&t).is_ok());
        assert!(b.verify(&t).is_err());
        assert!(a.verify("garbage").is_err());
        assert!(a.verify("1.2.3").is_err());
    }

    #[test]
    fn key_file_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cluster.key");
        let k1 = ClusterKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = ClusterKey::load_or_create(&path).unwrap();
        assert!(k2.verify(&k1.token()).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            ClusterKey::load(&path),
            Err(KeyError::TooOpen { .. })
        ));
    }
}

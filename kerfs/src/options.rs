//! The `kerfs` command line and mount options: `kerfs META_ADDRS MOUNTPOINT [-o OPTS] [-f]`,
//! where OPTS is what an fstab line or mount.fuse3 passes (`ro,allow_other,_netdev,...`).
//! Options that only matter to mount(8) itself (`_netdev`, `nofail`, `auto`...) are
//! accepted and ignored so that one fstab line works for both.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use fuser::{MountOption, SessionACL};

/// Mount a KerFS cluster (normally run by `mount -t fuse.kerfs ADDRS DIR`).
#[derive(Parser, Debug)]
#[command(name = "kerfs", version)]
pub struct Args {
    /// Metadata service addresses: host:port[,host:port...]
    pub meta_addrs: String,
    /// Directory to mount on.
    pub mountpoint: PathBuf,
    /// Mount options, comma separated (repeatable): ro, allow_other, default_permissions
    /// (the default), no_default_permissions, attr_timeout=SECS, entry_timeout=SECS, subdir=/path, key_file=PATH, auto_unmount,
    /// log=PATH, deadline=SECS, lease=SECS, and the generic ones (dev, suid, noexec,
    /// _netdev...).
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// Stay in the foreground (and log to stderr) instead of detaching once mounted.
    #[arg(short = 'f')]
    pub foreground: bool,
}

/// Parsed mount options.
#[derive(Debug, Clone, PartialEq)]
pub struct MountOptions {
    pub read_only: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub default_permissions: bool,
    pub auto_unmount: bool,
    pub attr_timeout: Duration,
    pub entry_timeout: Duration,
    /// Cluster directory to show as the mount's root.
    pub subdir: String,
    pub key_file: Option<PathBuf>,
    /// Where a detached daemon writes its log (default: nowhere).
    pub log_file: Option<PathBuf>,
    /// How long a cluster call retries before failing with ETIMEDOUT.
    pub deadline: Duration,
    /// The client session lease: if this mount dies, the cluster closes its files and
    /// frees its locks this long after its last renewal.
    pub lease: Duration,
    pub fsname: Option<String>,
    /// Generic mount flags passed through to the kernel (dev, nosuid, noexec, ...).
    pub flags: Vec<MountOption>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            allow_other: false,
            allow_root: false,
            // The kernel checks the mode bits on every path walk and open with the
            // attributes we gave it, cached or not; without this a cached lookup skips the
            // directory search permission that only the cluster's own lookup checks.
            default_permissions: true,
            auto_unmount: false,
            attr_timeout: Duration::from_secs(1),
            entry_timeout: Duration::from_secs(1),
            subdir: "/".into(),
            key_file: None,
            log_file: None,
            deadline: Duration::from_secs(30),
            lease: Duration::from_secs(30),
            fsname: None,
            flags: Vec::new(),
        }
    }
}

/// Options mount(8), mount.fuse3 or fstab conventions add that mean nothing to us.
const IGNORED: &[&str] = &[
    "_netdev",
    "nofail",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "defaults",
    "rw",
    "relatime",
    "norelatime",
    "strictatime",
    "lazytime",
    "nodiratime",
    "diratime",
    "silent",
    "loud",
    "nosymfollow",
];

fn seconds(key: &str, v: &str) -> Result<Duration, String> {
    let s: f64 = v
        .parse()
        .map_err(|_| format!("{key}={v}: expected a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&s) {
        return Err(format!("{key}={v}: expected 0 to 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(s))
}

impl MountOptions {
    /// Parses `-o` lists (each comma separated), later options winning.
    pub fn parse<S: AsRef<str>>(lists: &[S]) -> Result<MountOptions, String> {
        let mut o = MountOptions::default();
        for list in lists {
            for opt in list.as_ref().split(',').map(str::trim) {
                if opt.is_empty() || IGNORED.contains(&opt) || opt.starts_with("x-") {
                    continue;
                }
                let (key, value) = match opt.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (opt, None),
                };
                match (key, value) {
                    ("ro", None) => o.read_only = true,
                    ("allow_other", None) => o.allow_other = true,
                    ("allow_root", None) => o.allow_root = true,
                    ("default_permissions", None) => o.default_permissions = true,
                    ("no_default_permissions", None) => o.default_permissions = false,
                    ("auto_unmount", None) => o.auto_unmount = true,
                    ("attr_timeout", Some(v)) => o.attr_timeout = seconds(key, v)?,
                    ("entry_timeout", Some(v)) => o.entry_timeout = seconds(key, v)?,
                    ("deadline", Some(v)) => o.deadline = seconds(key, v)?,
                    ("lease", Some(v)) => {
                        o.lease = seconds(key, v)?;
                        // Renewed every third of it: shorter would be renewal traffic only.
                        if o.lease < Duration::from_secs(1) {
                            return Err(format!("lease={v}: give at least 1 second"));
                        }
                    }
                    ("subdir", Some(v)) => {
                        if !v.starts_with('/') {
                            return Err(format!("subdir={v}: give an absolute path"));
                        }
                        o.subdir = v.to_string();
                    }
                    ("key_file", Some(v)) => o.key_file = Some(PathBuf::from(v)),
                    ("log", Some(v)) => o.log_file = Some(PathBuf::from(v)),
                    ("fsname", Some(v)) => o.fsname = Some(v.to_string()),
                    // We always set subtype=kerfs ourselves.
                    ("subtype", Some(_)) => {}
                    ("dev", None) => o.flags.push(MountOption::Dev),
                    ("nodev", None) => o.flags.push(MountOption::NoDev),
                    ("suid", None) => o.flags.push(MountOption::Suid),
                    ("nosuid", None) => o.flags.push(MountOption::NoSuid),
                    ("exec", None) => o.flags.push(MountOption::Exec),
                    ("noexec", None) => o.flags.push(MountOption::NoExec),
                    ("atime", None) => o.flags.push(MountOption::Atime),
                    ("noatime", None) => o.flags.push(MountOption::NoAtime),
                    ("sync", None) => o.flags.push(MountOption::Sync),
                    ("async", None) => o.flags.push(MountOption::Async),
                    ("dirsync", None) => o.flags.push(MountOption::DirSync),
                    _ => return Err(format!("unknown mount option {opt:?}")),
                }
            }
        }
        // Later flags override earlier ones (fuser refuses a list with both dev and nodev).
        let mut kept: Vec<MountOption> = Vec::new();
        for f in o.flags.drain(..).rev() {
            let opposite = |x: &MountOption| opposite(x) == Some(f.clone());
            if !kept.contains(&f) && !kept.iter().any(opposite) {
                kept.push(f);
            }
        }
        kept.reverse();
        o.flags = kept;
        Ok(o)
    }

    /// What fuser mounts with: type `fuse.kerfs` (findmnt), source = the cluster addresses.
    pub fn fuser_config(&self, meta_addrs: &str) -> fuser::Config {
        let mut config = fuser::Config::default();
        let mut fsname = self
            .fsname
            .clone()
            .unwrap_or_else(|| meta_addrs.to_string());
        if self.auto_unmount {
            // auto_unmount goes through fusermount3, which gets the options as one string
            // and splits it at commas unless they are escaped (the address list has some).
            fsname = fsname.replace('\\', "\\\\").replace(',', "\\,");
        }
        let mut opts = vec![
            // MountOption::Subtype is dropped when mounting directly as root; the kernel
            // takes subtype= as an ordinary option.
            MountOption::CUSTOM("subtype=kerfs".into()),
            MountOption::FSName(fsname),
        ];
        if self.read_only {
            opts.push(MountOption::RO);
        }
        if self.default_permissions {
            opts.push(MountOption::DefaultPermissions);
        }
        if self.auto_unmount {
            opts.push(MountOption::AutoUnmount);
        }
        opts.extend(self.flags.iter().cloned());
        config.mount_options = opts;
        config.acl = if self.allow_other {
            SessionACL::All
        } else if self.allow_root || self.auto_unmount {
            // fuser's auto_unmount needs an ACL other than Owner.
            SessionACL::RootAndOwner
        } else {
            SessionACL::Owner
        };
        config
    }
}

fn opposite(o: &MountOption) -> Option<MountOption> {
    use MountOption::*;
    Some(match o {
        Dev => NoDev,
        NoDev => Dev,
        Suid => NoSuid,
        NoSuid => Suid,
        Exec => NoExec,
        NoExec => Exec,
        Atime => NoAtime,
        NoAtime => Atime,
        Sync => Async,
        Async => Sync,
        RO => RW,
        RW => RO,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_and_mount_fuse3_options() {
        let o = MountOptions::parse(&[
            "_netdev,allow_other,ro,default_permissions",
            "dev,suid,attr_timeout=0.5,entry_timeout=2,subdir=/a/b,key_file=/k,x-systemd.foo",
        ])
        .unwrap();
        assert!(o.read_only && o.allow_other && o.default_permissions);
        assert_eq!(o.attr_timeout, Duration::from_millis(500));
        assert_eq!(o.entry_timeout, Duration::from_secs(2));
        assert_eq!(o.subdir, "/a/b");
        assert_eq!(o.key_file, Some(PathBuf::from("/k")));
        assert_eq!(o.flags, vec![MountOption::Dev, MountOption::Suid]);
        let c = o.fuser_config("h:1");
        assert_eq!(c.acl, SessionACL::All);
        assert!(c
            .mount_options
            .contains(&MountOption::CUSTOM("subtype=kerfs".into())));
        assert!(c.mount_options.contains(&MountOption::RO));
    }

    #[test]
    fn later_flags_win_and_bad_options_fail() {
        let o = MountOptions::parse(&["nodev,dev,nosuid"]).unwrap();
        assert_eq!(o.flags, vec![MountOption::Dev, MountOption::NoSuid]);
        assert!(MountOptions::parse(&["bogus"]).is_err());
        assert!(MountOptions::parse(&["attr_timeout=x"]).is_err());
        assert!(MountOptions::parse(&["subdir=rel"]).is_err());
        assert!(MountOptions::parse(&["lease=0.5"]).is_err());
        // The kernel's own permission checks are on unless turned off by name.
        assert!(MountOptions::default().default_permissions);
        let off = MountOptions::parse(&["no_default_permissions"]).unwrap();
        assert!(!off.default_permissions);
        assert!(!off
            .fuser_config("h:1")
            .mount_options
            .contains(&MountOption::DefaultPermissions));
        assert!(
            MountOptions::parse(&["no_default_permissions,default_permissions"])
                .unwrap()
                .default_permissions
        );
        assert_eq!(
            MountOptions::parse(&["lease=3"]).unwrap().lease,
            Duration::from_secs(3)
        );
        assert_eq!(
            MountOptions::parse::<&str>(&[]).unwrap(),
            MountOptions::default()
        );
    }

    #[test]
    fn fsname_commas_escaped_only_for_fusermount3() {
        let fsname = |o: &MountOptions| {
            o.fuser_config("a:1,b:2")
                .mount_options
                .into_iter()
                .find_map(|m| match m {
                    MountOption::FSName(n) => Some(n),
                    _ => None,
                })
        };
        let direct = MountOptions::parse(&["allow_other"]).unwrap();
        assert_eq!(fsname(&direct).as_deref(), Some("a:1,b:2"));
        let auto = MountOptions::parse(&["auto_unmount"]).unwrap();
        assert_eq!(fsname(&auto).as_deref(), Some("a:1\\,b:2"));
        assert_eq!(auto.fuser_config("x").acl, SessionACL::RootAndOwner);
    }
}

//! This process's state in a binary upgrade, read on the request path (is this process
//! relaying? still adopting its predecessor's holds?). The procedures that change it, and
//! that need the whole gate, are in the parent module.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::clock::Now;
use crate::keys::{KeyEntry, KeySet};
use crate::limits::Reservation;
use crate::store::HandoverRow;

/// A hold this process took for an open admission of its predecessor.
pub(super) struct Adopted {
    pub(super) key: Arc<KeyEntry>,
    pub(super) reservation: Reservation,
    pub(super) row: HandoverRow,
}

/// How the change log and saved minutes name a group.
pub(super) const GROUP_MARK: &str = "*group:";

/// How saved minutes name one distinct request of a key's loop table:
/// `*loop:<digest, 32 hex digits>:<key id>`, each row one admission of it.
pub(super) const LOOP_MARK: &str = "*loop:";

/// How long either side waits for the other before going on alone.
pub(super) const HANDOVER_WAIT: Duration = Duration::from_secs(30);

/// This process's part in an upgrade, either side.
#[derive(Default)]
pub struct Handover {
    /// Set once this process handed its sockets over and relays instead of admitting.
    pub(super) relaying: AtomicBool,
    /// Admissions between their relay check and their journal push.
    pub(super) admitting: AtomicUsize,
    /// The successor's relay socket, once known.
    pub(super) successor: OnceLock<PathBuf>,
    /// This process's own relay socket (started with `--upgrade`).
    pub(super) relay_path: OnceLock<PathBuf>,
    /// Started with `--upgrade`: requests wait until the predecessor's state is adopted.
    pub(super) adopting: AtomicBool,
    /// Holds for the predecessor's open admissions, by journal id.
    pub(super) adopted: Mutex<HashMap<i64, Adopted>>,
}

/// An admission under way: the old process waits for it before it journals and hands over.
pub struct AdmissionGuard<'a>(&'a AtomicUsize);

impl Drop for AdmissionGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The relay socket a process started with `--upgrade` listens on.
pub fn relay_path_for(upgrade_sock: &str, pid: u32) -> PathBuf {
    PathBuf::from(format!("{upgrade_sock}.relay.{pid}"))
}

impl Handover {
    /// Where requests go instead of being admitted here: the successor's relay socket once
    /// this process handed over, else `None`.
    pub fn relay(&self) -> Option<&Path> {
        if self.relaying.load(Ordering::SeqCst) {
            self.successor.get().map(PathBuf::as_path)
        } else {
            None
        }
    }

    /// Starts an admission: `Err(relay socket)` when this process handed over meanwhile
    /// (the request goes there), else a guard to hold until the admission is journaled.
    pub fn begin_admission(&self) -> Result<AdmissionGuard<'_>, &Path> {
        self.admitting.fetch_add(1, Ordering::SeqCst);
        let guard = AdmissionGuard(&self.admitting);
        match self.relay() {
            Some(path) => Err(path),
            None => Ok(guard),
        }
    }

    /// This process was started with `--upgrade`: it listens on `path` for what its
    /// predecessor relays. A placeholder file marks it at once (Pingora binds the socket
    /// over it when the listeners start, after the predecessor sent its sockets).
    pub fn announce_relay(&self, path: PathBuf) -> std::io::Result<()> {
        if !path.exists() {
            std::fs::write(&path, b"")?;
        }
        let _ = self.relay_path.set(path);
        Ok(())
    }

    /// This process's relay socket, if it has one (removed at exit).
    pub fn relay_path(&self) -> Option<&Path> {
        self.relay_path.get().map(PathBuf::as_path)
    }

    /// The newest relay socket announced next to `upgrade_sock` by another live process.
    pub(super) fn find_successor(upgrade_sock: &str) -> Option<PathBuf> {
        let sock = Path::new(upgrade_sock);
        let dir = match sock.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let prefix = format!("{}.relay.", sock.file_name()?.to_string_lossy());
        let own = std::process::id();
        std::fs::read_dir(&dir)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
                let modified = e.metadata().ok()?.modified().ok()?;
                (pid != own && crate::owner::pid_is_live(i64::from(pid)))
                    .then_some((modified, e.path()))
            })
            .max()
            .map(|(_, path)| path)
    }
}

impl Handover {
    /// Started with `--upgrade`, once the sockets arrived: requests wait (see
    /// [`Handover::until_adopted`]) until [`adopt_when_handed_over`] has run.
    pub fn expect_predecessor(&self) {
        self.adopting.store(true, Ordering::Release);
    }

    /// Waits while the predecessor's state is not adopted yet (one atomic read otherwise).
    pub async fn until_adopted(&self) {
        if !self.adopting.load(Ordering::Acquire) {
            return;
        }
        let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
        while self.adopting.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Counts saved admissions (key or group, unix ms) into the rolling minutes of `keys`, and
/// those of a key's distinct requests into its loop table: a predecessor's at a hand-over,
/// or at a start those a stopped process saved.
pub fn seed_minutes(keys: &KeySet, now: Now, minutes: Vec<(String, i64)>) {
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for (key, at) in minutes {
        by_key.entry(key).or_default().push(at);
    }
    for (key, mut walls) in by_key {
        if let Some(rest) = key.strip_prefix(LOOP_MARK) {
            let parsed = rest
                .split_once(':')
                .and_then(|(hex, id)| Some((u128::from_str_radix(hex, 16).ok()?, id)));
            if let Some((digest, id)) = parsed {
                if let Some(k) = keys.by_id(id).filter(|k| k.limits.loop_limit.is_some()) {
                    k.counters.seed_loops(now, digest, &mut walls);
                }
            }
            continue;
        }
        match key.strip_prefix(GROUP_MARK) {
            Some(name) => {
                if let Some(g) = keys.groups().get(name) {
                    g.counters.seed_minute(now, &g.limits, &walls);
                }
            }
            None => {
                if let Some(k) = keys.by_id(&key) {
                    k.counters.seed_minute(now, &k.limits, &walls);
                }
            }
        }
    }
}

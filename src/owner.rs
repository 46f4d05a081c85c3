//! Who wrote a journal row: the identity of a gateway process, and whether it still runs.
//!
//! A gateway journals every open admission under its owner id; the next process to start
//! charges the rows of an owner that is gone at their upper bound (a crash never makes a
//! request free), and leaves a live owner's rows alone (an upgrade's predecessor still
//! finishing its requests). A pid alone cannot tell these apart: after a crash or a reboot
//! the pid names whatever process has it now (a container's gateway is pid 1 at every start,
//! a host's pid 2 is `kthreadd`), and rows taken for a live process's are never charged. So
//! an owner id is the pid in its low [`PID_BITS`] bits and, above them, a stamp of the boot
//! and of the process's start time: a process is the owner only if it has that pid, that
//! start time, in this boot, and is not a zombie.

use std::sync::OnceLock;

/// Bits of an owner id that hold the pid (Linux's `pid_max` is at most 2^22).
const PID_BITS: u32 = 22;
const PID_MASK: i64 = (1 << PID_BITS) - 1;
/// The stamp's bits: what is left of a positive i64.
const STAMP_MASK: u64 = (1 << (63 - PID_BITS)) - 1;

/// This process's owner id.
#[must_use]
pub fn own() -> i64 {
    static OWN: OnceLock<i64> = OnceLock::new();
    *OWN.get_or_init(|| {
        let pid = i64::from(std::process::id());
        // Unreadable /proc: the pid alone, as before stamps (see `is_live`).
        identity(pid).unwrap_or(pid)
    })
}

/// Whether the process that wrote rows as `owner` still runs, and is not this one (rows
/// under this process's id were left by an earlier process, as it has written none yet when
/// it asks).
#[must_use]
pub fn is_live(owner: i64) -> bool {
    if owner <= 0 || owner == own() {
        return false;
    }
    let pid = owner & PID_MASK;
    if owner >> PID_BITS == 0 {
        // A bare pid: a row of a build before stamps, or of a process whose /proc could not
        // be read. It is taken for its pid's process, as then.
        return pid_is_live(pid);
    }
    identity(pid) == Some(owner)
}

/// The pid an owner id holds.
#[must_use]
pub fn pid_of(owner: i64) -> i64 {
    owner & PID_MASK
}

/// Whether `pid` names a running process other than this one (not a zombie).
#[must_use]
pub fn pid_is_live(pid: i64) -> bool {
    pid > 0 && pid != i64::from(std::process::id()) && identity(pid).is_some()
}

/// The owner id of the process that has `pid` now; `None` when there is none or it is a
/// zombie (dead, not yet reaped: it settles nothing more).
fn identity(pid: i64) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (state, start) = state_and_start(&stat)?;
    if matches!(state, "Z" | "X" | "x") {
        return None;
    }
    Some(stamped(pid, boot_id(), start))
}

/// From a `/proc/PID/stat` line: the state (field 3) and the start time in clock ticks since
/// boot (field 22). The command name (field 2) may hold spaces and parentheses, so fields
/// are counted from its last `)`.
fn state_and_start(stat: &str) -> Option<(&str, &str)> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    // Fields 4 to 21 come before the start time.
    let start = fields.nth(18)?;
    Some((state, start))
}

/// This boot's id (read once); empty where the kernel does not say.
fn boot_id() -> &'static str {
    static BOOT: OnceLock<String> = OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    })
}

/// `pid` with a stamp of (boot, start) above it. FNV-1a, fixed here: the stamp must read
/// the same in every build that may follow this one in an upgrade. Never 0, which marks a
/// bare pid.
fn stamped(pid: i64, boot: &str, start: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in boot.bytes().chain([b'/']).chain(start.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let stamp = (h & STAMP_MASK).max(1);
    // Both parts fit: the stamp below 2^41, the pid below 2^22.
    ((stamp << PID_BITS) as i64) | (pid & PID_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 \
                    987654 1000000 200 18446744073709551615";
        assert_eq!(state_and_start(stat), Some(("S", "987654")));
        assert_eq!(state_and_start("1 (x) Z 0"), None);
    }

    #[test]
    fn an_owner_is_its_pid_under_a_stamp_of_boot_and_start() {
        let a = stamped(4_194_303, "boot-1", "100");
        assert_eq!(a & PID_MASK, 4_194_303);
        assert!(a > PID_MASK, "the stamp is never 0");
        // Another start of the same pid, or the same start in another boot, is another owner.
        assert_ne!(a, stamped(4_194_303, "boot-1", "101"));
        assert_ne!(a, stamped(4_194_303, "boot-2", "100"));
        assert_eq!(a, stamped(4_194_303, "boot-1", "100"));
    }

    #[test]
    fn a_live_process_is_its_owner_and_a_reused_pid_is_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i64::from(child.id());
        let owner = identity(pid).unwrap();
        assert!(is_live(owner));
        // The same pid with another start time: a process that had the pid before a crash.
        let boot = boot_id();
        let earlier = stamped(pid, boot, "1");
        assert!(!is_live(earlier));
        // A bare pid (a row of an older build) is taken for its process.
        assert!(is_live(pid));
        child.kill().unwrap();
        // Dead but not reaped: a zombie settles nothing more.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!is_live(owner));
        assert!(!is_live(pid));
        child.wait().unwrap();
        assert!(!is_live(owner));
        // This process's own id: rows an earlier process left under it.
        assert!(!is_live(own()));
        assert!(own() > PID_MASK);
    }
}

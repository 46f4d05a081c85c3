//! Binary upgrades on one node (`serve --upgrade`, then SIGQUIT to the old process): the two
//! processes together keep every limit and budget as one process would (SPEC §2).
//!
//! Counters live in each process's memory, so the new process must learn what the old one
//! still holds and will still book, and the old one must stop deciding:
//! - The new process, started with `--upgrade`, announces a relay socket next to
//!   `server.upgrade_sock` (`<upgrade_sock>.relay.<pid>`), where its proxy also listens.
//! - The old process, on SIGQUIT, marks the hand-over as begun (`<relay>.handing`) and sends
//!   its sockets at once, serving on by itself until the new process listens on its relay
//!   socket (Pingora's new process takes up to a second to pick the sockets up). Then it
//!   stops admitting (every request that reaches it from then on, on a kept-alive connection
//!   or in Pingora's last seconds of accepting, is relayed byte for byte to the new process,
//!   which decides and books it); waits for admissions already under way; journals every
//!   admission still open and commits its ledger; saves its rolling minutes; and marks the
//!   hand-over done (`<relay>.handed-over`). From then on its commits mark journal rows
//!   settled, with what they booked, instead of deleting them.
//! - The new process decides nothing until then (its requests wait, a few milliseconds).
//!   Once the hand-over is done, it loads its counters from the ledger and holds the bound of
//!   each open journal row of the old one (one consistent read), and seeds its rolling
//!   minutes. Each reload interval it then books what the old one settled (releasing that
//!   hold); once the old process is gone, what it left open is charged at its bound as an
//!   orphan, as after a crash.
//!
//! While the old process finishes, its open requests count at their bound in the new one
//! until their settlement is read (one reload interval after the old one's commit): the new
//! process may refuse a request a single process would have admitted a moment later, never
//! the other way round.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Now;
use crate::gate::Gate;

pub mod state;
use crate::limits::Charge;
use crate::store::{HandoverRow, Store, StoreError};
pub use state::{relay_path_for, AdmissionGuard, Handover};
use state::{seed_minutes, GROUP_MARK, LOOP_MARK};
use state::{Adopted, HANDOVER_WAIT};

/// Marker files next to the successor's relay socket: the hand-over began, and is done.
fn marker(relay: &Path, what: &str) -> PathBuf {
    let mut name = relay.as_os_str().to_owned();
    name.push(format!(".{what}"));
    PathBuf::from(name)
}

/// The old process's half, on SIGQUIT before its sockets go: marks the hand-over begun and
/// leaves the rest to a task (see [`finish_hand_over`]), so the sockets go at once. Without
/// a successor that announced a relay socket (an older binary), nothing changes: this
/// process finishes on its own counters as before.
pub fn hand_over(gate: &Arc<Gate>) {
    let upgrade_sock = gate.routes().config.tuning.upgrade_sock.clone();
    let Some(successor) = Handover::find_successor(&upgrade_sock) else {
        log::warn!(
            "SIGQUIT: no successor announced a relay socket next to {upgrade_sock}; \
             this process keeps admitting on its own counters until it stops"
        );
        return;
    };
    if let Err(e) = std::fs::write(marker(&successor, "handing"), b"") {
        log::error!("SIGQUIT: cannot tell the successor a hand-over begins: {e}");
    }
    tokio::spawn(finish_hand_over(gate.clone(), successor));
}

/// Once the successor listens on its relay socket: stops admitting and relays instead, waits
/// for admissions under way, journals and commits, saves the rolling minutes, and tells the
/// successor it may decide.
async fn finish_hand_over(gate: Arc<Gate>, successor: PathBuf) {
    let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
    while tokio::net::UnixStream::connect(&successor).await.is_err() {
        if tokio::time::Instant::now() >= deadline {
            log::error!(
                "upgrade: the new process never listened on {}; finishing on this process's counters",
                successor.display()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let h = &gate.handover;
    let _ = h.successor.set(successor.clone());
    h.relaying.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while h.admitting.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let g = gate.clone();
    let done = tokio::task::spawn_blocking(move || {
        if !g.ledger.hand_over() {
            return Err("the ledger did not commit".to_string());
        }
        let mut store = g.open_store().map_err(|e| e.to_string())?;
        save_minutes(&g, &mut store).map_err(|e| e.to_string())
    })
    .await;
    match done {
        Ok(Ok(())) => log::info!(
            "upgrade: open admissions journaled; relaying new requests to {}",
            successor.display()
        ),
        Ok(Err(e)) => log::error!("upgrade: handing the counters over failed: {e}"),
        Err(e) => log::error!("upgrade: handing the counters over failed: {e}"),
    }
    // Done either way: the successor must not wait longer.
    if let Err(e) = std::fs::write(marker(&successor, "handed-over"), b"") {
        log::error!("upgrade: cannot tell the successor the hand-over is done: {e}");
    }
}

fn save_minutes(gate: &Gate, store: &mut Store) -> Result<(), StoreError> {
    let now = Now::read();
    let keys = gate.keys();
    let mut rows = Vec::new();
    for k in keys.iter().filter(|k| k.limits.rpm.is_some()) {
        if let Some(c) = k.counters.get() {
            rows.extend(c.minute_walls(now).into_iter().map(|w| (k.id.clone(), w)));
        }
    }
    // Each key's loop table: its distinct requests' admissions of the last minute.
    for k in keys.iter().filter(|k| k.limits.loop_limit.is_some()) {
        if let Some(c) = k.counters.get() {
            let mut last: Option<(u128, Arc<str>)> = None;
            for (digest, wall) in c.loop_walls(now) {
                let name = match &last {
                    Some((d, name)) if *d == digest => name.clone(),
                    _ => {
                        let name: Arc<str> =
                            Arc::from(format!("{LOOP_MARK}{digest:032x}:{}", k.id));
                        last = Some((digest, name.clone()));
                        name
                    }
                };
                rows.push((name, wall));
            }
        }
    }
    for g in keys.groups().iter().filter(|g| g.limits.rpm.is_some()) {
        let name: Arc<str> = Arc::from(format!("{GROUP_MARK}{}", g.name));
        rows.extend(
            g.counters
                .minute_walls(now)
                .into_iter()
                .map(|w| (name.clone(), w)),
        );
    }
    store.save_minutes(crate::owner::own(), &rows)
}

/// The new process's half, once its listeners run: waits until the predecessor (if it marked
/// a hand-over begun) has stopped deciding and committed, then [`adopt`]s its state and lets
/// requests through.
pub async fn adopt_when_handed_over(gate: Arc<Gate>) {
    let Some(relay) = gate.handover.relay_path().map(Path::to_path_buf) else {
        return;
    };
    let (begun, done) = (marker(&relay, "handing"), marker(&relay, "handed-over"));
    if begun.exists() {
        let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
        while !done.exists() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let g = gate.clone();
    match tokio::task::spawn_blocking(move || adopt(&g)).await {
        Ok(Ok(n)) => log::info!("upgrade: holding {n} requests the old process still has open"),
        Ok(Err(e)) => log::error!("upgrade: cannot read the old process's open requests: {e}"),
        Err(e) => log::error!("upgrade: cannot read the old process's open requests: {e}"),
    }
    gate.handover.adopting.store(false, Ordering::Release);
    let _ = std::fs::remove_file(begun);
    let _ = std::fs::remove_file(done);
}

/// Counters from the ledger, holds for the predecessor's open admissions and its rolling
/// minutes, all read from one state of the store (the predecessor has journaled and
/// committed by then).
pub fn adopt(gate: &Gate) -> Result<usize, StoreError> {
    let mut store = gate.open_store()?;
    let own = crate::owner::own();
    // What earlier, gone processes left (their minutes would count twice).
    store.forget_handovers(crate::owner::is_live)?;
    let (rows, minutes) = store.read_consistent(|s| {
        gate.reload_fresh(s)?;
        Ok((s.foreign_journal(own)?, s.foreign_minutes(own)?))
    })?;
    // Settled before the read: their charge is in the ledger just read.
    let settled: Vec<i64> = rows
        .iter()
        .filter(|r| r.settled != 0)
        .map(|r| r.id)
        .collect();
    store.delete_settled(&settled)?;
    let now = Now::read();
    let keys = gate.keys();
    let mut adopted = gate
        .handover
        .adopted
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    for row in rows.into_iter().filter(|r| r.settled == 0) {
        let Some(key) = keys.by_id(&row.key_id) else {
            continue; // deleted since: nothing counts against it
        };
        let uplines = crate::fleet::uplines(&keys, key, now.wall).unwrap_or_default();
        let reservation = key
            .counters
            .adopt(now, &key.limits, row.cost, &uplines, row.ts);
        adopted.insert(
            row.id,
            Adopted {
                key: key.clone(),
                reservation,
                row,
            },
        );
    }
    seed_minutes(&keys, now, minutes);
    Ok(adopted.len())
}

/// A clean stop on one node (not a hand-over, whose successor took them already): saves the
/// rolling minutes, so that the next start does not give every key a fresh minute (SPEC §2:
/// at most `rpm` admitted in any rolling 60 s, across a restart too).
pub fn save_minutes_at_exit(gate: &Gate) {
    if gate.handover.relaying.load(Ordering::SeqCst) {
        return;
    }
    let result = gate
        .open_store()
        .and_then(|mut store| save_minutes(gate, &mut store));
    if let Err(e) = result {
        log::warn!("cannot save the rolling minutes for the next start: {e}");
    }
}

/// Each reload interval in the new process while it holds for its predecessor: books what
/// the predecessor settled and releases those holds; once the predecessor is gone, charges
/// what it left open at its bound (orphans), as a start after a crash would.
pub fn follow(gate: &Gate, store: &mut Store) -> Result<(), StoreError> {
    // Handed over in turn: the successor follows (and clears) these rows now.
    if gate.handover.relaying.load(Ordering::SeqCst) {
        return Ok(());
    }
    let mut adopted = gate
        .handover
        .adopted
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if adopted.is_empty() {
        return Ok(());
    }
    let own = crate::owner::own();
    let rows: HashMap<i64, HandoverRow> = store
        .foreign_journal(own)?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let mut settled = Vec::new();
    let ids: Vec<i64> = adopted.keys().copied().collect();
    for id in ids {
        let row = match rows.get(&id) {
            Some(r) if r.settled == 0 => continue,
            Some(r) => {
                settled.push(id);
                r.clone()
            }
            // Gone unsettled: charged as an orphan at its journaled bound.
            None => match adopted.get(&id) {
                Some(a) => a.row.clone(),
                None => continue,
            },
        };
        let Some(a) = adopted.remove(&id) else {
            continue;
        };
        let model: Arc<str> = Arc::from(row.served_model.as_str());
        let charge = (row.settled != 2).then_some(Charge {
            model: &model,
            prompt_tokens: row.prompt_tokens,
            completion_tokens: row.completion_tokens,
            cost: row.cost,
        });
        a.key.counters.settle(a.reservation, charge);
    }
    store.delete_settled(&settled)?;
    let predecessor_gone = adopted
        .values()
        .all(|a| !crate::owner::is_live(a.row.owner));
    if !adopted.is_empty() && predecessor_gone {
        // Rows it settled in its last commit were read above; what is still open is charged
        // now and released at the next round.
        let n = store.charge_orphans(crate::owner::is_live)?;
        if n > 0 {
            log::warn!("upgrade: the old process left {n} requests open; charged at their bound");
        }
    }
    if adopted.is_empty() {
        store.forget_handovers(crate::owner::is_live)?;
        log::info!("upgrade: the old process's requests are all booked");
    }
    Ok(())
}

/// At exit: books what a predecessor settled since the last round and clears what gone
/// processes left for a successor (never this process's own rows: a successor follows
/// them), so the journal holds only requests truly open.
pub fn finish(gate: &Gate) {
    if gate.handover.relaying.load(Ordering::SeqCst) {
        return; // the successor follows what is left
    }
    let own = crate::owner::own();
    let result = gate.open_store().and_then(|mut store| {
        follow(gate, &mut store)?;
        store.forget_handovers(|o| o == own || crate::owner::is_live(o))
    });
    if let Err(e) = result {
        log::warn!("upgrade: clearing the old process's journal rows failed: {e}");
    }
}

//! Large multipart forms forwarded as they arrive (SPEC §3): forms whose `Content-Length`
//! exceeds `server.multipart_hold_bytes`. `request_filter` reads the opening (up to the end
//! of the `model` part and the head of a file after it) and decides on it;
//! `request_body_filter` sends the rewritten opening first and passes the rest on piece by
//! piece, each scanned before it goes (a malformed form is cut short upstream, never
//! completed).
//! Smaller forms, and forms without a `Content-Length`, are read whole first, as every
//! other body is.

use crate::error::GateError;
use crate::providers::multipart::FormScanner;

/// A form being forwarded as it arrives.
pub(super) struct Upload {
    scanner: FormScanner,
    /// The client's body length (its `Content-Length`).
    body_len: usize,
    /// Bytes of the body read before the decision (the opening as the client sent it).
    opening_len: usize,
    /// The `n` part admitted (image edits) under a hard budget, whose reservation counted
    /// it: an `n` after the opening may not change it.
    admitted_n: Option<Option<String>>,
    /// An image edit: its inputs, admitted as the most an edit may have, may not exceed it.
    edit: bool,
    /// The opening and later pieces went to the upstream in the current attempt.
    started: bool,
    /// The body's last piece went to the upstream.
    complete: bool,
    /// Pingora replays the opening ahead of the rest at each attempt
    /// (`io::FormOpening::replayed`); else it goes in front of the first piece.
    replayed: bool,
    /// The current attempt sent the opening.
    opening_sent: bool,
    /// A piece showed the form malformed: the upload stopped there.
    malformed: bool,
}

impl Upload {
    pub(super) fn new(
        scanner: FormScanner,
        body_len: usize,
        opening_len: usize,
        replayed: bool,
        edit: bool,
    ) -> Upload {
        Upload {
            scanner,
            body_len,
            opening_len,
            admitted_n: None,
            edit,
            started: false,
            complete: false,
            replayed,
            opening_sent: false,
            malformed: false,
        }
    }

    /// Whether Pingora hands the opening (as read) to `request_body_filter` ahead of the
    /// rest at each attempt.
    pub(super) fn replayed(&self) -> bool {
        self.replayed
    }

    /// An attempt begins: its opening is yet to go.
    pub(super) fn attempt(&mut self) {
        self.opening_sent = false;
    }

    /// Whether the body piece at hand is Pingora's replay of the opening (the attempt's
    /// first, when it replays one): the rewritten opening goes in its place, unscanned, as
    /// it was scanned when read.
    pub(super) fn is_replay(&mut self) -> bool {
        self.replayed && !std::mem::replace(&mut self.opening_sent, true)
    }

    pub(super) fn scanner(&self) -> &FormScanner {
        &self.scanner
    }

    pub(super) fn body_len(&self) -> usize {
        self.body_len
    }

    /// Bytes of the client's body not read before the decision: they follow the opening.
    pub(super) fn rest_len(&self) -> usize {
        self.body_len.saturating_sub(self.opening_len)
    }

    /// Called once admitted. Under a cap that holds the request to its reservation (a hard
    /// budget, a `max_usd_per_hour`) the reservation's `n` is final; otherwise an `n` after
    /// the files is forwarded as sent (the images returned are charged).
    pub(super) fn admitted(&mut self, reservation_binds: bool) {
        self.admitted_n = reservation_binds.then(|| self.scanner.form().n.clone());
    }

    /// Whether the request can still be sent again (another key, another model): nothing
    /// of the client's body past the opening was consumed yet.
    pub(super) fn can_resend(&self) -> bool {
        !self.started
    }

    /// The whole body reached the upstream: only then can it have worked on the request.
    pub(super) fn complete(&self) -> bool {
        self.complete
    }

    /// The next piece of the client's body, before it goes upstream; `end`: the last one.
    /// `Ok(true)` for the first piece after the opening: nothing sends the opening again
    /// after it, and unless it was replayed, the opening goes ahead of this piece.
    /// `Err` when the form turns out malformed: the piece must not go, so the upstream
    /// never receives a complete form.
    pub(super) fn pass(&mut self, piece: &[u8], end: bool) -> Result<bool, GateError> {
        let checked = self.check(piece, end);
        self.malformed = checked.is_err();
        checked?;
        let first = !std::mem::replace(&mut self.started, true);
        self.complete = end;
        Ok(first)
    }

    fn check(&mut self, piece: &[u8], end: bool) -> Result<(), GateError> {
        self.scanner.feed(piece)?;
        if end {
            self.scanner.finish()?;
        }
        if let Some(n) = &self.admitted_n {
            if self.scanner.form().n != *n {
                return Err(GateError::InvalidRequest(
                    "under a hard budget or max_usd_per_hour, a large form's 'n' must come before its files"
                        .into(),
                ));
            }
        }
        if self.edit {
            crate::admission::check_edit_media_parts(self.scanner.form())?;
        }
        Ok(())
    }

    /// The upload stopped at a piece that showed the form malformed.
    pub(super) fn malformed(&self) -> bool {
        self.malformed
    }

    /// The audio duration read from the whole file, once all of it passed.
    pub(super) fn audio_ms(&self) -> Option<u64> {
        self.complete
            .then(|| self.scanner.form().audio_ms)
            .flatten()
    }
}

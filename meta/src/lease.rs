//! The leader lease of the `lease` read mode, as plain bookkeeping over instants the driver
//! passes in (so it is tested without clocks or processes).
//!
//! Why a lease holds: with check_quorum, a peer that heard from the leader refuses to vote
//! for anyone else until an election timeout (`election_ticks` of its ticks) has passed, and
//! a node that just started refuses votes for as long (the driver's vote guard). So once a
//! quorum answered a heartbeat round that the leader started at T, no other leader can be
//! elected before T + (election_ticks - 1) ticks on the peers' clocks (the first tick may
//! come right after the reset). The lease ends earlier than that, by [`LEASE_CLOCK_MARGIN`],
//! to absorb differences between the nodes' clock rates. It is void as soon as the term or
//! the voters differ from those of the round that confirmed it (a membership change voids
//! it: the quorum that confirmed it was of the old voters). A leader transfer
//! (`MsgTimeoutNow`) makes the transferee campaign at once, inside the lease, and the peers
//! vote for it whatever they last heard: so a leader that starts a transfer voids its lease
//! for the rest of its term ([`Lease::void_term`]), before it sends anything, and serves
//! reads only through ReadIndex rounds until the term ends.
//!
//! raft-rs's own `ReadOnlyOption::LeaseBased` is not used: it trusts leadership until the
//! leader's next quorum check, which can come up to two election timeouts after the quorum
//! was last heard from, and a leader that was paused answers from its old state until then.

use std::time::{Duration, Instant};

/// Share of the election timeout a lease may use: the rest absorbs clock-rate differences
/// between nodes (real drift is ~1e-4; this allows 20 %) and tick jitter.
pub const LEASE_CLOCK_MARGIN: f64 = 0.8;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    until: Instant,
    term: u64,
    voters: Vec<u64>,
}

/// One leader's lease and its renewal.
#[derive(Debug)]
pub struct Lease {
    len: Duration,
    held: Option<Held>,
    /// The renewal round under way: its read context and when it started.
    renewal: Option<(u64, Instant)>,
    /// A read was served from the lease since the last renewal started.
    used: bool,
    /// No lease in this term (a leader transfer began in it).
    void_term: Option<u64>,
}

impl Lease {
    /// A lease for nodes ticking every `tick` that campaign after `election_ticks` ticks.
    pub fn new(tick: Duration, election_ticks: usize) -> Lease {
        let ticks = election_ticks.saturating_sub(1) as f64;
        Lease {
            len: tick.mul_f64(ticks * LEASE_CLOCK_MARGIN),
            held: None,
            renewal: None,
            used: false,
            void_term: None,
        }
    }

    pub fn len(&self) -> Duration {
        self.len
    }

    /// Whether a leader in `term` with `voters` may serve a read at `now` without a round.
    /// Counts the read as a use of the lease (worth renewing).
    pub fn serve(&mut self, now: Instant, term: u64, voters: &[u64]) -> bool {
        let ok = self.void_term != Some(term)
            && self
                .held
                .as_ref()
                .is_some_and(|h| now < h.until && h.term == term && h.voters == voters);
        if ok {
            self.used = true;
        }
        ok
    }

    /// A quorum answered the heartbeats of a round that started at `started` in `term`.
    pub fn confirmed(&mut self, started: Instant, term: u64, voters: Vec<u64>) {
        if self.void_term == Some(term) {
            return;
        }
        let until = started + self.len;
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.term == term && h.voters == voters && h.until >= until)
        {
            return;
        }
        self.held = Some(Held {
            until,
            term,
            voters,
        });
    }

    /// Whether to start a renewal round at `now`: the lease was used and is past half its
    /// life, and no renewal is under way (one unanswered for a lease length is given up:
    /// raft drops a ReadIndex silently when it cannot serve it).
    pub fn wants_renewal(&self, now: Instant) -> bool {
        if !self.used {
            return false;
        }
        if let Some((_, started)) = self.renewal {
            if now.duration_since(started) < self.len {
                return false;
            }
        }
        let remaining = self
            .held
            .as_ref()
            .map_or(Duration::ZERO, |h| h.until.saturating_duration_since(now));
        remaining <= self.len / 2
    }

    /// A renewal round with read context `ctx` started at `now`.
    pub fn renewing(&mut self, ctx: u64, now: Instant) {
        self.used = false;
        self.renewal = Some((ctx, now));
    }

    /// The round with read context `ctx` ended (answered or not).
    pub fn round_done(&mut self, ctx: u64) {
        if self.renewal.is_some_and(|(c, _)| c == ctx) {
            self.renewal = None;
        }
    }

    /// A leader transfer starts in `term`: no lease holds in it from now on, and no round
    /// confirms one (a round started before the transfer proves nothing after it).
    pub fn void_term(&mut self, term: u64) {
        self.void_term = Some(term);
        self.clear();
    }

    /// Leadership was lost: nothing of the lease survives it.
    pub fn clear(&mut self) {
        self.held = None;
        self.renewal = None;
        self.used = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    #[test]
    fn lease_covers_reads_from_its_round_start_until_its_length() {
        let mut lease = Lease::new(TICK, 10);
        // 9 ticks of 100 ms, less the clock margin.
        assert_eq!(lease.len(), Duration::from_millis(720));
        let t0 = Instant::now();
        assert!(!lease.serve(t0, 3, &[1, 2, 3]), "no round confirmed yet");
        lease.confirmed(t0, 3, vec![1, 2, 3]);
        assert!(lease.serve(t0 + Duration::from_millis(719), 3, &[1, 2, 3]));
        assert!(
            !lease.serve(t0 + Duration::from_millis(720), 3, &[1, 2, 3]),
            "a lease past its end must not serve (a paused leader would read stale state)"
        );
    }

    #[test]
    fn lease_is_void_in_another_term_or_configuration_or_after_clear() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TICK, 10);
        lease.confirmed(t0, 3, vec![1, 2, 3]);
        let soon = t0 + Duration::from_millis(10);
        assert!(!lease.serve(soon, 4, &[1, 2, 3]), "new term");
        assert!(!lease.serve(soon, 3, &[1, 2, 3, 4]), "new voter set");
        assert!(lease.serve(soon, 3, &[1, 2, 3]));
        lease.clear();
        assert!(
            !lease.serve(soon, 3, &[1, 2, 3]),
            "cleared on losing leadership"
        );
    }

    #[test]
    fn a_leader_transfer_voids_the_lease_for_the_rest_of_the_term() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TICK, 10);
        lease.confirmed(t0, 3, vec![1, 2, 3]);
        let soon = t0 + Duration::from_millis(10);
        assert!(lease.serve(soon, 3, &[1, 2, 3]));
        lease.void_term(3);
        assert!(
            !lease.serve(soon, 3, &[1, 2, 3]),
            "the transferee may lead before the lease ends"
        );
        lease.confirmed(soon, 3, vec![1, 2, 3]);
        assert!(
            !lease.serve(soon, 3, &[1, 2, 3]),
            "a round answered during the transfer gives no new lease in that term"
        );
        // A later term (this node elected again) has its own lease.
        lease.confirmed(soon, 5, vec![1, 2, 3]);
        assert!(lease.serve(soon, 5, &[1, 2, 3]));
    }

    #[test]
    fn an_older_round_never_shortens_the_lease() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TICK, 10);
        lease.confirmed(t0 + Duration::from_millis(500), 3, vec![1, 2, 3]);
        lease.confirmed(t0, 3, vec![1, 2, 3]);
        assert!(lease.serve(t0 + Duration::from_millis(1_000), 3, &[1, 2, 3]));
    }

    #[test]
    fn renewal_starts_past_half_life_of_a_used_lease_once_at_a_time() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TICK, 10);
        lease.confirmed(t0, 3, vec![1, 2, 3]);
        let late = t0 + Duration::from_millis(400);
        assert!(!lease.wants_renewal(late), "unused: no renewal");
        assert!(lease.serve(t0, 3, &[1, 2, 3]));
        assert!(
            !lease.wants_renewal(t0 + Duration::from_millis(300)),
            "used, but more than half of it left"
        );
        assert!(lease.wants_renewal(late));
        lease.renewing(7, late);
        assert!(lease.serve(late, 3, &[1, 2, 3]));
        assert!(!lease.wants_renewal(late), "one renewal at a time");
        // A renewal raft dropped is given up after a lease length.
        assert!(lease.wants_renewal(late + lease.len()));
        lease.round_done(7);
        assert!(lease.wants_renewal(late));
        lease.confirmed(late, 3, vec![1, 2, 3]);
        assert!(!lease.wants_renewal(late), "renewed");
    }
}

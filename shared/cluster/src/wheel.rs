//! A hashed timer wheel, sans-IO: time (unix seconds) is passed in.
//!
//! An item due at `at` lives in slot `at % slots`; each tick visits one slot and fires the
//! items of that slot that are due, leaving those of later revolutions in place. Slot vectors
//! keep their capacity, so a wheel in steady state does not allocate.

use std::fmt;

/// Hashed timer wheel with one-second ticks.
pub struct TimerWheel<T> {
    slots: Box<[Vec<(u32, T)>]>,
    now: u32,
    len: usize,
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("now", &self.now)
            .field("slots", &self.slots.len())
            .field("len", &self.len)
            .finish()
    }
}

impl<T> TimerWheel<T> {
    /// A wheel at time `now_s` with `slots` one-second slots (at least 1). Items due within
    /// `slots` seconds cost no rescans; later ones are skipped once per revolution.
    pub fn new(now_s: u32, slots: usize) -> Self {
        let n = slots.max(1);
        TimerWheel {
            slots: (0..n).map(|_| Vec::new()).collect(),
            now: now_s,
            len: 0,
        }
    }

    #[inline]
    fn slot_of(&self, t: u32) -> usize {
        (t as usize) % self.slots.len()
    }

    /// Schedules `item` at `at_s`. An item already due (`at_s <= now`) fires on the next
    /// [`advance`](Self::advance), even one to the current time.
    pub fn insert(&mut self, at_s: u32, item: T) {
        let i = self.slot_of(at_s.max(self.now));
        let slot = &mut self.slots[i];
        if slot.len() == slot.capacity() {
            // Grow by 1.5x rather than 2x: slots hold many items each at scale, and the
            // average slack is what a loaded registrar pays per binding.
            slot.reserve_exact((slot.capacity() / 2).max(4));
        }
        slot.push((at_s, item));
        self.len += 1;
    }

    /// Moves time to `now_s` (never backwards) and passes every item due at or before it to
    /// `f`, in no particular order. Returns the number fired. Visits at most one revolution
    /// of slots however far time jumps.
    pub fn advance(&mut self, now_s: u32, mut f: impl FnMut(T)) -> usize {
        let now = now_s.max(self.now);
        let n = self.slots.len();
        let ticks = ((now - self.now) as usize).saturating_add(1).min(n);
        let start = self.slot_of(self.now);
        let mut fired = 0;
        for k in 0..ticks {
            let slot = &mut self.slots[(start + k) % n];
            let mut i = 0;
            while i < slot.len() {
                if slot[i].0 <= now {
                    let (_, item) = slot.swap_remove(i);
                    f(item);
                    fired += 1;
                } else {
                    i += 1;
                }
            }
        }
        self.len -= fired;
        self.now = now;
        fired
    }

    /// Number of scheduled items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no item is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Current time of the wheel.
    pub fn now(&self) -> u32 {
        self.now
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Bytes reserved by the slot vectors (capacity, not length).
    pub fn reserved_bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.capacity() * std::mem::size_of::<(u32, T)>())
            .sum::<usize>()
            + std::mem::size_of_val(&*self.slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fire(w: &mut TimerWheel<u32>, now: u32) -> Vec<u32> {
        let mut v = Vec::new();
        w.advance(now, |x| v.push(x));
        v.sort_unstable();
        v
    }

    #[test]
    fn fires_in_time_and_only_once() {
        let mut w = TimerWheel::new(1000, 8);
        w.insert(1001, 1);
        w.insert(1003, 3);
        w.insert(1003, 33);
        w.insert(1008, 8);
        assert_eq!(w.len(), 4);
        assert_eq!(fire(&mut w, 1000), Vec::<u32>::new());
        assert_eq!(fire(&mut w, 1001), vec![1]);
        assert_eq!(fire(&mut w, 1002), Vec::<u32>::new());
        assert_eq!(fire(&mut w, 1003), vec![3, 33]);
        assert_eq!(fire(&mut w, 1007), Vec::<u32>::new());
        assert_eq!(fire(&mut w, 1008), vec![8]);
        assert!(w.is_empty());
        // Already due: fires on the next advance, even to the same time.
        w.insert(5, 5);
        w.insert(1008, 6);
        assert_eq!(fire(&mut w, 1008), vec![5, 6]);
        // Time never goes backwards.
        w.insert(1009, 9);
        assert_eq!(fire(&mut w, 10), Vec::<u32>::new());
        assert_eq!(w.now(), 1008);
        assert_eq!(fire(&mut w, 1009), vec![9]);
    }

    #[test]
    fn far_future_items_wait_their_round() {
        let mut w = TimerWheel::new(0, 10);
        w.insert(3, 3);
        w.insert(13, 13);
        w.insert(103, 103);
        w.insert(1_000_003, 1_000_003);
        let mut fired = Vec::new();
        for t in 1..=200 {
            w.advance(t, |x| fired.push((t, x)));
        }
        assert_eq!(fired, vec![(3, 3), (13, 13), (103, 103)]);
        assert_eq!(w.len(), 1);
        // Jump far beyond one revolution at once.
        assert_eq!(fire(&mut w, 1_000_002), Vec::<u32>::new());
        assert_eq!(fire(&mut w, 4_000_000_000), vec![1_000_003]);
        assert!(w.is_empty());
    }

    #[test]
    fn advancing_across_many_slots_at_once() {
        let mut w = TimerWheel::new(0, 64);
        for i in 1..=1000u32 {
            w.insert(i, i);
        }
        // Less than a revolution, then several revolutions, then the rest.
        assert_eq!(fire(&mut w, 50), (1..=50).collect::<Vec<_>>());
        assert_eq!(fire(&mut w, 700), (51..=700).collect::<Vec<_>>());
        assert_eq!(w.len(), 300);
        assert_eq!(fire(&mut w, u32::MAX), (701..=1000).collect::<Vec<_>>());
        assert!(w.is_empty());
    }

    #[test]
    fn steady_state_reuses_slot_storage() {
        let mut w = TimerWheel::new(0, 16);
        for t in 0..16u32 {
            for k in 0..4 {
                w.insert(t + 1, k);
            }
        }
        w.advance(100, |_| {});
        let reserved = w.reserved_bytes();
        for round in 0..10u32 {
            let base = 100 + round * 16;
            for t in 0..16u32 {
                for k in 0..4 {
                    w.insert(base + t + 1, k);
                }
            }
            w.advance(base + 16, |_| {});
        }
        assert_eq!(w.reserved_bytes(), reserved);
        let one = TimerWheel::<u8>::new(0, 0);
        assert_eq!(one.slots(), 1);
    }
}

//! Replica health: a state machine that flips after `rise` consecutive good
//! or `fall` consecutive bad results (pure), apart from the probe that
//! produces the results (in `backend`).

/// Up or down, and the streak of results pointing the other way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    streak: u32,
}

impl Default for Health {
    /// Replicas start up: traffic flows at once, a failed probe or refused
    /// connection takes them out.
    fn default() -> Self {
        Self {
            up: true,
            streak: 0,
        }
    }
}

impl Health {
    /// Records one result; returns the new state when it flipped.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { rise } else { fall };
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }

    /// Down at once (a refused connection), the streak starting afresh.
    pub fn force_down(&mut self) -> bool {
        let changed = self.up;
        self.up = false;
        self.streak = 0;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_after_fall_then_rise_consecutive_results() {
        let mut h = Health::default();
        assert_eq!(h.record(false, 2, 2), None);
        assert_eq!(h.record(true, 2, 2), None); // streak broken
        assert_eq!(h.record(false, 2, 2), None);
        assert_eq!(h.record(false, 2, 2), Some(false));
        assert!(!h.up);
        assert_eq!(h.record(true, 2, 2), None);
        assert_eq!(h.record(true, 2, 2), Some(true));
        assert!(h.up);
    }

    #[test]
    fn force_down_then_rise() {
        let mut h = Health::default();
        assert!(h.force_down());
        assert!(!h.force_down());
        assert_eq!(h.record(true, 2, 2), None);
        assert_eq!(h.record(true, 2, 2), Some(true));
    }
}

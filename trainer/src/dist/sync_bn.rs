//! Synchronised BatchNorm: while a rank's thread is inside [`Scope`], train-mode BatchNorm sums its
//! per-channel statistics (and, in the backward, its per-channel gradient sums) over the ranks,
//! so that every rank normalises with the statistics of the global batch, as BYOL-style methods
//! need. The group rides on the thread because Candle runs an op's kernels, forward and
//! backward, on the thread that called it: the layers need no extra argument.

use std::cell::RefCell;

use super::Group;

thread_local! {
    static CURRENT: RefCell<Option<Group>> = const { RefCell::new(None) };
}

/// While alive, BatchNorm on this thread synchronises over `group`.
pub struct Scope {
    previous: Option<Group>,
}

impl Scope {
    /// Synchronises BatchNorm over `group` on this thread until the scope is dropped (a group of
    /// one changes nothing, and is not installed).
    pub fn enter(group: &Group) -> Self {
        let installed = (group.world_size() > 1).then(|| group.clone());
        Scope {
            previous: CURRENT.with(|c| c.replace(installed)),
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = self.previous.take());
    }
}

/// The group BatchNorm synchronises over on this thread, if any.
pub fn current() -> Option<Group> {
    CURRENT.with(|c| c.borrow().clone())
}

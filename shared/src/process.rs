//! Process-wide behaviour both binaries share.

/// Lets a closed pipe end the process quietly, as Unix tools do (`loader inspect DIR | head`),
/// instead of Rust's default of turning the write error into a panic.
pub fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of SIGPIPE before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

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

/// The most memory this process has held resident so far, in bytes (Linux's `VmHWM`); `None`
/// where the system does not report it.
pub fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

//! Where this process sits in a multi-process job: read from the variables that launchers set
//! (torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; srun's
//! `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`), or set by `trainer pretrain --gpus N`, which
//! starts one process per GPU of this machine itself ([`spawn_local`]).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// torchrun's default port, used when `MASTER_PORT` is not set.
pub const DEFAULT_PORT: u16 = 29500;

/// This process's rank in a job of several processes (one per GPU).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The rank among the processes of this machine: the GPU it uses.
    pub local_rank: usize,
    /// Ranks on this machine (torchrun's `LOCAL_WORLD_SIZE`, srun's `SLURM_NTASKS_PER_NODE`;
    /// 1 when neither says): their input pipelines share its cores.
    pub local_world_size: usize,
    /// `MASTER_ADDR:MASTER_PORT`, where rank 0 hands out NCCL's id.
    pub master: String,
}

impl RankEnv {
    /// From this process's environment; `None` when no launcher made it one of several ranks.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From the variables `get` returns (torchrun's first, then srun's); `None` when neither
    /// launcher's variables are set, or srun's say there is one task (a job script's own
    /// commands see those too). torchrun's with one rank still give a group of one, through NCCL.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let number = |key: &str| -> Result<Option<usize>> {
            get(key)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| Error::Run(format!("{key}={v}: must be a whole number")))
                })
                .transpose()
        };
        let (rank, world, local) = match (number("RANK")?, number("WORLD_SIZE")?) {
            (Some(rank), Some(world)) => (rank, world, number("LOCAL_RANK")?.unwrap_or(0)),
            (None, None) => match (number("SLURM_PROCID")?, number("SLURM_NTASKS")?) {
                (Some(rank), Some(world)) if world > 1 => {
                    (rank, world, number("SLURM_LOCALID")?.unwrap_or(0))
                }
                _ => return Ok(None),
            },
            _ => {
                return Err(Error::Run(
                    "RANK and WORLD_SIZE must be set together (torchrun sets both)".into(),
                ))
            }
        };
        if rank >= world {
            return Err(Error::Run(format!(
                "rank {rank} is not below the world size {world} (RANK/SLURM_PROCID, WORLD_SIZE/SLURM_NTASKS)"
            )));
        }
        let addr = get("MASTER_ADDR").ok_or_else(|| {
            Error::Run(
                "a job of several ranks needs MASTER_ADDR, the address of rank 0's machine \
                 (under SLURM: export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1))"
                    .into(),
            )
        })?;
        let port = number("MASTER_PORT")?.unwrap_or(DEFAULT_PORT as usize);
        // srun writes `8` or `8(x2)` (8 tasks on each of 2 nodes).
        let per_node = get("SLURM_NTASKS_PER_NODE").and_then(|v| {
            v.split('(')
                .next()
                .and_then(|n| n.trim().parse::<usize>().ok())
        });
        let local_world_size = number("LOCAL_WORLD_SIZE")?.or(per_node).unwrap_or(1);
        Ok(Some(RankEnv {
            rank,
            world_size: world,
            local_rank: local,
            local_world_size,
            master: format!("{addr}:{port}"),
        }))
    }
}

/// Starts `gpus` copies of this program with the same arguments, rank `i` on GPU `i` (through
/// torchrun's variables, on a free local port), and waits for them. When one fails, the others
/// are stopped and the error names it; a stop request (`stop`, set by SIGTERM/SIGINT) is passed
/// on to every rank, which checkpoints and exits.
pub fn spawn_local(gpus: usize, stop: &Arc<AtomicBool>) -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| {
            Error::Run(format!(
                "--gpus: no free local port for the rendezvous: {e}"
            ))
        })?
        .port();
    let exe = std::env::current_exe()
        .map_err(|e| Error::Run(format!("--gpus: cannot find this program: {e}")))?;
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let mut children: Vec<Child> = Vec::with_capacity(gpus);
    for rank in 0..gpus {
        let mut command = Command::new(&exe);
        // The ranks get signals from this process only (a terminal's Ctrl-C reaches it, and it
        // passes one SIGTERM on), and die with it if it is killed.
        command.process_group(0);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", gpus.to_string())
            .env("LOCAL_WORLD_SIZE", gpus.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn();
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                stop_all(&mut children, Duration::ZERO);
                return Err(Error::Run(format!("--gpus: cannot start rank {rank}: {e}")));
            }
        }
    }
    let mut done = vec![false; gpus];
    let mut forwarded = false;
    loop {
        if stop.load(Ordering::SeqCst) && !forwarded {
            children.iter().for_each(|c| signal(c, libc::SIGTERM));
            forwarded = true;
        }
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            let status = child
                .try_wait()
                .map_err(|e| Error::Run(format!("--gpus: cannot watch rank {rank}: {e}")))?;
            let Some(status) = status else { continue };
            done[rank] = true;
            if !status.success() {
                stop_all(&mut children, Duration::from_secs(30));
                return Err(Error::Run(format!(
                    "rank {rank} (GPU {rank}) exited with {status}; the other ranks were \
                     stopped. Its error is printed above; the last checkpoint is intact"
                )));
            }
        }
        if done.iter().all(|&d| d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends `sig` to `child`.
fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on a child this process started and has not yet reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Asks every child still running to stop (SIGTERM: checkpoint and exit), and kills those that
/// have not after `grace`.
fn stop_all(children: &mut [Child], grace: Duration) {
    fn running(c: &mut Child) -> bool {
        matches!(c.try_wait(), Ok(None))
    }
    children
        .iter_mut()
        .filter_map(|c| running(c).then_some(c))
        .for_each(|c| signal(c, libc::SIGTERM));
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && children.iter_mut().any(running) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for c in children.iter_mut().filter_map(|c| running(c).then_some(c)) {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_and_srun_variables_give_the_rank() {
        let torchrun = vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
        ]);
        assert_eq!(
            RankEnv::from_vars(torchrun).unwrap(),
            Some(RankEnv {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                local_world_size: 4,
                master: "node7:1234".into()
            })
        );
        let srun = vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "5"),
            ("SLURM_NTASKS_PER_NODE", "8(x2)"),
            ("MASTER_ADDR", "10.0.0.2"),
        ]);
        let env = RankEnv::from_vars(srun).unwrap().unwrap();
        assert_eq!(
            (
                env.rank,
                env.world_size,
                env.local_rank,
                env.local_world_size
            ),
            (5, 16, 5, 8)
        );
        assert_eq!(env.master, format!("10.0.0.2:{DEFAULT_PORT}"));
    }

    #[test]
    fn no_launcher_or_one_slurm_task_is_a_single_process() {
        assert_eq!(RankEnv::from_vars(vars(&[])).unwrap(), None);
        let one = vars(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]);
        assert_eq!(RankEnv::from_vars(one).unwrap(), None);
        let torchrun_one = vars(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "h")]);
        let env = RankEnv::from_vars(torchrun_one).unwrap().unwrap();
        assert_eq!((env.rank, env.world_size), (0, 1));
    }

    #[test]
    fn bad_variables_are_named() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (&[("RANK", "1")], "RANK and WORLD_SIZE"),
            (&[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=x"),
            (
                &[("RANK", "2"), ("WORLD_SIZE", "2")],
                "not below the world size",
            ),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "0")],
                "not below the world size",
            ),
            (&[("RANK", "1"), ("WORLD_SIZE", "2")], "needs MASTER_ADDR"),
        ];
        for (pairs, expected) in cases {
            let e = RankEnv::from_vars(vars(pairs)).unwrap_err().to_string();
            assert!(e.contains(expected), "{e}");
        }
    }
}

//! The meeting point of a multi-process job: rank 0 listens on `MASTER_ADDR:MASTER_PORT` and hands
//! a few bytes (NCCL's unique id) to every other rank, which connects until it gets through or the
//! timeout passes. Only this id travels here; the training itself talks through NCCL.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// What the protocol starts with, so that a stray connection is told apart from a rank.
const MAGIC: &[u8; 8] = b"maskdeep";

/// Rank 0 of `world`: listens on `addr`, sends `payload` to the `world - 1` other ranks (each
/// says its rank first) and returns once all have it.
pub fn serve(addr: &str, world: usize, payload: &[u8], timeout: Duration) -> Result<()> {
    let bind: SocketAddr = resolve(addr)?;
    // Listen on every interface at the port: MASTER_ADDR names this machine as the others see it.
    let any = SocketAddr::new(
        if bind.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        },
        bind.port(),
    );
    let listener = TcpListener::bind(any).map_err(|e| {
        Error::Run(format!(
            "rank 0 cannot listen on port {} ({e}): choose a free MASTER_PORT",
            bind.port()
        ))
    })?;
    listener.set_nonblocking(true).map_err(net("listen"))?;
    let deadline = Instant::now() + timeout;
    let mut served = vec![false; world];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(net("accept"))?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(net("accept"))?;
                let mut hello = [0u8; 16];
                if stream.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    continue;
                }
                let rank = u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")) as usize;
                if rank == 0 || rank >= world {
                    return Err(Error::Run(format!(
                        "rendezvous: a process says it is rank {rank} of a job of {world}: \
                         check WORLD_SIZE and RANK on every machine"
                    )));
                }
                let mut reply = (payload.len() as u64).to_le_bytes().to_vec();
                reply.extend_from_slice(payload);
                stream.write_all(&reply).map_err(net("answer"))?;
                served[rank] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| !served[r]).collect();
                    return Err(Error::Run(format!(
                        "rendezvous: ranks {missing:?} did not reach rank 0 at {addr} within \
                         {:.0} s: were they started, with the same MASTER_ADDR and MASTER_PORT?",
                        timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(net("accept")(e)),
        }
    }
    Ok(())
}

/// Rank `rank` (> 0): connects to rank 0 at `addr`, retrying until `timeout`, and returns the
/// payload rank 0 sends.
pub fn join(addr: &str, rank: usize, timeout: Duration) -> Result<Vec<u8>> {
    let target = resolve(addr)?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&target, left.max(Duration::from_millis(1))) {
            Ok(mut stream) => {
                stream
                    .set_read_timeout(Some(left.max(Duration::from_secs(1))))
                    .map_err(net("connect"))?;
                let mut hello = MAGIC.to_vec();
                hello.extend_from_slice(&(rank as u64).to_le_bytes());
                stream.write_all(&hello).map_err(net("send to rank 0"))?;
                let mut len = [0u8; 8];
                stream
                    .read_exact(&mut len)
                    .map_err(net("read from rank 0"))?;
                let len = u64::from_le_bytes(len) as usize;
                if len > 1 << 20 {
                    return Err(Error::Run(format!(
                        "rendezvous: {addr} answered with {len} bytes: is something else listening at MASTER_PORT?"
                    )));
                }
                let mut payload = vec![0u8; len];
                stream
                    .read_exact(&mut payload)
                    .map_err(net("read from rank 0"))?;
                return Ok(payload);
            }
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(Error::Run(format!(
                        "rendezvous: rank {rank} could not reach rank 0 at {addr} within {:.0} s \
                         ({e}): is rank 0 running, and MASTER_ADDR its address as this machine \
                         sees it?",
                        timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `host:port` as a socket address.
fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            Error::Run(format!(
                "rendezvous: cannot resolve `{addr}` (MASTER_ADDR:MASTER_PORT)"
            ))
        })
}

/// An I/O error of the rendezvous while doing `what`.
fn net(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::Run(format!("rendezvous: cannot {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn rank_zero_hands_the_payload_to_every_other_rank() {
        let addr = format!("127.0.0.1:{}", free_port());
        let payload: Vec<u8> = (0..128u8).collect();
        std::thread::scope(|s| {
            let joiners: Vec<_> = (1..4)
                .map(|rank| {
                    let addr = addr.clone();
                    s.spawn(move || join(&addr, rank, Duration::from_secs(20)))
                })
                .collect();
            serve(&addr, 4, &payload, Duration::from_secs(20)).unwrap();
            for j in joiners {
                assert_eq!(j.join().unwrap().unwrap(), payload);
            }
        });
    }

    #[test]
    fn a_missing_rank_is_named_after_the_timeout() {
        let addr = format!("127.0.0.1:{}", free_port());
        let e = serve(&addr, 2, b"id", Duration::from_millis(300)).unwrap_err();
        assert!(
            e.to_string().contains("ranks [1] did not reach rank 0"),
            "{e}"
        );
        let e = join(&addr, 1, Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("could not reach rank 0"), "{e}");
    }
}

//! Talking to the coordinator: `go`/`stop` on stdin, ticks and the result on stdout.

use std::io::{self, Write};

use crate::stats::{self, Lat, RoleCount, Tick, UrlCount, WorkerResult};
use crate::util::mono_ns;

use super::conn::{role_index, Conn, Role, State};
use super::held::{self, Held};
use super::{Engine, Phase};

impl Engine {
    pub(super) fn read_control(&mut self, fd: i32) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a stack buffer we own from our stdin descriptor.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                // The coordinator is gone: stop.
                self.phase = Phase::Done;
                return;
            }
            if n < 0 {
                return;
            }
            self.control.extend_from_slice(&buf[..n as usize]);
            while let Some(nl) = memchr::memchr(b'\n', &self.control) {
                let line: Vec<u8> = self.control.drain(..=nl).collect();
                self.on_control(String::from_utf8_lossy(&line).trim());
            }
        }
    }

    fn on_control(&mut self, line: &str) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("go") => {
                let mut n = || {
                    words
                        .next()
                        .and_then(|w| w.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                self.t0 = n().max(1);
                self.t1 = n().max(self.t0);
                let storm = n();
                self.storm_t = if storm == 0 { 0 } else { storm };
            }
            Some("stop") => self.phase = Phase::Done,
            _ => {}
        }
    }

    pub(super) fn tick(&mut self, now: u64, out: &mut dyn Write) -> anyhow::Result<()> {
        let tick = Tick {
            at_ns: now,
            ready: self.held.iter().map(Held::ready).sum(),
            target: self.conns.len() as u64,
            counters: self.c.clone(),
            errors: stats::errors(&self.c),
            interval: self.interval.to_data(),
        };
        self.interval.0.reset();
        writeln!(out, "tick {}", serde_json::to_string(&tick)?)?;
        out.flush()?;
        Ok(())
    }

    /// The connections of `role`, at one URL or (`None`) at all of them.
    fn role_count(&self, role: Role, url: Option<usize>) -> RoleCount {
        let r = role_index(role);
        let h = match url {
            Some(u) => self.held[u],
            None => held::total(&self.held),
        };
        let home = |c: &&Conn| url.is_none_or(|u| self.plan.url_of(c.id) as usize == u);
        RoleCount {
            target: self
                .conns
                .iter()
                .filter(|c| c.role == role)
                .filter(home)
                .count() as u64,
            ready_at_start: h.ready_t0[r],
            ready_at_end: h.ready_t1[r],
            stopped: h.stopped[r],
        }
    }

    fn url_count(&self, url: usize) -> UrlCount {
        UrlCount {
            agents: self.role_count(Role::Agent, Some(url)),
            users: self.role_count(Role::User, Some(url)),
            services: self.role_count(Role::Service, Some(url)),
            reconnected_elsewhere: self.held[url].reconnected_elsewhere,
        }
    }

    pub(super) fn finish(mut self, out: &mut dyn Write) -> anyhow::Result<()> {
        let now = mono_ns();
        if self.t1 == 0 {
            // Stopped before the window: report what was seen so far.
            self.snap_t0 = self.c.clone();
            self.snap_t1 = self.c.clone();
        }
        for i in 0..self.conns.len() {
            if self.conns[i].state == State::Ready {
                self.send_close(i, 1000);
                self.flush(i, now);
            }
        }
        let result = WorkerResult {
            proc_index: self.plan.proc_index,
            setup_start_ns: self.setup_start,
            setup_end_ns: self.setup_end,
            setup_complete: self.setup_complete,
            t0: self.t0,
            t1: self.t1,
            end_ns: now,
            total: self.c.clone(),
            setup: self.snap_setup.clone(),
            window: self.snap_t1.since(&self.snap_t0),
            agents: self.role_count(Role::Agent, None),
            users: self.role_count(Role::User, None),
            services: self.role_count(Role::Service, None),
            urls: (0..self.held.len()).map(|u| self.url_count(u)).collect(),
            errors_by_code: std::mem::take(&mut self.errors_by_code),
            close_codes: std::mem::take(&mut self.close_codes),
            connect_failures: std::mem::take(&mut self.connect_failures),
            disconnects: std::mem::take(&mut self.disconnects),
            sent_by_cluster: std::mem::take(&mut self.sent_by_cluster),
            users_by_cluster: std::mem::take(&mut self.users_by_cluster),
            hists: self.hists.iter().map(Lat::to_data).collect(),
            storm: self.plan.storm.as_ref().map(|_| self.storm),
            commands_unanswered: self.pending.len() as u64,
            flat_unacked: self.flat_unacked
                + self
                    .agents()
                    .map(|c| c.flat_sent - c.flat_acked.min(c.flat_sent))
                    .sum::<u64>(),
            cpu_ns_window: self.cpu_t1.saturating_sub(self.cpu_t0),
        };
        writeln!(out, "result {}", serde_json::to_string(&result)?)?;
        out.flush()?;
        Ok(())
    }
}

pub(super) fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

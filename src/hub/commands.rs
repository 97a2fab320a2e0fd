//! Commands in flight: ids, the pending table of the issuing worker, the commands an
//! agent on this worker was sent and has not answered, and how each one ends.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Action, AgentLoc, Hub, Msg, Sink};
use crate::auth::Identity;
use crate::conn::ConnId;
use crate::metrics::CommandOutcome;
use crate::protocol::envelope::{self, ErrorCode};

/// Why a command got no answer from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    NotConnected,
    /// A machine outside the issuer's clusters.
    Forbidden,
    /// The agent's connection was gone when the command reached its worker.
    Gone,
    /// The agent's connection ended before it answered.
    Disconnected,
    TimedOut,
    /// The gateway is shutting down.
    Draining,
}

impl Failure {
    /// The `COMMAND_FAILED` message.
    pub fn message(self) -> &'static str {
        match self {
            // A machine of another cluster is answered like an absent one, so that a user
            // cannot probe which machines of other clusters are online (PROTOCOL.md v1.1
            // section 5); the metric still tells the two apart.
            Failure::NotConnected | Failure::Forbidden => "machine not connected",
            Failure::Gone => "machine disconnected",
            Failure::Disconnected => "machine disconnected before answering",
            Failure::TimedOut => "command timed out",
            Failure::Draining => "the gateway is shutting down",
        }
    }

    /// How it is counted.
    pub fn outcome(self) -> CommandOutcome {
        match self {
            Failure::TimedOut => CommandOutcome::Timeout,
            Failure::Gone | Failure::Disconnected => CommandOutcome::Disconnected,
            Failure::NotConnected => CommandOutcome::NotConnected,
            Failure::Forbidden => CommandOutcome::Forbidden,
            Failure::Draining => CommandOutcome::Draining,
        }
    }
}

/// What the issuer of a command gets back: the agent's `data`, or why not.
pub type Answer = Result<Bytes, Failure>;

/// Who waits for a command's answer.
#[derive(Debug)]
enum Issuer {
    /// A client connection, with the id of its request.
    Conn { id: ConnId, req_id: Box<str> },
    /// An admin API request.
    Http(Sender<Answer>),
}

#[derive(Debug)]
struct Pending {
    issuer: Issuer,
    issued: Instant,
}

/// A command an agent on this worker received and has not answered yet.
#[derive(Debug)]
struct Outstanding {
    from: u16,
    seq: u64,
    deadline: Instant,
}

/// One worker's commands: those it issued, and those its agents were sent.
#[derive(Debug)]
pub(super) struct Commands {
    pending: HashMap<u64, Pending>,
    next_seq: u64,
    outstanding: HashMap<ConnId, Vec<Outstanding>>,
    /// Local agents replaced by a newer connection of their machine, until they are gone:
    /// no command is written to them (it could follow their 4009 close frame).
    pub(super) replaced: HashSet<ConnId>,
    timeout: Duration,
}

impl Commands {
    pub fn new(timeout: Duration) -> Commands {
        Commands {
            pending: HashMap::new(),
            next_seq: 0,
            outstanding: HashMap::new(),
            replaced: HashSet::new(),
            timeout,
        }
    }

    /// Agent `id` of this worker was replaced: it takes no more commands.
    pub fn replaced(&mut self, id: ConnId) {
        self.replaced.insert(id);
    }

    /// The pending commands whose issuer matches.
    fn pending_of(&self, mut select: impl FnMut(&Issuer) -> bool) -> Vec<u64> {
        self.pending
            .iter()
            .filter(|(_, p)| select(&p.issuer))
            .map(|(&seq, _)| seq)
            .collect()
    }
}

impl Hub {
    /// Commands waiting for an answer on this worker.
    pub fn pending_commands(&self) -> usize {
        self.commands.pending.len()
    }

    /// How long commands issued from now on wait for their answer.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.commands.timeout = timeout;
    }

    /// A client's command: checked against the machine's cluster and sent to the agent;
    /// the issuer gets `COMMAND_FAILED` when it cannot be.
    #[allow(clippy::too_many_arguments)]
    pub fn command(
        &mut self,
        issuer_id: ConnId,
        issuer: &Identity,
        req_id: &str,
        machine_id: &str,
        data: &str,
        now: Instant,
        ts: u64,
        out: &mut impl Sink,
    ) {
        let from = Issuer::Conn {
            id: issuer_id,
            req_id: req_id.into(),
        };
        let loc = self.shared.machines.get(machine_id).map(|l| l.clone());
        match loc {
            None => self.reply(from, now, Err(Failure::NotConnected), now, ts, out),
            Some(loc) if !issuer.sees_cluster(&loc.cluster) => {
                self.reply(from, now, Err(Failure::Forbidden), now, ts, out)
            }
            Some(loc) => self.dispatch(from, loc, data, now, ts, out),
        }
    }

    /// An admin API command (a service sees every cluster).
    pub(super) fn http_command(
        &mut self,
        machine_id: &str,
        data: &str,
        reply: Sender<Answer>,
        now: Instant,
        ts: u64,
        out: &mut impl Sink,
    ) {
        let from = Issuer::Http(reply);
        let loc = self.shared.machines.get(machine_id).map(|l| l.clone());
        match loc {
            None => self.reply(from, now, Err(Failure::NotConnected), now, ts, out),
            Some(loc) => self.dispatch(from, loc, data, now, ts, out),
        }
    }

    /// Records the pending command, arms its timer and sends it to the agent's worker.
    fn dispatch(
        &mut self,
        issuer: Issuer,
        loc: AgentLoc,
        data: &str,
        now: Instant,
        ts: u64,
        out: &mut impl Sink,
    ) {
        let c = &mut self.commands;
        c.next_seq += 1;
        let seq = c.next_seq;
        let deadline = now + c.timeout;
        c.pending.insert(
            seq,
            Pending {
                issuer,
                issued: now,
            },
        );
        let cmd_id = format!("cmd_{:08x}_{}_{}", self.shared.nonce, self.index, seq);
        let frame = envelope::command_to_agent(&cmd_id, data, ts);
        out.act(Action::ArmTimer { seq, at: deadline });
        if loc.worker == self.index {
            self.hand_to_agent(loc.conn, frame, self.index, seq, deadline, now, ts, out);
        } else {
            let msg = Msg::ToAgent {
                conn: loc.conn,
                frame,
                from: self.index,
                seq,
                deadline,
            };
            out.act(Action::Post {
                worker: loc.worker,
                msg,
            });
        }
    }

    /// A command reached the worker of its agent: sent and remembered, or failed at once
    /// when the agent is no longer connected here.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn hand_to_agent(
        &mut self,
        conn: ConnId,
        frame: Bytes,
        from: u16,
        seq: u64,
        deadline: Instant,
        now: Instant,
        ts: u64,
        out: &mut impl Sink,
    ) {
        if !self.agents.contains(conn) || self.commands.replaced.contains(&conn) {
            return self.result(from, seq, Err(Failure::Gone), now, ts, out);
        }
        out.act(Action::Send { conn, frame });
        let list = self.commands.outstanding.entry(conn).or_default();
        list.retain(|o| o.deadline > now);
        list.push(Outstanding {
            from,
            seq,
            deadline,
        });
    }

    /// Tells the issuer how its command ended, and counts the outcome.
    fn reply(
        &mut self,
        issuer: Issuer,
        issued: Instant,
        answer: Answer,
        now: Instant,
        ts: u64,
        out: &mut impl Sink,
    ) {
        let m = self.m();
        match &answer {
            Ok(_) => {
                m.commands[CommandOutcome::Answered as usize].add(1);
                m.round_trip.observe(now.saturating_duration_since(issued));
            }
            Err(f) => m.commands[f.outcome() as usize].add(1),
        }
        match issuer {
            Issuer::Http(tx) => {
                // The admin request may have given up waiting: nothing to do then.
                let _ = tx.send(answer);
            }
            Issuer::Conn { id, req_id } => {
                let frame = match answer {
                    // The agent's data was validated JSON when it arrived.
                    Ok(data) => envelope::command_response(
                        &req_id,
                        std::str::from_utf8(&data).unwrap_or("null"),
                        ts,
                    ),
                    Err(f) => {
                        envelope::error(ErrorCode::CommandFailed, f.message(), Some(&req_id), ts)
                    }
                };
                out.act(Action::Send { conn: id, frame });
            }
        }
    }

    /// An agent's `command:response`: only for a command this agent was sent and has
    /// not answered; anything else is ignored.
    pub fn command_response(
        &mut self,
        agent: ConnId,
        cmd_id: &str,
        data: &str,
        now: Instant,
        ts: u64,
        out: &mut impl Sink,
    ) {
        let Some((from, seq)) = parse_command_id(cmd_id, self.shared.nonce) else {
            return;
        };
        let outstanding = &mut self.commands.outstanding;
        let Some(list) = outstanding.get_mut(&agent) else {
            return;
        };
        let Some(pos) = list.iter().position(|o| o.from == from && o.seq == seq) else {
            return;
        };
        list.swap_remove(pos);
        if list.is_empty() {
            outstanding.remove(&agent);
        }
        let data = Bytes::copy_from_slice(data.as_bytes());
        self.result(from, seq, Ok(data), now, ts, out);
    }

    /// Local agent `id` is gone: its unanswered commands fail.
    pub(super) fn agent_gone(&mut self, id: ConnId, now: Instant, ts: u64, out: &mut impl Sink) {
        self.commands.replaced.remove(&id);
        let gone = self.commands.outstanding.remove(&id).unwrap_or_default();
        for o in gone {
            self.result(o.from, o.seq, Err(Failure::Disconnected), now, ts, out);
        }
    }

    /// Hands a command's answer to the worker that issued it.
    fn result(
        &mut self,
        from: u16,
        seq: u64,
        result: Answer,
        now: Instant,
        ts: u64,
        out: &mut impl Sink,
    ) {
        if from == self.index {
            self.finish_command(seq, result, now, ts, out);
        } else {
            let msg = Msg::CommandResult { seq, result };
            out.act(Action::Post { worker: from, msg });
        }
    }

    pub(super) fn finish_command(
        &mut self,
        seq: u64,
        result: Answer,
        now: Instant,
        ts: u64,
        out: &mut impl Sink,
    ) {
        let Some(p) = self.commands.pending.remove(&seq) else {
            return;
        };
        self.reply(p.issuer, p.issued, result, now, ts, out);
    }

    /// A pending command's timer fired.
    pub fn command_timed_out(&mut self, seq: u64, now: Instant, ts: u64, out: &mut impl Sink) {
        self.finish_command(seq, Err(Failure::TimedOut), now, ts, out);
    }

    /// The drain began: admin API commands still waiting are answered at once.
    pub fn fail_http_commands(&mut self, now: Instant, ts: u64, out: &mut impl Sink) {
        let seqs = self.commands.pending_of(|i| matches!(i, Issuer::Http(_)));
        for seq in seqs {
            self.finish_command(seq, Err(Failure::Draining), now, ts, out);
        }
    }

    /// These client connections are about to be closed by the drain: their commands still
    /// waiting fail now, so that every issuer hears about each of its commands.
    pub fn fail_commands_of(
        &mut self,
        ids: &HashSet<ConnId>,
        now: Instant,
        ts: u64,
        out: &mut impl Sink,
    ) {
        if self.commands.pending.is_empty() || ids.is_empty() {
            return;
        }
        let seqs = self
            .commands
            .pending_of(|i| matches!(i, Issuer::Conn { id, .. } if ids.contains(id)));
        for seq in seqs {
            self.finish_command(seq, Err(Failure::Draining), now, ts, out);
        }
    }
}

/// `cmd_<nonce>_<worker>_<seq>` of this process → (worker, seq).
fn parse_command_id(id: &str, nonce: u32) -> Option<(u16, u64)> {
    let rest = id.strip_prefix("cmd_")?;
    let (n, rest) = rest.split_once('_')?;
    if u32::from_str_radix(n, 16).ok()? != nonce {
        return None;
    }
    let (w, s) = rest.split_once('_')?;
    Some((w.parse().ok()?, s.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_ids_round_trip_and_reject_garbage() {
        assert_eq!(parse_command_id("cmd_0000beef_1_42", 0xbeef), Some((1, 42)));
        assert_eq!(parse_command_id("cmd_0000beee_1_42", 0xbeef), None);
        assert_eq!(parse_command_id("cmd_0000beef_x_42", 0xbeef), None);
        assert_eq!(parse_command_id("req_0000beef_1_42", 0xbeef), None);
        assert_eq!(parse_command_id("cmd_0000beef_1", 0xbeef), None);
    }
}

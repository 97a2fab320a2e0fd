//! The service client: commands to random agents and the answers they get.

use crate::msg;

use super::conn::{Kind, State};
use super::Engine;

impl Engine {
    /// The service issues one command to a random agent of the whole fleet.
    pub(super) fn command(&mut self, now: u64) {
        let Some(i) = self.service else {
            return;
        };
        if self.conns[i].state != State::Ready || self.plan.agents == 0 {
            return;
        }
        let agent = self.rng.below(u64::from(self.plan.agents)) as u32;
        let kind = msg::COMMANDS[self.rng.below(msg::COMMANDS.len() as u64) as usize];
        let req = self.next_req;
        self.next_req += 1;
        let id = self.plan.machine_id(agent);
        self.scratch.clear();
        msg::command(
            &mut self.scratch,
            self.plan.proc_index,
            req,
            &id,
            kind,
            agent,
        );
        self.pending.insert(req, now);
        let payload = std::mem::take(&mut self.scratch);
        self.write_msg(i, Kind::Command, &payload, now);
        self.scratch = payload;
    }

    /// The send time of the request this answer names (removing it), if it is ours.
    pub(super) fn request_of(&mut self, t: &str) -> Option<u64> {
        let n = msg::num_after(t.as_bytes(), &self.req_key)?;
        self.pending.remove(&n)
    }
}

//! Connection handles and per-connection tables, shared by the io loop and routing.

/// A connection's handle: slot index and generation, so a stale handle to a reused slot
/// is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub slot: u32,
    pub gen: u32,
}

impl ConnId {
    pub fn to_u64(self) -> u64 {
        (u64::from(self.gen) << 32) | u64::from(self.slot)
    }

    pub fn from_u64(v: u64) -> ConnId {
        ConnId {
            slot: v as u32,
            gen: (v >> 32) as u32,
        }
    }
}

/// Values kept per connection, indexed by slot: no hashing, and no table slack since
/// slots are reused densely. Each value is boxed so that slots of other connections
/// (clients of a table of agents) cost two words.
#[derive(Debug)]
pub struct ConnMap<T> {
    slots: Vec<Option<(u32, Box<T>)>>,
}

impl<T> Default for ConnMap<T> {
    fn default() -> Self {
        ConnMap { slots: Vec::new() }
    }
}

impl<T> ConnMap<T> {
    pub fn insert(&mut self, id: ConnId, value: T) {
        let slot = id.slot as usize;
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        self.slots[slot] = Some((id.gen, Box::new(value)));
    }

    pub fn remove(&mut self, id: ConnId) -> Option<T> {
        let entry = self.slots.get_mut(id.slot as usize)?;
        match entry {
            Some((gen, _)) if *gen == id.gen => entry.take().map(|(_, v)| *v),
            _ => None,
        }
    }

    pub fn get(&self, id: ConnId) -> Option<&T> {
        match self.slots.get(id.slot as usize)? {
            Some((gen, v)) if *gen == id.gen => Some(v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        match self.slots.get_mut(id.slot as usize)? {
            Some((gen, v)) if *gen == id.gen => Some(v),
            _ => None,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (ConnId, &T)> {
        self.slots.iter().enumerate().filter_map(|(slot, e)| {
            e.as_ref().map(|(gen, v)| {
                (
                    ConnId {
                        slot: slot as u32,
                        gen: *gen,
                    },
                    &**v,
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_map_answers_only_for_the_same_generation() {
        let mut m = ConnMap::default();
        let a = ConnId { slot: 3, gen: 1 };
        let reused = ConnId { slot: 3, gen: 2 };
        m.insert(a, "a");
        assert_eq!(m.get(a), Some(&"a"));
        assert_eq!(m.get(reused), None);
        assert_eq!(m.get(ConnId { slot: 9, gen: 1 }), None);
        assert_eq!(m.remove(reused), None);
        *m.get_mut(a).unwrap() = "b";
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(a, &"b")]);
        assert_eq!(m.remove(a), Some("b"));
        assert_eq!(m.get(a), None);
        m.insert(reused, "c");
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(reused, &"c")]);
    }
}
